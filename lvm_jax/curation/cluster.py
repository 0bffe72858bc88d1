"""k-means, hierarchical k-means with resampling and balanced sampling.

Hierarchical k-means (Vo et al. 2024, "Automatic Data Curation for
Self-Supervised Learning: A Clustering-Based Approach"): level 1 clusters the
data, level t clusters the centroids of level t-1.  Plain k-means puts many
centroids in dense regions; the *resampling* step re-runs k-means on the r
points closest to each centroid (one small, equal-sized group per cluster), so
the next centroids spread evenly over concepts rather than over density.
Balanced sampling then walks the tree top-down, splitting a target count as
evenly as possible between children (a child smaller than its share gives its
surplus to the others), and samples uniformly inside leaves.

All vectors are L2-normalised; k-means is spherical (cosine) via faiss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import faiss
import numpy as np

from lvm_jax.curation.index import VectorSet
from lvm_jax.errors import UserError


def kmeans(x: np.ndarray, k: int, niter: int = 20, seed: int = 0) -> np.ndarray:
    """Spherical k-means centroids ``[k, D]`` of normalised ``x [n, D]`` (k clipped to n)."""
    x = np.ascontiguousarray(x, np.float32)
    k = max(1, min(int(k), len(x)))
    if k == len(x):
        return x.copy()
    km = faiss.Kmeans(x.shape[1], k, niter=niter, spherical=True, seed=seed + 1,
                      max_points_per_centroid=len(x) // k + 1, min_points_per_centroid=1, verbose=False)
    km.train(x)
    return np.ascontiguousarray(km.centroids, np.float32)


def assign(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of each row: (labels int64 ``[n]``, cosine float32 ``[n]``)."""
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, np.float32))
    sims, labels = index.search(np.ascontiguousarray(x, np.float32), 1)
    return labels[:, 0].astype(np.int64), sims[:, 0]


def assign_rows(pool: VectorSet, rows: np.ndarray, centroids: np.ndarray, chunk: int = 65536
                ) -> tuple[np.ndarray, np.ndarray]:
    """`assign` for pool `rows` (sorted), streamed from disk."""
    labels = np.empty(len(rows), np.int64)
    sims = np.empty(len(rows), np.float32)
    for s in range(0, len(rows), chunk):
        part = rows[s:s + chunk]
        # Contiguous reads beat a scattered gather when most rows are wanted.
        lo, hi = int(part[0]), int(part[-1]) + 1
        x = pool.read(lo, hi)[part - lo] if hi - lo <= 2 * len(part) else pool.gather(part)
        labels[s:s + len(part)], sims[s:s + len(part)] = assign(x, centroids)
    return labels, sims


def sample_training_rows(rows: np.ndarray, k: int, per_cluster: int, rng: np.random.Generator) -> np.ndarray:
    size = min(len(rows), max(k, k * per_cluster))
    return np.sort(rng.choice(rows, size, replace=False))


@dataclass
class HierarchicalClusters:
    """A cluster tree.

    leaf: ``[n]`` level-1 cluster of each of the n clustered points.
    parents: ``parents[t]`` maps level-(t+1) clusters to level-(t+2) clusters
      (len(parents) == number of levels - 1).
    centroids: per level, ``[k_t, D]``.
    """
    leaf: np.ndarray
    parents: list[np.ndarray]
    centroids: list[np.ndarray]

    @property
    def num_levels(self) -> int:
        return len(self.centroids)


