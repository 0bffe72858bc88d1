"""Pretrained weights: timm, Hugging Face, OpenAI / open_clip, DINOv2 and big_vision checkpoints
into our Flax models, back out to Hugging Face, and into the trainer.

    from lvm_jax import convert
    model, variables = convert.load("dinov2_vitb14_reg4_pretrain.pth")   # file or checkpoint folder
    out = model.apply(variables, images)   # images [B, H, W, 3], normalised; any multiple of the patch
    out["cls"], out["registers"], out["patch_tokens"]                      # after the final norm

    clip, variables = convert.load("hf_clip_dir")                          # CLIP / SigLIP two towers
    img = clip.apply(variables, images, method="encode_image")             # [B, E], unnormalised
    txt = clip.apply(variables, tokens, method="encode_text")

    convert.save_hf(model, variables, "out_dir")                           # HF ViT / DINOv2 / CLIP

Nothing is downloaded: point at files you fetched yourself. Formats are
detected from config.json / open_clip_config.json and the key names
(`format=` forces one); the architecture is inferred from shapes and configs,
and any ViT / CLIP field can be overridden (`num_heads=16`, `act='quick_gelu'`,
`scan_layers=True`, `image_size=448` -- which resamples the stored position
table as the source library would). `lvm-convert SRC DST` writes an orbax
checkpoint for `config.init_from`; `merge_pretrained` is what a task calls.
"""
from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lvm_jax.convert import big_vision, dinov2, hf, infer, openclip, timm
from lvm_jax.convert.core import (
    ConversionError, StrayRuleError, _listing, assemble, expected_params, stack_blocks)
from lvm_jax.convert.readers import Checkpoint, read_checkpoint
from lvm_jax.models.clip import CLIP, DEFAULT_VISION
from lvm_jax.models.pos_embed import resample_pos_embed
from lvm_jax.models.vit import ViT

FORMATS = ("timm", "hf", "open_clip", "dinov2", "big_vision")

__all__ = ["FORMATS", "ConversionError", "Checkpoint", "detect_format", "from_checkpoint", "load",
           "load_converted", "merge_pretrained", "read_checkpoint", "save_converted", "save_hf"]


def detect_format(ck: Checkpoint) -> str:
    """'hf' | 'open_clip' | 'dinov2' | 'timm' | 'big_vision' from configs and key names."""
    for name, module in (("hf", hf), ("open_clip", openclip), ("dinov2", dinov2), ("timm", timm),
                         ("big_vision", big_vision)):
        if module.detect(ck):
            return name
    sample = ", ".join(sorted(ck.tensors)[:8])
    raise ConversionError(f"{ck.source}: cannot tell which library wrote this checkpoint (keys start [{sample}]); "
                          f"pass format= one of {FORMATS}.")


