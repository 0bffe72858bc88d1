"""Curation on embeddings: planted ground truth, brute-force references, bad input, resume.

The planted data: unit vectors around 80 random "concepts" in 256-d (40 in-domain,
40 off-domain).  Within a concept the cosine is ~0.31 +- 0.06, far below the 0.6
duplicate threshold; planted exact and near copies (cosine ~0.9) are the only
duplicates.  Curated queries come from in-domain concepts only.
"""
import concurrent.futures as cf
import json
import os
import subprocess
import sys
import threading

import faiss
import numpy as np
import pytest

from lvm_jax.curation import cluster, dedup, pipeline, retrieve
from lvm_jax.curation.__main__ import main as curate_main
from lvm_jax.curation.index import (Comm, IndexConfig, PoolIndex, VectorSet, cap_per_query, exact_knn,
                                    load_vectors, merge_topk, numpy_blas_threads)
from lvm_jax.errors import UserError

DIM = 256


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _around(rng, centers, labels, sigma=1.5):
    return _unit(centers[labels] + rng.standard_normal((len(labels), centers.shape[1])) * sigma / np.sqrt(
        centers.shape[1]))


def make_planted(seed=0, n_base=4000, n_concepts=80, n_exact=150, n_near=150, n_chain=30, n_curated=200):
    """Pool with planted duplicate groups; returns dict of arrays and ground truth."""
    rng = np.random.default_rng(seed)
    centers = _unit(rng.standard_normal((n_concepts, DIM)))
    in_domain = np.arange(n_concepts) < n_concepts // 2
    concept = rng.integers(0, n_concepts, n_base)
    pool = list(_around(rng, centers, concept))
    group = list(np.full(n_base, -1))
    concepts = list(concept)
    sources = rng.choice(n_base, n_exact + n_near + n_chain, replace=False)
    for j, src in enumerate(sources):
        v = pool[src].copy()
        copies = 2 if j >= n_exact + n_near else 1  # chains: a near copy of a near copy
        for _ in range(copies):
            if j >= n_exact:
                v = _unit((v + rng.standard_normal(DIM) * 0.45 / np.sqrt(DIM))[None])[0]
            pool.append(v)
            group.append(j)
            concepts.append(concept[src])
        group[src] = j
    pool = np.stack(pool).astype(np.float32)
    perm = rng.permutation(len(pool))  # copies must not sit next to their source
    pool, group, concepts = pool[perm], np.asarray(group)[perm], np.asarray(concepts)[perm]
    curated = _around(rng, centers, rng.choice(np.flatnonzero(in_domain), n_curated))
    # Reference set: 40 near copies of pool images (cosine ~0.8 > 0.45) + 60 unrelated vectors.
    hit = rng.choice(len(pool), 40, replace=False)
    ref = np.concatenate([_unit(pool[hit] + rng.standard_normal((40, DIM)) * 0.75 / np.sqrt(DIM)),
                          _unit(rng.standard_normal((60, DIM)))])
    return dict(pool=pool, group=group, concept=concepts, in_domain=in_domain, curated=curated,
                reference=ref, ref_hit=hit)


@pytest.fixture(scope="module")
def planted():
    return make_planted()


def _save(tmp_path, **arrays):
    paths = {}
    for name, x in arrays.items():
        paths[name] = str(tmp_path / f"{name}.npy")
        np.save(paths[name], x)
    return paths


class ThreadComm(Comm):
    """Rank `rank` of a group of threads standing in for jax.distributed processes.

    Collectives meet at a barrier.  Ranks that call different collectives (or ship
    arrays of another dtype or ndim) raise at once rather than hang or mix data.
    """

    def __init__(self, rank, group):
        super().__init__(rank, group["size"])
        self.group = group

    def _exchange(self, op, x):
        x, g = np.asarray(x), self.group
        g["slots"][self.rank] = ((op, x.dtype.str, x.ndim), x)
        g["barrier"].wait()
        got = list(g["slots"])
        g["barrier"].wait()
        calls = {call for call, _ in got}
        if len(calls) > 1:
            raise RuntimeError(f"processes out of step: {sorted(calls)}")
        return [v for _, v in got]

    def allgather(self, x):
        return np.concatenate(self._exchange("allgather", x))

    def broadcast(self, x):
        return self._exchange("broadcast", x)[0].copy()


