"""OpenAI CLIP and open_clip checkpoints (state-dict .pt/.bin/.safetensors, OpenAI's TorchScript .pt,
or an open_clip hub folder with open_clip_config.json).

The shapes give every size. Heads: with open_clip_config.json, vision width //
head_width and text heads, defaulting as open_clip does (head_width 64, heads
8); a bare state dict gets OpenAI's rule (width // 64, with the usual
exceptions, see infer.default_num_heads). Activation: OpenAI weights
use QuickGELU -- taken from open_clip_config.json's "quick_gelu", from a
TorchScript archive (only OpenAI ships those), or from 'openai' / 'quickgelu'
in the file name; otherwise exact GELU. Pass act=... when in doubt. Position
embeddings are resampled like open_clip's resize_pos_embed (bicubic,
antialiased).
"""
from __future__ import annotations

from typing import Any

from lvm_jax.convert import infer
from lvm_jax.convert.core import (
    ConversionError, Rule, attention_rules, conv, count_indexed, dense_rules, norm_rules, require)
from lvm_jax.convert.readers import Checkpoint

# open_clip's defaults (CLIPVisionCfg.head_width, CLIPTextCfg.heads) for configs that leave them out.
_HEAD_WIDTH, _TEXT_HEADS = 64, 8
# Scalars OpenAI's state dicts carry besides the weights.
_OPENAI_SCALARS = ("input_resolution", "context_length", "vocab_size")
_SUPPORTED_VISION = {"image_size", "layers", "width", "head_width", "mlp_ratio", "patch_size", "pool_type",
                     "final_ln_after_pool", "no_ln_pre", "ls_init_value", "act_kwargs", "norm_kwargs",
                     "output_tokens", "patch_dropout", "pos_embed_type"}
_SUPPORTED_TEXT = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "pool_type",
                   "no_causal_mask", "act_kwargs", "norm_kwargs", "output_tokens", "pad_id", "ls_init_value",
                   "final_ln_after_pool", "proj_bias", "embed_cls"}


def detect(ck: Checkpoint) -> bool:
    return "visual.conv1.weight" in ck.tensors or "visual.class_embedding" in ck.tensors


def _act(cfg: dict[str, Any], quick_gelu: bool) -> str:
    if quick_gelu:
        return "quick_gelu"
    return "gelu_tanh" if (cfg.get("act_kwargs") or {}).get("approximate") == "tanh" else "gelu"


def _check_options(cfg: dict[str, Any], supported: set[str], tower: str, source: str) -> None:
    unsupported = sorted(k for k, v in cfg.items() if k not in supported and v not in (None, False, "", 0))
    if cfg.get("pos_embed_type", "learnable") != "learnable":
        unsupported.append("pos_embed_type")
    if cfg.get("embed_cls"):
        unsupported.append("embed_cls")
    if unsupported:
        raise ConversionError(f"{source}: open_clip {tower}_cfg options {unsupported} have no lvm_jax equivalent.")


def _block_rules(p: str, i: int, dst: str, heads: int, layerscale: bool) -> list[Rule]:
    b = f"{p}transformer.resblocks.{i}."
    w, bias = b + "attn.in_proj_weight", b + "attn.in_proj_bias"
    out = attention_rules(f"{dst}/attn", heads, (w, bias, (0, 3)), (w, bias, (1, 3)), (w, bias, (2, 3)),
                          (b + "attn.out_proj.weight", b + "attn.out_proj.bias"))
    out += norm_rules(f"{dst}/norm1", b + "ln_1.weight", b + "ln_1.bias")
    out += norm_rules(f"{dst}/norm2", b + "ln_2.weight", b + "ln_2.bias")
    out += dense_rules(f"{dst}/mlp/fc1", b + "mlp.c_fc.weight", b + "mlp.c_fc.bias")
    out += dense_rules(f"{dst}/mlp/fc2", b + "mlp.c_proj.weight", b + "mlp.c_proj.bias")
    if layerscale:
        out += [(f"{dst}/ls1/scale", b + "ls_1.gamma", None), (f"{dst}/ls2/scale", b + "ls_2.gamma", None)]
    return out


