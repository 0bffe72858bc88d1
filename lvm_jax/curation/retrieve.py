"""Retrieval of pool images for a curated set (DINOv2 section 3, "self-supervised image retrieval").

Three ways, all over the deduplicated pool only:

- ``sample`` (default): each curated image takes its k nearest pool images (k = 4
  in DINOv2 for large curated sets).
- ``cluster``: k-means over the pool; every cluster that contains a curated image
  contributes ``per_cluster`` sampled images (DINOv2's choice for small curated sets).
- ``hierarchical``: hierarchical k-means with resampling and balanced sampling
  (Vo et al. 2024); by default restricted to leaf clusters that contain curated
  images, so the result is balanced over concepts near the curated set.

Every retrieved pool image is reported once, with the curated image it is most
similar to (among those that selected it) and that similarity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from lvm_jax.curation import cluster as clustering
from lvm_jax.curation.index import PoolIndex, VectorSet
from lvm_jax.errors import UserError

MODES = ("sample", "cluster", "hierarchical")


@dataclass
class Retrieval:
    """Retrieved pool rows (unique) with, for each, the curated row it serves and the cosine."""
    rows: np.ndarray        # int64 [M]
    query: np.ndarray       # int64 [M], -1: none (query-free hierarchical sampling)
    similarity: np.ndarray  # float32 [M], nan where query == -1

    def __len__(self) -> int:
        return len(self.rows)


def best_query_per_row(rows: np.ndarray, query: np.ndarray, sims: np.ndarray) -> Retrieval:
    """Collapses (pool row, query, sim) triples to one triple per pool row, the most similar."""
    ok = rows >= 0
    rows, query, sims = rows[ok], query[ok], sims[ok]
    order = np.lexsort((query, -sims, rows))
    rows, query, sims = rows[order], query[order], sims[order]
    first = np.r_[True, rows[1:] != rows[:-1]] if len(rows) else np.zeros(0, bool)
    return Retrieval(rows[first].astype(np.int64), query[first].astype(np.int64),
                     sims[first].astype(np.float32))


def retrieve_nearest(index: PoolIndex, queries: np.ndarray, k: int = 4,
                     allowed: np.ndarray | None = None) -> Retrieval:
    """Sample-based retrieval: the k nearest allowed pool rows of each normalised query ``[Q, D]``."""
    sims, rows = index.search(queries, k, allowed, desc="retrieve")
    query = np.repeat(np.arange(len(queries)), k)
    return best_query_per_row(rows.reshape(-1), query, sims.reshape(-1))


def _best_query(queries: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row of x, the most similar of `queries`: (index into queries, cosine)."""
    sims = x @ queries.T
    best = np.argmax(sims, axis=1)
    return best, sims[np.arange(len(x)), best]


def retrieve_from_clusters(pool: VectorSet, queries: np.ndarray, allowed: np.ndarray, k: int = 4,
                           num_clusters: int = 0, per_cluster: int = 0, niter: int = 20,
                           train_points_per_cluster: int = 64, seed: int = 0) -> Retrieval:
    """Cluster-based retrieval.

    k-means (``num_clusters``, 0: sqrt of the allowed pool size) over the allowed
    pool rows; each cluster containing at least one query yields ``per_cluster``
    uniformly sampled members (0: k x the number of queries in it, the same
    budget as sample-based retrieval).
    """
    rows = np.flatnonzero(allowed)
    if not len(rows):
        return Retrieval(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    rng = np.random.default_rng(seed)
    num_clusters = num_clusters or max(2, int(round(math.sqrt(len(rows)))))
    train = clustering.sample_training_rows(rows, num_clusters, train_points_per_cluster, rng)
    centroids = clustering.kmeans(pool.gather(train), num_clusters, niter, seed)
    labels, _ = clustering.assign_rows(pool, rows, centroids)
    q_labels, _ = clustering.assign(queries, centroids)
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(len(centroids) + 1))
    out_rows, out_q, out_s = [], [], []
    for c in np.unique(q_labels):
        members = rows[order[bounds[c]:bounds[c + 1]]]
        in_c = np.flatnonzero(q_labels == c)
        want = per_cluster or k * len(in_c)
        picked = np.sort(rng.choice(members, min(want, len(members)), replace=False))
        if not len(picked):
            continue
        best, sims = _best_query(queries[in_c], pool.gather(picked))
        out_rows.append(picked), out_q.append(in_c[best]), out_s.append(sims)
    if not out_rows:
        return Retrieval(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    return best_query_per_row(np.concatenate(out_rows), np.concatenate(out_q), np.concatenate(out_s))


def default_levels(n: int) -> list[int]:
    """Two levels: ~2 sqrt(n) leaves (over-clustering keeps leaves pure) and ~sqrt(leaves) parents."""
    leaves = max(2, min(n, int(round(2 * math.sqrt(n)))))
    return [leaves, max(1, int(round(math.sqrt(leaves))))]


def retrieve_hierarchical(pool: VectorSet, queries: np.ndarray, allowed: np.ndarray, k: int = 4,
                          levels: Sequence[int] = (), target_size: int = 0, queries_only: bool = True,
                          resample_steps: int = 2, niter: int = 20, seed: int = 0) -> Retrieval:
    """Hierarchical k-means + balanced sampling of ``target_size`` allowed pool rows.

    target_size: 0 means k x number of queries.
    queries_only: sample only from leaf clusters that contain a query (else the
      whole pool, Vo et al.'s query-free curation); each sampled row reports the
      most similar query in its leaf, or none.
    """
    rows = np.flatnonzero(allowed)
    if not len(rows):
        return Retrieval(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    levels = [min(int(l), len(rows)) for l in (levels or default_levels(len(rows)))]
    tree = clustering.hierarchical_kmeans(pool, rows, levels, resample_steps=resample_steps,
                                          niter=niter, seed=seed)
    q_leaf, _ = clustering.assign(queries, tree.centroids[0])
    eligible = np.isin(tree.leaf, q_leaf) if queries_only else None
    target = target_size or k * len(queries)
    picked = clustering.balanced_sample(tree, target, eligible, seed)
    picked_rows = rows[picked]
    leaf = tree.leaf[picked]
    query = np.full(len(picked), -1, np.int64)
    sims = np.full(len(picked), np.nan, np.float32)
    x = pool.gather(picked_rows) if len(picked_rows) else np.zeros((0, pool.dim), np.float32)
    for c in np.unique(leaf):
        in_c = np.flatnonzero(q_leaf == c)
        at = np.flatnonzero(leaf == c)
        if len(in_c):
            best, s = _best_query(queries[in_c], x[at])
            query[at], sims[at] = in_c[best], s
    return Retrieval(picked_rows.astype(np.int64), query, sims)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise UserError(f"retrieval mode {mode!r} is not one of {MODES}.")
    return mode
