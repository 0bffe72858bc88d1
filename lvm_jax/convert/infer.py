"""Architecture inference: what the shapes say, what configs add, what the user overrides.

Width, depth, patch size, MLP width, registers, class token, heads (where a
tensor carries them, as in big_vision) come from shapes. Heads of torch
checkpoints (a fused qkv `[3D, D]` does not show them) come from the config
file when there is one, else from `default_num_heads(width)`. Overrides win
over everything and are validated against the model's fields.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from lvm_jax.convert.core import ConversionError
from lvm_jax.models.layers import swiglu_hidden_dim

# Widths whose head count is not width // 64 (head dims 72, 80, 88, 104, 55).
_HEADS_BY_WIDTH = {1152: 16, 1280: 16, 1408: 16, 1664: 16, 880: 16}


def default_num_heads(width: int) -> int:
    """The usual head count for a width: the table above, else 64-wide heads."""
    if width in _HEADS_BY_WIDTH:
        return _HEADS_BY_WIDTH[width]
    if width % 64 or width < 64:
        raise ConversionError(f"Cannot infer the number of attention heads for width {width}; pass "
                              "num_heads=... (CLI: --set num_heads=N).")
    return width // 64


def square_grid(num_positions: int) -> int | None:
    """g with g*g == num_positions, else None."""
    side = math.isqrt(num_positions)
    return side if side * side == num_positions else None


def patch_grid(num_positions: int, prefix_options: tuple[int, ...], image_size: Any = None,
               patch: tuple[int, int] | None = None, source: str = "") -> tuple[tuple[int, int], int]:
    """(grid, number of prefix positions) of a learned position table with `num_positions` rows.

    With a known image size the grid is image // patch; otherwise the first
    prefix count in `prefix_options` that leaves a square grid wins.
    """
    if image_size is not None and patch is not None:
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)[-2:]
        grid = (size[0] // patch[0], size[1] // patch[1])
        prefix = num_positions - grid[0] * grid[1]
        if prefix in prefix_options:
            return grid, prefix
    for prefix in prefix_options:
        side = square_grid(num_positions - prefix) if num_positions > prefix else None
        if side:
            return (side, side), prefix
    raise ConversionError(f"{source}: cannot split {num_positions} position embeddings into "
                          f"{list(prefix_options)} prefix positions plus a square patch grid; pass "
                          "image_size=... (the training resolution).")


def swiglu_mlp_dim(hidden: int, width: int) -> int:
    """An mlp_dim whose DINOv2 SwiGLU rule gives `hidden` (4*width when that works)."""
    for candidate in (4 * width, hidden * 3 // 2, hidden * 3 // 2 + 1, hidden * 3 // 2 + 2):
        if swiglu_hidden_dim(candidate) == hidden:
            return candidate
    raise ConversionError(f"A SwiGLU hidden width of {hidden} is not a multiple of 8, so the ViT's SwiGLU "
                          "(DINOv2's width rule) cannot represent it.")


HF_ACTIVATIONS = {"gelu": "gelu", "gelu_python": "gelu", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh",
                  "gelu_pytorch_tanh": "gelu_tanh", "quick_gelu": "quick_gelu", "relu": "relu",
                  "silu": "silu", "swish": "silu"}


def hf_activation(name: str, source: str) -> str:
    if name not in HF_ACTIVATIONS:
        raise ConversionError(f"{source}: hidden_act {name!r} has no ViT equivalent; supported: "
                              f"{sorted(HF_ACTIVATIONS)}.")
    return HF_ACTIVATIONS[name]


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}


def apply_overrides(cls: type, inferred: dict[str, Any], overrides: Mapping[str, Any],
                    nested: tuple[str, ...] = ()) -> dict[str, Any]:
    """`inferred` updated by `overrides` (validated against `cls`'s fields; `nested` dicts merge)."""
    valid = _fields(cls)
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ConversionError(f"Unknown override(s) {unknown} for {cls.__name__}; valid: {sorted(valid)}.")
    out = dict(inferred)
    for key, value in overrides.items():
        if key in nested and isinstance(value, Mapping):
            out[key] = {**dict(out.get(key) or {}), **dict(value)}
        else:
            out[key] = value
    return out


def split_tower_overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Lets flat ViT-style overrides (e.g. scan_layers=True) reach a CLIP's towers.

    Keys that are not CLIP fields go to every tower that has such a field
    (`act='quick_gelu'` reaches both); `vision=dict(...)` / `text=dict(...)`
    target one tower.
    """
    from lvm_jax.models.clip import CLIP
    from lvm_jax.models.text import TextTransformer
    from lvm_jax.models.vit import ViT

    clip_fields, vit_fields, text_fields = _fields(CLIP), _fields(ViT), _fields(TextTransformer)
    out: dict[str, Any] = {}
    vision: dict[str, Any] = {}
    text: dict[str, Any] = {}
    for key, value in overrides.items():
        if key in clip_fields:
            out[key] = dict(value) if isinstance(value, Mapping) else value  # never mutate the caller's dict
            continue
        if key not in vit_fields and key not in text_fields:
            raise ConversionError(f"Unknown override {key!r} for CLIP; valid: CLIP fields {sorted(clip_fields)} "
                                  "or tower fields (ViT / TextTransformer).")
        if key in vit_fields:
            vision[key] = value
        if key in text_fields:
            text[key] = value
    if vision:
        out["vision"] = {**vision, **dict(out.get("vision") or {})}
    if text:
        out["text"] = {**text, **dict(out.get("text") or {})}
    return out
