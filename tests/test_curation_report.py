"""The curation report (report.html + PNGs) and the summary it shows, on tiny inputs.

Figures are checked through the data handed to matplotlib (histogram values, grid
cells), not pixels.
"""
import json
import os
import re

import matplotlib
import matplotlib.axes
import numpy as np
import pytest

from lvm_jax.curation import dedup, pipeline, report, retrieve
from lvm_jax.curation.__main__ import _print_summary
from lvm_jax.curation.index import Comm, IndexConfig, PoolIndex, VectorSet

matplotlib.use("Agg")


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _near_reference(seed=2, per_ref=4, noise=1.22, dim=32):
    """5 reference ("eval") vectors and a pool of `per_ref` noisy copies of each: cosine ~0.6-0.8
    to its reference, so relative dedup removes every pool row and nothing is retrieved."""
    rng = np.random.default_rng(seed)
    ref = _unit(rng.normal(size=(5, dim)))
    pool = np.repeat(ref, per_ref, axis=0) + noise * rng.normal(size=(5 * per_ref, dim)).astype(
        np.float32) / np.sqrt(dim)
    curated = rng.normal(size=(3, dim)).astype(np.float32)
    return VectorSet("curated", [curated]), VectorSet("pool", [pool]), VectorSet("evalset", [ref])


# -- BUG-1: exact copies (cosine rounding to just above 1.0) are counted ----------------------------
def test_histogram_counts_exact_copies(tmp_path, monkeypatch):
    calls = []
    orig = matplotlib.axes.Axes.hist

    def spy(self, x, *args, **kwargs):
        calls.append((kwargs.get("label"), np.asarray(x), np.asarray(kwargs["bins"])))
        return orig(self, x, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "hist", spy)
    above = np.nextafter(np.float32(1), np.float32(2))  # 1.0000001: float32 dot of two copies
    n = 6
    result = dedup.no_dedup(n)
    result.reason[1:] = dedup.SELF
    result.kept_as[:] = 0
    result.component[:] = 0
    result.matched_sim[1:] = [above, above, 1.0, 0.99, 0.7]
    retrieved = retrieve.Retrieval(np.arange(3), np.zeros(3, np.int64),
                                   np.array([above, 0.5, np.nan], np.float32))
    report._histogram(str(tmp_path / "similarity.png"), retrieved, result, {"dedup": {"threshold": 0.6}})
    counted = {label: int(np.histogram(x, bins)[0].sum()) for label, x, bins in calls}
    assert counted == {"retrieved (to query)": 2, "removed duplicates": 5}


# -- BUG-2: the duplicate-group table says what happened to every member -----------------------------
def _table_rows(out):
    html = open(os.path.join(out, "report.html")).read()
    table = html.split("<h2>Duplicate groups</h2>")[1]
    return re.findall(r"<tr><td>(.*?)</td><td>(.*?)</td></tr>", table)


def _cell_ids(cell):
    return dict(re.findall(r"(\d+) \((\w+)\)", cell))


def test_duplicate_table_marks_reference_removed_groups(tmp_path):
    curated, pool, ref = _near_reference()
    out = str(tmp_path / "out")
    s = pipeline.curate(curated, pool, out, [ref], dict(retrieval=dict(k=2)), progress=False)
    assert s["counts"]["removed_reference"] == 20 and s["counts"]["pool_kept"] == 0
    rows = _table_rows(out)
    assert rows
    dups = {str(d["id"]): d["reason"] for d in map(json.loads, open(os.path.join(out, "duplicates.jsonl")))}
    shown = {}
    for first, rest in rows:
        assert first and _cell_ids(first), first  # the representative carries its fate too
        shown.update(_cell_ids(first))
        shown.update(_cell_ids(rest))
    assert shown and all(dups.get(i) == why for i, why in shown.items()), (shown, dups)


def test_duplicate_table_marks_kept_and_self_removed(tmp_path):
    rng = np.random.default_rng(0)
    base = _unit(rng.normal(size=(30, 32)))
    pool = np.concatenate([base, np.repeat(base[:2], 3, axis=0)])  # 2 groups of 4 exact copies
    out = str(tmp_path / "out")
    pipeline.curate(VectorSet("curated", [base[:3]]), VectorSet("pool", [pool]), out,
                    config=dict(retrieval=dict(k=2)), progress=False)
    dups = {str(d["id"]): d["reason"] for d in map(json.loads, open(os.path.join(out, "duplicates.jsonl")))}
    rows = _table_rows(out)
    assert len(rows) == 2
    for first, rest in rows:
        (kept, why), = _cell_ids(first).items()
        assert why == "kept" and kept not in dups
        assert _cell_ids(rest) == {i: dups[i] for i in _cell_ids(rest)} and len(_cell_ids(rest)) == 3


