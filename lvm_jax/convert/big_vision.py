"""big_vision `.npz` checkpoints: ViT classifiers and SigLIP two-tower models (img/ + txt/), plus the
original vision_transformer (AugReg) naming.

The flax names map almost one to one (big_vision's attention keeps heads as an
axis, like ours), so heads are read off the kernels. Scanned checkpoints
(`Transformer/encoderblock/...` with a leading layer axis) are sliced per layer.
big_vision's MLP uses flax's default tanh-approximated GELU, LayerNorm eps 1e-6.
big_vision has no runtime resampling: it resamples the stored table once, at
load time, with scipy.ndimage.zoom(order=1); `resample_posemb_like_big_vision`
does the same for a new image size (load(..., image_size=N) calls it).
At other sizes the ViT falls back to jax.image.resize ('jax').
"""
from __future__ import annotations

import re
from typing import Any

import numpy as np

from lvm_jax.convert import infer
from lvm_jax.convert.core import ConversionError, Rule, count_indexed, layer, require
from lvm_jax.convert.readers import Checkpoint


def detect(ck: Checkpoint) -> bool:
    return ck.path.suffix == ".npz" or any("/" in k for k in ck.tensors)


def _root(t: dict[str, Any]) -> str:
    for root in ("params/", "opt/target/", ""):
        if f"{root}embedding/kernel" in t or f"{root}img/embedding/kernel" in t:
            return root
    return ""


class _Blocks:
    """Key names of one encoder's blocks: unrolled `encoderblock_{i}` or scanned `encoderblock`."""

    def __init__(self, t: dict[str, Any], encoder: str, source: str):
        self.scanned = f"{encoder}encoderblock/LayerNorm_0/scale" in t
        if self.scanned:
            self.depth = t[f"{encoder}encoderblock/LayerNorm_0/scale"].shape[0]
        else:
            self.depth = count_indexed(t, re.escape(encoder) + r"encoderblock_(\d+)/")
        if not self.depth:
            raise ConversionError(f"{source}: no encoder blocks under {encoder!r}.")
        self.encoder = encoder
        # The original vision_transformer names its sub-modules _1, _2, _3.
        first = f"{encoder}encoderblock{'' if self.scanned else '_0'}/"
        self.legacy = f"{first}MultiHeadDotProductAttention_1/query/kernel" in t
        self.first = first

    def key(self, i: int, name: str) -> str:
        if self.legacy:
            name = (name.replace("MultiHeadDotProductAttention_0", "MultiHeadDotProductAttention_1")
                    .replace("LayerNorm_1", "LayerNorm_2").replace("MlpBlock_0", "MlpBlock_3"))
        return f"{self.encoder}encoderblock{'' if self.scanned else f'_{i}'}/{name}"

    def fn(self, i: int):
        return layer(i) if self.scanned else None


def _mha_rules(dst: str, src: str, fn) -> list[Rule]:
    return [(f"{dst}/{n}/{p}", f"{src}{n}/{p}", fn) for n in ("query", "key", "value", "out")
            for p in ("kernel", "bias")]


def _encoder_rules(blocks: _Blocks, dst: str) -> list[Rule]:
    out: list[Rule] = []
    for i in range(blocks.depth):
        d, fn = f"{dst}/blocks_{i}", blocks.fn(i)
        for ours, theirs in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_1")):
            out += [(f"{d}/{ours}/scale", blocks.key(i, f"{theirs}/scale"), fn),
                    (f"{d}/{ours}/bias", blocks.key(i, f"{theirs}/bias"), fn)]
        out += _mha_rules(f"{d}/attn", blocks.key(i, "MultiHeadDotProductAttention_0/"), fn)
        for ours, theirs in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
            out += [(f"{d}/mlp/{ours}/{p}", blocks.key(i, f"MlpBlock_0/{theirs}/{p}"), fn)
                    for p in ("kernel", "bias")]
    return out


