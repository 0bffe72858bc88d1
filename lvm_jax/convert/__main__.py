"""`lvm-convert SRC DST`: convert a downloaded checkpoint once into an orbax checkpoint for fine-tuning.

    lvm-convert ~/ckpt/dinov2_vitb14_pretrain.pth runs/dinov2_b14
    lvm-convert ~/ckpt/clip-vit-base-patch32 runs/clip_b32 --set scan_layers=True
    lvm-train --config configs/<name>.py --workdir W --config.init_from=runs/dinov2_b14

SRC: a checkpoint file or folder (timm, Hugging Face, OpenAI/open_clip, DINOv2 hub,
big_vision .npz). DST: a new directory (model.json + orbax params/). The command
prints the model fields to put in config.model so the trainer builds the same
architecture.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
from typing import Any

import numpy as np

from lvm_jax.cli import run_cli
from lvm_jax.convert import FORMATS, detect_format, from_checkpoint, read_checkpoint, save_converted
from lvm_jax.convert.core import ConversionError, flatten
from lvm_jax.convert.pretrained import model_config
from lvm_jax.workdir import local_copy, require_local


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # bare strings: act=quick_gelu


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """['num_heads=12', 'vision.act=quick_gelu'] -> {'num_heads': 12, 'vision': {'act': 'quick_gelu'}}."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConversionError(f"--set {item!r} is not KEY=VALUE (e.g. --set num_heads=12).")
        node = out
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = _parse_value(value)
    return out


def _defaults(cls: type) -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(cls) if f.name not in ("parent", "name")}


def _changed(fields: dict[str, Any], defaults: dict[str, Any], prefix: str) -> list[str]:
    lines = []
    for key, value in fields.items():
        default = defaults.get(key)
        if value == (list(default) if isinstance(default, tuple) else default):
            continue
        if key in ("dtype", "param_dtype") and value == "float32":
            continue
        lines.append(f"--{prefix}.{key}={value}")
    return lines


def _config_lines(model: Any) -> list[str]:
    """--config.model.* flags for the fields that differ from the model classes' defaults."""
    from lvm_jax.models.clip import CLIP, DEFAULT_VISION
    from lvm_jax.models.text import TextTransformer
    from lvm_jax.models.vit import ViT

    spec = model_config(model)["config"]
    if not isinstance(model, CLIP):
        return _changed(spec, _defaults(ViT), "config.model")
    lines = _changed({k: v for k, v in spec.items() if k not in ("vision", "text")}, _defaults(CLIP), "config.model")
    lines += _changed(spec["vision"] or {}, {**_defaults(ViT), **DEFAULT_VISION}, "config.model.vision")
    lines += _changed(spec["text"] or {}, _defaults(TextTransformer), "config.model.text")
    return lines


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lvm-convert", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("src", help="checkpoint file or folder")
    parser.add_argument("dst", help="new output directory")
    parser.add_argument("--format", choices=FORMATS, help="force the reader (default: detect)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="model field override, e.g. num_heads=16, act=quick_gelu, vision.scan_layers=True")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="let torch unpickle arbitrary objects (only for files you trust)")
    args = parser.parse_args(argv)
    require_local(args.dst, "dst")
    with local_copy(args.src, what="src") as src:  # a gs:// checkpoint is read from a local copy
        checkpoint = read_checkpoint(src, allow_pickle=args.allow_pickle)
        fmt = args.format or detect_format(checkpoint)
        model, variables = from_checkpoint(checkpoint, fmt, **parse_overrides(args.set))
        out = save_converted(args.dst, model, variables, format=fmt, source=str(args.src))
    count = sum(int(np.prod(v.shape)) for v in flatten(variables["params"]).values())
    print(f"wrote {type(model).__name__} ({count / 1e6:.1f}M params) to {out}")
    print("fine-tune with: --config.init_from=" + str(out))
    print("model fields (config.model):")
    for line in _config_lines(model):
        print("  " + line)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
