"""Embedding sets on disk and the faiss index that searches a (host-sharded) pool.

A *vector set* is either one ``.npy`` file ``[N, D]`` (row i has id i) or a
directory written by ``lvm-curate embed``::

    DIR/index.json         {"dim", "count", "shard_size", "num_shards", ...}
    DIR/emb_00000.npy      float16 [n, D], L2-normalised
    DIR/ids_00000.npy      int64 [n]     record positions in the embedded source
    DIR/labels_00000.npy   int64 [n]     (when the source has labels)
    DIR/paths_00000.json   [str] * n     (when the source knows file paths)

Everything is memory-mapped and read in chunks, so a pool is held in RAM once:
inside the faiss index (float32), never also as a NumPy copy.

``PoolIndex`` picks exact search (``IndexFlatIP``) for small pools and IVF
(``IndexIVFFlat``, inner product on L2-normalised vectors = cosine) for large
ones; ``nprobe`` is the recall/speed knob.  faiss trains the coarse quantizer and
holds the inverted lists; the IVF scans read those lists in place and run one
matrix product per list against every query that probes it -- the result of
faiss's IVF search for the same probes, at BLAS speed, which is what makes a
million-vector self-join fit in minutes on two cores.  With several processes
(``jax.distributed``) each process indexes a contiguous slice of the pool rows,
searches only that slice, and the per-process top-k lists (or edges) are merged.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import functools
import json
import math
import os
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import faiss
import numpy as np
from tqdm.auto import tqdm

from lvm_jax.errors import UserError

INDEX_FILE = "index.json"


def shard_file(kind: str, shard: int, ext: str = "npy") -> str:
    """File name of one shard's part: kind in {'emb', 'ids', 'labels', 'paths'}."""
    return f"{kind}_{shard:05d}.{ext}"