def _vit(t: dict[str, Any], p: str, source: str) -> tuple[dict[str, Any], list[Rule]]:
    """ViT kwargs and rules for the image model under key prefix `p`."""
    require(t, [f"{p}embedding/kernel", f"{p}Transformer/encoder_norm/scale"], source=source,
            what="big_vision ViT")
    blocks = _Blocks(t, f"{p}Transformer/", source)
    kernel = t[f"{p}embedding/kernel"]
    patch, width = tuple(kernel.shape[:2]), kernel.shape[-1]
    q = t[blocks.key(0, "MultiHeadDotProductAttention_0/query/kernel")]
    heads = q.shape[-2]
    class_token = f"{p}cls" in t
    legacy_pos = f"{p}Transformer/posembed_input/pos_embedding" in t
    pos_key = f"{p}Transformer/posembed_input/pos_embedding" if legacy_pos else f"{p}pos_embedding"
    kwargs: dict[str, Any] = dict(
        variant=None, width=width, depth=blocks.depth, num_heads=heads,
        mlp_dim=t[blocks.key(0, "MlpBlock_0/Dense_0/kernel")].shape[-1],
        patch_size=patch[0] if patch[0] == patch[1] else patch, class_token=class_token,
        act="gelu_tanh", norm_eps=1e-6, pos_embed_interp="jax", patch_bias=True, pre_norm=False,
        pool="map" if f"{p}MAPHead_0/probe" in t else ("cls" if class_token else "gap"),
        rep_size=t[f"{p}pre_logits/kernel"].shape[-1] if f"{p}pre_logits/kernel" in t else None,
        num_classes=t[f"{p}head/kernel"].shape[-1] if f"{p}head/kernel" in t else None,
    )
    rules: list[Rule] = [("patch_embed/kernel", f"{p}embedding/kernel", None),
                         ("patch_embed/bias", f"{p}embedding/bias", None),
                         ("norm/scale", f"{p}Transformer/encoder_norm/scale", None),
                         ("norm/bias", f"{p}Transformer/encoder_norm/bias", None)]
    if pos_key in t:
        prefix = (1,) if legacy_pos and class_token else (0,)
        grid, _ = infer.patch_grid(t[pos_key].shape[1], prefix, None, patch, source)
        kwargs["image_size"] = grid[0] * patch[0]
        kwargs["pos_embed_includes_cls"] = legacy_pos and class_token
        rules.append(("pos_embed", pos_key, None))
    else:
        kwargs["pos_embed"] = "sincos2d"
        kwargs["image_size"] = 224
    if class_token:
        rules.append(("cls_token", f"{p}cls", None))
    rules += _encoder_rules(blocks, "encoder")
    if kwargs["pool"] == "map":
        m = f"{p}MAPHead_0/"
        rules.append(("map_head/probe", m + "probe", None))
        rules += _mha_rules("map_head/attn", m + "MultiHeadDotProductAttention_0/", None)
        rules += [("map_head/norm/scale", m + "LayerNorm_0/scale", None),
                  ("map_head/norm/bias", m + "LayerNorm_0/bias", None)]
        rules += [(f"map_head/mlp/{ours}/{x}", f"{m}MlpBlock_0/{theirs}/{x}", None)
                  for ours, theirs in (("fc1", "Dense_0"), ("fc2", "Dense_1")) for x in ("kernel", "bias")]
    for name in ("pre_logits", "head"):
        if f"{p}{name}/kernel" in t:
            rules += [(f"{name}/kernel", f"{p}{name}/kernel", None), (f"{name}/bias", f"{p}{name}/bias", None)]
    return kwargs, rules


