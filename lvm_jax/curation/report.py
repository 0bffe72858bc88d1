"""A human check of a curation run: ``DIR/report.html`` plus PNG figures.

- a similarity histogram of the retrieved images and of the removed duplicates;
- a grid of curated queries with the pool images retrieved for them (the
  `GRID_PER_QUERY` most similar per query, then a "+M more" note);
- a grid of duplicate groups (the kept image, if any, then the removed ones), each
  image labelled kept or with the reason it was removed.

Grids show images when an image loader is available (``lvm-curate run``, or
embedding directories that record their source / file paths); otherwise the
HTML lists ids, paths and similarities.
"""

from __future__ import annotations

import html
import json
import os
from typing import Callable

import numpy as np

from lvm_jax.curation import dedup as dd
from lvm_jax.curation.index import VectorSet
from lvm_jax.curation.retrieve import Retrieval

ImageFn = Callable[[str, int], np.ndarray]

GRID_PER_QUERY = 16  # retrieved images drawn per query row (a query can get thousands)
TABLE_PER_QUERY = 64  # retrieved ids listed per query in report.html (all of them made it megabytes)


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def example_queries(retrieved: Retrieval, num: int, seed: int = 0) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Up to `num` (curated row, pool rows, similarities) with the most similar retrieved first."""
    valid = retrieved.query >= 0
    queries = np.unique(retrieved.query[valid])
    rng = np.random.default_rng(seed)
    out = []
    for q in np.sort(rng.choice(queries, min(num, len(queries)), replace=False)) if len(queries) else []:
        at = np.flatnonzero(retrieved.query == q)
        at = at[np.argsort(-retrieved.similarity[at])]
        out.append((int(q), retrieved.rows[at], retrieved.similarity[at]))
    return out


def example_groups(result: dd.DedupResult, num: int) -> list[np.ndarray]:
    """Up to `num` removed duplicate groups, largest first: rows, kept (or first) member first."""
    removed = result.reason != dd.KEPT
    if not removed.any():
        return []
    comps, counts = np.unique(result.component[removed], return_counts=True)
    out = []
    for c in comps[np.argsort(-counts, kind="stable")][:num]:
        rows = np.flatnonzero(result.component == c)
        rows = rows[np.argsort(rows != result.kept_as[rows[0]], kind="stable")]
        out.append(rows)
    return out


def _grid(path: str, rows: list[list[tuple[np.ndarray | None, str]]], title: str) -> None:
    plt = _plt()
    ncols = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(1.6 * ncols, 1.8 * len(rows)), squeeze=False)
    for i, row in enumerate(rows):
        for j in range(ncols):
            ax = axes[i][j]
            ax.axis("off")
            if j < len(row):
                image, caption = row[j]
                if image is not None:
                    ax.imshow(image)
                ax.set_title(caption, fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _histogram(path: str, retrieved: Retrieval, result: dd.DedupResult, summary: dict) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3))
    bins = np.linspace(-1, 1, 201)  # fixed: identical values (exact copies) break auto-binning
    # Clipped into the bins: the float32 cosine of two copies of one image often rounds to
    # 1.0000001, which hist would drop past the last edge.
    sims = np.clip(retrieved.similarity[np.isfinite(retrieved.similarity)], -1, 1)
    if len(sims):
        ax.hist(sims, bins=bins, alpha=0.6, label="retrieved (to query)")
    dup = np.clip(result.matched_sim[(result.reason != dd.KEPT) & np.isfinite(result.matched_sim)], -1, 1)
    if len(dup):
        ax.hist(dup, bins=bins, alpha=0.6, label="removed duplicates")
    # The thresholds that were applied, and only those (self-dedup can be off; references are optional).
    if summary["dedup"].get("enabled", True):
        ax.axvline(summary["dedup"]["threshold"], color="k", ls="--", lw=1, label="dedup threshold")
    if summary.get("counts", {}).get("references"):
        ax.axvline(summary["dedup"]["reference_threshold"], color="tab:red", ls=":", lw=1,
                   label="reference threshold")
    ax.set_xlabel("cosine similarity")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_report(out_dir: str, summary: dict, curated: VectorSet, pool: VectorSet,
                 result: dd.DedupResult, retrieved: Retrieval, num_queries: int = 8, num_groups: int = 8,
                 image_fn: ImageFn | None = None) -> str:
    """Writes report.html (+ similarity.png, retrieval.png, duplicates.png); returns the HTML path."""
    queries = example_queries(retrieved, num_queries)
    groups = example_groups(result, num_groups)
    _histogram(os.path.join(out_dir, "similarity.png"), retrieved, result, summary)

    def image(which: str, row: int):
        if image_fn is None:
            return None
        try:
            return image_fn(which, int(row))
        except Exception:  # a report must not fail a finished curation run
            return None

    figures = ["similarity.png"]
    if image_fn is not None and queries:
        grid = [[(image("curated", q), f"query {curated.ids[q]}")]
                + [(image("pool", r), f"{pool.ids[r]}: {s:.2f}")
                   for r, s in zip(rows[:GRID_PER_QUERY], sims[:GRID_PER_QUERY])]
                + ([(None, f"+{len(rows) - GRID_PER_QUERY} more")] if len(rows) > GRID_PER_QUERY else [])
                for q, rows, sims in queries]
        _grid(os.path.join(out_dir, "retrieval.png"), grid,
              f"curated query | retrieved (id: cosine; the {GRID_PER_QUERY} most similar)")
        figures.append("retrieval.png")
    if image_fn is not None and groups:
        grid = [[(image("pool", r), f"{_why(result, r)} {pool.ids[r]}") for r in rows[:8]] for rows in groups]
        _grid(os.path.join(out_dir, "duplicates.png"), grid, "duplicate groups (kept, or why removed)")
        figures.append("duplicates.png")

    esc = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>lvm-curate report</title>",
             "<style>body{font-family:sans-serif;margin:2em}td,th{padding:2px 8px;text-align:left}"
             "table{border-collapse:collapse}tr:nth-child(even){background:#f3f3f3}</style></head><body>",
             "<h1>Curation report</h1>", "<h2>Summary</h2>",
             f"<pre>{esc(json.dumps(summary, indent=2))}</pre>"]
    for fig in figures:
        parts.append(f"<h2>{esc(fig[:-4])}</h2><img src='{fig}'>")
    parts.append("<h2>Retrieved per query</h2><table><tr><th>query</th><th>retrieved (cosine)</th></tr>")
    for q, rows, sims in queries:
        cells = ", ".join(f"{esc(pool.describe(r))} ({s:.3f})"
                          for r, s in zip(rows[:TABLE_PER_QUERY], sims[:TABLE_PER_QUERY]))
        if len(rows) > TABLE_PER_QUERY:
            cells += f", +{len(rows) - TABLE_PER_QUERY} more (all in manifest.jsonl)"
        parts.append(f"<tr><td>{esc(curated.describe(q))}</td><td>{cells}</td></tr>")
    # Every member says what happened to it (as in duplicates.jsonl): the representative is
    # the kept image unless relative deduplication removed the whole group.
    parts.append("</table><h2>Duplicate groups</h2><table><tr><th>representative</th>"
                 "<th>other members</th></tr>")
    for rows in groups:
        first, *rest = (f"{esc(pool.describe(r))} ({_why(result, r)})" for r in rows)
        parts.append(f"<tr><td>{first}</td><td>{', '.join(rest)}</td></tr>")
    parts.append("</table></body></html>")
    path = os.path.join(out_dir, "report.html")
    with open(path, "w") as f:
        f.write("\n".join(parts))
    return path


def _why(result: dd.DedupResult, row: int) -> str:
    return dd.REASONS.get(int(result.reason[row]), "kept")