def _run_ranks(size, fn):
    """[fn(comm) for each of `size` ThreadComm ranks run at once]; re-raises a rank's error."""
    group = dict(size=size, barrier=threading.Barrier(size, timeout=60), slots=[None] * size)

    def run(rank):
        try:
            return fn(ThreadComm(rank, group))
        except BaseException:
            group["barrier"].abort()  # wake the other ranks instead of leaving them waiting
            raise

    # One BLAS thread throughout: the ranks' IVF scans set and restore it concurrently.
    with numpy_blas_threads(1), cf.ThreadPoolExecutor(size) as ex:
        return [f.result() for f in [ex.submit(run, rank) for rank in range(size)]]


def _dedup_scores(result, group):
    removed = np.flatnonzero(result.reason == dedup.SELF)
    tp = sum(group[r] >= 0 and group[result.kept_as[r]] == group[r] for r in removed)
    expected = sum(np.bincount(group[group >= 0]) - 1)
    return tp / max(1, len(removed)), tp / expected


@pytest.mark.parametrize("index", [dict(kind="flat"), dict(kind="ivf", nlist=32, nprobe=8, dedup_nprobe=4)])
def test_planted_ground_truth(tmp_path, planted, index):
    p = planted
    paths = _save(tmp_path, curated=p["curated"], pool=p["pool"], ref=p["reference"])
    out = str(tmp_path / "out")
    summary = pipeline.curate(load_vectors(paths["curated"], "curated"), load_vectors(paths["pool"], "pool"),
                              out, [load_vectors(paths["ref"], "evalset")],
                              dict(index=index, report=dict(enabled=True)), progress=False)
    # Self-dedup against the planted groups (reference removals are scored separately).
    result = pipeline._load_dedup(next(os.path.join(out, ".cache", f)
                                       for f in os.listdir(os.path.join(out, ".cache"))))
    self_only = dedup.DedupResult(**{**result.__dict__, "reason": np.where(
        result.reason == dedup.REFERENCE, dedup.KEPT, result.reason)})
    # Rows removed for a reference lose their 'self' label: judge self-dedup on the rest.
    untouched = result.reason != dedup.REFERENCE
    grp = np.where(untouched, p["group"], -1)
    precision, recall = _dedup_scores(self_only, grp)
    assert precision >= 0.95 and recall >= 0.95, (precision, recall)

    # Relative dedup: exactly the components of the rows the reference copies hit.
    comp = result.component
    want = np.isin(comp, comp[p["ref_hit"]])
    got = result.reason == dedup.REFERENCE
    assert (got & want).sum() / got.sum() >= 0.95 and (got & want).sum() / want.sum() >= 0.95

    # Retrieval: only kept rows, mostly in-domain.
    lines = [json.loads(l) for l in open(os.path.join(out, "manifest.jsonl"))]
    retrieved = [l for l in lines if l["source"] == "retrieved"]
    rows = np.array([l["id"] for l in retrieved])  # .npy input: ids are rows
    assert result.keep[rows].all()
    in_domain = p["in_domain"][p["concept"][rows]].mean()
    assert in_domain >= 0.9, in_domain
    curated_lines = [l for l in lines if l["source"] == "curated"]
    assert len(curated_lines) == len(p["curated"])
    assert all(set(l) == {"id", "source", "query", "similarity"} for l in lines)
    assert all(l["query"] is not None and -1 <= l["similarity"] <= 1 for l in retrieved)
    # Each retrieved row's reported similarity is its cosine to the reported query.
    for l in retrieved[:50]:
        assert abs(float(p["pool"][l["id"]] @ p["curated"][l["query"]]) - l["similarity"]) < 1e-4

    dups = [json.loads(l) for l in open(os.path.join(out, "duplicates.jsonl"))]
    assert len(dups) == int((result.reason != dedup.KEPT).sum())
    assert {d["reason"] for d in dups} == {"self", "reference"}
    for d in dups:
        if d["reason"] == "self":
            assert result.keep[d["kept"]] or result.reason[d["kept"]] == dedup.REFERENCE
        else:
            assert d["reference"] == "evalset" and 0 <= d["kept"] < len(p["reference"])
    assert summary["counts"]["manifest"] == len(lines)
    assert summary["index"]["kind"] == index["kind"]
    assert os.path.isfile(os.path.join(out, "report.html"))
    if index["kind"] == "ivf":
        assert summary["recall_at_k_estimate"] >= 0.95


