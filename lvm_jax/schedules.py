"""Explicit schedule objects: `value = schedule(step)`.

Each schedule is a frozen dataclass whose `__call__` takes an integer step (a
Python int, a NumPy integer or a traced `jnp` scalar inside a jitted step) and
returns a float32 `jnp` scalar, so one object serves the host (logging) and the
device (inside `train_step`), and any of them is a valid `optax` schedule.

`WarmupCosine` reproduces DINOv2's `CosineScheduler` step for step:
  * a linear warmup from `start_warmup_value` to `base_value` over
    `warmup_steps` steps *including both end points* (NumPy `linspace`), so the
    last warmup step already equals `base_value`;
  * then a half cosine from `base_value` towards `final_value` over the
    remaining `total_steps - warmup_steps` steps (the last one stops just short
    of `final_value`, as in the reference);
  * `final_value` for every step >= `total_steps`.
`freeze_steps` zeroes the first steps *without* shifting the rest, which is what
DINOv2 does to the last-layer lr (`schedule[:freeze] = 0`).

The factories below build the DINOv2 recipe's schedules (lr, weight decay,
teacher momentum, teacher temperature, last-layer lr) from the recipe numbers.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

_DECAYS = ("cosine", "linear", "constant")


@dataclasses.dataclass(frozen=True)
class WarmupCosine:
    """Linear warmup, then cosine (or linear / constant) decay; constant after the end.

    Attributes:
      base_value: value reached at the end of the warmup.
      final_value: value the decay heads to; returned for `step >= total_steps`.
      total_steps: length of warmup + decay.
      warmup_steps: number of warmup steps (0: start the decay at `base_value`).
      start_warmup_value: value at step 0 when `warmup_steps > 0`.
      freeze_steps: steps `< freeze_steps` return 0 (the rest is unchanged).
      decay: 'cosine' (DINOv2), 'linear' or 'constant'.
    """

    base_value: float
    final_value: float
    total_steps: int
    warmup_steps: int = 0
    start_warmup_value: float = 0.0
    freeze_steps: int = 0
    decay: str = "cosine"

    def __post_init__(self):
        if self.total_steps < 0 or self.warmup_steps < 0 or self.freeze_steps < 0:
            raise ValueError(
                f"WarmupCosine got a negative step count (total={self.total_steps}, warmup={self.warmup_steps}, "
                f"freeze={self.freeze_steps}); use counts >= 0.")
        if self.warmup_steps > self.total_steps:
            raise ValueError(
                f"WarmupCosine warmup_steps={self.warmup_steps} exceeds total_steps={self.total_steps}; "
                "lower the warmup or raise the total.")
        if self.decay not in _DECAYS:
            raise ValueError(f"WarmupCosine decay={self.decay!r} is unknown; use one of {_DECAYS}.")

    def __call__(self, step) -> jnp.ndarray:
        step = jnp.asarray(step, jnp.float32)
        warmup = self.warmup_steps
        # linspace(start, base, warmup) includes both end points.
        warm_frac = step / max(warmup - 1, 1)
        warm = self.start_warmup_value + (self.base_value - self.start_warmup_value) * warm_frac
        decay_len = max(self.total_steps - warmup, 1)
        frac = (step - warmup) / decay_len
        if self.decay == "cosine":
            main = self.final_value + 0.5 * (self.base_value - self.final_value) * (1.0 + jnp.cos(math.pi * frac))
        elif self.decay == "linear":
            main = self.base_value + (self.final_value - self.base_value) * frac
        else:
            main = jnp.full_like(frac, self.base_value)
        value = jnp.where(step < warmup, warm, main)
        value = jnp.where(step >= self.total_steps, self.final_value, value)
        return jnp.where(step < self.freeze_steps, 0.0, value).astype(jnp.float32)


def dinov2_lr(lr: float, min_lr: float, total_steps: int, warmup_steps: int) -> WarmupCosine:
    """DINOv2 learning rate: linear warmup 0 -> `lr`, cosine -> `min_lr` (recipe: 10 warmup epochs, 1e-6)."""
    return WarmupCosine(lr, min_lr, total_steps, warmup_steps=warmup_steps)


def dinov2_last_layer_lr(lr: float, min_lr: float, total_steps: int, warmup_steps: int,
                         freeze_steps: int) -> WarmupCosine:
    """The lr schedule with the first `freeze_steps` zeroed: keeps the prototypes fixed early (recipe: 1 epoch)."""
    return WarmupCosine(lr, min_lr, total_steps, warmup_steps=warmup_steps, freeze_steps=freeze_steps)


def dinov2_weight_decay(total_steps: int, start: float = 0.04, end: float = 0.4) -> WarmupCosine:
    """Weight decay rising along a cosine from `start` to `end` (recipe: 0.04 -> 0.4)."""
    return WarmupCosine(start, end, total_steps)


def teacher_momentum(total_steps: int, start: float = 0.992, end: float = 1.0) -> WarmupCosine:
    """EMA momentum of the teacher, cosine from `start` to `end` (recipe: 0.992 -> 1)."""
    return WarmupCosine(start, end, total_steps)


def teacher_temperature(warmup_steps: int, start: float = 0.04, end: float = 0.07) -> WarmupCosine:
    """Teacher softmax temperature: linear warmup `start` -> `end`, then `end` (recipe: 0.04 -> 0.07, 30 epochs)."""
    return WarmupCosine(end, end, warmup_steps, warmup_steps=warmup_steps, start_warmup_value=start)
