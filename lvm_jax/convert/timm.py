"""timm VisionTransformer checkpoints (hub layout: config.json with "architecture" + model.safetensors).

Covers the plain, CLIP-tower (pre_norm, no patch bias), register, DINOv2-style
(LayerScale, packed SwiGLU), avg-pool/fc_norm and MAP-pool (SigLIP) variants.
What the shapes cannot say (heads, activation, LayerNorm eps) comes from
config.json's `model_args`, which hold only what the user passed to
`create_model`; the architecture's own defaults come from the generated table
`timm_arch_defaults` (e.g. SigLIP 2's tanh GELU, giant-opt's 16 heads), else
from the name and width (timm's CLIP towers use LayerNorm eps 1e-5,
'*quickgelu*' towers QuickGELU, heads = infer.default_num_heads(width)).
Architectures timm builds from another class (Perception Encoder, RoPE,
hybrid, relpos, DINOv3 ...) are refused. Position embeddings are resampled at
other resolutions like timm's `dynamic_img_size=True` (bicubic, antialiased).
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from lvm_jax.convert import infer, timm_arch_defaults
from lvm_jax.convert.core import (
    ConversionError, Rule, attention_rules, chunk, concat, conv, count_indexed, dense_rules, linear,
    norm_rules, require)
from lvm_jax.convert.readers import Checkpoint

VIT_PREFIXES = ("vit_", "deit_", "deit3_", "flexivit_")  # names of timm's VisionTransformer models
_POOLS = {"token": "cls", "avg": "gap", "map": "map", "": "none"}
# timm act_layer names (timm lowercases them) -> our ViT's `act`; '' is no layer, for which timm's ViT uses GELU.
_ACTS = {"gelu": "gelu", "gelu_tanh": "gelu_tanh", "quick_gelu": "quick_gelu", "silu": "silu", "swish": "silu",
         "relu": "relu", "": "gelu"}
# `vit_*` families timm builds from classes other than VisionTransformer (eva.py: Perception Encoder, RoPE,
# DINOv3, sapiens, lingbot, MCi; hybrid CNN stems; relpos; deit's distilled twin). Consulted only for names
# missing from the generated table (another timm version); the generator checks it covers timm's own.
_NOT_VIT = re.compile(r"^vit_pe_|_rope_|dinov3|^vit_s?relpos_|_r\d+_s\d+|_r_s\d+|resnet|^vit_base_mci_|sapiens|"
                      r"lingbot|distilled")


def guess_defaults(arch: str, width: int) -> dict[str, Any]:
    """What the name and width suggest (the table lists only the architectures where this is wrong)."""
    try:
        heads = infer.default_num_heads(width)
    except ConversionError:
        heads = None
    return dict(num_heads=heads, act="quick_gelu" if "quickgelu" in arch else "gelu",
                norm_eps=1e-5 if "_clip_" in arch else 1e-6)


def check_architecture(arch: str, source: str) -> str:
    """The bare timm model name of a VisionTransformer architecture; ConversionError for any other."""
    name = arch.partition(".")[0]  # 'vit_x.tag' -> 'vit_x' (hub configs store the bare name anyway)
    refuse = f"{source}: timm architecture {arch!r} is not a VisionTransformer"
    convertible = f"lvm_jax converts timm VisionTransformer models ({', '.join(p + '*' for p in VIT_PREFIXES)})."
    if not name.startswith(VIT_PREFIXES):
        raise ConversionError(f"{refuse}; {convertible}")
    if name in timm_arch_defaults.REFUSED:
        raise ConversionError(f"{source}: timm architecture {arch!r} uses "
                              f"{timm_arch_defaults.REFUSED[name]}, which lvm_jax's ViT lacks.")
    if name not in timm_arch_defaults.VIT_ARCHS and _NOT_VIT.search(name):
        raise ConversionError(f"{refuse} (timm builds it from another class, e.g. with RoPE or a CNN stem); "
                              f"{convertible}")
    return name


def resolve_defaults(name: str, width: int, args: Mapping[str, Any],
                     source: str) -> tuple[dict[str, Any], dict[str, str]]:
    """num_heads / act / norm_eps, and {field: error} for those only the user can supply (left None).

    Order: config.json model_args, the generated table, then the name/width guess where it is known to
    be right (a table architecture at its default width) or all there is (a bare state dict). An
    unknown name (another timm version) keeps the guess unless timm's own ViTs show it is ambiguous.
    The errors are raised by `rules` on the final kwargs, so the override they ask for satisfies them.
    """
    guess = guess_defaults(name, width)
    table = timm_arch_defaults.DEFAULTS.get(name, {})
    known = name in timm_arch_defaults.VIT_ARCHS
    unlisted = f"timm architecture {name!r} is not in lvm_jax's table of timm ViT defaults"
    out: dict[str, Any] = {"num_heads": None, "act": None,
                           "norm_eps": table.get("norm_eps", guess["norm_eps"])}  # model_args hold no norm_layer
    ask: dict[str, str] = {}

    if args.get("num_heads"):
        out["num_heads"] = int(args["num_heads"])
    elif "num_heads" in table:
        out["num_heads"] = table["num_heads"]
    elif known and "embed_dim" in args:
        # timm keeps the architecture's default head count whatever embed_dim is; the width cannot show it.
        ask["num_heads"] = (f"config.json model_args set embed_dim but not num_heads, so timm kept {name!r}'s "
                            "default head count, which the weights do not show")
    elif not known and width in timm_arch_defaults.AMBIGUOUS_HEADS and name:
        counts = " or ".join(map(str, timm_arch_defaults.AMBIGUOUS_HEADS[width]))
        ask["num_heads"] = f"{unlisted}, and timm ViTs of width {width} use {counts} heads"
    elif guess["num_heads"] is None:
        ask["num_heads"] = f"cannot infer the number of attention heads for width {width}"
    else:
        out["num_heads"] = guess["num_heads"]

    act = args.get("act_layer")
    if act is not None:
        if not isinstance(act, str) or act.lower() not in _ACTS:
            # No `act` override can stand in for another activation: refuse instead of asking for one.
            raise ConversionError(f"{source}: config.json model_args act_layer={act!r} has no equivalent in "
                                  f"lvm_jax's ViT; supported: {sorted(k for k in _ACTS if k)}.")
        out["act"] = _ACTS[act.lower()]
    elif "act" in table or known or "siglip" not in name:
        out["act"] = table.get("act", guess["act"])
    else:
        # timm's SigLIP towers use exact GELU (SigLIP 1) or tanh GELU (SigLIP 2); the name does not say which.
        ask["act"] = f"{unlisted}, and timm's SigLIP towers use either 'gelu' or 'gelu_tanh'"
    return out, {k: f"{source}: {why}; pass {k}=... (CLI: --set {k}=...)." for k, why in ask.items()}


def detect(ck: Checkpoint) -> bool:
    return "architecture" in ck.config or "patch_embed.proj.weight" in ck.tensors


def infer_config(ck: Checkpoint) -> tuple[dict[str, Any], dict[str, Any]]:
    """(ViT kwargs, facts the rules need) from shapes + config.json."""
    t, cfg = ck.tensors, ck.config
    arch = cfg.get("architecture", "")
    name = check_architecture(arch, ck.source) if arch else ""
    require(t, ["patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight",
                "blocks.0.mlp.fc2.weight"], source=ck.source, what="timm VisionTransformer")
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

    defaults, ask = resolve_defaults(name, width, args, ck.source)
    if swiglu and args.get("act_layer") is not None and defaults["act"] != "silu":
        # Our SwiGLU always gates with SiLU (as every timm SwiGLU architecture does).
        raise ConversionError(f"{ck.source}: a SwiGLU MLP gated by act_layer={args['act_layer']!r}; lvm_jax's "
                              "SwiGLU gates with silu only, so this checkpoint cannot be converted.")
    facts: dict[str, Any] = {"swiglu_hidden": hidden if swiglu else None, "fold_prefix_pos": False, "ask": ask}
    kwargs: dict[str, Any] = dict(
        variant=None, width=width, depth=depth, mlp_dim=mlp_dim,
        num_heads=defaults["num_heads"],
        patch_size=patch[0] if patch[0] == patch[1] else patch,
        class_token=class_token, num_registers=registers,
        ffn="swiglu" if swiglu else "mlp",
        qkv_bias="blocks.0.attn.qkv.bias" in t, patch_bias="patch_embed.proj.bias" in t,
        layerscale_init=1e-5 if "blocks.0.ls1.gamma" in t else None,
        pre_norm="norm_pre.weight" in t, final_norm="norm.weight" in t, fc_norm="fc_norm.weight" in t,
        norm_eps=defaults["norm_eps"], act=defaults["act"],
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
    for field, error in facts.get("ask", {}).items():
        # Checked here, on the final kwargs, so that the override the error asks for satisfies it.
        if kwargs.get(field) is None:
            raise ConversionError(error)
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