def _clustered(rng, n, d=32, centers=20, sigma=0.6):
    c = _unit(rng.standard_normal((centers, d)))
    return _around(rng, c, rng.integers(0, centers, n), sigma)


def test_ivf_self_join_equals_faiss_range_search(tmp_path):
    rng = np.random.default_rng(1)
    x = _clustered(rng, 3000)
    x[1500:1600] = x[:100]  # exact duplicates
    np.save(tmp_path / "x.npy", x)
    vs = load_vectors(str(tmp_path / "x.npy"))
    index = PoolIndex(vs, IndexConfig(kind="ivf", nlist=16, dedup_nprobe=3), progress=False)
    q, n, s = index.self_join(0.8, k=10 ** 6)
    # faiss's own IVF range search with the same probes is the reference.
    index.index.nprobe = 3
    lims, d, i = index.index.range_search(x, 0.8)
    ref = {(a, int(b)) for a in range(len(x)) for b in i[lims[a]:lims[a + 1]] if b != a}
    assert set(zip(q.tolist(), n.tolist())) == ref
    assert np.allclose(s, (x[q] * x[n]).sum(1), atol=1e-5)
    # External queries (a reference set) with their own probe count.
    queries = _unit(x[:200] + np.random.default_rng(9).standard_normal((200, x.shape[1])) * 0.1)
    q, n, s = index.pairs_above(0.7, 10 ** 6, queries=queries, nprobe=5)
    index.index.nprobe = 5
    lims, d, i = index.index.range_search(queries, 0.7)
    ref = {(a, int(b)) for a in range(len(queries)) for b in i[lims[a]:lims[a + 1]]}
    assert set(zip(q.tolist(), n.tolist())) == ref and len(ref) > 100


def test_ivf_search_equals_faiss_ivf_search(tmp_path):
    rng = np.random.default_rng(8)
    x, queries = _clustered(rng, 3000), _clustered(rng, 300)
    np.save(tmp_path / "x.npy", x)
    allowed = rng.random(3000) > 0.2
    index = PoolIndex(load_vectors(str(tmp_path / "x.npy")), IndexConfig(kind="ivf", nlist=16), progress=False)
    sims, rows = index.search(queries, 6, allowed, nprobe=3)
    # faiss's own per-query IVF search with the same probes and an id selector.
    bitmap = np.packbits(allowed, bitorder="little")
    params = faiss.SearchParametersIVF(nprobe=3, sel=faiss.IDSelectorBitmap(3000, faiss.swig_ptr(bitmap)))
    ref_s, ref_r = index.index.search(queries, 6, params=params)
    assert np.allclose(sims, ref_s, atol=1e-5)
    # Same neighbours up to float ties: our rows are allowed and have faiss's similarities.
    assert allowed[rows].all()
    assert np.allclose((queries[:, None, :] * x[rows]).sum(-1), ref_s, atol=1e-5)
    assert (np.sort(rows, 1) == np.sort(ref_r, 1)).mean() > 0.99


def test_flat_self_join_equals_bruteforce(tmp_path):
    rng = np.random.default_rng(2)
    x = _clustered(rng, 1200)
    np.save(tmp_path / "x.npy", x)
    index = PoolIndex(load_vectors(str(tmp_path / "x.npy")), IndexConfig(kind="flat", chunk=500), progress=False)
    q, n, s = index.self_join(0.7, k=5)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    want = set()
    for a in range(len(x)):
        order = np.argsort(-sims[a], kind="stable")
        want |= {(a, int(b)) for b in order[:5] if sims[a, b] > 0.7}
    assert set(zip(q.tolist(), n.tolist())) == want


def test_search_respects_allowed_and_matches_numpy(tmp_path):
    rng = np.random.default_rng(3)
    x, queries = _clustered(rng, 2000), _clustered(rng, 50)
    np.save(tmp_path / "x.npy", x)
    allowed = rng.random(2000) > 0.3
    index = PoolIndex(load_vectors(str(tmp_path / "x.npy")), IndexConfig(kind="flat"), progress=False)
    sims, rows = index.search(queries, 7, allowed)
    ref = queries @ x.T
    ref[:, ~allowed] = -np.inf
    want = np.argsort(-ref, axis=1)[:, :7]
    assert np.array_equal(np.sort(rows, 1), np.sort(want, 1))
    assert np.allclose(sims, np.take_along_axis(ref, want, 1), atol=1e-5)
    es, er = exact_knn(load_vectors(str(tmp_path / "x.npy")), queries, 7, allowed, chunk=300)
    assert np.array_equal(np.sort(er, 1), np.sort(want, 1))