# ----------------------------------------------------------------------------
# Vector sets
# ----------------------------------------------------------------------------
class VectorSet:
    """Rows ``[N, D]`` (memory-mapped shards), their int64 ids ``[N]`` and optional paths/labels.

    Rows are addressed by their position 0..N-1 ("row"); ``ids[row]`` is what
    the outputs report.  All reads return float32 L2-normalised vectors and fail
    with one clear message on NaN/inf or all-zero rows.
    """

    def __init__(self, name: str, shards: Sequence[np.ndarray], ids: np.ndarray | None = None,
                 paths: Sequence[str] | None = None, labels: np.ndarray | None = None):
        if not shards:
            raise UserError(f"vector set {name!r} has no shards; embed something into it first.")
        dims = {int(s.shape[1]) if s.ndim == 2 else -1 for s in shards}
        if len(dims) != 1 or -1 in dims:
            raise UserError(f"vector set {name!r} has shards that are not [N, D] arrays of one width "
                            f"(widths {sorted(dims)}); re-embed it.")
        self.name = name
        self.shards = list(shards)
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards]).astype(np.int64)
        n = int(self.offsets[-1])
        self.ids = np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids, np.int64)
        if len(self.ids) != n:
            raise UserError(f"vector set {name!r} has {n} vectors but {len(self.ids)} ids; re-embed it.")
        if n and np.unique(self.ids).size != n:
            raise UserError(f"vector set {name!r} repeats ids; every vector needs its own id.")
        self.paths = list(paths) if paths is not None else None
        self.labels = None if labels is None else np.asarray(labels, np.int64)
        # Optional [D] vector subtracted (after normalising) before the final normalisation:
        # mean-centering removes the common direction anisotropic embeddings share.
        self.center: np.ndarray | None = None

    @property
    def dim(self) -> int:
        return int(self.shards[0].shape[1])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __repr__(self) -> str:
        return f"VectorSet({self.name!r}, n={len(self)}, dim={self.dim}, shards={len(self.shards)})"

    def _raw(self, start: int, stop: int) -> np.ndarray:
        parts = []
        s = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while start < stop:
            lo = start - self.offsets[s]
            hi = min(stop, self.offsets[s + 1]) - self.offsets[s]
            parts.append(np.array(self.shards[s][lo:hi], np.float32))  # a writable copy
            start += hi - lo
            s += 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _normalize(self, x: np.ndarray, rows: np.ndarray) -> np.ndarray:
        finite = np.isfinite(x).all(axis=1)
        if not finite.all():
            bad = int(rows[np.argmin(finite)])
            raise UserError(f"{self.name} has NaN or infinite values (first at id {self.ids[bad]}, "
                            f"row {bad}); re-embed those images or drop them.")
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        if self.center is not None:
            x /= np.maximum(norms, 1e-30)
            x -= self.center
            norms = np.linalg.norm(x, axis=1, keepdims=True)
        zero = norms[:, 0] < 1e-12
        if zero.any():
            bad = int(rows[np.argmax(zero)])
            raise UserError(f"{self.name} has an all-zero vector (id {self.ids[bad]}, row {bad}) "
                            "whose cosine similarity is undefined; re-embed that image or drop it.")
        x /= norms
        return x

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) as float32 normalised ``[n, D]``."""
        stop = len(self) if stop is None else stop
        if stop <= start:
            return np.zeros((0, self.dim), np.float32)
        return self._normalize(self._raw(start, stop), np.arange(start, stop))

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """Arbitrary rows as float32 normalised ``[len(rows), D]`` (order kept)."""
        rows = np.asarray(rows, np.int64)
        if len(self.shards) == 1:
            x = np.array(self.shards[0][rows], np.float32)
        else:
            x = np.empty((len(rows), self.dim), np.float32)
            shard = np.searchsorted(self.offsets, rows, side="right") - 1
            for s in np.unique(shard):
                sel = np.flatnonzero(shard == s)
                x[sel] = self.shards[s][rows[sel] - self.offsets[s]]
        return self._normalize(x, rows)

    def chunks(self, start: int = 0, stop: int | None = None, chunk: int = 65536
               ) -> Iterator[tuple[int, np.ndarray]]:
        """Yields ``(row0, float32 [n, D])`` blocks covering rows [start, stop)."""
        stop = len(self) if stop is None else stop
        for s in range(start, stop, chunk):
            yield s, self.read(s, min(stop, s + chunk))

    def describe(self, row: int) -> str:
        """Human label of a row: its path when known, else its id."""
        if self.paths is not None:
            return self.paths[row]
        return str(int(self.ids[row]))


def mean_vector(vs: VectorSet, sample: int = 100_000, seed: int = 0) -> np.ndarray:
    """Mean ``[D]`` of the normalised vectors of `vs` (a uniform sample of at most `sample` rows)."""
    rows = np.arange(len(vs)) if len(vs) <= sample else \
        np.sort(np.random.default_rng(seed).choice(len(vs), sample, replace=False))
    center, vs.center = vs.center, None
    try:
        return vs.gather(rows).mean(axis=0)
    finally:
        vs.center = center


def load_vectors(path: str, name: str | None = None) -> VectorSet:
    """Opens an ``.npy`` file (rows are ids) or an embedding directory (``lvm-curate embed``)."""
    name = name or os.path.basename(os.path.normpath(path))
    if os.path.isdir(path):
        meta_file = os.path.join(path, INDEX_FILE)
        if not os.path.isfile(meta_file):
            raise UserError(f"{path!r} has no {INDEX_FILE}; pass an .npy file [N, D] or a directory "
                            "written by `lvm-curate embed`.")
        with open(meta_file) as f:
            meta = json.load(f)
        shards, paths = [], []
        have_paths = True
        for s in range(int(meta["num_shards"])):
            emb = os.path.join(path, shard_file("emb", s))
            if not os.path.isfile(emb):
                done = sum(os.path.isfile(os.path.join(path, shard_file("emb", t)))
                           for t in range(int(meta["num_shards"])))
                raise UserError(f"embedding shard {emb!r} is missing ({done} of {meta['num_shards']} "
                                "shards done); re-run `lvm-curate embed` with the same --out to finish it.")
            shards.append(np.load(emb, mmap_mode="r"))
            pth = os.path.join(path, shard_file("paths", s, "json"))
            have_paths = have_paths and os.path.isfile(pth)
            if have_paths:
                with open(pth) as f:
                    paths.extend(json.load(f))
        if not shards:
            raise UserError(f"{path!r} lists no shards; its source was empty.")
        ids, labels = read_ids_labels(path, meta)
        return VectorSet(name, shards, ids, paths if have_paths else None, labels)
    if not os.path.isfile(path):
        raise UserError(f"embedding file {path!r} does not exist; pass an .npy file [N, D] or an "
                        "embedding directory.")
    try:
        x = np.load(path, mmap_mode="r")
    except ValueError as e:
        raise UserError(f"{path!r} is not a plain .npy array ({e}); save it with np.save.") from e
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.floating):
        raise UserError(f"{path!r} holds a {x.dtype} array of shape {x.shape}; expected float [N, D].")
    return VectorSet(name, [x])


def read_ids_labels(emb_dir: str, meta: dict) -> tuple[np.ndarray, np.ndarray | None]:
    """(ids ``[N]``, labels ``[N]`` or None) of an embedding directory (local or a bucket URL), without
    its vectors: the manifest source needs no more, and a bucket's vectors are not memory-mappable."""
    import io

    from lvm_jax.data import files
    ids, labels = [], []
    for s in range(int(meta["num_shards"])):
        try:
            ids.append(np.load(io.BytesIO(files.read_bytes(files.join(emb_dir, shard_file("ids", s))))))
        except OSError as e:
            raise UserError(f"embedding directory {emb_dir} lacks shard {s} ({e}); finish it with "
                            "`lvm-curate embed` (same --out).") from e
        label_file = files.join(emb_dir, shard_file("labels", s))
        if labels is not None and files.isfile(label_file):
            labels.append(np.load(io.BytesIO(files.read_bytes(label_file))))
        else:
            labels = None
    return np.concatenate(ids), (np.concatenate(labels) if labels else None)


