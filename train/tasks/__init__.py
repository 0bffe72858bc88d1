"""Task registry: `config.task` -> the module that knows its objective."""

from __future__ import annotations

import importlib

import ml_collections
from jax.sharding import Mesh

from lvm_jax.errors import UserError

TASKS = {
    "supervised": "train.tasks.supervised:SupervisedTask",
    "clip": "train.tasks.clip:ClipTask",
    "dinov2": "train.tasks.dinov2:Dinov2Task",
}


def get_task(config: ml_collections.ConfigDict, mesh: Mesh):
    name = config.get("task")
    if name not in TASKS:
        raise UserError(f"config.task={name!r} is unknown; use one of {sorted(TASKS)}.")
    module, _, cls = TASKS[name].partition(":")
    return getattr(importlib.import_module(module), cls)(config, mesh)