def test_components_and_topk_helpers():
    rng = np.random.default_rng(4)
    n = 200
    q, nb = rng.integers(0, n, 150), rng.integers(0, n, 150)
    labels, kept = dedup.connected_duplicate_groups(n, q, nb)
    parent = list(range(n))  # union-find reference

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in zip(q, nb):
        parent[find(a)] = find(b)
    roots = np.array([find(a) for a in range(n)])
    for a in range(n):
        same = np.flatnonzero(roots == roots[a])
        assert kept[a] == same.min()
        assert (labels[same] == labels[a]).all() and (labels[roots != roots[a]] != labels[a]).all()

    s = rng.random(150).astype(np.float32)
    cq, cn, cs = cap_per_query(q, nb, s, 2)
    for a in np.unique(q):
        top = np.sort(s[q == a])[::-1][:2]
        assert np.allclose(np.sort(cs[cq == a])[::-1], top)

    sims, rows = rng.random((5, 9)).astype(np.float32), rng.integers(-1, 50, (5, 9))
    ms, mr = merge_topk(sims, rows, 3)
    for r in range(5):
        valid = rows[r] >= 0
        want = np.sort(sims[r][valid])[::-1][:3]
        assert np.allclose(ms[r][:len(want)], want)


def _widely_copied_reference(dim=128):
    """A reference vector r; 70 exact copies of a pool image at cosine 0.8 to r (one
    component); 10 distinct images at cosine 0.70, 0.68, ..., 0.52 to r (pairwise <= 0.49,
    0.8 * 0.7 = 0.56 to the copies: components of their own); 40 unrelated images."""
    rng = np.random.default_rng(14)
    basis, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    r = basis[0]
    copies = np.repeat((0.8 * r + 0.6 * basis[1])[None], 70, 0)
    cos = 0.70 - 0.02 * np.arange(10)
    distinct = cos[:, None] * r + np.sqrt(1 - cos[:, None] ** 2) * basis[2:12]
    unrelated = _unit(rng.standard_normal((40, dim)))
    return np.concatenate([copies, distinct, unrelated]).astype(np.float32), r[None].astype(np.float32)


@pytest.mark.parametrize("index", [dict(kind="flat"), dict(kind="ivf", nlist=4, dedup_nprobe=4, reference_nprobe=4)])
def test_reference_dedup_counts_components_not_copies(index):
    # The k budget of a reference vector counts pictures (components), not rows: the 70
    # copies of one picture used to fill k = 64 slots and keep every other image above 0.45.
    x, ref = _widely_copied_reference()
    pool, refs = VectorSet("pool", [x]), [VectorSet("eval", [ref]), VectorSet("far", [-ref])]
    cfg = IndexConfig(**index)

    def run(k, comm=None):
        idx = PoolIndex(pool, cfg, comm, progress=False)
        return dedup.reference_deduplicate(idx, dedup.self_deduplicate(idx, 0.6, 64), refs, 0.45, k)

    for k, removed in ((64, 10), (5, 4)):  # k = 5: the copies' component + the 4 closest images
        res = run(k)
        assert (res.reason[:70] == dedup.REFERENCE).all() and res.keep[80:].all()
        assert (res.reason[70:80] == dedup.REFERENCE).tolist() == [i < removed for i in range(10)], k
        assert (res.matched_set[res.reason == dedup.REFERENCE] == 0).all()  # "far" matches nothing
        # Two processes (the pool split between them) agree with one.
        for got in _run_ranks(2, lambda comm: run(k, comm)):
            for f in ("component", "kept_as", "reason", "matched", "matched_set"):
                assert np.array_equal(getattr(got, f), getattr(res, f)), (k, f)
            assert np.allclose(got.matched_sim, res.matched_sim, atol=1e-6, equal_nan=True)


