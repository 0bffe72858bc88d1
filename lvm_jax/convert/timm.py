"""timm VisionTransformer checkpoints (hub layout: config.json with "architecture" + model.safetensors).

Covers the plain, CLIP-tower (pre_norm, no patch bias), register, DINOv2-style
(LayerScale, packed SwiGLU), avg-pool/fc_norm and MAP-pool (SigLIP) variants.
What the shapes cannot say comes from config.json: `model_args` first, then the
architecture name (timm's CLIP towers use LayerNorm eps 1e-5; '*quickgelu*'
towers use QuickGELU). Position embeddings are resampled at other resolutions
like timm's `dynamic_img_size=True` (bicubic, antialiased).
"""
from __future__ import annotations

from typing import Any

from lvm_jax.convert import infer
from lvm_jax.convert.core import (
    ConversionError, Rule, attention_rules, chunk, concat, conv, count_indexed, dense_rules, linear,
    norm_rules, require)
from lvm_jax.convert.readers import Checkpoint

VIT_PREFIXES = ("vit_", "deit_", "deit3_", "flexivit_")  # names of timm's VisionTransformer models
_POOLS = {"token": "cls", "avg": "gap", "map": "map", "": "none"}
_ACTS = {"gelu": "gelu", "gelu_tanh": "gelu_tanh", "quick_gelu": "quick_gelu", "silu": "silu", "relu": "relu"}


def detect(ck: Checkpoint) -> bool:
    return "architecture" in ck.config or "patch_embed.proj.weight" in ck.tensors


def infer_config(ck: Checkpoint) -> tuple[dict[str, Any], dict[str, Any]]:
    """(ViT kwargs, facts the rules need) from shapes + config.json."""
    t, cfg = ck.tensors, ck.config
    arch = cfg.get("architecture", "")
    if arch and not arch.startswith(VIT_PREFIXES):
        raise ConversionError(f"{ck.source}: timm architecture {arch!r} is not a VisionTransformer; lvm_jax "
                              f"converts timm models named {', '.join(p + '*' for p in VIT_PREFIXES)}.")
    require(t, ["patch_embed.proj.weight", "blocks.0.attn.qkv.weight"], source=ck.source,
            what="timm VisionTransformer")
    args = dict(cfg.get("model_args") or {})
    patch_w = t["patch_embed.proj.weight"]
    width, patch = patch_w.shape[0], tuple(patch_w.shape[2:])
    depth = count_indexed(t, r"blocks\.(\d+)\.")
    class_token = "cls_token" in t
    registers = t["reg_token"].shape[1] if "reg_token" in t else 0
    num_prefix = int(class_token) + registers

    fc1, fc2 = t["blocks.0.mlp.fc1.weight"], t["blocks.0.mlp.fc2.weight"]
    swiglu = fc1.shape[0] == 2 * fc2.shape[1]  # timm's SwiGLUPacked: fc1 holds [w1; w2]
    hidden = fc2.shape[1]
    mlp_dim = infer.swiglu_mlp_dim(hidden, width) if swiglu else hidden

    facts: dict[str, Any] = {"swiglu_hidden": hidden if swiglu else None, "fold_prefix_pos": False}
    kwargs: dict[str, Any] = dict(
        variant=None, width=width, depth=depth, mlp_dim=mlp_dim,
        num_heads=int(args.get("num_heads") or infer.default_num_heads(width)),
        patch_size=patch[0] if patch[0] == patch[1] else patch,
        class_token=class_token, num_registers=registers,
        ffn="swiglu" if swiglu else "mlp",
        qkv_bias="blocks.0.attn.qkv.bias" in t, patch_bias="patch_embed.proj.bias" in t,
        layerscale_init=1e-5 if "blocks.0.ls1.gamma" in t else None,
        pre_norm="norm_pre.weight" in t, final_norm="norm.weight" in t, fc_norm="fc_norm.weight" in t,
        norm_eps=1e-5 if "_clip_" in arch else 1e-6,
        act=_ACTS.get(str(args.get("act_layer", "")), "quick_gelu" if "quickgelu" in arch else "gelu"),
        num_classes=t["head.weight"].shape[0] if "head.weight" in t else None,
        pos_embed_interp="bicubic_antialias",
    )
    pool = cfg.get("global_pool", args.get("global_pool"))
    if pool is None:
        pool = "map" if "attn_pool.latent" in t else ("avg" if kwargs["fc_norm"] or not class_token else "token")
    if pool not in _POOLS:
        raise ConversionError(f"{ck.source}: timm global_pool {pool!r} has no ViT equivalent; supported: "
                              f"{sorted(_POOLS)}.")
    kwargs["pool"] = _POOLS[pool]

    if "pos_embed" in t:
        image_size = args.get("img_size") or (cfg.get("pretrained_cfg") or {}).get("input_size")
        grid, prefix = infer.patch_grid(t["pos_embed"].shape[1], (0, num_prefix), image_size, patch,
                                        ck.source)
        kwargs["image_size"] = grid[0] * patch[0] if grid[0] == grid[1] and patch[0] == patch[1] else (
            grid[0] * patch[0], grid[1] * patch[1])
        kwargs["pos_embed_includes_cls"] = prefix > 0 and class_token
        # Register positions (timm without no_embed_class) are constants added to constant
        # tokens: fold them into reg_tokens, which is exact.
        facts["fold_prefix_pos"] = prefix > 0 and registers > 0
        facts["pos_prefix"] = prefix
    else:
        kwargs["pos_embed"] = "none"
    return kwargs, facts


