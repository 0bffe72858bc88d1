"""Meshes, logical-axis rules and host -> global array helpers.

Every parameter and key activation in lvm_jax carries *logical* axis names
(`embed`, `mlp`, `heads`, ...). One table, `LOGICAL_RULES`, maps them onto the
three mesh axes `('data', 'fsdp', 'tensor')`. A mesh axis of size 1 makes its
rules no-ops, so data-parallel, FSDP and tensor-parallel are mesh shapes in the
config (`config.mesh = dict(data=-1, fsdp=1, tensor=1)`), never code changes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lvm_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
# The batch is split over every axis that holds a different slice of the data.
BATCH_AXES = ("data", "fsdp")

# Logical axis name -> mesh axis (or axes). Params and activations use distinct
# names for the model width: FSDP shards the *parameter* `embed` dimension while
# activations keep it whole (they are already split along `batch`).
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    # activations
    ("batch", BATCH_AXES),
    ("length", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv", None),
    # parameters
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("classes", None),
    ("proj", None),
    ("layers", None),
    ("patch", None),
    ("prototypes", "tensor"),
)


def maybe_initialize_distributed() -> None:
    """Calls `jax.distributed.initialize` when this process is one of several.

    TPU pods and SLURM clusters are auto-detected by JAX; elsewhere set
    `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`.
    Must run before any other JAX call touches the devices.
    """
    coordinator = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if coordinator:
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    elif "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize()
    elif os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
        jax.distributed.initialize()


def resolve_mesh_shape(mesh_cfg: Mapping[str, int], num_devices: int) -> tuple[int, int, int]:
    """Turns `dict(data=-1, fsdp=2, tensor=1)` into concrete sizes for `num_devices`.

    At most one axis may be -1 ("the rest of the devices").
    """
    unknown = set(mesh_cfg) - set(MESH_AXES)
    if unknown:
        raise UserError(
            f"config.mesh has unknown axes {sorted(unknown)}; use only {list(MESH_AXES)}."
        )
    sizes = [int(mesh_cfg.get(axis, 1)) for axis in MESH_AXES]
    if sizes.count(-1) > 1:
        raise UserError(f"config.mesh={dict(mesh_cfg)} has more than one -1; give all but one axis a size.")
    if any(s == 0 or s < -1 for s in sizes):
        raise UserError(f"config.mesh={dict(mesh_cfg)} has a size that is not positive or -1.")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if num_devices % known:
            raise UserError(
                f"config.mesh={dict(mesh_cfg)} needs a multiple of {known} devices but {num_devices} are "
                "available; change the fixed axis sizes."
            )
        sizes[sizes.index(-1)] = num_devices // known
    total = int(np.prod(sizes))
    if total > num_devices:
        raise UserError(
            f"config.mesh={dict(mesh_cfg)} needs {total} devices but only {num_devices} are available; "
            "shrink the mesh or use -1 for one axis."
        )
    if total < num_devices:
        raise UserError(
            f"config.mesh={dict(mesh_cfg)} uses {total} of the {num_devices} devices; "
            "make the mesh cover all devices (use -1 for one axis)."
        )
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(mesh_cfg: Mapping[str, int] | None = None, devices: list[Any] | None = None) -> Mesh:
    """Builds a `('data', 'fsdp', 'tensor')` mesh over `devices` (default: all)."""
    devices = list(jax.devices()) if devices is None else list(devices)
    shape = resolve_mesh_shape(dict(mesh_cfg or {"data": -1}), len(devices))
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # non-TPU topologies that mesh_utils cannot lay out
        grid = np.asarray(devices).reshape(shape)
    axis_types = getattr(jax.sharding, "AxisType", None)
    if axis_types is not None:
        return Mesh(grid, MESH_AXES, axis_types=(axis_types.Auto,) * len(MESH_AXES))
    return Mesh(grid, MESH_AXES)


def data_parallel_size(mesh: Mesh) -> int:
    """Number of distinct batch slices: the product of the batch mesh axes."""
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def check_batch_size(global_batch: int, mesh: Mesh, what: str = "config.batch_size") -> int:
    """Returns the per-process batch; raises if the batch does not split evenly."""
    dp = data_parallel_size(mesh)
    if global_batch % dp:
        raise UserError(
            f"{what}={global_batch} is not divisible by the data-parallel size {dp} "
            f"(mesh data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']}); "
            f"use a multiple of {dp}."
        )
    if global_batch % jax.process_count():
        raise UserError(
            f"{what}={global_batch} is not divisible by the {jax.process_count()} processes; "
            f"use a multiple of {jax.process_count()}."
        )
    if dp % jax.process_count():
        # Every process loads its own rows; processes that hold the same batch slice (the tensor
        # axis spanning hosts) would feed different rows to what XLA takes as one replicated slice.
        raise UserError(
            f"the data-parallel size {dp} (mesh data x fsdp) is not a multiple of the {jax.process_count()} "
            "processes: keep the mesh's tensor axis within one host (tensor <= devices per process).")
    return global_batch // jax.process_count()


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over ('data', 'fsdp'); other dims whole."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def logical_shardings(boxed_tree: Any, mesh: Mesh) -> Any:
    """Maps a tree with `nn.LogicallyPartitioned` leaves (e.g. from `jax.eval_shape(init)`)
    to `NamedSharding`s; unannotated leaves are replicated. Output has the unboxed structure."""
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_RULES)


def host_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Per-process numpy batch `{k: [B_local, ...]}` -> global arrays `[B, ...]` sharded on batch axes."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def to_host(tree: Any) -> Any:
    """`tree`'s arrays as NumPy arrays holding their full (global) values, on every process.

    Collective when there are several processes (every process must call it): an array sharded
    across hosts (fsdp over a pod, a batch split over processes) is not fully addressable on any
    one of them, and `jax.device_get` of it fails; the values are all-gathered instead.
    """
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return jax.tree_util.tree_map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def axis_rules():
    """Context manager installing LOGICAL_RULES for `nn.with_logical_constraint` inside traced code."""
    return nn.logical_axis_rules(LOGICAL_RULES)


def mesh_context(mesh: Mesh):
    """Context that makes `mesh` (and LOGICAL_RULES) visible to traced code.

    Needed so `nn.with_logical_constraint` inside models resolves to mesh axes.
    """
    import contextlib

    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(mesh) if hasattr(jax, "set_mesh") else mesh)
    stack.enter_context(axis_rules())
    return stack


def state_shardings(abstract_state: Any, mesh: Mesh) -> Any:
    """NamedShardings for a TrainState whose `params`/`extra` hold logically-annotated (boxed) leaves.

    Optimizer-state leaves that mirror params (Adam moments) get the params' shardings
    (found with `optax.tree_map_params`); everything else is replicated.
    """
    import optax

    # Masked transforms (optax.masked / multi_transform, e.g. a frozen LiT tower) hold a MaskedNode
    # where a parameter is masked out; it stays a MaskedNode (an empty subtree) in the specs.
    is_masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
    param_specs = nn.get_partition_spec(abstract_state.params)
    unboxed_params = nn.meta.unbox(abstract_state.params)
    opt_specs = optax.tree_map_params(
        abstract_state.tx,
        lambda x, spec: x if is_masked(x) else spec,
        abstract_state.opt_state,
        param_specs,
        transform_non_params=lambda _: P(),
        is_leaf=is_masked,
    )
    del unboxed_params
    specs = abstract_state.replace(
        step=P(), rng=P(), params=param_specs, opt_state=opt_specs,
        extra=nn.get_partition_spec(abstract_state.extra))
    return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_RULES)
