"""Task `supervised`: ViT image classification (softmax cross-entropy, label smoothing, mixup)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from lvm_jax import data as lvm_data
from lvm_jax.models import ViT
from lvm_jax.optim import build_optimizer
from train.state import TrainState
from train.tasks.base import Task
from train.tasks.common import accumulate_gradients, build_vit, grad_accum_steps, topk_correct


class SupervisedTask(Task):
    name = "supervised"

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh):
        super().__init__(config, mesh)
        self._eval_source = None
        self._eval_step = None
        self.total_steps = int(config.get("total_steps") or 1)
        self.grad_accum = grad_accum_steps(config, mesh)

    # --- data ---------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        if getattr(self, "_num_classes", None) is None:
            n = self.config.model.get("num_classes") or self.train_source().num_classes
            self._num_classes = int(n)
        return self._num_classes

    def train_transforms(self) -> list:
        return lvm_data.supervised_transforms(self.config.data, train=True)

    # --- model and state ----------------------------------------------------------------------
    @property
    def model(self) -> ViT:
        return build_vit(self.config.model, num_classes=self.num_classes)

    def init_state(self, rng: jax.Array) -> TrainState:
        size = int(self.config.data.image_size)
        init_rng, state_rng = jax.random.split(rng)
        variables = self.model.init(init_rng, jnp.zeros((1, size, size, 3), jnp.float32))
        params = variables["params"]
        tx = self.optimizer(params)
        return TrainState.create(params=params, tx=tx, rng=state_rng)

    def optimizer(self, params: Any) -> optax.GradientTransformation:
        # Cached so the abstract and the concrete state share one (static) tx object.
        if getattr(self, "_tx", None) is None:
            import flax.linen as nn

            self._tx, self.schedule = build_optimizer(
                self.config.optim, self.total_steps, nn.meta.unbox(params), depth=self.model.dims()[1])
        return self._tx

    # --- step ---------------------------------------------------------------------------------
    def train_step(self, state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict]:
        rng = state.step_rng()
        mix_rng, drop_rng = jax.random.split(rng)
        images, targets = batch["image"], self.soft_targets(batch["label"])
        images, targets = self.mixup(mix_rng, images, targets)

        def loss_fn(params, micro):
            out = self.model.apply({"params": params}, micro["image"], train=True,
                                   rngs={"dropout": jax.random.fold_in(drop_rng, micro["index"])})
            logits = out["logits"].astype(jnp.float32)
            loss = jnp.mean(optax.softmax_cross_entropy(logits, micro["target"]))
            return loss, {"top1": jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(micro["target"], -1))}

        grads, (loss, aux) = accumulate_gradients(
            loss_fn, state.params, {"image": images, "target": targets},
            self.grad_accum)
        new_state = state.apply_gradients(grads)
        metrics = {"loss": loss, "top1": aux["top1"], "lr": self.schedule(state.step),
                   "grad_norm": optax.tree.norm(grads)}
        return new_state, metrics

    def soft_targets(self, labels: jax.Array) -> jax.Array:
        smoothing = float(self.config.get("label_smoothing", 0.0))
        onehot = jax.nn.one_hot(labels, self.num_classes, dtype=jnp.float32)
        return onehot * (1.0 - smoothing) + smoothing / self.num_classes

    def mixup(self, rng: jax.Array, images: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Mixup (Zhang et al.) with one Beta(a, a) ratio per batch, mixing with the reversed batch."""
        alpha = float(self.config.get("mixup_alpha", 0.0))
        if alpha <= 0:
            return images, targets
        ratio = jax.random.beta(rng, alpha, alpha)
        mix = lambda x: ratio * x + (1 - ratio) * x[::-1]  # noqa: E731
        return mix(images), mix(targets)

    # --- eval ---------------------------------------------------------------------------------
    def evaluate(self, state: TrainState, step: int) -> dict[str, float]:
        if self._eval_source is None:
            self._eval_source = lvm_data.build_source(self.config.data, split="eval")
            model = self.model

            def eval_step(params, batch):
                logits = model.apply({"params": params}, batch["image"])["logits"]
                top1, top5 = topk_correct(logits, batch["label"], (1, 5))
                valid = batch["valid"]
                loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["label"])
                return {"top1": jnp.sum(top1 * valid), "top5": jnp.sum(top5 * valid),
                        "eval_loss": jnp.sum(loss * valid), "count": jnp.sum(valid)}

            self._eval_step = jax.jit(eval_step)
        totals: dict[str, float] = {}
        ops = lvm_data.supervised_transforms(self.config.data, train=False)
        for batch in self.eval_batches(self._eval_source, ops, keys=("image", "label")):
            for k, v in self._eval_step(state.params, batch).items():
                totals[k] = totals.get(k, 0.0) + v
        totals = {k: float(v) for k, v in jax.device_get(totals).items()}
        count = max(totals.pop("count"), 1.0)
        return {k: v / count for k, v in totals.items()}