def hierarchical_kmeans(pool: VectorSet, rows: np.ndarray, levels: Sequence[int],
                        resample_steps: int = 2, resample_size: Sequence[int] | None = None,
                        niter: int = 20, train_points_per_cluster: int = 64, seed: int = 0,
                        chunk: int = 65536) -> HierarchicalClusters:
    """Hierarchical k-means with resampling over pool `rows` (sorted).

    levels: clusters per level, finest first, e.g. (1000, 100, 10).
    resample_size: r per level (points kept per cluster in a resampling step);
      default: half the mean cluster size of the level (at least 2), as in Vo et al.'s
      examples.  Resampling helps most when a level has several clusters per concept.
      Level 1's r is at most `train_points_per_cluster`.
    Level 1 is trained on a sample of the rows (at most ``levels[0] *
    train_points_per_cluster`` of them, as is each level-1 resample) and assigned
    by streaming, so the rows need not fit in memory; upper levels cluster
    centroids in memory.
    """
    levels = [int(k) for k in levels]
    if not levels or any(k < 1 for k in levels):
        raise UserError(f"hierarchical levels must be positive cluster counts, got {list(levels)}.")
    if any(a < b for a, b in zip(levels, levels[1:])):
        raise UserError(f"hierarchical levels {list(levels)} must shrink upwards (finest level first).")
    inputs = [len(rows)] + levels[:-1]
    resample_size = list(resample_size or [max(2, n // k // 2) for n, k in zip(inputs, levels)])
    if len(resample_size) != len(levels):
        raise UserError(f"resample_size {list(resample_size)} needs one r per level of {levels}.")
    # The level-1 resample is gathered into memory: bound it like the training sample
    # (the default r, half a mean cluster, would gather about half of all rows).
    resample_size[0] = min(resample_size[0], train_points_per_cluster)
    rng = np.random.default_rng(seed)

    class _Level1:  # labels_fn over all rows, streamed; gather() for resampled rows
        def __call__(self, centroids):
            return assign_rows(pool, rows, centroids, chunk)

        def gather(self, idx):
            return pool.gather(rows[np.sort(idx)])

    train = sample_training_rows(rows, levels[0], train_points_per_cluster, rng)
    level1 = _Level1()
    centroids = kmeans(pool.gather(train), levels[0], niter, seed)
    leaf, sims = level1(centroids)
    for step in range(resample_steps):
        closest = _closest_per_cluster(leaf, sims, resample_size[0])
        if len(closest) <= len(centroids):
            break
        centroids = kmeans(level1.gather(closest), levels[0], niter, seed + step + 1)
        leaf, sims = level1(centroids)
    all_centroids, parents = [centroids], []
    below = centroids
    for t, k in enumerate(levels[1:], start=1):
        upper = kmeans(below, k, niter, seed + 100 * t)
        lab, s = assign(below, upper)
        for step in range(resample_steps):
            closest = _closest_per_cluster(lab, s, resample_size[t])
            if len(closest) <= k:
                break
            upper = kmeans(below[np.sort(closest)], k, niter, seed + 100 * t + step + 1)
            lab, s = assign(below, upper)
        parents.append(lab)
        all_centroids.append(upper)
        below = upper
    return HierarchicalClusters(leaf=leaf, parents=parents, centroids=all_centroids)


def _closest_per_cluster(labels: np.ndarray, sims: np.ndarray, r: int) -> np.ndarray:
    """Indices of the r most similar points of each cluster."""
    order = np.lexsort((-sims, labels))
    start = np.r_[0, np.flatnonzero(np.diff(labels[order])) + 1]
    rank = np.arange(len(order)) - np.repeat(start, np.diff(np.r_[start, len(order)]))
    return order[rank < r]


def split_target(sizes: np.ndarray, target: int, rng: np.random.Generator) -> np.ndarray:
    """Integer counts c_i <= sizes_i with sum min(target, sum sizes), as equal as possible.

    Water-filling: the largest cut t with sum(min(sizes, t)) <= target, then the
    remainder goes one each to randomly chosen children that still have room.
    """
    sizes = np.asarray(sizes, np.int64)
    target = int(min(target, sizes.sum()))
    if target <= 0:
        return np.zeros_like(sizes)
    lo, hi = 0, int(sizes.max())
    while lo < hi:  # largest t with sum(min(sizes, t)) <= target
        mid = (lo + hi + 1) // 2
        if np.minimum(sizes, mid).sum() <= target:
            lo = mid
        else:
            hi = mid - 1
    counts = np.minimum(sizes, lo)
    remainder = target - int(counts.sum())
    if remainder:
        room = np.flatnonzero(sizes > counts)
        counts[rng.choice(room, remainder, replace=False)] += 1
    return counts


def balanced_sample(tree: HierarchicalClusters, target: int, eligible: np.ndarray | None = None,
                    seed: int = 0) -> np.ndarray:
    """Indices (into the clustered points) of a hierarchically balanced sample of `target` points.

    eligible: optional bool ``[n]``; other points are never sampled.
    """
    rng = np.random.default_rng(seed)
    n = len(tree.leaf)
    eligible = np.ones(n, bool) if eligible is None else np.asarray(eligible, bool)
    points = np.flatnonzero(eligible)
    leaf_of = tree.leaf[points]
    # cluster -> members at each level, leaves hold point indices
    members = [np.split(points[np.argsort(leaf_of, kind="stable")],
                        np.cumsum(np.bincount(leaf_of, minlength=len(tree.centroids[0])))[:-1])]
    sizes = [np.array([len(m) for m in members[0]], np.int64)]
    for t, parent in enumerate(tree.parents):
        k = len(tree.centroids[t + 1])
        order = np.argsort(parent, kind="stable")
        members.append(np.split(order, np.cumsum(np.bincount(parent, minlength=k))[:-1]))
        sizes.append(np.bincount(parent, weights=sizes[-1], minlength=k).astype(np.int64))
    top = len(members) - 1
    out: list[np.ndarray] = []

    def take(level: int, cluster: int, count: int) -> None:
        if count <= 0:
            return
        if level == 0:
            out.append(rng.choice(members[0][cluster], count, replace=False))
            return
        children = members[level][cluster]
        for child, c in zip(children, split_target(sizes[level - 1][children], count, rng)):
            take(level - 1, int(child), int(c))

    for cluster, c in enumerate(split_target(sizes[top], target, rng)):
        take(top, cluster, int(c))
    return np.sort(np.concatenate(out)) if out else np.zeros(0, np.int64)
