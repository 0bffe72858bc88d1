"""Hugging Face `save_pretrained` directories: ViTModel / ViTForImageClassification, Dinov2Model,
Dinov2WithRegistersModel, CLIPModel and SiglipModel -- and the way back (`export`).

Key names are the on-disk ones (what `save_pretrained` writes and the hub
holds), not the module names some transformers versions use in memory. Each
model resamples position embeddings at other resolutions as transformers does:
bicubic without antialiasing, except Dinov2WithRegisters (antialiased).
"""
from __future__ import annotations

import json
import logging
import pathlib
from typing import Any

import numpy as np

from lvm_jax.convert import infer
from lvm_jax.convert.core import (
    ConversionError, Rule, attention_rules, chunk, conv, count_indexed, dense_rules, flatten, linear,
    norm_rules, require, unstack_blocks)
from lvm_jax.convert.readers import Checkpoint

VISION_TYPES = ("vit", "dinov2", "dinov2_with_registers")
CLIP_TYPES = ("clip", "siglip")
MODEL_TYPES = VISION_TYPES + CLIP_TYPES

log = logging.getLogger(__name__)


def detect(ck: Checkpoint) -> bool:
    return "model_type" in ck.config


def _prefix(tensors: dict[str, Any], candidates: tuple[str, ...]) -> str:
    for prefix in candidates:
        if any(k.startswith(prefix + "embeddings.") for k in tensors):
            return prefix
    return ""


# --- vision backbones ------------------------------------------------------------------------

def _vision_block_rules(kind: str, p: str, i: int, dst: str, heads: int, qkv_bias: bool,
                        swiglu: bool) -> list[Rule]:
    b = f"{p}encoder.layer.{i}."
    a = b + "attention.attention."
    q, k, v = ((a + f"{n}.weight", (a + f"{n}.bias") if qkv_bias else None, None)
               for n in ("query", "key", "value"))
    out = attention_rules(f"{dst}/attn", heads, q, k, v,
                          (b + "attention.output.dense.weight", b + "attention.output.dense.bias"))
    if kind == "vit":
        out += norm_rules(f"{dst}/norm1", b + "layernorm_before.weight", b + "layernorm_before.bias")
        out += norm_rules(f"{dst}/norm2", b + "layernorm_after.weight", b + "layernorm_after.bias")
        out += dense_rules(f"{dst}/mlp/fc1", b + "intermediate.dense.weight", b + "intermediate.dense.bias")
        out += dense_rules(f"{dst}/mlp/fc2", b + "output.dense.weight", b + "output.dense.bias")
        return out
    out += norm_rules(f"{dst}/norm1", b + "norm1.weight", b + "norm1.bias")
    out += norm_rules(f"{dst}/norm2", b + "norm2.weight", b + "norm2.bias")
    out += [(f"{dst}/ls1/scale", b + "layer_scale1.lambda1", None),
            (f"{dst}/ls2/scale", b + "layer_scale2.lambda1", None)]
    if swiglu:
        w, bias = b + "mlp.weights_in.weight", b + "mlp.weights_in.bias"
        out += [(f"{dst}/mlp/w1/kernel", w, chunk(0, 2, linear)), (f"{dst}/mlp/w1/bias", bias, chunk(0, 2)),
                (f"{dst}/mlp/w2/kernel", w, chunk(1, 2, linear)), (f"{dst}/mlp/w2/bias", bias, chunk(1, 2))]
        out += dense_rules(f"{dst}/mlp/w3", b + "mlp.weights_out.weight", b + "mlp.weights_out.bias")
    else:
        out += dense_rules(f"{dst}/mlp/fc1", b + "mlp.fc1.weight", b + "mlp.fc1.bias")
        out += dense_rules(f"{dst}/mlp/fc2", b + "mlp.fc2.weight", b + "mlp.fc2.bias")
    return out