def check_dims(sets: Sequence[VectorSet]) -> int:
    """The common width of `sets`; raises if they differ."""
    dims = {s.name: s.dim for s in sets}
    if len(set(dims.values())) > 1:
        raise UserError(f"embedding dims differ ({', '.join(f'{k}: {v}' for k, v in dims.items())}); "
                        "embed every set with the same model.")
    return next(iter(dims.values()))


# ----------------------------------------------------------------------------
# Several processes: allgather / broadcast of NumPy arrays of any dtype
# ----------------------------------------------------------------------------
class Comm:
    """This process's rank among `size` (jax.distributed); identity operations when size == 1."""

    def __init__(self, rank: int = 0, size: int = 1):
        self.rank, self.size = rank, size

    @classmethod
    def from_jax(cls) -> "Comm":
        import jax
        return cls(jax.process_index(), jax.process_count())

    def row_range(self, n: int) -> tuple[int, int]:
        """Contiguous slice [lo, hi) of n rows owned by this process."""
        return self.rank * n // self.size, (self.rank + 1) * n // self.size

    def allgather(self, x: np.ndarray) -> np.ndarray:
        """Concatenation along axis 0 of every process's `x` (shapes may differ on axis 0)."""
        if self.size == 1:
            return x
        from jax.experimental import multihost_utils as mu
        x = np.ascontiguousarray(x)
        tail = x.shape[1:]
        # Ship raw bytes: jax would silently narrow int64/float64 without x64.
        raw = x.view(np.uint8).reshape(-1)
        sizes = np.asarray(mu.process_allgather(np.array([raw.size], np.int32))).reshape(-1)
        buf = np.zeros(int(sizes.max()), np.uint8)
        buf[:raw.size] = raw
        gathered = np.asarray(mu.process_allgather(buf)).reshape(self.size, -1)
        parts = [gathered[p, :sizes[p]].view(x.dtype).reshape((-1,) + tail) for p in range(self.size)]
        return np.concatenate(parts)

    def broadcast(self, x: np.ndarray) -> np.ndarray:
        """Process 0's `x` on every process (same shape everywhere)."""
        if self.size == 1:
            return x
        from jax.experimental import multihost_utils as mu
        x = np.ascontiguousarray(x)
        raw = np.asarray(mu.broadcast_one_to_all(x.view(np.uint8).reshape(-1)), np.uint8)
        return raw.view(x.dtype).reshape(x.shape)