def convert(ck: Checkpoint) -> tuple[dict[str, Any], Any, Any, str]:
    """(kwargs, make_rules, ignore, 'vit' | 'clip')."""
    t = ck.tensors
    root = _root(t)
    if f"{root}img/embedding/kernel" not in t:
        kwargs, rules = _vit(t, root, ck.source)
        return kwargs, lambda kw: rules, lambda key: False, "vit"

    vision, img_rules = _vit(t, f"{root}img/", ck.source)
    x = f"{root}txt/"
    require(t, [f"{x}Embed_0/embedding", f"{x}pos_embedding", f"{root}t"], source=ck.source,
            what="big_vision two-tower (SigLIP)")
    if vision.pop("num_classes", None) is not None:  # big_vision's img/head is the image projection
        img_rules = [r for r in img_rules if not r[0].startswith("head/")]
    encoder = next((f"{x}{n}/" for n in ("Encoder_0", "Encoder", "Transformer")
                    if f"{x}{n}/encoder_norm/scale" in t), f"{x}Encoder_0/")
    blocks = _Blocks(t, encoder, ck.source)
    token = t[f"{x}Embed_0/embedding"]
    text = dict(vocab_size=token.shape[0], context_length=t[f"{x}pos_embedding"].shape[1], width=token.shape[1],
                depth=blocks.depth, num_heads=t[blocks.key(0, "MultiHeadDotProductAttention_0/query/kernel")].shape[-2],
                mlp_dim=t[blocks.key(0, "MlpBlock_0/Dense_0/kernel")].shape[-1], act="gelu_tanh",
                norm_eps=1e-6, causal=False, pool="last")
    image_proj = f"{root}img/head/kernel" in t
    if f"{x}head/kernel" not in t:
        raise ConversionError(f"{ck.source}: the text tower has no head (txt/head); lvm_jax's CLIP needs a "
                              "text projection.")
    embed_dim = t[f"{x}head/kernel"].shape[-1]
    kwargs = dict(embed_dim=embed_dim, vision=vision, text=text, image_projection=image_proj,
                  projection_bias=True, init_logit_bias=0.0 if f"{root}b" in t else None)
    rules: list[Rule] = [(f"image_tower/{dst}", src, fn) for dst, src, fn in img_rules]
    if image_proj:
        rules += [("image_proj/kernel", f"{root}img/head/kernel", None),
                  ("image_proj/bias", f"{root}img/head/bias", None)]
    rules += [("text_tower/token_embed/embedding", f"{x}Embed_0/embedding", None),
              ("text_tower/pos_embed", f"{x}pos_embedding", lambda w: w[0]),
              ("text_tower/norm/scale", f"{encoder}encoder_norm/scale", None),
              ("text_tower/norm/bias", f"{encoder}encoder_norm/bias", None),
              ("text_proj/kernel", f"{x}head/kernel", None), ("text_proj/bias", f"{x}head/bias", None),
              ("logit_scale", f"{root}t", lambda s: s.reshape(()))]
    rules += _encoder_rules(blocks, "text_tower/encoder")
    if f"{root}b" in t:
        rules.append(("logit_bias", f"{root}b", lambda s: s.reshape(())))
    return kwargs, lambda kw: rules, lambda key: False, "clip"


def resize_position_table(ck: Checkpoint, image_size: int) -> None:
    """Resamples the stored position table(s) of `ck` in place for `image_size`, as big_vision loads them."""
    root = _root(ck.tensors)
    p = f"{root}img/" if f"{root}img/embedding/kernel" in ck.tensors else root
    key = f"{p}pos_embedding"
    if key not in ck.tensors:
        raise ConversionError(f"{ck.source}: image_size=... resamples big_vision's {key!r}, which this "
                              "checkpoint does not have.")
    patch = ck.tensors[f"{p}embedding/kernel"].shape[0]
    if image_size % patch:
        raise ConversionError(f"image_size {image_size} is not a multiple of the patch size {patch}.")
    ck.tensors[key] = resample_posemb_like_big_vision(np.asarray(ck.tensors[key]), image_size // patch)


def resample_posemb_like_big_vision(pos_embed: np.ndarray, new_grid: int) -> np.ndarray:
    """big_vision's resample_posemb: `[1, g*g, D]` -> `[1, new*new, D]` with scipy.ndimage.zoom(order=1)."""
    import scipy.ndimage

    old = infer.square_grid(pos_embed.shape[1])
    if old is None:
        raise ConversionError(f"pos_embed with {pos_embed.shape[1]} rows is not a square grid.")
    if old == new_grid:
        return pos_embed
    grid = np.asarray(pos_embed, np.float32).reshape(old, old, -1)
    zoomed = scipy.ndimage.zoom(grid, (new_grid / old, new_grid / old, 1), order=1)
    return zoomed.reshape(1, new_grid * new_grid, -1)
