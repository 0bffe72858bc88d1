"""The one training state: every piece of mutable training state as a pytree."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import optax


@flax.struct.dataclass
class TrainState:
    """`step`, `params`, `opt_state`, `rng` plus task extras (EMA teacher, DINO centre, ...).

    A train step is a pure function `(TrainState, batch) -> (TrainState, metrics)`;
    sharding, checkpointing and EMA are tree maps over this object.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    extra: dict[str, Any]
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    @classmethod
    def create(cls, params: Any, tx: optax.GradientTransformation, rng: jax.Array,
               extra: dict[str, Any] | None = None) -> "TrainState":
        # `params` may still carry logical-axis boxes (for sharding); the optimizer sees plain arrays.
        return cls(step=jax.numpy.zeros((), jax.numpy.int32), params=params,
                   opt_state=tx.init(nn.meta.unbox(params)),
                   rng=rng, extra=dict(extra or {}), tx=tx)

    def apply_gradients(self, grads: Any, **extra_updates: Any) -> "TrainState":
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        params = optax.apply_updates(self.params, updates)
        extra = {**self.extra, **extra_updates}
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state, extra=extra)

    def step_rng(self) -> jax.Array:
        """A fresh key for this step (dropout, drop-path, mixup), derived without mutating `rng`."""
        return jax.random.fold_in(self.rng, self.step)
