"""What a task gives the loop. The loop knows nothing about ViT vs CLIP vs DINOv2."""

from __future__ import annotations

from collections.abc import Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from lvm_jax import data as lvm_data
from lvm_jax import sharding
from train.state import TrainState


class Task:
    """Base class: subclasses define the model, the transforms, init, the step and the evals.

    `init_state` returns a TrainState whose `params` (and model trees in `extra`)
    still carry logical-axis boxes; the loop derives shardings from them and
    creates the state already sharded. `train_step` is pure and jitted by the loop.
    """

    name = "base"
    workdir = None  # set by the loop: where a task may write extra outputs (e.g. DIR/plots)

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh):
        self.config = config
        self.mesh = mesh

    # --- data -----------------------------------------------------------------------------
    def train_source(self):
        return lvm_data.build_source(self.config.data, split="train")

    def train_transforms(self) -> list:
        raise NotImplementedError

    # --- state and step -------------------------------------------------------------------
    def init_state(self, rng: jax.Array) -> TrainState:
        raise NotImplementedError

    def train_step(self, state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        raise NotImplementedError

    def load_pretrained(self, state: TrainState, path: str) -> TrainState:
        """`config.init_from`: merge converted/pretrained weights into the fresh (sharded) params.

        Heads of another size and leaves the checkpoint lacks keep their init; the
        position table is resampled to the model's image size (see lvm_jax.convert).
        """
        from lvm_jax.convert import merge_pretrained

        return state.replace(params=merge_pretrained(state.params, path, model=self.model))

    def health_warnings(self, step: int, metrics: dict[str, float]) -> list[str]:
        """One-sentence warnings about logged train metrics (e.g. a collapsing self-supervised run).

        Each warning starts with its kind and a colon ("uniform collapse: ..."); the loop prints
        each kind once, at the first logged step where it appears.
        """
        del step, metrics
        return []

    # --- evaluation -----------------------------------------------------------------------
    def evaluate(self, state: TrainState, step: int) -> dict[str, float]:
        return {}

    def eval_batches(self, source, transforms: list, global_batch: int | None = None,
                     keys: tuple[str, ...] | None = None) -> Iterator[dict[str, jax.Array]]:
        """One pass over `source` as global batches with a `valid` mask `[B]` for the padding.

        Every process yields the same number of batches (padding with empty ones), so
        collective evals never hang on uneven shards.
        """
        global_batch = global_batch or int(self.config.get("eval_batch_size", self.config.batch_size))
        local_batch = sharding.check_batch_size(global_batch, self.mesh, "config.eval_batch_size")
        options = {**lvm_data.loader_options(self.config.data),
                   "worker_count": int(self.config.data.get("eval_worker_count", 0))}
        loader = lvm_data.make_loader(
            source, transforms, batch_size=local_batch, shuffle=False, seed=0, num_epochs=1,
            shard_index=jax.process_index(), shard_count=jax.process_count(), drop_remainder=False, **options)

        def first_record() -> dict[str, np.ndarray]:
            # The batch layout for a process whose shard is empty (fewer records than processes):
            # any record of the whole source shows it.
            one = lvm_data.make_loader(source, transforms, batch_size=1, shuffle=False, seed=0, num_epochs=1,
                                       shard_index=0, shard_count=1, drop_remainder=False,
                                       **{**options, "worker_count": 0})
            return next(iter(one))

        per_process = -(-len(source) // jax.process_count())
        num_batches = -(-per_process // local_batch)
        iterator = iter(loader)
        template = None
        for _ in range(num_batches):
            batch = next(iterator, None)
            if batch is None:  # this process's shard ran out first: an all-padding batch
                template = template or first_record()
                batch = {k: np.zeros_like(v[:0]) for k, v in template.items()}
            template = template or batch
            if keys is not None:
                batch = {k: batch[k] for k in keys}
            n = len(next(iter(batch.values())))
            pad = local_batch - n
            padded = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) if pad else v
                      for k, v in batch.items()}
            padded["valid"] = np.arange(local_batch) < n
            yield sharding.host_to_global(padded, self.mesh)


def masked_mean(x: jax.Array, valid: jax.Array) -> jax.Array:
    return jnp.sum(jnp.where(valid, x, 0)) / jnp.maximum(jnp.sum(valid), 1)
