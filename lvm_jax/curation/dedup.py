"""Near-duplicate removal as in DINOv2 (Oquab et al. 2023, section 3 and appendix A).

Self-deduplication: every pool image queries its k = 64 nearest pool
neighbours; pairs with cosine > 0.6 are edges of a graph, and of each connected
component only one image is kept (the one with the smallest row, so the choice
is deterministic).

Relative deduplication: each reference image (evaluation sets, typically) queries
the pool for its k = 64 nearest components; any component with a member at
cosine > 0.45 to it goes out *whole*, because a component is one picture in
several copies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from lvm_jax.curation.index import PoolIndex, VectorSet, cap_per_query

KEPT, SELF, REFERENCE = 0, 1, 2
REASONS = {SELF: "self", REFERENCE: "reference"}


@dataclass
class DedupResult:
    """Per pool row (all ``[N]``).

    component: connected-component label in the near-duplicate graph.
    kept_as: row kept for the row's component (== row for kept rows).
    reason: KEPT, SELF or REFERENCE.
    matched: for REFERENCE rows, the row of the best-matching reference vector, else -1.
    matched_set: for REFERENCE rows, the index of that reference set, else -1.
    matched_sim: cosine similarity behind the removal (self: to the kept row's
      component via the graph edge; reference: to the reference vector), else nan.
    """
    component: np.ndarray
    kept_as: np.ndarray
    reason: np.ndarray
    matched: np.ndarray
    matched_set: np.ndarray
    matched_sim: np.ndarray
    num_edges: int = 0
    reference_names: list[str] = field(default_factory=list)

    @property
    def keep(self) -> np.ndarray:
        """bool [N]: rows that survive both deduplications."""
        return self.reason == KEPT

    def counts(self) -> dict[str, int]:
        return dict(kept=int((self.reason == KEPT).sum()), self=int((self.reason == SELF).sum()),
                    reference=int((self.reason == REFERENCE).sum()), edges=int(self.num_edges),
                    components_with_duplicates=int(_multi_member_components(self.component)))


def _multi_member_components(labels: np.ndarray) -> int:
    return int((np.bincount(labels) > 1).sum()) if len(labels) else 0


def connected_duplicate_groups(n: int, q: np.ndarray, nb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of the undirected graph on n rows with edges (q[i], nb[i]).

    Returns (component label ``[n]``, kept row ``[n]``: the smallest row of each component).
    """
    graph = sp.coo_matrix((np.ones(len(q), np.int8), (q, nb)), shape=(n, n))
    _, labels = connected_components(graph, directed=True, connection="weak")
    labels = labels.astype(np.int64)
    first = np.full(labels.max() + 1 if n else 0, n, np.int64)
    np.minimum.at(first, labels, np.arange(n, dtype=np.int64))
    return labels, first[labels]


def self_deduplicate(index: PoolIndex, threshold: float = 0.6, k: int = 64) -> DedupResult:
    """Removes near-duplicates inside the pool: one image kept per component of the
    graph {cosine > threshold among each image's k nearest neighbours}."""
    n = len(index.pool)
    q, nb, s = index.self_join(threshold, min(k, max(n - 1, 1)))
    labels, kept_as = connected_duplicate_groups(n, q, nb)
    rows = np.arange(n, dtype=np.int64)
    reason = np.where(kept_as == rows, KEPT, SELF).astype(np.int8)
    # Strongest edge touching each removed row, for the report.
    sim = np.full(n, np.nan, np.float32)
    if len(q):
        both = np.concatenate([q, nb]), np.concatenate([s, s])
        best = np.full(n, -np.inf, np.float32)
        np.maximum.at(best, both[0], both[1])
        sim = np.where(np.isfinite(best), best, np.nan).astype(np.float32)
    sim[reason == KEPT] = np.nan
    return DedupResult(component=labels, kept_as=kept_as, reason=reason,
                       matched=np.full(n, -1, np.int64), matched_set=np.full(n, -1, np.int16),
                       matched_sim=sim, num_edges=len(q))


def no_dedup(n: int) -> DedupResult:
    """The identity result (self-deduplication switched off)."""
    rows = np.arange(n, dtype=np.int64)
    return DedupResult(component=rows.copy(), kept_as=rows, reason=np.zeros(n, np.int8),
                       matched=np.full(n, -1, np.int64), matched_set=np.full(n, -1, np.int16),
                       matched_sim=np.full(n, np.nan, np.float32))


def reference_deduplicate(index: PoolIndex, result: DedupResult, references: Sequence[VectorSet],
                          threshold: float = 0.45, k: int = 64) -> DedupResult:
    """Removes every pool component among the k most similar components of a reference vector
    at cosine > threshold.

    Each reference vector ``[D]`` gets k *distinct components* (pictures), as the
    paper's k-NN over the self-deduplicated source gets k distinct images.  A
    component is matched by its most similar member: any copy, including one
    self-deduplication removed.  Updates and returns `result` (all ``[N]``); whole
    components go, including the image self-deduplication kept, and their reason
    becomes REFERENCE.  IVF probes ``cfg.reference_nprobe`` lists per reference vector.
    """
    n = len(index.pool)
    best_sim = np.full(result.component.max() + 1 if n else 0, -np.inf, np.float32)
    best_ref = np.full_like(best_sim, -1, dtype=np.int64)
    best_set = np.full_like(best_sim, -1, dtype=np.int16)
    for set_index, ref in enumerate(references):
        result.reference_names.append(ref.name)
        for start, x in ref.chunks(chunk=index.cfg.chunk):
            # Every edge above the threshold (no cap per row): k rows would let the copies of
            # one widely copied picture fill all k slots and hide other pool images above the
            # threshold.  Searching only the kept rows would also fix that, but would miss a
            # removed copy that is closer to the reference than its kept representative.
            # Every process gets the same edges, so the caps below agree across processes.
            qi, rows, s = index.pairs_above(threshold, None, queries=x, nprobe=index.cfg.reference_nprobe,
                                            desc=f"reference {ref.name}")
            if not len(qi):
                continue
            comp = result.component[rows]
            # Best edge per (reference vector, component), then each vector's k most similar components.
            order = np.lexsort((-s, comp, qi))
            qi, comp, s = qi[order], comp[order], s[order]
            first = np.r_[True, (qi[1:] != qi[:-1]) | (comp[1:] != comp[:-1])]
            qi, comp, s = cap_per_query(qi[first], comp[first], s[first], k)
            # Best reference vector per touched component (ties: the smaller reference row).
            order = np.lexsort((qi, -s, comp))
            comp, s, qi = comp[order], s[order], qi[order]
            first = np.r_[True, comp[1:] != comp[:-1]]
            comp, s, qi = comp[first], s[first], qi[first]
            better = s > best_sim[comp]
            best_sim[comp[better]] = s[better]
            best_ref[comp[better]] = start + qi[better]
            best_set[comp[better]] = set_index
    touched = best_set[result.component] >= 0
    result.reason[touched] = REFERENCE
    result.matched[touched] = best_ref[result.component[touched]]
    result.matched_set[touched] = best_set[result.component[touched]]
    result.matched_sim[touched] = best_sim[result.component[touched]]
    return result
