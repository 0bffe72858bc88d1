"""The curation pipeline on embeddings: index -> self-dedup -> relative dedup -> retrieval -> files.

``curate(curated, pool, out_dir, references, config)`` writes

- ``manifest.jsonl``: one line per kept image,
  ``{"id", "source": "curated"|"retrieved", "query": curated id or null, "similarity"}``
  (plus ``"path"`` when known);
- ``duplicates.jsonl``: one line per removed pool image,
  ``{"id", "kept": representative id, "reason": "self"|"reference"}`` (plus the
  ``"similarity"`` behind the removal and, for reference removals, the
  reference set name; ``kept`` is then the id of the matching reference vector);
- ``summary.json``: counts, thresholds, index, recall estimate (null when nothing
  can be retrieved), timings, inputs; written before the report and again after it
  (with the report's time);
- ``report.html`` (+ PNGs): retrieval and duplicate examples.

Self-/relative-deduplication results are cached in ``DIR/.cache`` under a
fingerprint of their inputs (settings, and a digest of a sample of the vectors),
so an interrupted run resumes at retrieval.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Callable, Sequence

import ml_collections
import numpy as np

from lvm_jax.curation import dedup as dd
from lvm_jax.curation import retrieve as rt
from lvm_jax.curation.index import (Comm, IndexConfig, PoolIndex, VectorSet, check_dims, exact_knn,
                                    mean_vector)
from lvm_jax.errors import UserError


def default_config() -> ml_collections.ConfigDict:
    """Curation settings (the DINOv2 paper's values where it gives them)."""
    c = ml_collections.ConfigDict()
    c.dedup = ml_collections.ConfigDict(dict(
        enabled=True, threshold=0.6, k=64,  # self-dedup: k-NN graph, cosine > 0.6
        reference_threshold=0.45,           # relative dedup against reference sets
    ))
    c.retrieval = ml_collections.ConfigDict(dict(
        mode="sample",  # 'sample' | 'cluster' | 'hierarchical'
        k=4,            # neighbours per curated image (sample); budget per query otherwise
        num_clusters=0, per_cluster=0,        # cluster mode (0 = auto)
        levels=(), target_size=0, queries_only=True, resample_steps=2,  # hierarchical mode
        seed=0,
    ))
    c.index = ml_collections.ConfigDict(IndexConfig().__dict__)
    c.center = False  # subtract the pool's mean vector from every set before cosine
    c.recall_sample = 256  # curated queries checked against exact search to tune nprobe (0: skip)
    c.report = ml_collections.ConfigDict(dict(enabled=True, num_queries=8, num_groups=8))
    return c


def merged_config(overrides=None) -> ml_collections.ConfigDict:
    """default_config() updated with a (nested) dict / ConfigDict of overrides."""
    cfg = default_config()
    if overrides is not None:
        cfg.update(overrides.to_dict() if hasattr(overrides, "to_dict") else dict(overrides))
    return cfg


def _write_atomic(path: str, write: Callable) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        write(f)
    os.replace(tmp, path)


def _json_lines(path: str, rows: Sequence[dict]) -> None:
    _write_atomic(path, lambda f: f.writelines(json.dumps(r) + "\n" for r in rows))


def _fingerprint(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _set_signature(vs: VectorSet, sample: int = 1000) -> list:
    """What the dedup cache key knows of a vector set: name, N, D and a digest of the ids and
    vectors of at most `sample` evenly spaced rows.

    The vectors matter: a re-embedded set (new model, a fixed row) keeps its ids and
    shape.  Spaced rows see any re-embedding at the cost of ~`sample` row reads; an
    edit confined to rows between them goes unseen.
    """
    rows = np.unique(np.linspace(0, len(vs) - 1, min(len(vs), sample)).astype(np.int64))
    digest = hashlib.sha1(vs.ids[rows].tobytes())
    digest.update(vs.gather(rows).tobytes())  # float32 [len(rows), D], normalised (and centred)
    return [vs.name, len(vs), vs.dim, digest.hexdigest()[:16]]


def validate_inputs(curated: VectorSet, pool: VectorSet, references: Sequence[VectorSet], k: int) -> None:
    """The bad inputs that deserve one clear sentence before any work starts."""
    check_dims([curated, pool, *references])
    if len(curated) == 0:
        raise UserError(f"the curated set {curated.name!r} is empty; retrieval needs at least one "
                        "curated image.")
    if len(pool) == 0:
        raise UserError(f"the pool {pool.name!r} is empty; there is nothing to deduplicate or retrieve.")
    if k < 1:
        raise UserError(f"retrieval k must be >= 1, got {k}.")
    if k > len(pool):
        raise UserError(f"k={k} is larger than the pool ({len(pool)} vectors); lower --k or use a "
                        "larger pool.")


def curate(curated: VectorSet, pool: VectorSet, out_dir: str, references: Sequence[VectorSet] = (),
           config=None, comm: Comm | None = None, progress: bool = True,
           inputs: dict | None = None, image_fn: Callable | None = None) -> dict:
    """Runs the pipeline and writes the output files (process 0); returns the summary dict.

    config: overrides of `default_config()` (nested dict or ConfigDict).
    comm: process group; the pool is indexed and searched sharded by process.
    inputs: paths of the inputs, recorded in summary.json (the manifest source
      follows them back to the images).
    image_fn: optional ``(which: 'curated'|'pool', row) -> uint8 [H, W, 3]`` for the report.
    """
    cfg = merged_config(config)
    comm = comm or Comm()
    timings: dict[str, float] = {}
    tick = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal tick
        now = time.perf_counter()
        timings[name] = round(now - tick, 3)
        tick = now

    rcfg = cfg.retrieval
    mode = rt.check_mode(rcfg.mode)
    validate_inputs(curated, pool, references, int(rcfg.k))
    if cfg.center:
        mean = mean_vector(pool, seed=int(rcfg.seed))
        for vs in (curated, pool, *references):
            vs.center = mean
    queries = curated.read()
    os.makedirs(out_dir, exist_ok=True)
    lap("load")

    index_cfg = IndexConfig.from_dict(cfg.index.to_dict())
    index = PoolIndex(pool, index_cfg, comm, progress=progress)
    lap("index")

    # -- deduplication (cached) --------------------------------------------
    cache_dir = os.path.join(out_dir, ".cache")
    key = _fingerprint(_set_signature(pool), [_set_signature(r) for r in references],
                       cfg.dedup.to_dict(), bool(cfg.center), index.describe(), index_cfg.__dict__)
    cache_file = os.path.join(cache_dir, f"dedup_{key}.npz")
    result = _load_dedup(cache_file)
    # Every process must take the same branch (deduplication runs collectives), but only
    # process 0 writes the cache, so another process's copy of out_dir may lack it: use
    # the cache only if every process has it.
    if not comm.allgather(np.array([result is not None])).all():
        result = None
    if result is None:
        if cfg.dedup.enabled:
            result = dd.self_deduplicate(index, float(cfg.dedup.threshold), int(cfg.dedup.k))
        else:
            result = dd.no_dedup(len(pool))
        lap("self_dedup")
        if references:
            dd.reference_deduplicate(index, result, references, float(cfg.dedup.reference_threshold),
                                     int(cfg.dedup.k))
        lap("reference_dedup")
        if comm.rank == 0:
            _save_dedup(cache_file, result)
    else:
        timings["self_dedup"] = timings["reference_dedup"] = 0.0
        timings["dedup_cached"] = True
    keep = result.keep

    # -- retrieval ---------------------------------------------------------
    k = int(rcfg.k)
    recall, nprobe = None, index_cfg.nprobe
    # With every pool row removed nothing can be retrieved: the recall is undefined (None)
    # and nprobe stays as given.  `keep` is the same on every process.
    if mode == "sample" and index.kind == "ivf" and cfg.recall_sample and keep.any():
        nprobe, recall = tune_nprobe(index, pool, queries, k, keep, int(cfg.recall_sample),
                                     index_cfg.target_recall, int(rcfg.seed), comm)
        lap("tune_nprobe")
    if mode == "sample":
        sims, rows = index.search(queries, k, keep, desc="retrieve", nprobe=nprobe)
        retrieved = rt.best_query_per_row(rows.reshape(-1), np.repeat(np.arange(len(queries)), k),
                                          sims.reshape(-1))
    elif comm.rank == 0:  # clustering modes read the whole pool on process 0
        if mode == "cluster":
            retrieved = rt.retrieve_from_clusters(pool, queries, keep, k, int(rcfg.num_clusters),
                                                   int(rcfg.per_cluster), seed=int(rcfg.seed))
        else:
            retrieved = rt.retrieve_hierarchical(pool, queries, keep, k, tuple(rcfg.levels),
                                                 int(rcfg.target_size), bool(rcfg.queries_only),
                                                 int(rcfg.resample_steps), seed=int(rcfg.seed))
    else:
        retrieved = rt.Retrieval(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    lap("retrieval")

    if comm.rank != 0:
        return {}
    # -- outputs -----------------------------------------------------------
    summary = dict(
        counts=dict(curated=len(curated), pool=len(pool),
                    references={r.name: len(r) for r in references},
                    removed_self=int((result.reason == dd.SELF).sum()),
                    removed_reference=int((result.reason == dd.REFERENCE).sum()),
                    pool_kept=int(keep.sum()), retrieved=len(retrieved),
                    manifest=len(curated) + len(retrieved),
                    duplicate_edges=int(result.num_edges),
                    duplicate_groups=dd._multi_member_components(result.component)),
        dedup=cfg.dedup.to_dict(),
        retrieval={**rcfg.to_dict(), "levels": list(rcfg.levels)},
        index={**index.describe(), **({"nprobe": min(nprobe, index.nlist)} if index.kind == "ivf" else {})},
        recall_at_k_estimate=recall,
        dim=pool.dim,
        inputs=inputs or {},
        timings_s=timings,
    )
    write_outputs(out_dir, curated, pool, references, result, retrieved)
    lap("write")

    write_summary(out_dir, summary)  # before the report: the outputs are complete even if the report is stopped
    if cfg.report.enabled:
        from lvm_jax.curation import report
        report.write_report(out_dir, summary, curated, pool, result, retrieved,
                            num_queries=int(cfg.report.num_queries), num_groups=int(cfg.report.num_groups),
                            image_fn=image_fn)
        lap("report")
        write_summary(out_dir, summary)
    return summary


def write_summary(out_dir: str, summary: dict) -> None:
    """Writes `out_dir/summary.json` whole, its `timings_s.total` the sum of the other timings."""
    timings = summary["timings_s"]
    timings["total"] = round(sum(v for k, v in timings.items() if k != "total" and not isinstance(v, bool)), 3)
    _write_atomic(os.path.join(out_dir, "summary.json"), lambda f: json.dump(summary, f, indent=2))


def tune_nprobe(index: PoolIndex, pool: VectorSet, queries: np.ndarray, k: int, keep: np.ndarray,
                sample: int, target: float, seed: int, comm: Comm) -> tuple[int, float | None]:
    """Smallest nprobe = cfg.nprobe * 2^j whose recall@k vs exact search reaches `target` on
    `sample` random queries; returns (nprobe, recall measured there).

    Queries with no exact neighbour (every pool row masked out by `keep`) do not count;
    with none left the recall is undefined: returns (cfg.nprobe, None).
    """
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(queries), min(sample, len(queries)), replace=False))
    exact = np.zeros((len(pick), k), np.int64)
    if comm.rank == 0:  # ground truth by streaming the whole pool once
        _, exact = exact_knn(pool, queries[pick], k, keep)
    exact = comm.broadcast(exact)
    nprobe = max(1, index.cfg.nprobe)
    has = (exact >= 0).any(axis=1)  # the same on every process (broadcast)
    if not has.any():
        return nprobe, None
    pick, exact = pick[has], exact[has]
    while True:
        _, rows = index.search(queries[pick], k, keep, desc="tune nprobe", nprobe=nprobe)
        recall = float(np.mean([len(set(a[a >= 0]) & set(e[e >= 0])) / (e >= 0).sum()
                                for a, e in zip(rows, exact)]))
        if not target or recall >= target or nprobe >= index.nlist:
            return nprobe, round(recall, 4)
        nprobe *= 2


def write_outputs(out_dir: str, curated: VectorSet, pool: VectorSet, references: Sequence[VectorSet],
                  result: dd.DedupResult, retrieved: rt.Retrieval) -> None:
    """manifest.jsonl and duplicates.jsonl (atomic writes)."""
    lines = []
    for row in range(len(curated)):
        line = {"id": int(curated.ids[row]), "source": "curated", "query": None, "similarity": None}
        if curated.paths is not None:
            line["path"] = curated.paths[row]
        lines.append(line)
    for row, q, s in zip(retrieved.rows, retrieved.query, retrieved.similarity):
        line = {"id": int(pool.ids[row]), "source": "retrieved",
                "query": int(curated.ids[q]) if q >= 0 else None,
                "similarity": round(float(s), 6) if q >= 0 else None}
        if pool.paths is not None:
            line["path"] = pool.paths[row]
        lines.append(line)
    _json_lines(os.path.join(out_dir, "manifest.jsonl"), lines)

    dups = []
    for row in np.flatnonzero(result.reason != dd.KEPT):
        sim = float(result.matched_sim[row])
        if result.reason[row] == dd.SELF:
            line = {"id": int(pool.ids[row]), "kept": int(pool.ids[result.kept_as[row]]), "reason": "self"}
        else:
            ref = references[int(result.matched_set[row])]
            line = {"id": int(pool.ids[row]), "kept": int(ref.ids[result.matched[row]]),
                    "reason": "reference", "reference": ref.name}
        line["similarity"] = round(sim, 6) if np.isfinite(sim) else None
        if pool.paths is not None:
            line["path"] = pool.paths[row]
        dups.append(line)
    _json_lines(os.path.join(out_dir, "duplicates.jsonl"), dups)


_DEDUP_FIELDS = ("component", "kept_as", "reason", "matched", "matched_set", "matched_sim")


def _save_dedup(path: str, result: dd.DedupResult) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, num_edges=result.num_edges, reference_names=np.array(result.reference_names, dtype=str),
             **{f: getattr(result, f) for f in _DEDUP_FIELDS})
    os.replace(tmp, path)


def _load_dedup(path: str) -> dd.DedupResult | None:
    if not os.path.isfile(path):
        return None
    with np.load(path) as z:
        return dd.DedupResult(**{f: z[f] for f in _DEDUP_FIELDS}, num_edges=int(z["num_edges"]),
                              reference_names=[str(s) for s in z["reference_names"]])
