"""Tiny configs and runners shared by the trainer tests."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
from typing import Any

import ml_collections
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def set_dotted(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
    """Sets `config.<a.b.c> = value` for each `{'a.b.c': value}` (Python values, no parsing); returns config."""
    for key, value in overrides.items():
        node = config
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return config


def tiny_supervised_config(**overrides) -> ml_collections.ConfigDict:
    """The synthetic ViT config shrunk to a 2-block, 32-wide model on 16 px images."""
    from lvm_jax.config import load_config_file

    c = load_config_file(str(ROOT / "configs" / "vit_synthetic.py"))
    c.model.width, c.model.depth, c.model.num_heads, c.model.mlp_dim = 32, 2, 2, 64
    c.model.stem, c.model.patch_size = "patch", 4  # a plain ViT with 16 tokens (the default is a conv-stem hybrid)
    c.model.image_size = 16
    c.model.num_classes = 10
    c.data.image_size = 16
    c.data.synthetic.image_size = 16
    c.data.synthetic.num_train = 512
    c.data.synthetic.num_eval = 64
    c.batch_size = 16
    c.eval_batch_size = 32
    c.total_steps = 6
    c.optim.warmup_steps = 2
    c.log_every = 1
    c.eval_every = 0
    c.ckpt_every = 3
    return set_dotted(c, overrides)


def run_cli(args: list[str], env: dict[str, str] | None = None, timeout: float = 600,
            devices: int = 1) -> subprocess.CompletedProcess:
    """Runs `python -m <module> args` in a fresh process with `devices` simulated CPU devices."""
    full_env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
                "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


@functools.lru_cache(maxsize=None)
def convert_fixtures() -> tuple[Any, dict, dict]:
    """(scripts/make_convert_fixtures.py as a module, its cases.json, its golden outputs.npz).

    The converter tests share these: the script that wrote the fixtures also rebuilds each case's
    checkpoint files (scripts/ is not a package, so it is loaded by path)."""
    spec = importlib.util.spec_from_file_location("make_convert_fixtures", ROOT / "scripts" / "make_convert_fixtures.py")
    fx = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fx)
    return fx, json.loads((fx.FIXTURES / "cases.json").read_text()), dict(np.load(fx.FIXTURES / "outputs.npz"))

