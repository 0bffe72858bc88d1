"""Image-text retrieval recall@k (CLIP_benchmark conventions) and batched embedding helpers.

An image may have several captions. A query counts as a hit at k when ANY of its
correct matches is among its k highest-scoring candidates:
- `t2i_r{k}`: for each caption, is its image among the top-k images? (mean over captions)
- `i2t_r{k}`: for each image, is any of its captions among the top-k captions? (mean over images)
Scores are cosine similarities (embeddings are L2-normalised here); values are fractions in [0, 1].
"""
from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from lvm_jax import sharding

DEFAULT_KS = (1, 5, 10)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Unit-norm rows of `[N, D]` (float32)."""
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def group_captions_by_image(image_keys: Sequence[Hashable]) -> tuple[np.ndarray, np.ndarray]:
    """Per-caption image keys (e.g. paths) -> (first row of each distinct image `[N_img]`,
    image index of every caption `[N_txt]`), in first-seen order."""
    index_of: dict[Hashable, int] = {}
    first_rows: list[int] = []
    text_to_image = np.empty(len(image_keys), np.int64)
    for row, key in enumerate(image_keys):
        if key not in index_of:
            index_of[key] = len(first_rows)
            first_rows.append(row)
        text_to_image[row] = index_of[key]
    return np.asarray(first_rows, np.int64), text_to_image


MISS = np.iinfo(np.int64).max  # the rank of a query with no finite positive: outside every top-k


def best_positive_rank(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """0-based position of each row's first positive in a top-k ranking of its candidates `[Q]`.

    Args:
      scores: `[Q, C]` similarities; positive: bool `[Q, C]`, >= 1 True per row.
    Ties rank by candidate index (deterministic; torch.topk's order among ties is unspecified):
    counting only strictly higher scores would make every tie a hit, so a collapsed model whose
    embeddings are all equal would score recall 1.0. A non-finite score (a NaN embedding) ranks
    below every finite one, and a row whose positives are all non-finite is a miss at every k
    (`MISS`, not C: with k >= C, rank C was a hit), so NaN embeddings never count as perfect and
    one NaN caption costs its own hits only.
    """
    candidates = np.arange(scores.shape[1])
    clean = np.where(np.isfinite(scores), scores, -np.inf)
    masked = np.where(positive, clean, -np.inf)
    best_index = np.argmax(masked, axis=1)[:, None]  # the lowest index among tied best positives
    best = np.take_along_axis(masked, best_index, axis=1)
    rank = np.sum(clean > best, axis=1) + np.sum((clean == best) & (candidates < best_index), axis=1)
    return np.where(np.isfinite(best[:, 0]), rank, MISS)


def retrieval_metrics(image_embeds: np.ndarray, text_embeds: np.ndarray, text_to_image: Sequence[int],
                      ks: Sequence[int] = DEFAULT_KS, chunk_size: int = 1024) -> dict[str, float]:
    """Recall@k in both directions.

    Args:
      image_embeds: `[N_img, D]`; text_embeds: `[N_txt, D]` (normalised here).
      text_to_image: int `[N_txt]`, the image index of every caption; every image needs >= 1 caption.
      ks: recall cut-offs.
      chunk_size: query rows scored at a time (bounds memory to chunk x N).
    Returns:
      {'i2t_r1', 'i2t_r5', 'i2t_r10', 't2i_r1', 't2i_r5', 't2i_r10'} for ks=(1, 5, 10).
    """
    images, texts = l2_normalize(image_embeds), l2_normalize(text_embeds)
    text_to_image = np.asarray(text_to_image, np.int64)
    if images.ndim != 2 or texts.ndim != 2 or images.shape[1] != texts.shape[1]:
        raise ValueError(f"retrieval_metrics needs [N, D] image and text embeddings of one width, got "
                         f"{images.shape} and {texts.shape}.")
    if text_to_image.shape != (len(texts),):
        raise ValueError(f"text_to_image must hold one image index per caption ({len(texts)}), got shape "
                         f"{text_to_image.shape}.")
    if len(texts) and (text_to_image.min() < 0 or text_to_image.max() >= len(images)):
        raise ValueError(f"text_to_image has indices outside [0, {len(images)}); it must index image_embeds.")
    captions_per_image = np.bincount(text_to_image, minlength=len(images))
    if len(images) == 0 or np.any(captions_per_image == 0):
        raise ValueError(f"{int(np.sum(captions_per_image == 0))} images have no caption (or there are no "
                         "images); retrieval needs at least one caption per image.")

    t2i_rank = np.empty(len(texts), np.int64)
    for start in range(0, len(texts), chunk_size):
        q = texts[start:start + chunk_size]
        positive = text_to_image[start:start + chunk_size, None] == np.arange(len(images))[None]
        t2i_rank[start:start + chunk_size] = best_positive_rank(q @ images.T, positive)
    i2t_rank = np.empty(len(images), np.int64)
    for start in range(0, len(images), chunk_size):
        q = images[start:start + chunk_size]
        positive = np.arange(start, start + len(q))[:, None] == text_to_image[None]
        i2t_rank[start:start + chunk_size] = best_positive_rank(q @ texts.T, positive)

    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = float(np.mean(i2t_rank < k))
        out[f"t2i_r{k}"] = float(np.mean(t2i_rank < k))
    return out


def embed_arrays(apply_fn: Callable[[Any, jax.Array], jax.Array], params: Any, inputs: np.ndarray,
                 mesh: Mesh, batch_size: int = 256) -> np.ndarray:
    """Runs a jitted forward over `inputs` in fixed-size batches sharded on the batch mesh axes.

    Every process passes the same `inputs` (e.g. all prompts, or all tokenized captions)
    and gets all embeddings back.

    Args:
      apply_fn: `(params, x [B, ...]) -> [B, E]`, e.g.
        `lambda p, t: model.apply(p, t, method="encode_text")`.
      inputs: `[N, ...]` images (already preprocessed) or token ids.
      batch_size: rows per forward; rounded up to a multiple of the data-parallel size.
    Returns:
      `[N, E]` NumPy array (unnormalised, as apply_fn returns it).
    """
    inputs = np.asarray(inputs)
    if len(inputs) == 0:
        raise ValueError("embed_arrays got no inputs; pass at least one row.")
    dp = sharding.data_parallel_size(mesh)
    unit = int(np.lcm(dp, jax.process_count()))
    batch_size = -(-batch_size // unit) * unit
    per_process = batch_size // jax.process_count()
    fwd = jax.jit(apply_fn)
    outputs = []
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start:start + batch_size]
        n = len(chunk)
        if n < batch_size:  # pad the last batch so the forward compiles once
            chunk = np.concatenate([chunk, np.zeros((batch_size - n,) + chunk.shape[1:], chunk.dtype)])
        local = chunk[jax.process_index() * per_process:(jax.process_index() + 1) * per_process]
        x = sharding.host_to_global({"x": local}, mesh)["x"]
        with sharding.mesh_context(mesh):
            y = fwd(params, x)
        outputs.append(sharding.to_host(y)[:n])
    return np.concatenate(outputs)