def convert_vision(ck: Checkpoint) -> tuple[dict[str, Any], Any, Any]:
    """ViT kwargs, make_rules(final kwargs) and an ignore predicate for a ViT / DINOv2 directory."""
    t, cfg, kind = ck.tensors, ck.config, ck.config["model_type"]
    p = _prefix(t, ("vit.", "dinov2.", "dinov2_with_registers."))
    require(t, [f"{p}embeddings.patch_embeddings.projection.weight", f"{p}embeddings.position_embeddings"],
            source=ck.source, what=f"Hugging Face {kind}")
    patch_w = t[f"{p}embeddings.patch_embeddings.projection.weight"]
    width, patch = patch_w.shape[0], tuple(patch_w.shape[2:])
    depth = count_indexed(t, rf"{p}encoder\.layer\.(\d+)\.")
    registers = t[f"{p}embeddings.register_tokens"].shape[1] if f"{p}embeddings.register_tokens" in t else 0
    grid, _ = infer.patch_grid(t[f"{p}embeddings.position_embeddings"].shape[1], (1,), cfg.get("image_size"),
                               patch, ck.source)
    heads = int(cfg.get("num_attention_heads") or infer.default_num_heads(width))
    swiglu = f"{p}encoder.layer.0.mlp.weights_in.weight" in t
    if kind == "vit":
        mlp_dim = t[f"{p}encoder.layer.0.intermediate.dense.weight"].shape[0]
    elif swiglu:
        mlp_dim = infer.swiglu_mlp_dim(t[f"{p}encoder.layer.0.mlp.weights_out.weight"].shape[1], width)
    else:
        mlp_dim = t[f"{p}encoder.layer.0.mlp.fc1.weight"].shape[0]
    head = "classifier.weight" in t and kind == "vit"
    kwargs: dict[str, Any] = dict(
        variant=None, width=width, depth=depth, num_heads=heads, mlp_dim=mlp_dim,
        patch_size=patch[0] if patch[0] == patch[1] else patch,
        image_size=grid[0] * patch[0] if grid[0] == grid[1] else (grid[0] * patch[0], grid[1] * patch[1]),
        num_registers=registers, qkv_bias=bool(cfg.get("qkv_bias", True)),
        act=infer.hf_activation(cfg.get("hidden_act", "gelu"), ck.source),
        norm_eps=float(cfg.get("layer_norm_eps", 1e-12 if kind == "vit" else 1e-6)),
        ffn="swiglu" if swiglu else "mlp", layerscale_init=None if kind == "vit" else 1.0,
        use_mask_token=f"{p}embeddings.mask_token" in t,
        # ViTForImageClassification classifies the CLS token without the pooler (transformers drops
        # pooler weights next to a classifier), so a pooler counts only in a headless ViTModel.
        rep_size=width if f"{p}pooler.dense.weight" in t and not head else None,
        num_classes=t["classifier.weight"].shape[0] if head else None,
        pos_embed_interp="bicubic_antialias" if kind == "dinov2_with_registers" else "bicubic",
    )
    e = f"{p}embeddings."

    def make_rules(kw: dict[str, Any]) -> list[Rule]:
        rules: list[Rule] = [("patch_embed/kernel", e + "patch_embeddings.projection.weight", conv),
                             ("patch_embed/bias", e + "patch_embeddings.projection.bias", None),
                             ("cls_token", e + "cls_token", None), ("pos_embed", e + "position_embeddings", None)]
        if registers:
            rules.append(("reg_tokens", e + "register_tokens", None))
        if kw["use_mask_token"]:
            rules.append(("mask_token", e + "mask_token", lambda m: m.reshape(1, 1, -1)))
        for i in range(depth):
            rules += _vision_block_rules(kind, p, i, f"encoder/blocks_{i}", kw["num_heads"], kw["qkv_bias"], swiglu)
        rules += norm_rules("norm", f"{p}layernorm.weight", f"{p}layernorm.bias")
        if kw["rep_size"]:
            rules += dense_rules("pre_logits", f"{p}pooler.dense.weight", f"{p}pooler.dense.bias")
        if head:
            rules += dense_rules("head", "classifier.weight", "classifier.bias")
        return rules

    # Dinov2ForImageClassification's head sees [cls, mean(patches)]: not our head; load the backbone.
    if kind != "vit" and "classifier.weight" in t:
        log.warning("%s: the %s classifier head (classifier.*, %d classes on [cls, mean(patch tokens)]) was "
                    "not loaded; lvm_jax's ViT has no such head, so only the backbone is returned.", ck.source,
                    kind, t["classifier.weight"].shape[0])
    ignore = lambda key: (kind != "vit" and key.startswith("classifier.")) or (  # noqa: E731
        head and key.startswith(f"{p}pooler."))
    return kwargs, make_rules, ignore


