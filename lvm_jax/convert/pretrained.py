"""Converted checkpoints on disk (what `lvm-convert` writes) and merging them into a task's params.

Layout of a converted checkpoint directory:
  DIR/model.json    {"class": "ViT" | "CLIP", "config": {fields}, "format": ..., "source": ...}
  DIR/params/       orbax (StandardCheckpointer) tree of the model's params

`merge_pretrained(params, path, model=...)` is the one call a task's
`load_pretrained(state, path)` needs: it returns the task's (sharded) params
with every leaf the checkpoint provides, classification heads of another size
and anything the checkpoint lacks kept from init, position tables resampled
to the task's resolution, the layer layout (scan_layers) matched, and each
leaf placed with the target leaf's sharding.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lvm_jax.convert.core import ConversionError, expected_params, flatten, stack_blocks, unflatten, unstack_blocks
from lvm_jax.models.clip import CLIP, DEFAULT_VISION
from lvm_jax.models.pos_embed import resample_pos_embed
from lvm_jax.models.text import TextTransformer
from lvm_jax.models.vit import ViT

MODEL_FILE = "model.json"
PARAMS_DIR = "params"
_CLASSES = {"ViT": ViT, "CLIP": CLIP}


# --- model <-> JSON ------------------------------------------------------------------------------

def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    try:
        return jnp.dtype(value).name  # dtype / param_dtype
    except TypeError as e:
        raise ConversionError(f"Model field value {value!r} cannot be written to {MODEL_FILE}.") from e


def model_config(model: nn.Module) -> dict[str, Any]:
    """{'class': ..., 'config': fields} of a ViT or CLIP, JSON-ready."""
    name = type(model).__name__
    if name not in _CLASSES:
        raise ConversionError(f"Only ViT and CLIP models can be saved, not {name}.")
    fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model) if f.name not in ("parent", "name")}
    return {"class": name, "config": _jsonable(fields)}


def _restore_fields(cls: type, fields: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in fields.items():
        if key in ("dtype", "param_dtype") and isinstance(value, str):
            value = jnp.dtype(value)
        elif isinstance(value, list):
            value = tuple(value)
        out[key] = value
    return out


def model_from_config(spec: Mapping[str, Any]) -> nn.Module:
    """Inverse of `model_config`."""
    cls = _CLASSES.get(spec.get("class"))
    if cls is None:
        raise ConversionError(f"{MODEL_FILE} names class {spec.get('class')!r}; expected one of {sorted(_CLASSES)}.")
    fields = _restore_fields(cls, spec["config"])
    if cls is CLIP:
        for tower, tower_cls in (("vision", ViT), ("text", TextTransformer)):
            if fields.get(tower) is not None:
                fields[tower] = _restore_fields(tower_cls, fields[tower])
    return cls(**fields)


# --- save / load -----------------------------------------------------------------------------------

def is_converted(path: str | pathlib.Path) -> bool:
    path = pathlib.Path(path)
    return (path / MODEL_FILE).is_file() and (path / PARAMS_DIR).is_dir()


def save_converted(directory: str | pathlib.Path, model: nn.Module, variables: Mapping[str, Any], *,
                   format: str | None = None, source: str | None = None) -> pathlib.Path:
    """Writes `model` + `variables['params']` as a converted checkpoint directory (see module docstring)."""
    import orbax.checkpoint as ocp

    directory = pathlib.Path(directory).expanduser().absolute()
    if directory.exists() and any(directory.iterdir()):
        raise ConversionError(f"{directory} already exists and is not empty; pick a new directory or remove it.")
    spec = {**model_config(model), "format": format, "source": source}
    params = jax.tree_util.tree_map(np.asarray, dict(variables.get("params", variables)))
    directory.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / PARAMS_DIR, params)
    checkpointer.wait_until_finished()
    (directory / MODEL_FILE).write_text(json.dumps(spec, indent=2, sort_keys=True))
    return directory


def load_converted(directory: str | pathlib.Path) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """Reads a converted checkpoint directory into host memory: (model, {'params': numpy tree}, spec)."""
    import orbax.checkpoint as ocp

    from lvm_jax.convert import dummy_inputs, restack, unscanned

    directory = pathlib.Path(directory).expanduser().absolute()
    if not is_converted(directory):
        raise ConversionError(f"{directory} is not an lvm-convert output (no {MODEL_FILE} + {PARAMS_DIR}/); run "
                              f"`lvm-convert SRC {directory}` first.")
    spec = json.loads((directory / MODEL_FILE).read_text())
    model = model_from_config(spec)
    # The restore structure comes from the model itself, so no orbax metadata API is needed.
    flat_model = unscanned(model)
    shapes = restack(model, unflatten(expected_params(flat_model, *dummy_inputs(flat_model))))
    restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), shapes)
    params = ocp.PyTreeCheckpointer().restore(directory / PARAMS_DIR,
                                              args=ocp.args.PyTreeRestore(restore_args=restore_args))
    return model, {"params": params}, spec


# --- merging into a task's params -------------------------------------------------------------------

def _vit_fields(model: nn.Module | None, tower: str | None) -> ViT | None:
    if model is None:
        return None
    if isinstance(model, CLIP):
        return ViT(**{**DEFAULT_VISION, **dict(model.vision or {})}) if tower != "text_tower" else None
    return model if isinstance(model, ViT) else None


# Fields that change what the pretrained weights compute: a mismatch would drop parameters (a
# LayerScale, ln_pre, a bias, registers) or leave them at their init, which shapes cannot reveal.
FUNCTION_FIELDS = ("act", "norm_eps", "pre_norm", "final_norm", "fc_norm", "ffn", "qkv_bias", "patch_bias",
                   "class_token", "num_registers", "pos_embed")


def _check_compatible(source: nn.Module, target: nn.Module | None) -> None:
    """Fields the param shapes cannot reveal but that change the function: they must agree."""
    if target is None:
        return
    pairs = []
    src_vit, tgt_vit = _vit_fields(source, None), _vit_fields(target, None)
    if isinstance(target, ViT) and isinstance(source, CLIP):
        pairs.append(("config.model", src_vit, tgt_vit))
    elif isinstance(target, type(source)) and isinstance(source, ViT):
        pairs.append(("config.model", source, target))
    elif isinstance(source, CLIP) and isinstance(target, CLIP):
        pairs.append(("config.model.vision", src_vit, tgt_vit))
        src_text, tgt_text = TextTransformer(**dict(source.text or {})), TextTransformer(**dict(target.text or {}))
        pairs.append(("config.model.text", src_text, tgt_text))
    elif isinstance(source, ViT) and isinstance(target, CLIP):
        pairs.append(("config.model.vision", source, tgt_vit))
    problems = []
    for where, src, tgt in pairs:
        for field in FUNCTION_FIELDS:
            if not (hasattr(src, field) and hasattr(tgt, field)):
                continue  # a text tower has no ViT-only fields
            if getattr(src, field) != getattr(tgt, field):
                problems.append(f"{where}.{field}={getattr(src, field)!r}")
        # The LayerScale value is a parameter (loaded); whether the blocks have one is not.
        if hasattr(src, "layerscale_init") and (src.layerscale_init is None) != (tgt.layerscale_init is None):
            problems.append(f"{where}.layerscale_init={'None' if src.layerscale_init is None else '1.0'}")
    if problems:
        raise ConversionError("The checkpoint was trained with " + ", ".join(problems) + " but the model to "
                              "fine-tune differs; set those fields so the pretrained weights compute what they "
                              "learned.")


def _match_layout(src: Any, tgt: Any) -> Any:
    """Stacks source blocks wherever the target keeps a scanned 'blocks' subtree."""
    if not isinstance(src, Mapping) or not isinstance(tgt, Mapping):
        return src
    if "blocks" in tgt and "blocks_0" in src:
        src = stack_blocks(src)
    return {k: _match_layout(v, tgt[k]) if k in tgt else v for k, v in src.items()}


def _grid(vit: ViT) -> tuple[int, int]:
    size = vit.image_size
    return tuple(s // p for s, p in zip((size, size) if isinstance(size, int) else size, vit.dims()[4]))


def _resample_table(value: np.ndarray, want: tuple[int, ...], src_vit: ViT, tgt_vit: ViT | None,
                    big_vision_style: bool) -> np.ndarray | None:
    """The source's learned position table at the target's grid, or None if the layouts do not line up."""
    src_prefix = int(src_vit.class_token and src_vit.pos_embed_includes_cls)
    tgt_prefix = int(tgt_vit.class_token and tgt_vit.pos_embed_includes_cls) if tgt_vit else src_prefix
    old = _grid(src_vit)
    if tgt_vit is not None:
        new = _grid(tgt_vit)
    else:
        side = int(round((want[1] - tgt_prefix) ** 0.5))
        new = (side, side)
    if new[0] * new[1] + tgt_prefix != want[1] or value.shape[-1] != want[-1]:
        return None
    table = value[:, src_prefix:]
    if big_vision_style and new[0] == new[1] and old[0] == old[1]:
        from lvm_jax.convert.big_vision import resample_posemb_like_big_vision
        table = resample_posemb_like_big_vision(table, new[0])
    else:
        table = np.asarray(resample_pos_embed(jnp.asarray(table), old, new, src_vit.pos_embed_interp))
    prefix = value[:, :1] if tgt_prefix and src_prefix else np.zeros((1, tgt_prefix, want[-1]), value.dtype)
    return np.concatenate([prefix[:, :tgt_prefix], table.astype(value.dtype)], axis=1)


def _place(value: np.ndarray, target: Any) -> Any:
    """`value` as `target` is: same dtype, same sharding (multi-host safe), same logical box."""
    if isinstance(target, nn.meta.AxisMetadata):
        return target.replace_boxed(_place(value, target.value))
    value = np.asarray(value, dtype=target.dtype)
    if isinstance(target, jax.Array):
        return jax.make_array_from_callback(value.shape, target.sharding, lambda index: value[index])
    return value


def merge_pretrained(params: Any, path: str | pathlib.Path, *, model: nn.Module | None = None,
                     keep_init: tuple[str, ...] = (), log: Callable[[str], None] | None = None) -> Any:
    """Returns `params` with the pretrained leaves from `path` (see module docstring).

    params: the task's freshly initialised params (plain arrays, possibly
      sharded jax.Arrays, or logically boxed) of a ViT or CLIP.
    path: an `lvm-convert` output directory, or any checkpoint `load` reads.
    model: the task's model; enables the act/norm_eps check and exact
      position-table resampling to its image_size.
    keep_init: path prefixes (e.g. ('head',)) never loaded.
    A CLIP checkpoint initialises a ViT from its image tower; a ViT checkpoint
    initialises a CLIP's image tower. Leaves the checkpoint lacks and
    classification heads of another size keep their init; any other shape
    difference raises one ConversionError listing them.
    """
    from lvm_jax.convert import detect_format, from_checkpoint
    from lvm_jax.convert.readers import read_checkpoint

    if log is None:
        log = print if jax.process_index() == 0 else (lambda message: None)
    if is_converted(path):
        source_model, variables, spec = load_converted(path)
        fmt = spec.get("format")
    else:
        # The format decides how a position table is resampled (big_vision's own zoom for its .npz),
        # as it does for the same file after lvm-convert.
        ck = read_checkpoint(path)
        fmt = detect_format(ck)
        source_model, variables = from_checkpoint(ck, fmt)
    _check_compatible(source_model, model)
    src = unstack_blocks(dict(variables["params"]))
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
    structure = jax.tree_util.tree_map(lambda x: x.value if is_box(x) else x, params, is_leaf=is_box)
    notes = []
    src_vit = _vit_fields(source_model, None)
    tgt_is_clip = "image_tower" in structure
    if "image_tower" in src and not tgt_is_clip:
        src = src["image_tower"]
        notes.append("using the CLIP checkpoint's image tower")
    elif tgt_is_clip and "patch_embed" in src:
        src = {"image_tower": src}
        notes.append("loading the ViT checkpoint into the image tower")
    src = _match_layout(src, structure)
    src_flat = flatten(src)
    tgt_flat = flatten(structure)
    tgt_vit = _vit_fields(model, None)

    merged: dict[str, Any] = {}
    kept, mismatched, resampled = [], [], []
    for key, target in tgt_flat.items():
        value = src_flat.get(key)
        want = tuple(target.shape)
        if any(key == p or key.startswith(p.rstrip("/") + "/") for p in keep_init) or value is None:
            kept.append(key)
            continue
        position_table = key in ("pos_embed", "image_tower/pos_embed") and src_vit is not None
        if tuple(value.shape) == want and not (position_table and _grid(src_vit) != _grid(tgt_vit or src_vit)):
            merged[key] = value
        elif position_table:
            table = _resample_table(np.asarray(value), want, src_vit, tgt_vit, fmt == "big_vision")
            if table is None:
                mismatched.append(f"{key} {tuple(value.shape)} vs {want}")
            else:
                merged[key] = table
                resampled.append(f"{key} {tuple(value.shape)} -> {want}")
        elif key.split("/")[0] == "head":
            kept.append(key)  # a classification head for another label set: train it from scratch
        else:
            mismatched.append(f"{key} {tuple(value.shape)} vs {want}")
    if mismatched:
        raise ConversionError(f"{path} does not fit the model to fine-tune: shape mismatches (checkpoint vs model) "
                              f"[{', '.join(mismatched[:12])}]; make config.model match the checkpoint's "
                              "architecture (lvm-convert prints it).")
    if not merged:
        raise ConversionError(f"{path} shares no parameters with the model to fine-tune; check config.model.")
    ignored = sorted(set(src_flat) - set(merged) - set(kept))
    notes.append(f"loaded {len(merged)}/{len(tgt_flat)} params")
    if resampled:
        notes.append("resampled " + ", ".join(resampled))
    if kept:
        notes.append(f"kept init for {kept[:8]}" + (" ..." if len(kept) > 8 else ""))
    if ignored:
        notes.append(f"ignored {ignored[:8]}" + (" ..." if len(ignored) > 8 else ""))
    log(f"init_from {path}: " + "; ".join(notes))

    def place(key: str, leaf: Any) -> Any:
        return _place(merged[key], leaf) if key in merged else leaf

    flat_params = flatten_with_boxes(params)
    return unflatten({k: place(k, leaf) for k, leaf in flat_params.items()})


def flatten_with_boxes(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Like core.flatten, but keeps logical boxes as leaves."""
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_with_boxes(value, path + "/"))
        else:
            flat[path] = value
    return flat