def test_split_target_and_balanced_sample():
    rng = np.random.default_rng(5)
    for _ in range(50):
        sizes = rng.integers(0, 30, rng.integers(1, 8))
        target = int(rng.integers(0, 120))
        counts = cluster.split_target(sizes, target, rng)
        assert counts.sum() == min(target, sizes.sum()) and (counts <= sizes).all()
        # Balanced: no child is short of the cut while another has 2 more than it.
        short = counts < sizes
        if short.any():
            assert counts.max() <= counts[short].min() + 1
    # A tiny 2-level tree: 4 leaves (sizes 1, 1, 50, 50) under 2 parents.
    leaf = np.array([0] + [1] + [2] * 50 + [3] * 50)
    tree = cluster.HierarchicalClusters(leaf=leaf, parents=[np.array([0, 0, 1, 1])],
                                        centroids=[np.zeros((4, 2)), np.zeros((2, 2))])
    picked = cluster.balanced_sample(tree, 20, seed=0)
    assert len(np.unique(picked)) == 20
    per_leaf = np.bincount(leaf[picked], minlength=4)
    assert per_leaf.tolist() == [1, 1, 9, 9]  # parent 0 can only give 2; parent 1 takes the rest


def test_cluster_and_hierarchical_retrieval_stay_in_domain(tmp_path, planted):
    p = planted
    np.save(tmp_path / "pool.npy", p["pool"])
    pool = load_vectors(str(tmp_path / "pool.npy"))
    allowed = np.ones(len(pool), bool)
    allowed[::7] = False
    queries = p["curated"][:60]
    got = retrieve.retrieve_from_clusters(pool, queries, allowed, k=4, num_clusters=80, seed=0)
    assert allowed[got.rows].all() and len(np.unique(got.rows)) == len(got.rows)
    assert p["in_domain"][p["concept"][got.rows]].mean() >= 0.9
    assert np.allclose(got.similarity, (p["pool"][got.rows] * queries[got.query]).sum(1), atol=1e-5)
    hier = retrieve.retrieve_hierarchical(pool, queries, allowed, k=4, levels=(160, 16), seed=0)
    assert len(hier) == 240 and allowed[hier.rows].all()
    assert p["in_domain"][p["concept"][hier.rows]].mean() >= 0.9
    # Query-free (Vo et al.): balanced over the whole pool, so about half is off-domain.
    free = retrieve.retrieve_hierarchical(pool, queries, allowed, k=4, levels=(160, 16),
                                          queries_only=False, seed=0)
    assert 0.3 < p["in_domain"][p["concept"][free.rows]].mean() < 0.7


def test_hierarchical_balanced_sampling_evens_out_concepts(tmp_path):
    # 16 concepts from 2000 down to 20 points: the 8 smallest hold 6% of the data.
    rng = np.random.default_rng(0)
    centers = _unit(rng.standard_normal((16, 64)))
    sizes = np.array([2000, 1000, 700, 400, 300, 200, 150, 100, 80, 60, 50, 40, 30, 30, 20, 20])
    labels = np.repeat(np.arange(16), sizes)
    np.save(tmp_path / "x.npy", _around(rng, centers, labels, sigma=0.5))
    vs = load_vectors(str(tmp_path / "x.npy"))
    tree = cluster.hierarchical_kmeans(vs, np.arange(len(vs)), levels=(80, 16), seed=0)
    assert len(tree.leaf) == len(vs) and tree.parents[0].shape == (80,)
    picked = cluster.balanced_sample(tree, 320, seed=0)
    assert len(np.unique(picked)) == 320
    share = np.bincount(labels[picked], minlength=16)
    random_share = sizes[8:].sum() / sizes.sum()
    assert share[8:].sum() / 320 >= 3 * random_share, share
    assert share.min() >= 1, share


def test_hierarchical_resample_is_bounded_like_the_training_sample():
    # levels (10, 2) on 4000 rows: the default r (200 per cluster) would gather half the pool.
    x = _clustered(np.random.default_rng(13), 4000, d=16)
    vs = VectorSet("pool", [x])
    sizes, gather = [], vs.gather
    vs.gather = lambda rows: (sizes.append(len(rows)), gather(rows))[1]
    tree = cluster.hierarchical_kmeans(vs, np.arange(len(x)), levels=(10, 2), train_points_per_cluster=32,
                                       seed=0)
    assert len(sizes) == 3 and max(sizes) <= 10 * 32, sizes  # training sample + 2 resamples
    assert len(tree.leaf) == len(x) and len(np.unique(tree.leaf)) == 10 and tree.parents[0].shape == (10,)
    with pytest.raises(UserError, match="one r per level"):
        cluster.hierarchical_kmeans(vs, np.arange(len(x)), levels=(10, 2), resample_size=(5,))


def _run_cli(argv):
    return curate_main(argv)