# --- CLIP / SigLIP -----------------------------------------------------------------------------

def _tower_block_rules(p: str, i: int, dst: str, heads: int) -> list[Rule]:
    b = f"{p}encoder.layers.{i}."
    q, k, v = ((b + f"self_attn.{n}_proj.weight", b + f"self_attn.{n}_proj.bias", None) for n in "qkv")
    out = attention_rules(f"{dst}/attn", heads, q, k, v,
                          (b + "self_attn.out_proj.weight", b + "self_attn.out_proj.bias"))
    out += norm_rules(f"{dst}/norm1", b + "layer_norm1.weight", b + "layer_norm1.bias")
    out += norm_rules(f"{dst}/norm2", b + "layer_norm2.weight", b + "layer_norm2.bias")
    out += dense_rules(f"{dst}/mlp/fc1", b + "mlp.fc1.weight", b + "mlp.fc1.bias")
    out += dense_rules(f"{dst}/mlp/fc2", b + "mlp.fc2.weight", b + "mlp.fc2.bias")
    return out


def convert_clip(ck: Checkpoint) -> tuple[dict[str, Any], Any, Any]:
    """CLIP kwargs, make_rules(final kwargs) and an ignore predicate for a CLIPModel / SiglipModel dir."""
    t, cfg, kind = ck.tensors, ck.config, ck.config["model_type"]
    siglip = kind == "siglip"
    vcfg, tcfg = cfg.get("vision_config") or {}, cfg.get("text_config") or {}
    v, x = "vision_model.", "text_model."
    require(t, [v + "embeddings.patch_embedding.weight", x + "embeddings.token_embedding.weight"],
            source=ck.source, what=f"Hugging Face {kind}")
    patch_w = t[v + "embeddings.patch_embedding.weight"]
    vwidth, patch = patch_w.shape[0], tuple(patch_w.shape[2:])
    grid, _ = infer.patch_grid(t[v + "embeddings.position_embedding.weight"].shape[0], (0,) if siglip else (1,),
                               vcfg.get("image_size"), patch, ck.source)
    vdepth = count_indexed(t, r"vision_model\.encoder\.layers\.(\d+)\.")
    vheads = int(vcfg.get("num_attention_heads") or infer.default_num_heads(vwidth))
    vision = dict(
        variant=None, width=vwidth, depth=vdepth, num_heads=vheads,
        mlp_dim=t[v + "encoder.layers.0.mlp.fc1.weight"].shape[0],
        patch_size=patch[0] if patch[0] == patch[1] else patch, image_size=grid[0] * patch[0],
        act=infer.hf_activation(vcfg.get("hidden_act", "gelu_pytorch_tanh" if siglip else "quick_gelu"), ck.source),
        norm_eps=float(vcfg.get("layer_norm_eps", 1e-6 if siglip else 1e-5)), pos_embed_interp="bicubic",
        pre_norm=not siglip, patch_bias=siglip, class_token=not siglip, pos_embed_includes_cls=not siglip,
        pool="map" if siglip else "cls",
    )
    token_w = t[x + "embeddings.token_embedding.weight"]
    twidth = token_w.shape[1]
    theads = int(tcfg.get("num_attention_heads") or infer.default_num_heads(twidth))
    text = dict(
        vocab_size=token_w.shape[0], context_length=t[x + "embeddings.position_embedding.weight"].shape[0],
        width=twidth, depth=count_indexed(t, r"text_model\.encoder\.layers\.(\d+)\."), num_heads=theads,
        mlp_dim=t[x + "encoder.layers.0.mlp.fc1.weight"].shape[0],
        act=infer.hf_activation(tcfg.get("hidden_act", "gelu_pytorch_tanh" if siglip else "quick_gelu"), ck.source),
        norm_eps=float(tcfg.get("layer_norm_eps", 1e-6 if siglip else 1e-5)),
        causal=not siglip, pool="last" if siglip else "eot",
    )
    eos = tcfg.get("eos_token_id")
    if not siglip and eos not in (None, 2, text["vocab_size"] - 1):
        # HF pools at the first eos_token_id; our 'eot' pool takes the largest id, the same
        # token exactly when eos is the last id of the vocabulary (as in CLIP's BPE).
        raise ConversionError(f"{ck.source}: text_config.eos_token_id={eos} is not the largest token id "
                              f"({text['vocab_size'] - 1}), so EOT pooling by argmax would pick another token.")
    if siglip:
        embed_dim = t[x + "head.weight"].shape[0]
        kwargs = dict(embed_dim=embed_dim, vision=vision, text=text, image_projection=False,
                      projection_bias=True, init_logit_bias=0.0)
    else:
        kwargs = dict(embed_dim=t["visual_projection.weight"].shape[0], vision=vision, text=text)

    e = v + "embeddings."

    def make_rules(kw: dict[str, Any]) -> list[Rule]:
        vheads, theads = kw["vision"]["num_heads"], kw["text"]["num_heads"]
        rules: list[Rule] = [("image_tower/patch_embed/kernel", e + "patch_embedding.weight", conv),
                             ("image_tower/pos_embed", e + "position_embedding.weight", lambda w: w[None])]
        if siglip:
            rules.append(("image_tower/patch_embed/bias", e + "patch_embedding.bias", None))
        else:
            rules.append(("image_tower/cls_token", e + "class_embedding", lambda w: w.reshape(1, 1, -1)))
            rules += norm_rules("image_tower/norm_pre", v + "pre_layrnorm.weight", v + "pre_layrnorm.bias")
        for i in range(vdepth):
            rules += _tower_block_rules(v, i, f"image_tower/encoder/blocks_{i}", vheads)
        rules += norm_rules("image_tower/norm", v + "post_layernorm.weight", v + "post_layernorm.bias")
        if siglip:
            h = v + "head."
            w, b = h + "attention.in_proj_weight", h + "attention.in_proj_bias"
            rules.append(("image_tower/map_head/probe", h + "probe", None))
            rules += attention_rules("image_tower/map_head/attn", vheads, (w, b, (0, 3)), (w, b, (1, 3)),
                                     (w, b, (2, 3)), (h + "attention.out_proj.weight", h + "attention.out_proj.bias"))
            rules += norm_rules("image_tower/map_head/norm", h + "layernorm.weight", h + "layernorm.bias")
            rules += dense_rules("image_tower/map_head/mlp/fc1", h + "mlp.fc1.weight", h + "mlp.fc1.bias")
            rules += dense_rules("image_tower/map_head/mlp/fc2", h + "mlp.fc2.weight", h + "mlp.fc2.bias")
            rules += dense_rules("text_proj", x + "head.weight", x + "head.bias")
            rules += [("logit_scale", "logit_scale", lambda s: s.reshape(())),
                      ("logit_bias", "logit_bias", lambda s: s.reshape(()))]
        else:
            rules += dense_rules("image_proj", "visual_projection.weight", None)
            rules += dense_rules("text_proj", "text_projection.weight", None)
            rules.append(("logit_scale", "logit_scale", lambda s: s.reshape(())))
        rules += [("text_tower/token_embed/embedding", x + "embeddings.token_embedding.weight", None),
                  ("text_tower/pos_embed", x + "embeddings.position_embedding.weight", None)]
        for i in range(kw["text"]["depth"]):
            rules += _tower_block_rules(x, i, f"text_tower/encoder/blocks_{i}", theads)
        rules += norm_rules("text_tower/norm", x + "final_layer_norm.weight", x + "final_layer_norm.bias")
        return rules

    return kwargs, make_rules, lambda key: key.endswith("position_ids")


