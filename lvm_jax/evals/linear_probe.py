"""Linear probe on frozen features with a small learning-rate sweep (`linear_top1`).

Follows DINOv2's linear evaluation in miniature: linear classifiers on the CLS
token and on CLS concatenated with the mean patch token, SGD with momentum 0.9
and a cosine learning rate, one classifier per learning rate, all trained at
once (`vmap`) inside one jitted `lax.scan`; the best accuracy on the eval set
is reported, as DINOv2 reports the best of its sweep on the evaluation split.

Features are standardised with the train statistics first (an affine
re-parametrisation of the same linear model that makes one lr grid fit any
backbone's feature scale).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

DEFAULT_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)


def _feature_sets(features: Mapping[str, np.ndarray] | np.ndarray) -> dict[str, np.ndarray]:
    if not isinstance(features, Mapping):
        return {"features": np.asarray(features, np.float32)}
    if "cls" not in features:
        raise ValueError(f"linear_probe expects a 'cls' feature (got {sorted(features)}); "
                         "return {'cls': ..., 'patch_mean': ...} from the feature function.")
    sets = {"cls": np.asarray(features["cls"], np.float32)}
    if "patch_mean" in features:
        sets["cls+patch_mean"] = np.concatenate(
            [sets["cls"], np.asarray(features["patch_mean"], np.float32)], axis=-1)
    return sets


def train_linear_classifiers(train_x: np.ndarray, train_y: np.ndarray, num_classes: int,
                             lrs: Sequence[float], epochs: int, batch_size: int, weight_decay: float,
                             seed: int) -> tuple[jax.Array, jax.Array]:
    """Trains one softmax classifier per lr on standardised `train_x [N, D]`.

    Returns stacked `(kernels [n_lr, D, C], biases [n_lr, C])`.
    """
    n, dim = train_x.shape
    batch_size = min(batch_size, n)
    steps_per_epoch = n // batch_size
    steps = epochs * steps_per_epoch
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(n)[:steps_per_epoch * batch_size] for _ in range(epochs)])
    batches = jnp.asarray(order.reshape(steps, batch_size))
    x = jnp.asarray(train_x)
    y = jnp.asarray(train_y, jnp.int32)

    def train_one(lr):
        tx = optax.chain(optax.add_decayed_weights(weight_decay),
                         optax.sgd(optax.cosine_decay_schedule(lr, steps), momentum=0.9))
        params = (jnp.zeros((dim, num_classes)), jnp.zeros((num_classes,)))

        def loss_fn(p, idx):
            logits = x[idx] @ p[0] + p[1]
            return optax.softmax_cross_entropy_with_integer_labels(logits, y[idx]).mean()

        def step(carry, idx):
            p, opt_state = carry
            grads = jax.grad(loss_fn)(p, idx)
            updates, opt_state = tx.update(grads, opt_state, p)
            return (optax.apply_updates(p, updates), opt_state), None

        (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), batches)
        return params

    return jax.jit(jax.vmap(train_one))(jnp.asarray(lrs, jnp.float32))


def linear_probe(train_features: Mapping[str, np.ndarray] | np.ndarray, train_labels: np.ndarray,
                 test_features: Mapping[str, np.ndarray] | np.ndarray, test_labels: np.ndarray,
                 num_classes: int | None = None, lrs: Sequence[float] = DEFAULT_LRS, epochs: int = 50,
                 batch_size: int = 1024, weight_decay: float = 0.0, seed: int = 0) -> dict[str, float]:
    """Linear-probe accuracy: best over learning rates and feature sets.

    Args:
      train_features / test_features: `{'cls': [N, D], 'patch_mean': [N, D] (optional)}`
        or a plain `[N, D]` array.
      train_labels / test_labels: int `[N]`.
      num_classes: default `max(label) + 1`.
      lrs: the sweep; epochs, batch_size, weight_decay: SGD settings.
    Returns:
      `{'linear_top1', 'linear_best_lr', 'linear_best_uses_patch_mean' (0/1),
        'linear_top1_cls'}` ('linear_top1_features' for array input), accuracies as fractions in [0, 1].
    """
    train_sets, test_sets = _feature_sets(train_features), _feature_sets(test_features)
    train_labels = np.asarray(train_labels, np.int32)
    test_labels = np.asarray(test_labels, np.int32)
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    results = {}
    for name, train_x in train_sets.items():
        test_x = test_sets[name]
        if len(train_x) != len(train_labels) or len(test_x) != len(test_labels):
            raise ValueError("linear_probe: features and labels have different lengths; pass one label per row.")
        mean = train_x.mean(0)
        std = train_x.std(0) + 1e-6
        kernels, biases = train_linear_classifiers((train_x - mean) / std, train_labels, num_classes, lrs,
                                                   epochs, batch_size, weight_decay, seed)
        logits = jnp.einsum("nd,ldc->lnc", jnp.asarray((test_x - mean) / std), kernels) + biases[:, None]
        acc = np.asarray(jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(test_labels)[None], axis=-1))
        acc = np.where(np.isfinite(np.asarray(kernels).sum((1, 2))), acc, 0.0)  # a diverged lr scores 0
        results[name] = acc
    best_name, best_i = max(((name, int(np.argmax(acc))) for name, acc in results.items()),
                            key=lambda item: results[item[0]][item[1]])
    first = next(iter(results))
    return {
        "linear_top1": float(results[best_name][best_i]),
        "linear_best_lr": float(lrs[best_i]),
        "linear_best_uses_patch_mean": float(best_name == "cls+patch_mean"),
        f"linear_top1_{first.replace('+', '_')}": float(results[first].max()),
    }