def test_cli_embeddings_end_to_end_and_resume(tmp_path, planted, capsys):
    p = planted
    paths = _save(tmp_path, curated=p["curated"][:50], pool=p["pool"][:2000])
    out = str(tmp_path / "out")
    argv = ["embeddings", "--curated", paths["curated"], "--pool", paths["pool"], "--out", out,
            "--k", "3", "--no-progress", "--no-report"]
    assert _run_cli(argv) == 0
    first = open(os.path.join(out, "manifest.jsonl")).read()
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["counts"]["curated"] == 50 and "dedup_cached" not in summary["timings_s"]
    # A second run (e.g. after an interruption during retrieval) reuses the dedup result.
    assert _run_cli(argv) == 0
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["timings_s"].get("dedup_cached") is True
    assert open(os.path.join(out, "manifest.jsonl")).read() == first
    # A different threshold is a different fingerprint: recomputed.
    assert _run_cli(argv + ["--dedup-threshold", "0.7"]) == 0
    assert "dedup_cached" not in json.load(open(os.path.join(out, "summary.json")))["timings_s"]
    # Plain vectors name no images, so the manifest cannot be a training source.
    from lvm_jax.data.manifest import build_manifest_source
    import ml_collections
    with pytest.raises(UserError, match="records no image source"):
        build_manifest_source(ml_collections.ConfigDict(dict(path=out)), "train")


def test_dedup_cache_key_sees_new_vectors(tmp_path):
    # Re-embedding keeps a set's ids and shape; the cache must not hand back the old removals.
    rng = np.random.default_rng(11)
    pool = _unit(rng.standard_normal((300, 64)))
    pool[200:210] = pool[:10]
    paths = _save(tmp_path, curated=pool[250:260], pool=pool)
    argv = ["embeddings", "--curated", paths["curated"], "--pool", paths["pool"], "--out", str(tmp_path / "out"),
            "--no-progress", "--no-report"]
    summaries = []
    for vectors in (pool, _unit(rng.standard_normal((300, 64)))):  # the second: no duplicates at all
        np.save(paths["pool"], vectors)
        assert _run_cli(argv) == 0
        summaries.append(json.load(open(tmp_path / "out" / "summary.json")))
    assert summaries[0]["counts"]["removed_self"] == 10
    assert summaries[1]["counts"]["removed_self"] == 0 and "dedup_cached" not in summaries[1]["timings_s"]
    # The digest reads a bounded sample of rows.
    big = VectorSet("big", [_unit(rng.standard_normal((5000, 8)))])
    sizes, gather = [], big.gather
    big.gather = lambda rows: (sizes.append(len(rows)), gather(rows))[1]
    pipeline._set_signature(big)
    assert sizes == [1000]


def test_dedup_cache_hit_is_decided_by_all_processes(tmp_path):
    # Only process 0 writes the cache; a resumed run whose other processes lack it must
    # still run deduplication (and its collectives) on every process.
    rng = np.random.default_rng(12)
    x = _unit(rng.standard_normal((400, 64)))
    x[300:320] = x[:20]
    paths = _save(tmp_path, curated=x[350:370], pool=x)
    cached, fresh = str(tmp_path / "cached"), str(tmp_path / "fresh")
    config = dict(report=dict(enabled=False))

    def curate(out_dirs, comm=None):
        return pipeline.curate(load_vectors(paths["curated"]), load_vectors(paths["pool"]),
                               out_dirs[comm.rank if comm else 0], config=config, comm=comm, progress=False)

    want = curate([str(tmp_path / "one")])
    assert want["counts"]["removed_self"] == 20
    # The key counts processes, so two processes write their own cache (process 0, in `cached`).
    got = _run_ranks(2, lambda comm: curate([cached, cached], comm))[0]
    assert "dedup_cached" not in got["timings_s"] and got["counts"] == want["counts"]
    # Resumed with the cache on process 0 only: every process deduplicates again.
    got = _run_ranks(2, lambda comm: curate([cached, fresh], comm))[0]
    assert "dedup_cached" not in got["timings_s"] and got["counts"] == want["counts"]
    got = _run_ranks(2, lambda comm: curate([cached, cached], comm))[0]  # every process has it
    assert got["timings_s"]["dedup_cached"] is True and got["counts"] == want["counts"]