def model_type(ck: Checkpoint) -> str:
    kind = ck.config.get("model_type")
    if kind not in MODEL_TYPES:
        raise ConversionError(f"{ck.source}: Hugging Face model_type {kind!r} is not supported; lvm_jax "
                              f"converts {', '.join(MODEL_TYPES)}.")
    return kind


# --- export ------------------------------------------------------------------------------------

def _t(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.T)


def _heads_to_torch(kernel: np.ndarray) -> np.ndarray:
    """[embed, heads, kv] -> torch [heads*kv, embed]."""
    return np.ascontiguousarray(kernel.reshape(kernel.shape[0], -1).T)


def _block_to_hf(blk: dict[str, Any], kind: str, prefix: str) -> dict[str, np.ndarray]:
    attn = blk["attn"]
    out: dict[str, np.ndarray] = {}
    if kind in ("clip", "siglip"):
        names = {"query": "self_attn.q_proj", "key": "self_attn.k_proj", "value": "self_attn.v_proj"}
        out_name, ln = "self_attn.out_proj", ("layer_norm1", "layer_norm2")
    else:
        names = {n: f"attention.attention.{n}" for n in ("query", "key", "value")}
        out_name = "attention.output.dense"
        ln = ("layernorm_before", "layernorm_after") if kind == "vit" else ("norm1", "norm2")
    for ours, theirs in names.items():
        out[f"{prefix}{theirs}.weight"] = _heads_to_torch(attn[ours]["kernel"])
        if "bias" in attn[ours]:
            out[f"{prefix}{theirs}.bias"] = attn[ours]["bias"].reshape(-1)
    kernel = attn["out"]["kernel"]
    out[f"{prefix}{out_name}.weight"] = np.ascontiguousarray(kernel.reshape(-1, kernel.shape[-1]).T)
    out[f"{prefix}{out_name}.bias"] = attn["out"]["bias"]
    for ours, theirs in zip(("norm1", "norm2"), ln):
        out[f"{prefix}{theirs}.weight"], out[f"{prefix}{theirs}.bias"] = blk[ours]["scale"], blk[ours]["bias"]
    mlp = blk["mlp"]
    if "w1" in mlp:
        out[f"{prefix}mlp.weights_in.weight"] = np.concatenate([_t(mlp["w1"]["kernel"]), _t(mlp["w2"]["kernel"])])
        out[f"{prefix}mlp.weights_in.bias"] = np.concatenate([mlp["w1"]["bias"], mlp["w2"]["bias"]])
        out[f"{prefix}mlp.weights_out.weight"], out[f"{prefix}mlp.weights_out.bias"] = (
            _t(mlp["w3"]["kernel"]), mlp["w3"]["bias"])
    else:
        fc1, fc2 = (("intermediate.dense", "output.dense") if kind == "vit" else ("mlp.fc1", "mlp.fc2"))
        out[f"{prefix}{fc1}.weight"], out[f"{prefix}{fc1}.bias"] = _t(mlp["fc1"]["kernel"]), mlp["fc1"]["bias"]
        out[f"{prefix}{fc2}.weight"], out[f"{prefix}{fc2}.bias"] = _t(mlp["fc2"]["kernel"]), mlp["fc2"]["bias"]
    if "ls1" in blk:
        out[f"{prefix}layer_scale1.lambda1"] = blk["ls1"]["scale"]
        out[f"{prefix}layer_scale2.lambda1"] = blk["ls2"]["scale"]
    elif kind in ("dinov2", "dinov2_with_registers"):
        width = blk["norm1"]["scale"].shape[0]  # DINOv2 always has LayerScale: identity scales are exact
        out[f"{prefix}layer_scale1.lambda1"] = np.ones(width, blk["norm1"]["scale"].dtype)
        out[f"{prefix}layer_scale2.lambda1"] = np.ones(width, blk["norm1"]["scale"].dtype)
    return out