# ----------------------------------------------------------------------------
# NumPy's BLAS threads
# ----------------------------------------------------------------------------
@contextlib.contextmanager
def numpy_blas_threads(n: int):
    """Temporarily sets the thread count of NumPy's bundled OpenBLAS (no-op if not found).

    The IVF scans run many mid-sized matrix products from parallel Python threads;
    a multi-threaded BLAS under each of them mostly spins (3-5x the CPU time
    measured on 2 cores).  threadpoolctl would do this for any BLAS; NumPy's wheels
    bundle scipy-openblas, whose C API is reached directly here.
    """
    lib = _numpy_openblas()
    if lib is None:
        yield
        return
    before = lib.scipy_openblas_get_num_threads64_()
    lib.scipy_openblas_set_num_threads64_(int(n))
    try:
        yield
    finally:
        lib.scipy_openblas_set_num_threads64_(before)


@functools.lru_cache(maxsize=1)
def _numpy_openblas():
    import ctypes
    import glob
    libs = glob.glob(os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs",
                                  "libscipy_openblas*.so*"))
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
            lib.scipy_openblas_get_num_threads64_, lib.scipy_openblas_set_num_threads64_  # noqa: B018
            return lib
        except (OSError, AttributeError):
            continue
    return None


# ----------------------------------------------------------------------------
# Top-k helpers
# ----------------------------------------------------------------------------
def merge_topk(sims: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best k of candidate lists ``[Q, M]`` (rows == -1 are empty slots), sorted descending."""
    sims = np.where(rows < 0, -np.inf, sims)
    if sims.shape[1] > k:
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        sims, rows = np.take_along_axis(sims, part, 1), np.take_along_axis(rows, part, 1)
    order = np.argsort(-sims, axis=1, kind="stable")
    sims, rows = np.take_along_axis(sims, order, 1), np.take_along_axis(rows, order, 1)
    rows = np.where(np.isfinite(sims), rows, -1)
    return sims.astype(np.float32), rows


def cap_per_query(q: np.ndarray, n: np.ndarray, s: np.ndarray, k: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keeps, for each query q, its k most similar edges (q -> n, similarity s)."""
    if len(q) == 0:
        return q, n, s
    order = np.lexsort((n, -s, q))  # by query, then similarity descending (ties: smaller row)
    q, n, s = q[order], n[order], s[order]
    start = np.r_[0, np.flatnonzero(np.diff(q)) + 1]
    rank = np.arange(len(q)) - np.repeat(start, np.diff(np.r_[start, len(q)]))
    keep = rank < k
    return q[keep], n[keep], s[keep]


def exact_knn(pool: VectorSet, queries: np.ndarray, k: int, allowed: np.ndarray | None = None,
              chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k (cosine) of normalised `queries` [Q, D] over all pool rows (streamed).

    The ground truth for recall estimates; `allowed` [N] bool masks rows out.
    """
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_r = np.full((len(queries), k), -1, np.int64)
    for start, x in pool.chunks(chunk=chunk):
        s = queries @ x.T
        if allowed is not None:
            s[:, ~allowed[start:start + len(x)]] = -np.inf
        kk = min(k, s.shape[1])
        part = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
        cand_s = np.concatenate([best_s, np.take_along_axis(s, part, 1)], 1)
        cand_r = np.concatenate([best_r, part + start], 1)
        best_s, best_r = merge_topk(cand_s, cand_r, k)
    return best_s, best_r


# ----------------------------------------------------------------------------
# The index
# ----------------------------------------------------------------------------
@dataclass
class IndexConfig:
    """Index choice and the recall/speed knobs.

    kind: 'auto' (exact up to `exact_max` pool vectors, IVF above), 'flat' or 'ivf'.
    nlist: IVF lists; 0 picks 2**round(log2(2 * sqrt(N))) (~2k lists for 1M vectors).
    nprobe: lists probed per retrieval / reference query (the recall/speed knob): the
      starting value; retrieval doubles it until the recall@k measured against exact
      search on `recall_sample` queries (pipeline setting) reaches `target_recall`.
    target_recall: 0 disables the tuning (nprobe is then used as given).
    dedup_nprobe: lists probed per pool vector in self-deduplication; near-duplicates
      (cosine > 0.6) almost always share a list, so few probes suffice.
    reference_nprobe: lists probed per reference vector in relative deduplication;
      reference sets are small and a missed evaluation image is costly, so probe more.
    """
    kind: str = "auto"
    exact_max: int = 50_000
    nlist: int = 0
    nprobe: int = 32
    target_recall: float = 0.95
    dedup_nprobe: int = 4
    reference_nprobe: int = 128
    train_points_per_list: int = 32
    kmeans_iters: int = 10
    chunk: int = 32768
    threads: int = 0  # IVF scan threads; 0 = one per CPU
    seed: int = 0

    @classmethod
    def from_dict(cls, d) -> "IndexConfig":
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise UserError(f"unknown index option(s) {sorted(unknown)}; use "
                            f"{sorted(cls.__dataclass_fields__)}.")
        return cls(**d)

    def resolve(self, n: int) -> tuple[str, int]:
        """(kind, nlist) for a pool of n vectors."""
        if self.kind not in ("auto", "flat", "ivf"):
            raise UserError(f"index kind {self.kind!r} is not one of 'auto', 'flat', 'ivf'.")
        kind = self.kind if self.kind != "auto" else ("flat" if n <= self.exact_max else "ivf")
        if kind == "flat":
            return "flat", 1
        nlist = self.nlist or 2 ** int(round(math.log2(max(2.0, 2 * math.sqrt(n)))))
        return "ivf", int(max(1, min(nlist, n // 4 or 1)))


def _bar(total: int, desc: str, unit: str, progress: bool, unit_scale=False):
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, disable=not progress,
                leave=False, dynamic_ncols=True, smoothing=0.1)


def train_centroids(pool: VectorSet, nlist: int, cfg: IndexConfig) -> np.ndarray:
    """Spherical k-means centroids ``[nlist, D]`` on a uniform sample of the pool."""
    n = len(pool)
    size = min(n, max(nlist, nlist * cfg.train_points_per_list))
    rng = np.random.default_rng(cfg.seed)
    rows = np.sort(rng.choice(n, size, replace=False))
    x = pool.gather(rows)
    km = faiss.Kmeans(pool.dim, nlist, niter=cfg.kmeans_iters, spherical=True, seed=cfg.seed + 1,
                      max_points_per_centroid=size // nlist + 1, min_points_per_centroid=1,
                      verbose=False)
    km.train(x)
    return np.ascontiguousarray(km.centroids, np.float32)


class PoolIndex:
    """faiss index over this process's slice of the pool; searches return *global* rows.

    Args:
      pool: the pool vectors (every process can read all of them).
      cfg: IndexConfig.
      comm: process group; each process indexes `comm.row_range(len(pool))`.
      progress: tqdm bars (vectors/s).
    """

    def __init__(self, pool: VectorSet, cfg: IndexConfig | None = None, comm: Comm | None = None,
                 progress: bool = True):
        self.pool, self.cfg, self.comm = pool, cfg or IndexConfig(), comm or Comm()
        self.progress = progress and self.comm.rank == 0
        n = len(pool)
        self.kind, self.nlist = self.cfg.resolve(n)
        self.lo, self.hi = self.comm.row_range(n)
        self.threads = self.cfg.threads or os.cpu_count() or 1
        d = pool.dim
        self.probes = None  # [hi - lo, dedup_nprobe] IVF lists nearest each local row
        if self.kind == "flat":
            self.index = faiss.IndexFlatIP(d)
            for _, x in self._stream(self.lo, self.hi, "index"):
                self.index.add(x)
            return
        centroids = train_centroids(pool, self.nlist, self.cfg) if self.comm.rank == 0 \
            else np.zeros((self.nlist, d), np.float32)
        self.centroids = self.comm.broadcast(centroids)
        self.quantizer = faiss.IndexFlatIP(d)
        self.quantizer.add(self.centroids)
        self.index = faiss.IndexIVFFlat(self.quantizer, d, self.nlist, faiss.METRIC_INNER_PRODUCT)
        nprobe = min(self.cfg.dedup_nprobe, self.nlist)
        probes = []
        for _, x in self._stream(self.lo, self.hi, "index"):
            _, lists = self.quantizer.search(x, nprobe)
            # The nearest list doubles as the add assignment: one coarse pass, not two.
            assign = np.ascontiguousarray(lists[:, 0], np.int64)
            self.index.add_core(len(x), faiss.swig_ptr(x), None, faiss.swig_ptr(assign))
            probes.append(lists.astype(np.int32))
        self.probes = np.concatenate(probes) if probes else np.zeros((0, nprobe), np.int32)

    def _stream(self, lo: int, hi: int, desc: str) -> Iterator[tuple[int, np.ndarray]]:
        with _bar(hi - lo, desc, "vec", self.progress, True) as bar:
            for start, x in self.pool.chunks(lo, hi, self.cfg.chunk):
                yield start, x
                bar.update(len(x))

    def describe(self) -> dict:
        out = dict(kind=self.kind, ntotal=len(self.pool), processes=self.comm.size)
        if self.kind == "ivf":
            out.update(nlist=self.nlist, nprobe=min(self.cfg.nprobe, self.nlist),
                       dedup_nprobe=min(self.cfg.dedup_nprobe, self.nlist),
                       reference_nprobe=min(self.cfg.reference_nprobe, self.nlist))
        return out

    # -- k nearest neighbours ------------------------------------------------
    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None,
               desc: str = "search", nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k cosine neighbours of normalised `queries` ``[Q, D]`` among the pool rows.

        allowed: optional bool ``[N]``; rows set False are never returned.
        nprobe: IVF lists to probe (default: cfg.nprobe).
        Returns (similarities float32 ``[Q, k]``, global rows int64 ``[Q, k]``, -1 = none),
        merged over all processes.
        """
        queries = np.ascontiguousarray(queries, np.float32)
        if self.kind == "flat":
            sims, rows = self._search_flat(queries, k, allowed, desc)
        else:
            sims, rows = self._search_ivf(queries, k, allowed, min(nprobe or self.cfg.nprobe, self.nlist), desc)
        if self.comm.size > 1:
            all_s = self.comm.allgather(sims[None]).transpose(1, 0, 2).reshape(len(queries), -1)
            all_r = self.comm.allgather(rows[None]).transpose(1, 0, 2).reshape(len(queries), -1)
            sims, rows = merge_topk(all_s, all_r, k)
        rows = np.where(np.isfinite(sims) & (rows >= 0), rows, -1)
        return sims, rows

    def _search_flat(self, queries, k, allowed, desc):
        params, bitmap = None, None
        if allowed is not None:
            bitmap = np.packbits(np.asarray(allowed[self.lo:self.hi], bool), bitorder="little")
            params = faiss.SearchParameters(sel=faiss.IDSelectorBitmap(self.hi - self.lo, faiss.swig_ptr(bitmap)))
        sims = np.full((len(queries), k), -np.inf, np.float32)
        rows = np.full((len(queries), k), -1, np.int64)
        chunk = max(1, self.cfg.chunk // 4)
        with _bar(len(queries), desc, "vec", self.progress, True) as bar:
            for s in range(0, len(queries), chunk):
                q = queries[s:s + chunk]
                if self.index.ntotal:
                    d, i = self.index.search(q, k, params=params)
                    sims[s:s + len(q)], rows[s:s + len(q)] = d, np.where(i >= 0, i + self.lo, -1)
                bar.update(len(q))
        del bitmap  # the selector reads it until here
        return sims, rows

    def _search_ivf(self, queries, k, allowed, nprobe, desc):
        probes = None if nprobe >= self.nlist else self.quantizer.search(queries, nprobe)[1]
        best_s = np.full((len(queries), k), -np.inf, np.float32)
        best_r = np.full((len(queries), k), -1, np.int64)

        lock = threading.Lock()  # lists run in parallel; two may update the same query

        def visit(qidx, rows, sim):
            if allowed is not None:
                sim[:, ~allowed[rows]] = -np.inf
            kk = min(k, sim.shape[1])
            part = np.argpartition(-sim, kk - 1, axis=1)[:, :kk]
            cand_s, cand_r = np.take_along_axis(sim, part, 1), rows[part]
            with lock:
                # Only rows whose candidates beat their current k-th best need a merge.
                better = cand_s.max(1) > best_s[qidx].min(1)
                if better.any():
                    q = qidx[better]
                    best_s[q], best_r[q] = merge_topk(np.concatenate([best_s[q], cand_s[better]], 1),
                                                      np.concatenate([best_r[q], cand_r[better]], 1), k)

        self._scan(probes, len(queries), lambda idx: queries[idx], visit, desc)
        return best_s, best_r

    def _scan(self, probes: np.ndarray | None, num_queries: int,
              vectors_of: Callable[[np.ndarray], np.ndarray],
              visit: Callable[[np.ndarray, np.ndarray, np.ndarray], None], desc: str) -> None:
        """Dense IVF scan of this process's lists.

        Every query is grouped with the lists it probes; each list then meets its
        queries in one matrix product (BLAS), which is what faiss's IVF search
        computes, query by query, for the same probes.
        probes: ``[Q, p]`` list ids per query, or None for every list (exact search);
        vectors_of(query indices) -> ``[n, D]``;
        visit(query indices ``[n]``, member rows ``[m]`` (global), cosine ``[n, m]``).
        """
        if probes is None:
            p, owners, bounds = self.nlist, np.arange(num_queries, dtype=np.int64), None
        else:
            p = probes.shape[1]
            flat = probes.reshape(-1)
            order = np.argsort(flat, kind="stable")
            owners = (order // p).astype(np.int64)
            bounds = np.searchsorted(flat[order], np.arange(self.nlist + 1))
        invlists, d = self.index.invlists, self.pool.dim
        block = 1 << 23  # similarity entries per matrix product (32 MiB of float32)

        def scan_list(lst: int) -> int:
            qidx = owners if bounds is None else owners[bounds[lst]:bounds[lst + 1]]
            size = invlists.list_size(lst)
            if size and len(qidx):
                # Views into faiss's inverted list: no copy of the pool.
                rows = faiss.rev_swig_ptr(invlists.get_ids(lst), size).astype(np.int64) + self.lo
                codes = faiss.rev_swig_ptr(invlists.get_codes(lst), size * d * 4)
                members = np.frombuffer(codes, np.float32).reshape(size, d)
                step = max(1, block // size)
                for s in range(0, len(qidx), step):
                    part = qidx[s:s + step]
                    visit(part, rows, vectors_of(part) @ members.T)
            return len(qidx)

        # Lists in parallel threads (BLAS releases the GIL), each product single-threaded:
        # many mid-sized products waste far less CPU this way than in a threaded BLAS.
        with _bar(num_queries * p, desc, "vec", self.progress, 1 / p) as bar, \
                numpy_blas_threads(1), cf.ThreadPoolExecutor(self.threads) as pool:
            for done in pool.map(scan_list, range(self.nlist)):
                bar.update(done)

    # -- all pairs above a threshold (deduplication) ---------------------------
    def pairs_above(self, threshold: float, k: int | None, queries: np.ndarray | None = None,
                    nprobe: int | None = None, desc: str = "dedup"
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Edges (query, pool row, cosine) with cosine > threshold, at most k per query (None: all).

        queries None: a self-join -- every pool row queries the index (itself
          excluded; query ids are pool rows), probing ``dedup_nprobe`` IVF lists;
          near-duplicates (cosine > 0.6) almost always share a list.
        queries ``[R, D]``: e.g. a reference set (query ids are its rows), probing
          `nprobe` lists (default cfg.nprobe).
        The k most similar edges of each query are kept: the k-NN graph restricted
        to pairs above the threshold, as in DINOv2.  IVF returns what faiss's IVF
        range search returns for the same probes.  Merged over processes; every
        process gets all edges: (query int64 ``[E]``, pool row int64 ``[E]``, cosine
        float32 ``[E]``), sorted by query when capped, in no fixed order when k is None.
        """
        self_join = queries is None
        found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

        def visit(qidx, rows, sim):
            qi, mi = np.nonzero(sim > threshold)
            q, n = qidx[qi], rows[mi]
            keep = q != n if self_join else slice(None)
            # Lists are scanned in parallel threads: one append per visit keeps (q, n, s) aligned
            # (three separate appends could interleave with another thread's).
            found.append((q[keep], n[keep], sim[qi[keep], mi[keep]]))

        if self.kind == "flat":
            self._pairs_flat(threshold, queries, found, desc)
        elif self_join:
            # Every process needs every row's probes: it scans its own lists for all rows.
            probes = self.comm.allgather(self.probes)
            self._scan(probes, len(probes), self.pool.gather, visit, desc)
        else:
            queries = np.ascontiguousarray(queries, np.float32)
            nprobe = min(nprobe or self.cfg.nprobe, self.nlist)
            probes = None if nprobe >= self.nlist else self.quantizer.search(queries, nprobe)[1]
            self._scan(probes, len(queries), lambda idx: queries[idx], visit, desc)
        q, n, s = (_cat([f[i] for f in found], dtype) for i, dtype in enumerate((np.int64, np.int64, np.float32)))
        if self.comm.size > 1:
            q, n, s = self.comm.allgather(q), self.comm.allgather(n), self.comm.allgather(s)
        return (q, n, s) if k is None else cap_per_query(q, n, s, k)

    def self_join(self, threshold: float, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`pairs_above` with the pool itself as the queries."""
        return self.pairs_above(threshold, k)

    def _pairs_flat(self, threshold: float, queries, found: list, desc: str) -> None:
        source = self.pool.chunks(0, len(self.pool), self.cfg.chunk) if queries is None else \
            ((s, np.ascontiguousarray(queries[s:s + self.cfg.chunk], np.float32))
             for s in range(0, len(queries), self.cfg.chunk))
        total = len(self.pool) if queries is None else len(queries)
        with _bar(total, desc, "vec", self.progress, True) as bar:
            for start, x in source:
                if self.index.ntotal:
                    lims, d, i = self.index.range_search(x, float(threshold))
                    q = np.repeat(np.arange(start, start + len(x)), np.diff(lims).astype(np.int64))
                    n = i.astype(np.int64) + self.lo
                    keep = (d > threshold) & ((q != n) if queries is None else True)
                    found.append((q[keep], n[keep], d[keep].astype(np.float32)))
                bar.update(len(x))


def _cat(parts: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)
