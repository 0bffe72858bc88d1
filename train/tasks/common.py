"""Pieces several tasks share: building a ViT from config, gradient accumulation, top-k."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from lvm_jax.errors import UserError
from lvm_jax.models import ViT

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def model_kwargs(model_cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """ConfigDict -> ViT keyword arguments (dtype names become dtypes, lists become tuples)."""
    kwargs = dict(model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else model_cfg)
    for key in ("dtype", "param_dtype"):
        if isinstance(kwargs.get(key), str):
            if kwargs[key] not in DTYPES:
                raise UserError(f"config.model.{key}={kwargs[key]!r} is unknown; use one of {sorted(DTYPES)}.")
            kwargs[key] = DTYPES[kwargs[key]]
    return {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}


def build_vit(model_cfg: ml_collections.ConfigDict, **overrides: Any) -> ViT:
    kwargs = {**model_kwargs(model_cfg), **overrides}
    valid = set(ViT.__dataclass_fields__) - {"parent", "name"}
    unknown = set(kwargs) - valid
    if unknown:
        raise UserError(f"config.model has fields ViT does not know: {sorted(unknown)}; valid: {sorted(valid)}.")
    return ViT(**kwargs)


def grad_accum_steps(config: ml_collections.ConfigDict, mesh) -> int:
    """`config.optim.grad_accum`, checked: every micro-batch must split evenly over the data-parallel devices.

    accumulate_gradients takes rows i, i+k, ... into micro-batch i; with B % (k * dp) == 0 each device
    then forms its micro-batches from its own rows. Otherwise XLA reshards every micro-batch (correct
    numbers, a hidden all-to-all per micro-batch), so it is refused.
    """
    from lvm_jax import sharding

    k = int(config.optim.get("grad_accum", 1) or 1)
    dp = sharding.data_parallel_size(mesh)
    if k < 1 or int(config.batch_size) % (k * dp):
        raise UserError(f"config.optim.grad_accum={k} must split config.batch_size={config.batch_size} into "
                        f"micro-batches divisible by the data-parallel size {dp}; use a batch size that is a "
                        f"multiple of {max(k, 1) * dp}.")
    return k


def accumulate_gradients(loss_fn: Callable[[Any, dict], tuple[jax.Array, dict]], params: Any,
                         batch: dict[str, jax.Array], steps: int) -> tuple[Any, tuple[jax.Array, dict]]:
    """Mean gradient of `loss_fn(params, micro_batch)` over `steps` micro-batches of `batch`.

    Micro-batch i takes rows i, i+steps, i+2*steps, ... so every device contributes
    B_local/steps rows to each micro-batch (no cross-device shuffling). Each micro-batch
    gets an `index` entry (for rng folding). Returns (grads, (loss, aux)).
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if steps <= 1:
        (loss, aux), grads = grad_fn(params, {**batch, "index": jnp.int32(0)})
        return grads, (loss, aux)
    size = next(iter(batch.values())).shape[0]
    if size % steps:
        raise UserError(f"config.optim.grad_accum={steps} does not divide the batch {size}; pick a divisor.")
    micro = jax.tree_util.tree_map(
        lambda x: jnp.swapaxes(x.reshape((size // steps, steps) + x.shape[1:]), 0, 1), batch)
    micro["index"] = jnp.arange(steps, dtype=jnp.int32)

    def body(carry, mb):
        (loss, aux), grads = grad_fn(params, mb)
        acc = jax.tree_util.tree_map(jnp.add, carry, (grads, loss, aux))
        return acc, None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    _, aux_shape = jax.eval_shape(loss_fn, params, jax.tree_util.tree_map(lambda x: x[0], micro))
    zero_aux = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape)
    (grads, loss, aux), _ = jax.lax.scan(body, (zeros, jnp.float32(0), zero_aux), micro)
    scale = 1.0 / steps
    return (jax.tree_util.tree_map(lambda g: g * scale, grads),
            (loss * scale, jax.tree_util.tree_map(lambda a: a * scale, aux)))


def topk_correct(logits: jax.Array, labels: jax.Array, ks: tuple[int, ...]) -> list[jax.Array]:
    """Per-example 0/1 hits `[B]` for each k: the label is among the k largest logits.

    Ties go to the lower class index (as argmax), so a constant classifier scores 1/C, not 1.
    """
    _, top = jax.lax.top_k(logits, min(max(ks), logits.shape[-1]))  # top-5 of 2 classes = top-2
    hits = top == labels[:, None]
    return [jnp.any(hits[:, :k], axis=1).astype(jnp.float32) for k in ks]