_HF_ACT = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "quick_gelu": "quick_gelu", "relu": "relu",
           "silu": "silu"}


def _vit_kind(vit) -> str:
    """'vit' or 'dinov2' / 'dinov2_with_registers' for a ViT module, or raise why it has no HF twin."""
    width, depth, heads, mlp_dim, patch = vit.dims()
    problems = []
    if not vit.class_token or vit.pool != "cls":
        problems.append("HF ViT/DINOv2 need a class token and pool='cls'")
    if vit.pos_embed != "learned":
        problems.append("a learned position table")
    if getattr(vit, "stem", "patch") != "patch":
        problems.append("a patch-embedding stem (not a convolutional stem)")
    if vit.pre_norm or vit.fc_norm or not vit.final_norm or not vit.patch_bias:
        problems.append("no pre_norm / fc_norm, a final norm and a patch-embedding bias")
    if vit.act not in _HF_ACT:
        problems.append(f"an activation HF knows (not {vit.act!r})")
    dinov2 = vit.layerscale_init is not None or vit.num_registers or vit.ffn == "swiglu" or vit.use_mask_token
    if dinov2 and (vit.num_classes or vit.rep_size):
        problems.append("no classification head or pooler on a DINOv2-style model")
    if problems:
        raise ConversionError("This ViT has no Hugging Face equivalent: " + "; ".join(problems) + ".")
    if not dinov2:
        return "vit"
    return "dinov2_with_registers" if vit.num_registers else "dinov2"


