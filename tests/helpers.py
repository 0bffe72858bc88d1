"""Tiny configs and runners shared by the trainer tests."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import ml_collections

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