def test_center_removes_a_shared_direction(tmp_path):
    # Anisotropic embeddings: a common direction makes every pair look like a duplicate.
    rng = np.random.default_rng(10)
    common = _unit(rng.standard_normal((1, 64)))
    x = _unit(3 * common + _unit(rng.standard_normal((300, 64))))
    x[200:210] = x[:10]  # the only true duplicates
    paths = _save(tmp_path, pool=x, curated=x[250:260])
    for center, want in ((False, None), (True, set(range(200, 210)))):
        out = str(tmp_path / f"out{center}")
        assert _run_cli(["embeddings", "--curated", paths["curated"], "--pool", paths["pool"], "--out", out,
                         "--no-progress", "--no-report"] + (["--center"] if center else [])) == 0
        removed = {json.loads(l)["id"] for l in open(os.path.join(out, "duplicates.jsonl"))}
        if want is None:
            assert len(removed) > 250  # without centering nearly everything is a "duplicate"
        else:
            assert removed == want


def test_bad_inputs_give_one_clear_error(tmp_path, capsys):
    rng = np.random.default_rng(7)
    good = _unit(rng.standard_normal((30, 16)))
    nan = good.copy()
    nan[4, 3] = np.nan
    zero = good.copy()
    zero[5] = 0
    paths = _save(tmp_path, good=good, narrow=good[:, :8], empty=np.zeros((0, 16), np.float32),
                  nan=nan, zero=zero)
    out = str(tmp_path / "out")

    def error(curated, pool, *extra):
        code = _run_cli(["embeddings", "--curated", paths[curated], "--pool", paths[pool], "--out", out,
                         "--no-progress", "--no-report", *extra])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("error: ") and "\n" not in err, err
        return err

    assert "dims differ" in error("good", "narrow")
    assert "curated set" in error("empty", "good") and "empty" in error("empty", "good")
    assert "k=31 is larger than the pool (30" in error("good", "good", "--k", "31")
    assert "NaN" in error("good", "nan") and "id 4" in error("good", "nan")
    assert "all-zero" in error("zero", "good") and "id 5" in error("zero", "good")
    # A missing shard of an embedding directory.
    emb = tmp_path / "emb"
    emb.mkdir()
    json.dump(dict(dim=16, count=30, shard_size=10, num_shards=3), open(emb / "index.json", "w"))
    for s in (0, 2):
        np.save(emb / f"emb_{s:05d}.npy", good[10 * s:10 * s + 10].astype(np.float16))
        np.save(emb / f"ids_{s:05d}.npy", np.arange(10 * s, 10 * s + 10))
    paths["emb"] = str(emb)
    err = error("good", "emb")
    assert "emb_00001.npy' is missing (2 of 3 shards done)" in err and "lvm-curate embed" in err
    with pytest.raises(UserError, match="repeats ids"):
        VectorSet("dup", [good], ids=np.zeros(30, np.int64))


def test_two_processes_match_one(tmp_path, planted):
    """`lvm-curate embeddings` on 2 processes (pool sharded by process, top-k merged) == 1 process."""
    p = planted
    paths = _save(tmp_path, curated=p["curated"][:40], pool=p["pool"][:2500], ref=p["reference"])
    common = ["embeddings", "--curated", paths["curated"], "--pool", paths["pool"], "--reference",
              paths["ref"], "--no-progress", "--no-report", "--index", "ivf", "--nlist", "16",
              "--nprobe", "16", "--dedup-nprobe", "16"]
    assert _run_cli(common + ["--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    port = 20000 + os.getpid() % 20000
    procs = [subprocess.Popen([sys.executable, "-m", "lvm_jax.curation", *common, "--out", str(tmp_path / "two"),
                               "--coordinator", f"localhost:{port}", "--num-processes", "2",
                               "--process-id", str(i)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [pr.communicate(timeout=240)[0] for pr in procs]
    assert all(pr.returncode == 0 for pr in procs), logs
    for name in ("manifest.jsonl", "duplicates.jsonl"):
        one, two = ([json.loads(l) for l in open(tmp_path / d / name)] for d in ("one", "two"))
        key = lambda l: (l["id"], l.get("source", ""))  # noqa: E731
        one, two = sorted(one, key=key), sorted(two, key=key)
        assert [{**l, "similarity": None} for l in one] == [{**l, "similarity": None} for l in two], name
        # Similarities agree to float32 rounding (the matmuls are blocked differently).
        assert all(abs((a["similarity"] or 0) - (b["similarity"] or 0)) < 1e-5 for a, b in zip(one, two))
    summary = json.load(open(tmp_path / "two" / "summary.json"))
    assert summary["index"]["processes"] == 2