def _vit_to_hf(vit, params: dict[str, Any], prefix: str = "") -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    kind = _vit_kind(vit)
    width, depth, heads, mlp_dim, patch = vit.dims()
    if patch[0] != patch[1]:
        raise ConversionError("Hugging Face ViT/DINOv2 configs need a square patch.")
    image = vit.image_size if isinstance(vit.image_size, int) else tuple(vit.image_size)
    if not isinstance(image, int):
        if image[0] != image[1]:
            raise ConversionError("Hugging Face ViT/DINOv2 configs need a square image_size.")
        image = image[0]
    p = prefix
    pos = params["pos_embed"]
    if not vit.pos_embed_includes_cls:  # HF adds position 0 to the class token: a zero row is exact
        pos = np.concatenate([np.zeros_like(pos[:, :1]), pos], axis=1)
    sd: dict[str, np.ndarray] = {
        f"{p}embeddings.cls_token": params["cls_token"], f"{p}embeddings.position_embeddings": pos,
        f"{p}embeddings.patch_embeddings.projection.weight": params["patch_embed"]["kernel"].transpose(3, 2, 0, 1),
        f"{p}embeddings.patch_embeddings.projection.bias": params["patch_embed"]["bias"],
        f"{p}layernorm.weight": params["norm"]["scale"], f"{p}layernorm.bias": params["norm"]["bias"],
    }
    if "reg_tokens" in params:
        sd[f"{p}embeddings.register_tokens"] = params["reg_tokens"]
    if "mask_token" in params:
        sd[f"{p}embeddings.mask_token"] = params["mask_token"].reshape(1, -1)
    elif kind != "vit":
        sd[f"{p}embeddings.mask_token"] = np.zeros((1, width), params["cls_token"].dtype)
    for i in range(depth):
        sd.update(_block_to_hf(params["encoder"][f"blocks_{i}"], kind, f"{p}encoder.layer.{i}."))
    config: dict[str, Any] = dict(
        model_type=kind, hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
        hidden_act=_HF_ACT[vit.act], layer_norm_eps=vit.norm_eps, image_size=image, patch_size=patch[0],
        num_channels=3, qkv_bias=vit.qkv_bias)
    if kind == "vit":
        config["intermediate_size"] = mlp_dim
        if vit.rep_size:
            if vit.rep_size != width:
                raise ConversionError(f"HF ViT's pooler keeps the width ({width}); rep_size={vit.rep_size} differs.")
            if vit.num_classes:
                raise ConversionError(
                    "HF's ViTForImageClassification classifies the CLS token without a pooler, so this model's "
                    "tanh pre-logits layer (rep_size) has no place there; export it without the head "
                    "(a ViTModel keeps the pooler) or in the lvm / timm format.")
            sd[f"{p}pooler.dense.weight"] = _t(params["pre_logits"]["kernel"])
            sd[f"{p}pooler.dense.bias"] = params["pre_logits"]["bias"]
        config["architectures"] = ["ViTForImageClassification" if vit.num_classes else "ViTModel"]
        if vit.num_classes:
            sd["classifier.weight"], sd["classifier.bias"] = _t(params["head"]["kernel"]), params["head"]["bias"]
            config["id2label"] = {str(i): f"LABEL_{i}" for i in range(vit.num_classes)}
    else:
        # int(width * mlp_ratio) must give mlp_dim back despite float rounding.
        if mlp_dim % width == 0:
            config["mlp_ratio"] = mlp_dim // width  # transformers' Dinov2Config validates an int here
        else:
            config["mlp_ratio"] = mlp_dim / width if int(width * (mlp_dim / width)) == mlp_dim else (mlp_dim + 0.5) / width
        config["use_swiglu_ffn"] = vit.ffn == "swiglu"
        config["layerscale_value"] = 1.0
        config["use_mask_token"] = True
        if vit.num_registers:
            config["num_register_tokens"] = vit.num_registers
        config["architectures"] = ["Dinov2WithRegistersModel" if vit.num_registers else "Dinov2Model"]
    return sd, config