def convert(ck: Checkpoint) -> tuple[dict[str, Any], Any, Any]:
    """ViT kwargs, make_rules(final kwargs) and an ignore predicate."""
    kwargs, facts = infer_config(ck)
    return kwargs, lambda kw: rules(kw, facts), lambda key: False


def rules(kwargs: dict[str, Any], facts: dict[str, Any], src: str = "") -> list[Rule]:
    """Rules from a timm state dict (key prefix `src`, e.g. 'visual.trunk.') to our ViT tree."""
    heads, depth = kwargs["num_heads"], kwargs["depth"]
    out: list[Rule] = [("patch_embed/kernel", f"{src}patch_embed.proj.weight", conv)]
    if kwargs["patch_bias"]:
        out.append(("patch_embed/bias", f"{src}patch_embed.proj.bias", None))
    if kwargs["class_token"]:
        out.append(("cls_token", f"{src}cls_token", None))
    regs = kwargs["num_registers"]
    cls_slots = int(kwargs["class_token"])
    if kwargs.get("pos_embed", "learned") == "learned":
        if facts["fold_prefix_pos"]:
            out.append(("reg_tokens", (f"{src}reg_token", f"{src}pos_embed"),
                        lambda r, p: r + p[:, cls_slots:cls_slots + regs]))
            out.append(("pos_embed", f"{src}pos_embed",
                        lambda p: concat([p[:, :cls_slots], p[:, cls_slots + regs:]], axis=1)))
        else:
            out.append(("pos_embed", f"{src}pos_embed", None))
            if regs:
                out.append(("reg_tokens", f"{src}reg_token", None))
    elif regs:
        out.append(("reg_tokens", f"{src}reg_token", None))
    if kwargs["pre_norm"]:
        out += norm_rules("norm_pre", f"{src}norm_pre.weight", f"{src}norm_pre.bias")
    bias = kwargs["qkv_bias"]
    for i in range(depth):
        b, d = f"{src}blocks.{i}.", f"encoder/blocks_{i}"
        qkv_w, qkv_b = b + "attn.qkv.weight", (b + "attn.qkv.bias") if bias else None
        out += norm_rules(f"{d}/norm1", b + "norm1.weight", b + "norm1.bias")
        out += attention_rules(f"{d}/attn", heads, (qkv_w, qkv_b, (0, 3)), (qkv_w, qkv_b, (1, 3)),
                               (qkv_w, qkv_b, (2, 3)), (b + "attn.proj.weight", b + "attn.proj.bias"))
        out += norm_rules(f"{d}/norm2", b + "norm2.weight", b + "norm2.bias")
        if kwargs["layerscale_init"] is not None:
            out += [(f"{d}/ls1/scale", b + "ls1.gamma", None), (f"{d}/ls2/scale", b + "ls2.gamma", None)]
        if kwargs["ffn"] == "swiglu":
            out += [(f"{d}/mlp/w1/kernel", b + "mlp.fc1.weight", chunk(0, 2, linear)),
                    (f"{d}/mlp/w1/bias", b + "mlp.fc1.bias", chunk(0, 2)),
                    (f"{d}/mlp/w2/kernel", b + "mlp.fc1.weight", chunk(1, 2, linear)),
                    (f"{d}/mlp/w2/bias", b + "mlp.fc1.bias", chunk(1, 2))]
            out += dense_rules(f"{d}/mlp/w3", b + "mlp.fc2.weight", b + "mlp.fc2.bias")
        else:
            out += dense_rules(f"{d}/mlp/fc1", b + "mlp.fc1.weight", b + "mlp.fc1.bias")
            out += dense_rules(f"{d}/mlp/fc2", b + "mlp.fc2.weight", b + "mlp.fc2.bias")
    if kwargs["final_norm"]:
        out += norm_rules("norm", f"{src}norm.weight", f"{src}norm.bias")
    if kwargs["fc_norm"]:
        out += norm_rules("fc_norm", f"{src}fc_norm.weight", f"{src}fc_norm.bias")
    if kwargs["pool"] == "map":
        a = f"{src}attn_pool."
        out.append(("map_head/probe", a + "latent", None))
        out += attention_rules("map_head/attn", heads, (a + "q.weight", a + "q.bias", None),
                               (a + "kv.weight", a + "kv.bias", (0, 2)), (a + "kv.weight", a + "kv.bias", (1, 2)),
                               (a + "proj.weight", a + "proj.bias"))
        out += norm_rules("map_head/norm", a + "norm.weight", a + "norm.bias")
        out += dense_rules("map_head/mlp/fc1", a + "mlp.fc1.weight", a + "mlp.fc1.bias")
        out += dense_rules("map_head/mlp/fc2", a + "mlp.fc2.weight", a + "mlp.fc2.bias")
    if kwargs["num_classes"]:
        out += dense_rules("head", f"{src}head.weight", f"{src}head.bias")
    return out