def load(path: str | pathlib.Path, format: str | None = None, *, shapes_only: bool = False,
         allow_pickle: bool = False, **overrides: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Reads a checkpoint file or folder and returns `(model, variables)`.

    model: a `ViT` (backbones / classifiers) or a `CLIP` (two towers).
    variables: {'params': tree of numpy arrays} (`jax.ShapeDtypeStruct`s with
      shapes_only=True: maps real-size checkpoints without reading the weights).
    format: one of FORMATS; detected when None.
    allow_pickle: let torch unpickle arbitrary objects (only for files you trust).
    overrides: ViT fields, or CLIP fields (`vision=dict(...)`, `text=dict(...)`;
      flat tower fields reach every tower that has them).
    """
    ck = read_checkpoint(path, shapes_only=shapes_only, allow_pickle=allow_pickle)
    return from_checkpoint(ck, format, **overrides)


def from_checkpoint(ck: Checkpoint, format: str | None = None,
                    **overrides: Any) -> tuple[nn.Module, dict[str, Any]]:
    """`load` on an already read Checkpoint."""
    fmt = format or detect_format(ck)
    if fmt not in FORMATS:
        raise ConversionError(f"Unknown format {fmt!r}; choose one of {FORMATS}.")
    family = "vit"
    if fmt == "hf":
        if hf.model_type(ck) in hf.VISION_TYPES:
            kwargs, make_rules, ignore = hf.convert_vision(ck)
        else:
            kwargs, make_rules, ignore = hf.convert_clip(ck)
            family = "clip"
    elif fmt == "timm":
        kwargs, make_rules, ignore = timm.convert(ck)
    elif fmt == "dinov2":
        kwargs, make_rules, ignore = dinov2.convert(ck)
    elif fmt == "open_clip":
        kwargs, make_rules, ignore = openclip.convert(ck)
        family = "clip"
    else:
        kwargs, make_rules, ignore, family = big_vision.convert(ck)

    overrides, inferred = dict(overrides), kwargs
    if family == "clip":
        cls, nested = CLIP, ("vision", "text")
        overrides = infer.split_tower_overrides(overrides)
        new_size = (overrides.get("vision") or {}).pop("image_size", None)
        kwargs = infer.apply_overrides(CLIP, kwargs, overrides, nested=nested)
        model = CLIP(**kwargs)
        what = f"CLIP ({_describe(kwargs['vision'])}; text {_describe(kwargs['text'])})"
    else:
        cls, nested = ViT, ()
        new_size = overrides.pop("image_size", None)
        kwargs = infer.apply_overrides(ViT, kwargs, overrides)
        model = ViT(**kwargs)
        what = f"ViT ({_describe(kwargs)})"
    try:
        params = _assemble(model, make_rules(kwargs), ck, ignore, f"{fmt} {what}")
    except StrayRuleError as error:
        raise _override_removed(error, ck.source, cls, inferred, overrides, nested) from None
    if new_size is not None:
        model, params = _resize(model, params, new_size, big_vision_style=fmt == "big_vision")
    return model, {"params": params}


def save_hf(model: nn.Module, variables: dict[str, Any], directory: str | pathlib.Path) -> pathlib.Path:
    """Writes `model.safetensors` + `config.json` that transformers loads with `from_pretrained`.

    ViT -> ViTModel / ViTForImageClassification; a ViT with LayerScale,
    registers, SwiGLU or a mask token -> Dinov2Model / Dinov2WithRegistersModel;
    CLIP -> CLIPModel. Raises ConversionError naming what has no HF equivalent.
    """
    return hf.export(model, variables, directory)


# --- internals ---------------------------------------------------------------------------------

def _describe(kw: dict[str, Any]) -> str:
    keys = ("width", "depth", "num_heads", "mlp_dim", "patch_size", "num_registers", "vocab_size")
    return ", ".join(f"{k}={kw[k]}" for k in keys if kw.get(k) not in (None, 0))


def _vision_fields(model: nn.Module) -> dict[str, Any]:
    return {**DEFAULT_VISION, **dict(model.vision or {})} if isinstance(model, CLIP) else {}


def unscanned(model: nn.Module) -> nn.Module:
    """The same model with scan_layers off in every tower (converters build the blocks_i layout)."""
    if isinstance(model, CLIP):
        return model.clone(vision={**dict(model.vision or {}), "scan_layers": False},
                           text={**dict(model.text or {}), "scan_layers": False})
    return model.clone(scan_layers=False)


def _image_shape(vit_fields: dict[str, Any]) -> tuple[int, int]:
    size = vit_fields.get("image_size", 224)
    return (size, size) if isinstance(size, int) else tuple(size)


def dummy_inputs(model: nn.Module) -> tuple[Any, ...]:
    """Smallest inputs that `init` the model at its stored resolution / context length."""
    if isinstance(model, CLIP):
        height, width = _image_shape(_vision_fields(model))
        context = dict(model.text or {}).get("context_length", 77)
        return (jnp.zeros((1, height, width, 3), jnp.float32), jnp.zeros((1, context), jnp.int32))
    height, width = _image_shape({"image_size": model.image_size})
    return (jnp.zeros((1, height, width, 3), jnp.float32),)


def _override_removed(error: StrayRuleError, source: str, cls: type, inferred: dict[str, Any],
                      overrides: dict[str, Any], nested: tuple[str, ...]) -> Exception:
    """A ConversionError naming the override(s) that removed params the checkpoint has weights for;
    `error` itself (a converter bug) when dropping the overrides does not bring those params back."""
    paths: list[tuple[str, ...]] = []  # ('final_norm',) or ('vision', 'pre_norm')
    for key, v in overrides.items():
        paths += [(key, sub) for sub in v] if key in nested and isinstance(v, Mapping) else [(key,)]

    def value(where: Mapping[str, Any], path: tuple[str, ...]) -> Any:
        return where[path[0]] if len(path) == 1 else where[path[0]][path[1]]

    def without(drop: list[tuple[str, ...]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for path in paths:
            if path not in drop:
                if len(path) == 1:
                    out[path[0]] = value(overrides, path)
                else:
                    out.setdefault(path[0], {})[path[1]] = value(overrides, path)
        return out

    def restored(drop: list[tuple[str, ...]]) -> nn.Module | None:
        try:
            model = cls(**infer.apply_overrides(cls, inferred, without(drop), nested=nested))
            flat = unscanned(model)
            expected = expected_params(flat, *dummy_inputs(flat))
        except Exception:  # without that override the model cannot even be built
            return None
        return model if set(error.targets) <= set(expected) else None

    culprits = [(p, m) for p in paths if (m := restored([p])) is not None]
    if not culprits and paths and (m := restored(paths)) is not None:
        culprits = [(p, m) for p in paths]
    if not culprits:
        return error

    def show(path: tuple[str, ...], v: Any) -> str:
        return f"{path[0]}={v!r}" if len(path) == 1 else f"{path[0]}=dict({path[1]}={v!r})"

    def checkpoint_value(model: nn.Module, path: tuple[str, ...]) -> Any:
        if len(path) == 1:
            return getattr(model, path[0], None)
        fields = _vision_fields(model) if path[0] == "vision" else dict(getattr(model, path[0]) or {})
        return fields.get(path[1])

    given = ", ".join(show(p, value(overrides, p)) for p, _ in culprits)
    wanted = [show(p, checkpoint_value(m, p)) for p, m in culprits if checkpoint_value(m, p) is not None]
    keys = sorted({k for srcs in error.targets.values() for k in srcs})
    groups = list(dict.fromkeys(t.rsplit("/", 1)[0] for t in error.targets))
    return ConversionError(
        f"{source} has weights for {_listing(groups, 6)} ({_listing(keys, 6)}), but the override "
        f"{given} removes {'it' if len(groups) == 1 else 'them'} from the model; drop the override"
        + (f" or set it to match the checkpoint ({', '.join(wanted)})." if wanted else "."))


def _assemble(model: nn.Module, rules: list, ck: Checkpoint, ignore: Any, what: str) -> dict[str, Any]:
    flat_model = unscanned(model)
    expected = expected_params(flat_model, *dummy_inputs(flat_model))
    params = assemble(rules, ck.tensors, expected, source=ck.source, what=what, ignore=ignore)
    return restack(model, params)


def restack(model: nn.Module, params: dict[str, Any]) -> dict[str, Any]:
    """Puts unscanned (blocks_i) params into the layout `model` expects (scan_layers per tower)."""
    if isinstance(model, CLIP):
        params = dict(params)
        for tower, fields in (("image_tower", model.vision), ("text_tower", model.text)):
            if dict(fields or {}).get("scan_layers"):
                params[tower] = stack_blocks(params[tower])
        return params
    return stack_blocks(params) if model.scan_layers else params


def _resize(model: nn.Module, params: dict[str, Any], image_size: Any,
            big_vision_style: bool) -> tuple[nn.Module, dict[str, Any]]:
    """Stores the position table at `image_size` (as the source library resamples it for a new size)."""
    if isinstance(model, CLIP):
        vit = ViT(**_vision_fields(model))
        new_vit, tower = _resize(vit, dict(params["image_tower"]), image_size, big_vision_style)
        vision = {**dict(model.vision or {}), "image_size": new_vit.image_size}
        return model.clone(vision=vision), {**params, "image_tower": tower}
    width, _, _, _, patch = model.dims()
    if model.pos_embed != "learned":
        return model.clone(image_size=image_size), params
    old = tuple(s // p for s, p in zip(_image_shape({"image_size": model.image_size}), patch))
    new = tuple(s // p for s, p in zip(_image_shape({"image_size": image_size}), patch))
    prefix = 1 if (model.class_token and model.pos_embed_includes_cls) else 0
    pos = params["pos_embed"]
    if isinstance(pos, jax.ShapeDtypeStruct):
        resized = jax.ShapeDtypeStruct((1, prefix + new[0] * new[1], width), pos.dtype)
    else:
        if big_vision_style:
            if new[0] != new[1]:
                raise ConversionError("big_vision resamples square grids only; pass a square image_size.")
            table = big_vision.resample_posemb_like_big_vision(pos[:, prefix:], new[0])
        else:
            table = np.asarray(resample_pos_embed(jnp.asarray(pos[:, prefix:]), old, new, model.pos_embed_interp))
        resized = np.concatenate([pos[:, :prefix], table.astype(pos.dtype)], axis=1)
    return model.clone(image_size=image_size), {**params, "pos_embed": resized}


from lvm_jax.convert.pretrained import load_converted, merge_pretrained, save_converted  # noqa: E402