def _clip_to_hf(clip, params: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    from lvm_jax.models.clip import DEFAULT_VISION
    from lvm_jax.models.text import TextTransformer
    from lvm_jax.models.vit import ViT

    vit = ViT(**{**DEFAULT_VISION, **dict(clip.vision or {})})
    text = TextTransformer(**dict(clip.text or {}))
    width, depth, heads, mlp_dim, patch = vit.dims()
    problems = []
    if not (vit.class_token and vit.pool == "cls" and vit.pre_norm and not vit.patch_bias and vit.final_norm
            and vit.pos_embed == "learned" and vit.pos_embed_includes_cls and not vit.num_registers
            and vit.layerscale_init is None and vit.ffn == "mlp" and not vit.fc_norm and vit.qkv_bias):
        problems.append("the image tower must be OpenAI-CLIP shaped (class token, ln_pre, no patch bias, "
                        "plain MLP blocks)")
    if not (text.causal and text.pool == "eot" and not text.pad_mask):
        problems.append("the text tower must be causal with EOT pooling")
    if not clip.image_projection or clip.projection_bias or clip.init_logit_bias is not None:
        problems.append("bias-free projections on both towers and no logit bias")
    if vit.act not in _HF_ACT or text.act not in _HF_ACT or patch[0] != patch[1]:
        problems.append("activations HF knows and a square patch")
    if problems:
        raise ConversionError("This CLIP has no Hugging Face CLIPModel equivalent: " + "; ".join(problems) + ".")
    image = vit.image_size if isinstance(vit.image_size, int) else vit.image_size[0]
    img, txt = params["image_tower"], params["text_tower"]
    v, x = "vision_model.", "text_model."
    sd: dict[str, np.ndarray] = {
        "logit_scale": np.asarray(params["logit_scale"]).reshape(()),
        "visual_projection.weight": _t(params["image_proj"]["kernel"]),
        "text_projection.weight": _t(params["text_proj"]["kernel"]),
        v + "embeddings.class_embedding": img["cls_token"].reshape(-1),
        v + "embeddings.patch_embedding.weight": img["patch_embed"]["kernel"].transpose(3, 2, 0, 1),
        v + "embeddings.position_embedding.weight": img["pos_embed"][0],
        v + "pre_layrnorm.weight": img["norm_pre"]["scale"], v + "pre_layrnorm.bias": img["norm_pre"]["bias"],
        v + "post_layernorm.weight": img["norm"]["scale"], v + "post_layernorm.bias": img["norm"]["bias"],
        x + "embeddings.token_embedding.weight": txt["token_embed"]["embedding"],
        x + "embeddings.position_embedding.weight": txt["pos_embed"],
        x + "final_layer_norm.weight": txt["norm"]["scale"], x + "final_layer_norm.bias": txt["norm"]["bias"],
    }
    for i in range(depth):
        sd.update(_block_to_hf(img["encoder"][f"blocks_{i}"], "clip", f"{v}encoder.layers.{i}."))
    for i in range(text.depth):
        sd.update(_block_to_hf(txt["encoder"][f"blocks_{i}"], "clip", f"{x}encoder.layers.{i}."))
    config = dict(
        architectures=["CLIPModel"], model_type="clip", projection_dim=clip.embed_dim,
        logit_scale_init_value=float(np.asarray(params["logit_scale"])),
        text_config=dict(vocab_size=text.vocab_size, hidden_size=text.width, num_hidden_layers=text.depth,
                         num_attention_heads=text.num_heads, intermediate_size=text.mlp_dim or 4 * text.width,
                         max_position_embeddings=text.context_length, hidden_act=_HF_ACT[text.act],
                         layer_norm_eps=text.norm_eps, projection_dim=clip.embed_dim,
                         # HF pools at the first eos id; the largest id is what 'eot' (argmax) takes.
                         eos_token_id=text.vocab_size - 1, bos_token_id=text.vocab_size - 2, pad_token_id=0),
        vision_config=dict(hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
                           intermediate_size=mlp_dim, image_size=image, patch_size=patch[0], num_channels=3,
                           hidden_act=_HF_ACT[vit.act], layer_norm_eps=vit.norm_eps, projection_dim=clip.embed_dim),
    )
    return sd, config


def export(model, variables: dict[str, Any], directory: str | pathlib.Path) -> pathlib.Path:
    """Writes `model.safetensors` + `config.json` loadable by transformers' `from_pretrained`."""
    from safetensors.numpy import save_file

    from lvm_jax.models.clip import CLIP
    from lvm_jax.models.vit import ViT

    params = variables.get("params", variables)
    params = unstack_blocks(jax_to_numpy(params))
    if isinstance(model, CLIP):
        sd, config = _clip_to_hf(model, params)
    elif isinstance(model, ViT):
        sd, config = _vit_to_hf(model, params)
    else:
        raise ConversionError(f"save_hf exports ViT and CLIP models, not {type(model).__name__}.")
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: np.array(v, dtype=np.float32, order="C") for k, v in sd.items()},
              str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return directory


def jax_to_numpy(tree: dict[str, Any]) -> dict[str, Any]:
    from lvm_jax.convert.core import unbox, unflatten

    return unflatten({k: np.asarray(v) for k, v in flatten(unbox(tree)).items()})
