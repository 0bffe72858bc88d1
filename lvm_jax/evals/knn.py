"""Weighted k-NN classification on frozen features (DINO's `knn_classifier`), and feature extraction.

Each test feature votes with its k most cosine-similar train features, each
vote weighted by `exp(similarity / T)` (T = 0.07); the class with the largest
summed weight wins. Features are L2-normalised first. `knn_top1` is the
accuracy at k = 20, a fraction in [0, 1] like every `top1` in lvm_jax.

The train features live on the default device; the test set is processed in
fixed-size chunks (the last one padded) so the jitted chunk compiles once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from lvm_jax import sharding

DEFAULT_KS = (10, 20, 100)
DEFAULT_TEMPERATURE = 0.07


def _l2_normalize(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def knn_classifier(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                   test_labels: np.ndarray, ks: Sequence[int] = DEFAULT_KS,
                   temperature: float = DEFAULT_TEMPERATURE, num_classes: int | None = None,
                   chunk_size: int = 512) -> dict[str, float]:
    """Weighted k-NN accuracy for every k in `ks`.

    Args:
      train_features: `[N_train, D]`; test_features `[N_test, D]` (normalised here).
      train_labels / test_labels: int `[N_train]` / `[N_test]`.
      ks: neighbour counts; a k above N_train uses all train points.
      temperature: T of the `exp(sim / T)` vote weights.
      num_classes: default `max(label) + 1`.
      chunk_size: test rows per jitted chunk.
    Returns:
      `{'knn_top1': acc at k=20 (or the middle k when 20 is absent), 'knn_top5': same k,
      'knn_top1_k{k}': acc for each k}`, fractions in [0, 1].
    """
    train_features = np.asarray(train_features, np.float32)
    test_features = np.asarray(test_features, np.float32)
    train_labels = np.asarray(train_labels, np.int32)
    test_labels = np.asarray(test_labels, np.int32)
    if train_features.ndim != 2 or test_features.ndim != 2 or train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"knn_classifier needs [N, D] train and test features of the same D, got {train_features.shape} "
            f"and {test_features.shape}.")
    if len(train_features) != len(train_labels) or len(test_features) != len(test_labels):
        raise ValueError("knn_classifier: features and labels have different lengths; pass one label per row.")
    if len(train_features) == 0 or len(test_features) == 0:
        raise ValueError("knn_classifier got an empty train or test set; extract features for both splits.")
    ks = tuple(sorted(set(int(k) for k in ks)))
    if not ks or ks[0] < 1:
        raise ValueError(f"knn_classifier ks={ks} must be positive integers.")
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    k_eff = tuple(min(k, len(train_features)) for k in ks)
    k_max = max(k_eff)

    train = _l2_normalize(jnp.asarray(train_features))
    train_onehot = jax.nn.one_hot(jnp.asarray(train_labels), num_classes, dtype=jnp.float32)

    @jax.jit
    def chunk_correct(queries, labels, valid):
        sims = _l2_normalize(queries) @ train.T
        top_sims, top_idx = jax.lax.top_k(sims, k_max)  # sorted, most similar first
        votes = train_onehot[top_idx] * jnp.exp(top_sims / temperature)[..., None]  # [b, k_max, C]
        cum_votes = jnp.cumsum(votes, axis=1)
        out = []
        for k in k_eff:
            scores = cum_votes[:, k - 1]
            top1 = jnp.argmax(scores, axis=-1) == labels
            top5 = jnp.any(jax.lax.top_k(scores, min(5, num_classes))[1] == labels[:, None], axis=-1)
            out.append((jnp.sum(top1 & valid), jnp.sum(top5 & valid)))
        return out

    chunk_size = min(chunk_size, len(test_features))
    totals = np.zeros((len(ks), 2), np.int64)
    for start in range(0, len(test_features), chunk_size):
        q = test_features[start:start + chunk_size]
        y = test_labels[start:start + chunk_size]
        n = len(q)
        if n < chunk_size:  # pad so the chunk keeps its compiled shape
            q = np.concatenate([q, np.zeros((chunk_size - n, q.shape[1]), np.float32)])
            y = np.concatenate([y, np.zeros(chunk_size - n, np.int32)])
        totals += np.asarray(jax.device_get(chunk_correct(q, y, jnp.arange(chunk_size) < n)))
    acc = totals / len(test_features)
    main = ks.index(20) if 20 in ks else len(ks) // 2
    metrics = {"knn_top1": float(acc[main, 0]), "knn_top5": float(acc[main, 1])}
    metrics.update({f"knn_top1_k{k}": float(acc[i, 0]) for i, k in enumerate(ks)})
    return metrics


def extract_features(apply_fn: Callable[[Any, jax.Array], Any], params: Any,
                     batches: Iterable[Mapping[str, Any]], mesh: Mesh,
                     batch_size: int | None = None) -> dict[str, np.ndarray]:
    """Runs a jitted forward over batches sharded on the batch axes and returns host features.

    Args:
      apply_fn: `(params, images [B, H, W, 3]) -> array [B, ...] or dict of them`
        (e.g. `{'cls': [B, D], 'patch_mean': [B, D]}`).
      params: the model parameters (already placed/sharded as you like).
      batches: dicts with 'image' and 'label', either per-process NumPy arrays
        (padded here to a fixed size, so the forward compiles once) or global
        `jax.Array`s with a bool 'valid' `[B]` (as `Task.eval_batches` yields).
      mesh: the `('data', 'fsdp', 'tensor')` mesh.
      batch_size: padded per-process batch for NumPy input; default: the first
        batch's size rounded up to the data-parallel size.
    Returns:
      `{name: [N, ...]}` NumPy arrays for the valid rows (an array output is named
      'features'), plus 'label' `[N]`.
    """
    fwd = jax.jit(apply_fn)
    collected: dict[str, list[np.ndarray]] = {}
    for batch in batches:
        if isinstance(batch["image"], jax.Array) and "valid" in batch:
            images, labels, valid = batch["image"], batch["label"], batch["valid"]
        else:
            images, labels = np.asarray(batch["image"]), np.asarray(batch["label"])
            n = len(images)
            if batch_size is None:
                dp = sharding.data_parallel_size(mesh) // max(jax.process_count(), 1)
                batch_size = -(-n // max(dp, 1)) * max(dp, 1)
            if n > batch_size:
                raise ValueError(f"extract_features got a batch of {n} rows, above batch_size={batch_size}; "
                                 "keep the loader's batch size fixed.")
            pad = batch_size - n
            host = {
                "image": np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)]),
                "label": np.concatenate([labels, np.zeros((pad,) + labels.shape[1:], labels.dtype)]),
                "valid": np.arange(batch_size) < n,
            }
            glob = sharding.host_to_global(host, mesh)
            images, labels, valid = glob["image"], glob["label"], glob["valid"]
        with sharding.mesh_context(mesh):
            out = fwd(params, images)
        out = dict(out) if isinstance(out, Mapping) else {"features": out}
        out["label"] = labels
        out["valid"] = valid
        host_out = sharding.to_host(out)
        keep = host_out.pop("valid").astype(bool)
        for name, value in host_out.items():
            collected.setdefault(name, []).append(value[keep])
    if not collected:
        raise ValueError("extract_features got no batches; check the data source and split.")
    return {name: np.concatenate(parts) for name, parts in collected.items()}


