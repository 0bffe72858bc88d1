"""Config files (`configs/*.py` with `get_config(arg)`) and `--config.a.b=value` overrides.

ml_collections' own flag parser prints a long traceback for a mistyped key; this
small loader gives one sentence with the closest valid key instead.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import pathlib
from collections.abc import Sequence
from typing import Any

import ml_collections

from lvm_jax.errors import UserError


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Loads `path/to/config.py` or `path/to/config.py:arg` and returns `get_config(arg)`."""
    path, _, arg = spec.partition(":")
    file = pathlib.Path(path)
    if not file.is_file():
        raise UserError(f"Config file {path!r} does not exist; pass e.g. --config configs/vit_synthetic.py.")
    module_spec = importlib.util.spec_from_file_location(f"lvm_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)  # type: ignore[union-attr]
    if not hasattr(module, "get_config"):
        raise UserError(f"Config file {path!r} defines no get_config(); add `def get_config(arg=None)`.")
    config = module.get_config(arg) if arg else module.get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        raise UserError(f"get_config() in {path!r} must return an ml_collections.ConfigDict.")
    return config


def _all_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in config.items():
        keys.append(prefix + k)
        if isinstance(v, ml_collections.ConfigDict):
            keys.extend(_all_keys(v, prefix + k + "."))
    return keys


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        lowered = text.lower()
        if lowered in ("true", "false"):
            return lowered == "true"
        if lowered in ("none", "null"):
            return None
        return text


def apply_override(config: ml_collections.ConfigDict, dotted: str, raw: str) -> None:
    """Sets `config.<dotted> = raw` (parsed as a Python literal, else a string); checks the key exists."""
    parts = dotted.split(".")
    node = config
    for i, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            close = difflib.get_close_matches(dotted, _all_keys(config), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise UserError(f"Unknown config key '{dotted}'.{hint}")
        if i < len(parts) - 1:
            node = node[part]
    value = _parse_value(raw)
    old = node[parts[-1]]
    if isinstance(old, float) and raw.strip().lower() in ("inf", "+inf", "-inf", "nan"):
        value = float(raw)
    if isinstance(value, bool) and isinstance(old, (int, float)) and not isinstance(old, bool):
        # ConfigDict would take True as 1 (bool is an int): almost surely a wrong key or value.
        raise UserError(f"Config key '{dotted}' expects a {type(old).__name__} but got {raw!r}; pass a number.")
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(old, tuple) and isinstance(value, list):
        value = tuple(value)
    if isinstance(old, str) and value is not None and not isinstance(value, str):
        value = raw  # a str field keeps the text as written (a tag '123', a path '2024')
    try:
        with node.unlocked() if hasattr(node, "unlocked") else _null():
            node[parts[-1]] = value
    except TypeError as e:
        raise UserError(
            f"Config key '{dotted}' expects a {type(old).__name__} but got {raw!r}; pass a value of that type."
        ) from e


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Loads a config file and applies `a.b=value` overrides (already stripped of `--config.`)."""
    config = load_config_file(spec)
    for item in overrides:
        key, eq, raw = item.partition("=")
        if not eq:
            raise UserError(f"Override '--config.{item}' has no value; write --config.{key}=VALUE.")
        apply_override(config, key, raw)
    return config


def split_config_args(argv: Sequence[str]) -> tuple[str | None, list[str], list[str]]:
    """Splits argv into (config spec, ['a.b=v', ...] overrides, remaining args).

    Accepts `--config F`, `--config=F` and `--config.a.b=v` / `--config.a.b v`.
    """
    spec, overrides, rest = None, [], []
    args = list(argv)

    def set_spec(value: str) -> None:
        nonlocal spec
        if not value:
            raise UserError("--config needs a config file; pass e.g. --config configs/vit_synthetic.py.")
        if spec is not None and value != spec:
            # The second used to replace the first silently; overrides go through --config.a.b=v.
            raise UserError(f"--config was given twice ({spec!r} and {value!r}); pass one config file and "
                            "change its fields with --config.a.b=VALUE.")
        spec = value

    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--config":
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                set_spec("")
            set_spec(args[i + 1])
            i += 2
            continue
        if arg.startswith("--config="):
            set_spec(arg.split("=", 1)[1])
        elif arg.startswith("--config."):
            body = arg[len("--config."):]
            if "=" not in body and i + 1 < len(args) and not args[i + 1].startswith("--"):
                body = f"{body}={args[i + 1]}"
                i += 1
            overrides.append(body)
        else:
            rest.append(arg)
        i += 1
    return spec, overrides, rest


def config_to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)