def convert(ck: Checkpoint) -> tuple[dict[str, Any], Any, Any]:
    """CLIP kwargs, make_rules(final kwargs) and an ignore predicate."""
    t = ck.tensors
    require(t, ["visual.conv1.weight", "visual.positional_embedding", "token_embedding.weight",
                "positional_embedding", "ln_final.weight"], source=ck.source, what="CLIP (OpenAI / open_clip)")
    if "text.token_embedding.weight" in t or "visual.trunk.patch_embed.proj.weight" in t:
        raise ConversionError(f"{ck.source} is an open_clip CustomTextCLIP (timm/HF towers), which lvm_jax "
                              "does not convert; use the tower's own format (timm) or an HF export.")
    model_cfg = dict((ck.open_clip_config or {}).get("model_cfg") or {})
    vcfg, tcfg = dict(model_cfg.get("vision_cfg") or {}), dict(model_cfg.get("text_cfg") or {})
    if not isinstance(vcfg.get("layers", 12), int):
        raise ConversionError(f"{ck.source}: a ModifiedResNet image tower is not a ViT; lvm_jax converts ViT CLIPs.")
    _check_options(vcfg, _SUPPORTED_VISION, "vision", ck.source)
    _check_options(tcfg, _SUPPORTED_TEXT, "text", ck.source)
    name = ck.path.name.lower()
    quick = bool(model_cfg.get("quick_gelu")) if model_cfg else (
        ck.torchscript or "openai" in name or "quickgelu" in name)

    conv1 = t["visual.conv1.weight"]
    vwidth, patch = conv1.shape[0], tuple(conv1.shape[2:])
    grid, _ = infer.patch_grid(t["visual.positional_embedding"].shape[0], (1,), vcfg.get("image_size"), patch,
                               ck.source)
    # A config that omits head_width / heads relies on open_clip's CLIPVisionCfg / CLIPTextCfg defaults;
    # only a bare state dict (no config at all) falls back to the width rule.
    vheads = vwidth // int(vcfg.get("head_width") or _HEAD_WIDTH) if model_cfg else infer.default_num_heads(vwidth)
    pool = vcfg.get("pool_type", "tok")
    if pool not in ("tok", "avg"):
        raise ConversionError(f"{ck.source}: open_clip vision pool_type {pool!r} is not supported (tok, avg).")
    ln_after_pool = bool(vcfg.get("final_ln_after_pool")) and pool == "avg"
    vision = dict(
        variant=None, width=vwidth, depth=count_indexed(t, r"visual\.transformer\.resblocks\.(\d+)\."),
        num_heads=vheads, mlp_dim=t["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        patch_size=patch[0] if patch[0] == patch[1] else patch,
        image_size=grid[0] * patch[0] if grid[0] == grid[1] else (grid[0] * patch[0], grid[1] * patch[1]),
        act=_act(vcfg, quick), norm_eps=float((vcfg.get("norm_kwargs") or {}).get("eps", 1e-5)),
        pre_norm="visual.ln_pre.weight" in t, patch_bias="visual.conv1.bias" in t,
        layerscale_init=1e-5 if "visual.transformer.resblocks.0.ls_1.gamma" in t else None,
        pool="cls" if pool == "tok" else "gap", final_norm=not ln_after_pool, fc_norm=ln_after_pool,
        pos_embed_interp="bicubic_antialias",
    )
    twidth = t["ln_final.weight"].shape[0]
    text_pools = {"argmax": "eot", "first": "first", "last": "last"}
    tpool = tcfg.get("pool_type", "argmax")
    if tpool not in text_pools or tcfg.get("final_ln_after_pool"):
        raise ConversionError(f"{ck.source}: open_clip text pooling {tpool!r} (final_ln_after_pool="
                              f"{bool(tcfg.get('final_ln_after_pool'))}) is not supported.")
    if "transformer.resblocks.0.ls_1.gamma" in t:
        raise ConversionError(f"{ck.source}: the text tower uses LayerScale, which lvm_jax's text tower lacks.")
    text = dict(
        vocab_size=t["token_embedding.weight"].shape[0], context_length=t["positional_embedding"].shape[0],
        width=twidth, depth=count_indexed(t, r"transformer\.resblocks\.(\d+)\."),
        num_heads=int(tcfg.get("heads") or _TEXT_HEADS) if model_cfg else infer.default_num_heads(twidth),
        mlp_dim=t["transformer.resblocks.0.mlp.c_fc.weight"].shape[0], act=_act(tcfg, quick),
        norm_eps=float((tcfg.get("norm_kwargs") or {}).get("eps", 1e-5)), causal=not tcfg.get("no_causal_mask"),
        pool=text_pools[tpool],
    )
    linear_proj = "text_projection.weight" in t  # open_clip's proj_type='linear' text towers
    embed_dim = t["text_projection.weight"].shape[0] if linear_proj else t["text_projection"].shape[1]
    kwargs: dict[str, Any] = dict(embed_dim=embed_dim, vision=vision, text=text)
    if "logit_bias" in t:
        kwargs["init_logit_bias"] = 0.0
    if "text_projection.bias" in t:
        raise ConversionError(f"{ck.source}: a text projection with bias but none on the image side is not "
                              "representable (CLIP.projection_bias applies to both).")

    def make_rules(kw: dict[str, Any]) -> list[Rule]:
        vision, text = kw["vision"], kw["text"]
        rules: list[Rule] = [("image_tower/patch_embed/kernel", "visual.conv1.weight", conv),
                             ("image_tower/cls_token", "visual.class_embedding", lambda w: w.reshape(1, 1, -1)),
                             ("image_tower/pos_embed", "visual.positional_embedding", lambda w: w[None]),
                             ("image_proj/kernel", "visual.proj", None),
                             ("logit_scale", "logit_scale", lambda s: s.reshape(()))]
        if vision["patch_bias"]:
            rules.append(("image_tower/patch_embed/bias", "visual.conv1.bias", None))
        if vision["pre_norm"]:
            rules += norm_rules("image_tower/norm_pre", "visual.ln_pre.weight", "visual.ln_pre.bias")
        for i in range(vision["depth"]):
            rules += _block_rules("visual.", i, f"image_tower/encoder/blocks_{i}", vision["num_heads"],
                                  vision["layerscale_init"] is not None)
        rules += norm_rules("image_tower/fc_norm" if ln_after_pool else "image_tower/norm",
                            "visual.ln_post.weight", "visual.ln_post.bias")
        rules += [("text_tower/token_embed/embedding", "token_embedding.weight", None),
                  ("text_tower/pos_embed", "positional_embedding", None)]
        for i in range(text["depth"]):
            rules += _block_rules("", i, f"text_tower/encoder/blocks_{i}", text["num_heads"], False)
        rules += norm_rules("text_tower/norm", "ln_final.weight", "ln_final.bias")
        rules.append(("text_proj/kernel", "text_projection.weight", lambda w: w.T) if linear_proj
                     else ("text_proj/kernel", "text_projection", None))
        if "logit_bias" in t:
            rules.append(("logit_bias", "logit_bias", lambda s: s.reshape(())))
        return rules

    ignore = lambda key: key in _OPENAI_SCALARS or key == "attn_mask"  # noqa: E731
    return kwargs, make_rules, ignore
