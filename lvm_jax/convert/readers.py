"""Checkpoint readers: safetensors (no torch needed), torch .pt/.pth/.bin (needs torch), .npz.

`read_checkpoint(path)` accepts a file or a directory (a timm hub / Hugging Face
`save_pretrained` / open_clip hub folder) and returns a `Checkpoint`: the flat
`{name: array}` dict plus the JSON configs found next to the weights. With
`shapes_only=True` the tensors are `jax.ShapeDtypeStruct`s read from the file
headers (safetensors, npz), so a 1B-parameter file maps without loading it.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import struct
import zipfile
from typing import Any

import jax
import ml_dtypes
import numpy as np

from lvm_jax.convert.core import ConversionError

# Weight files in the order a directory is searched.
WEIGHT_NAMES = ("model.safetensors", "model.safetensors.index.json", "open_clip_model.safetensors",
                "pytorch_model.bin", "pytorch_model.bin.index.json", "open_clip_pytorch_model.bin")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".npz")
CONFIG_NAMES = ("config.json", "open_clip_config.json")

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


@dataclasses.dataclass
class Checkpoint:
    """A flat tensor dict and what came with it.

    tensors: {name: np.ndarray or jax.ShapeDtypeStruct}.
    config: parsed config.json next to the weights ({} if none).
    open_clip_config: parsed open_clip_config.json ({} if none).
    path: the weight file; torchscript: whether it was a TorchScript archive (OpenAI CLIP).
    """
    tensors: dict[str, Any]
    config: dict[str, Any]
    open_clip_config: dict[str, Any]
    path: pathlib.Path
    torchscript: bool = False

    @property
    def source(self) -> str:
        return str(self.path)


# --- safetensors -----------------------------------------------------------------------------

def _safetensors_header(path: pathlib.Path) -> tuple[dict[str, Any], int]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ConversionError(f"{path} is too short to be a safetensors file; re-download it.")
        (size,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(size))
        except (ValueError, UnicodeDecodeError) as e:
            raise ConversionError(f"{path} has no valid safetensors header ({e}); re-download it.") from e
    return header, 8 + size


def read_safetensors(path: pathlib.Path, shapes_only: bool = False) -> dict[str, Any]:
    """Reads a .safetensors file with numpy only (memory-mapped; bf16 via ml_dtypes)."""
    header, start = _safetensors_header(path)
    header.pop("__metadata__", None)
    data = None if shapes_only else np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, info in header.items():
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ConversionError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}.")
        shape = tuple(info["shape"])
        if shapes_only:
            out[name] = jax.ShapeDtypeStruct(shape, dtype)
            continue
        begin, end = info["data_offsets"]
        out[name] = np.asarray(data[start + begin:start + end]).view(dtype).reshape(shape)
    return out


# --- torch -------------------------------------------------------------------------------------

def _import_torch(path: pathlib.Path):
    try:
        import torch
    except ImportError as e:
        raise ConversionError(
            f"{path} is a PyTorch file and reading it needs torch: `pip install torch` (the CPU build is "
            "enough), or re-save its state dict as .safetensors.") from e
    return torch


def _is_torchscript(path: pathlib.Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def _unwrap(obj: Any, path: pathlib.Path) -> dict[str, Any]:
    """Finds the state dict inside common training-checkpoint wrappers."""
    for _ in range(3):
        if isinstance(obj, dict) and obj and not any(hasattr(v, "shape") for v in obj.values()):
            for key in ("state_dict", "model", "module", "teacher", "model_ema", "params"):
                if isinstance(obj.get(key), dict):
                    obj = obj[key]
                    break
            else:
                break
    if not isinstance(obj, dict):
        raise ConversionError(f"{path} holds a {type(obj).__name__}, not a state dict; save "
                              "model.state_dict() instead.")
    tensors = {k: v for k, v in obj.items() if hasattr(v, "shape")}
    for prefix in ("module.", "_orig_mod."):  # DDP / torch.compile wrappers
        if tensors and all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    for prefix in ("teacher.backbone.", "backbone."):
        # DINOv2 training checkpoints: keep the (teacher) backbone, drop the DINO/iBOT heads.
        if any(k.startswith(prefix) for k in tensors) and not any(k.startswith("blocks.") for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            break
    return tensors


def read_torch(path: pathlib.Path, shapes_only: bool = False,
               allow_pickle: bool = False) -> tuple[dict[str, Any], bool]:
    """Reads a torch state dict (or TorchScript archive, as OpenAI CLIP ships). Returns (tensors, torchscript)."""
    torch = _import_torch(path)
    torchscript = _is_torchscript(path)
    if torchscript:
        state = torch.jit.load(str(path), map_location="cpu").state_dict()
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=not allow_pickle, mmap=True)
        except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
            state = torch.load(str(path), map_location="cpu", weights_only=not allow_pickle)
        except Exception as e:  # weights_only refuses arbitrary pickled objects
            if allow_pickle:
                raise
            raise ConversionError(
                f"{path} contains pickled Python objects besides tensors ({type(e).__name__}); if you trust "
                "the file pass allow_pickle=True (CLI: --allow-pickle), or re-save its state dict.") from e
    out = {}
    for name, tensor in _unwrap(state, path).items():
        if shapes_only:
            name_of_dtype = str(tensor.dtype).split(".")[-1]
            dtype = ml_dtypes.bfloat16 if name_of_dtype == "bfloat16" else np.dtype(name_of_dtype)
            out[name] = jax.ShapeDtypeStruct(tuple(tensor.shape), dtype)
        elif tensor.dtype == torch.bfloat16:
            out[name] = tensor.detach().cpu().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            out[name] = tensor.detach().cpu().numpy()
    return out, torchscript


# --- npz ---------------------------------------------------------------------------------------

def read_npz(path: pathlib.Path, shapes_only: bool = False) -> dict[str, Any]:
    """Reads a flat .npz (big_vision keys such as 'params/img/embedding/kernel')."""
    if not shapes_only:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    out = {}
    with zipfile.ZipFile(path) as z:
        for member in z.namelist():
            with z.open(member) as f:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read_header(f)
            out[member[:-4] if member.endswith(".npy") else member] = jax.ShapeDtypeStruct(shape, dtype)
    return out


# --- entry point -------------------------------------------------------------------------------

def _read_json(path: pathlib.Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ConversionError(f"{path} is not valid JSON ({e}); fix or remove it.") from e


def find_weights(directory: pathlib.Path) -> pathlib.Path:
    """The weight file of a checkpoint directory."""
    for name in WEIGHT_NAMES:
        if (directory / name).is_file():
            return directory / name
    candidates = sorted(p for p in directory.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ConversionError(f"{directory} holds no weight file ({', '.join(WEIGHT_NAMES)} or *"
                              f"{'/*'.join(WEIGHT_SUFFIXES)}); point at the checkpoint file itself.")
    raise ConversionError(f"{directory} holds several weight files {[p.name for p in candidates]}; "
                          "point at the one to load.")


def _read_weights(path: pathlib.Path, shapes_only: bool, allow_pickle: bool) -> tuple[dict[str, Any], bool]:
    name = path.name
    if name.endswith(".index.json"):  # sharded Hugging Face checkpoint
        shards = sorted(set(_read_json(path).get("weight_map", {}).values()))
        if not shards:
            raise ConversionError(f"{path} lists no shards under 'weight_map'.")
        tensors: dict[str, Any] = {}
        torchscript = False
        for shard in shards:
            part, torchscript = _read_weights(path.parent / shard, shapes_only, allow_pickle)
            tensors.update(part)
        return tensors, torchscript
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint file {path} does not exist.")
    if path.suffix == ".safetensors":
        return read_safetensors(path, shapes_only), False
    if path.suffix == ".npz":
        return read_npz(path, shapes_only), False
    if path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        return read_torch(path, shapes_only, allow_pickle)
    raise ConversionError(f"{path}: unknown checkpoint suffix {path.suffix!r}; supported: "
                          f"{', '.join(WEIGHT_SUFFIXES)} or a checkpoint directory.")


def read_checkpoint(path: str | pathlib.Path, shapes_only: bool = False,
                    allow_pickle: bool = False) -> Checkpoint:
    """Reads a checkpoint file or directory (see module docstring)."""
    path = pathlib.Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"Checkpoint {path} does not exist; download it first (nothing is fetched "
                                "at run time).")
    weights = find_weights(path) if path.is_dir() else path
    directory = weights.parent
    # Configs are read only beside weight files with hub names, so a stray config.json
    # in a downloads folder cannot change how a lone .pth is interpreted.
    hub_file = path.is_dir() or weights.name in WEIGHT_NAMES
    configs = {name: _read_json(directory / name) if hub_file and (directory / name).is_file() else {}
               for name in CONFIG_NAMES}
    tensors, torchscript = _read_weights(weights, shapes_only, allow_pickle)
    if not tensors:
        raise ConversionError(f"{weights} contains no tensors.")
    return Checkpoint(tensors, configs["config.json"], configs["open_clip_config.json"], weights, torchscript)