# -- BUG-8: nothing retrievable -> recall undefined, nprobe left alone -------------------------------
def test_recall_is_none_when_nothing_is_retrievable(tmp_path, capsys):
    curated, pool, ref = _near_reference(per_ref=40, noise=1.0)
    out = str(tmp_path / "out")
    s = pipeline.curate(curated, pool, out, [ref],
                        dict(index=dict(kind="ivf", nlist=8, nprobe=1), report=dict(enabled=True)),
                        progress=False)
    assert s["counts"]["pool_kept"] == 0 and s["counts"]["retrieved"] == 0
    assert s["recall_at_k_estimate"] is None
    assert s["index"]["nprobe"] == 1
    on_disk = json.load(open(os.path.join(out, "summary.json")))
    assert on_disk["recall_at_k_estimate"] is None and on_disk["index"]["nprobe"] == 1
    assert os.path.isfile(os.path.join(out, "report.html"))
    _print_summary(s, out)
    assert "recall@k" not in capsys.readouterr().out

    # tune_nprobe itself: no query has an exact neighbour -> (starting nprobe, None)
    index = PoolIndex(pool, IndexConfig(kind="ivf", nlist=8, nprobe=2), Comm(), progress=False)
    nprobe, recall = pipeline.tune_nprobe(index, pool, curated.read(), 4, np.zeros(len(pool), bool),
                                          16, 0.95, 0, Comm())
    assert (nprobe, recall) == (2, None)


# -- BUG-9: the retrieval grid is capped per query; summary.json comes before the report --------------
def test_retrieval_grid_is_capped_per_query(tmp_path, monkeypatch):
    grids = {}
    monkeypatch.setattr(report, "_grid", lambda path, rows, title: grids.__setitem__(os.path.basename(path), rows))
    loaded = []

    def image_fn(which, row):
        loaded.append((which, row))
        return np.zeros((4, 4, 3), np.uint8)

    monkeypatch.setattr(report, "TABLE_PER_QUERY", 20)
    rng = np.random.default_rng(1)
    n = 50
    pool = rng.normal(size=(n + 10, 16)).astype(np.float32)
    curated = rng.normal(size=(1, 16)).astype(np.float32)
    s = pipeline.curate(VectorSet("curated", [curated]), VectorSet("pool", [pool]), str(tmp_path / "out"),
                        config=dict(retrieval=dict(mode="cluster", num_clusters=1, per_cluster=n),
                                    dedup=dict(enabled=False)),
                        progress=False, image_fn=image_fn)
    assert s["counts"]["retrieved"] == n
    (row,) = grids["retrieval.png"]  # one query row
    assert len(row) < n  # not one panel per retrieved image
    cap = report.GRID_PER_QUERY
    assert cap <= 32 and len(row) == 1 + cap + 1  # query, the most similar, "+M more"
    assert row[-1] == (None, f"+{n - cap} more")
    assert len(loaded) <= 1 + cap  # only the images drawn are decoded
    # The HTML table listed every retrieved id (per_cluster 10000: megabytes per query row).
    html = open(tmp_path / "out" / "report.html").read()
    (cells,) = re.findall(r"<tr><td>[^<]*</td><td>([^<]*)</td></tr>", html.split("Retrieved per query")[1]
                          .split("Duplicate groups")[0])
    assert len(re.findall(r"\(-?[01]\.\d{3}\)", cells)) == 20 and cells.endswith(", +30 more (all in manifest.jsonl)")


@pytest.mark.parametrize("dedup_on, references, lines", [
    (True, False, ["dedup threshold"]), (False, True, ["reference threshold"]),
    (True, True, ["dedup threshold", "reference threshold"])])
def test_histogram_draws_the_thresholds_that_were_applied(tmp_path, monkeypatch, dedup_on, references, lines):
    drawn = []
    orig = matplotlib.axes.Axes.axvline
    monkeypatch.setattr(matplotlib.axes.Axes, "axvline",
                        lambda self, x, *a, **kw: (drawn.append((kw.get("label"), x)), orig(self, x, *a, **kw))[1])
    result = dedup.no_dedup(4)
    retrieved = retrieve.Retrieval(np.arange(2), np.zeros(2, np.int64), np.array([0.5, 0.4], np.float32))
    summary = {"dedup": {"enabled": dedup_on, "threshold": 0.6, "reference_threshold": 0.45},
               "counts": {"references": {"evalset": 5} if references else {}}}
    report._histogram(str(tmp_path / "similarity.png"), retrieved, result, summary)
    # The self threshold was drawn with dedup off, the reference one never.
    assert drawn == [(label, 0.6 if label == "dedup threshold" else 0.45) for label in lines]


def test_summary_is_written_before_the_report(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    seen = {}

    def stopped(out_dir, summary, *args, **kwargs):
        seen["summary"] = json.load(open(os.path.join(out_dir, "summary.json")))
        raise RuntimeError("stopped while drawing the report")

    monkeypatch.setattr(report, "write_report", stopped)
    rng = np.random.default_rng(0)
    with pytest.raises(RuntimeError, match="stopped"):
        pipeline.curate(VectorSet("curated", [rng.normal(size=(3, 16)).astype(np.float32)]),
                        VectorSet("pool", [rng.normal(size=(20, 16)).astype(np.float32)]), out,
                        config=dict(retrieval=dict(k=2)), progress=False)
    assert seen["summary"]["counts"]["manifest"] == len(open(os.path.join(out, "manifest.jsonl")).readlines())
    assert "total" in seen["summary"]["timings_s"]
    monkeypatch.undo()
    s = pipeline.curate(VectorSet("curated", [rng.normal(size=(3, 16)).astype(np.float32)]),
                        VectorSet("pool", [rng.normal(size=(20, 16)).astype(np.float32)]), out,
                        config=dict(retrieval=dict(k=2)), progress=False)
    on_disk = json.load(open(os.path.join(out, "summary.json")))
    assert "report" in on_disk["timings_s"] and on_disk["timings_s"]["total"] == s["timings_s"]["total"]
