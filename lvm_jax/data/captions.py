"""Image-caption data sources: caption files (JSONL / CSV) and webdataset tar shards.

Both are grain ``RandomAccessDataSource``s (``len`` + ``__getitem__``) whose records are
``dict(image=bytes, caption=str, id=int, path=str)``; the image stays encoded until the
pipeline's ``DecodeImage`` transform. ``image_keys`` names each record's image, so
retrieval evals can group several captions of one image (``group_captions_by_image``).

captions (``data.source='captions'``):
  ``data.path`` is a ``.jsonl`` file of ``{"image": "rel/path.jpg", "caption": "..."}`` lines
  (``caption`` may also be a list: one record per caption) or a ``.csv``/``.tsv`` file with
  a header row (open_clip's columns ``filepath``, ``title`` by default; the separator is a
  tab when the header holds one, else a comma; a TSV is read unquoted, so a '"' stays text).
  ``data.image_column`` / ``data.caption_column`` rename the fields; relative image paths are
  resolved against ``data.image_root``, default the caption file's folder, and normalised
  ('./a.jpg' and its absolute path are one image). http(s) image URLs are refused when the
  source is built (download the images first).
webdataset (``data.source='webdataset'``):
  ``data.path`` is a glob and/or brace pattern of uncompressed ``.tar`` shards in the
  img2dataset layout (``{key}.jpg`` + ``{key}.txt`` and/or ``{key}.json`` with a "caption").
  Each shard's member index (offsets of images, the captions) is built once when the source
  is created — in parallel, and cached in ``data.index_dir`` when set — so any record is a
  single positioned read.

Every path may be a gs:// URL (``lvm_jax.data.files``): a shard in a bucket is scanned once front
to back and each record is then one ranged GET. On a pod, a shared ``data.index_dir`` (gs://)
lets the hosts split the scanning (each starts at its own slice and reads the others' indexes);
lvm-train defaults it to ``WORKDIR/webdataset_index`` (train/loop.py: with_default_index_dir).

Splits: ``data.eval_path`` (same format) is the eval split; without it a fixed-seed
``data.holdout_fraction`` of the *images* (all their captions together) is held out.

Bad input (``data.decode_errors``: 'skip' (default) or 'raise'):
- empty / whitespace-only caption: always dropped when the source is built, and counted;
- malformed row (bad JSON, missing image or caption field), a tar sample with no image or no
  caption (or a .json without a text "caption"):
  skip = dropped and counted, raise = ValueError naming the file and line / sample;
- a shard glob (in a comma list) that matches nothing, a JSON array / multi-line JSON caption
  file, an unparsable CSV record: ValueError under both policies;
- a shard that is truncated or not a tar file: skip = its intact samples are kept and the
  rest counted, raise = ValueError naming the shard;
- missing or unreadable image file (found only when read): skip = the record carries empty
  image bytes, which ``DecodeImage(errors='skip')`` counts and drops like any undecodable
  image; raise = ValueError naming the file;
- text longer than the context is not a data error: the tokenizer truncates it, EOT kept.
Counts of build-time skips are in ``source.skipped`` and logged once as a warning.
"""
from __future__ import annotations

import concurrent.futures
import csv
import errno
import glob
import hashlib
import json
import logging
import os
import posixpath
import re
import sys
import tarfile
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath
from tqdm import tqdm

from lvm_jax.data import files
from lvm_jax.data.sources import holdout_fraction
from lvm_jax.workdir import write_whole

ERROR_POLICIES = ("skip", "raise")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
MAX_OPEN_SHARDS = 64  # per WebDatasetSource and process: local shard files kept open between reads
_CAPTION_FIELD = "caption"  # inside img2dataset's per-sample .json

log = logging.getLogger(__name__)


def _check_policy(errors: str) -> str:
    if errors not in ERROR_POLICIES:
        raise ValueError(f"data.decode_errors must be one of {ERROR_POLICIES}, got {errors!r}.")
    return errors


def _count(skipped: dict[str, int], reason: str) -> None:
    skipped[reason] = skipped.get(reason, 0) + 1


def _log_skipped(what: str, skipped: dict[str, int]) -> None:
    if skipped:
        details = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in sorted(skipped.items()))
        log.warning("%s: skipped %s", what, details)


# ------------------------------------------------------------------ caption files
class CaptionsSource:
    """Image file + caption pairs. Records: ``dict(image=bytes, caption=str, id=int, path=str)``."""

    def __init__(self, image_paths: Sequence[str], captions: Sequence[str], errors: str = "skip",
                 name: str = "", skipped: dict[str, int] | None = None):
        if len(image_paths) != len(captions):
            raise ValueError("CaptionsSource needs one caption per image path.")
        if not image_paths:
            raise ValueError(f"caption data {name!r} has no usable rows; check the file and its columns.")
        self.image_paths = list(image_paths)
        self.captions = list(captions)
        self.errors = _check_policy(errors)
        self.name = name
        self.skipped = dict(skipped or {})
        self.missing_images = 0  # per process: files found missing/unreadable at read time

    @property
    def image_keys(self) -> list[str]:
        return self.image_paths

    def __len__(self) -> int:
        return len(self.captions)

    def __repr__(self) -> str:
        return f"CaptionsSource({self.name!r}, records={len(self)})"

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        path = self.image_paths[index]
        try:
            data = files.read_bytes(path)
        except OSError as e:
            if self.errors == "raise":
                raise ValueError(f"image {path!r} of caption record {index} in {self.name!r} cannot be read "
                                 f"({type(e).__name__}); fix the path (data.image_root) or set "
                                 "data.decode_errors='skip'.") from e
            self.missing_images += 1
            data = b""  # DecodeImage(errors='skip') counts and drops it
        return dict(image=data, caption=self.captions[index], id=index, path=path)


def _resolve(path: str, root: str) -> str:
    """`path` under `root`, normalised ('./a//b.png' and the absolute spelling name one image)."""
    joined = files.join(root, files.expand(path))
    if not files.is_url(joined):
        return os.path.abspath(joined)
    scheme, sep, rest = joined.partition("://")
    return scheme + sep + posixpath.normpath(rest) if rest else joined


def _check_image_url(image: str, file: str, line_no: int) -> None:
    """Refuses, at build time, an image URL that the loader could not read (http(s), ftp, ...)."""
    scheme = image.partition("://")[0]
    if scheme not in files.CLIENTS:
        raise ValueError(f"{file}:{line_no}: image {image!r} is a {scheme}:// URL, which the loader cannot "
                         "read; download the images (e.g. with img2dataset) and point the caption file at "
                         f"local paths or {'/'.join(s + '://' for s in files.CLIENTS)} copies.")


def read_captions_file(path: str, image_column: str | None = None, caption_column: str | None = None,
                       image_root: str | None = None, separator: str | None = None,
                       errors: str = "skip") -> tuple[list[str], list[str], dict[str, int]]:
    """Parses a JSONL or CSV/TSV caption file -> (image paths, captions, skip counts).

    Rows with an empty caption are dropped and counted; malformed rows are dropped and
    counted (errors='skip') or raise ValueError naming the line (errors='raise').
    """
    _check_policy(errors)
    files.check(path)
    path = files.expand(path)
    if not files.isfile(path):
        raise ValueError(f"caption file {path!r} does not exist; set data.path to a .jsonl or .csv file.")
    if image_root:
        files.check(image_root, "data.image_root")
    root = files.expand(image_root) if image_root else files.dirname(path)
    is_json = path.endswith((".jsonl", ".json"))
    image_column = image_column or ("image" if is_json else "filepath")
    caption_column = caption_column or ("caption" if is_json else "title")
    paths: list[str] = []
    captions: list[str] = []
    skipped: dict[str, int] = {}

    def bad_row(line_no: int, why: str) -> None:
        if errors == "raise":
            raise ValueError(f"{path}:{line_no}: {why}; fix the row or set data.decode_errors='skip' to drop it.")
        _count(skipped, "malformed_row")

    def add(line_no: int, image: Any, caption: Any) -> None:
        if isinstance(image, str):
            # 'img/a.jpg ' (a padded CSV cell, a hand-edited file) names img/a.jpg: no data set's files end
            # in spaces, and kept literally every such row would count as a missing image at read time.
            image = image.strip()
        if not isinstance(image, str) or not image:
            return bad_row(line_no, f"no image path in column {image_column!r}")
        if caption is None:  # the field is absent (a short CSV row, a JSON row without the key, null)
            return bad_row(line_no, f"no caption in column {caption_column!r}")
        resolved = _resolve(image, root)
        if files.is_url(resolved):
            _check_image_url(resolved, path, line_no)
        texts = caption if isinstance(caption, list) else [caption]
        if not texts:
            _count(skipped, "empty_caption")
        for text in texts:
            if not isinstance(text, str):
                bad_row(line_no, f"caption in column {caption_column!r} is not text")
            elif not text.strip():
                _count(skipped, "empty_caption")
            else:
                paths.append(resolved)
                captions.append(text)

    with files.open_text(path) as f:
        if is_json:
            first = True
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                if first and (line.lstrip().startswith("[") or line.strip() == "{"):
                    raise ValueError(f"caption file {path!r} holds one JSON document (an array or a multi-line "
                                     "object), but caption files are JSON Lines: write one {\"image\": ..., "
                                     "\"caption\": ...} object per line (e.g. jq -c '.[]' file.json > file.jsonl).")
                first = False
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    bad_row(line_no, "not valid JSON")
                    continue
                if not isinstance(row, dict):
                    bad_row(line_no, "not a JSON object")
                    continue
                add(line_no, row.get(image_column), row.get(caption_column))
        else:
            header = f.readline()
            if separator is None:
                separator = "\t" if "\t" in header else ","
            f.seek(0)
            # Unquoted TSV is the common form (CC3M-style exports): there a caption that starts with '"'
            # must stay text, not open a quoted field that swallows the following rows.
            reader = csv.reader(f, delimiter=separator,
                                quoting=csv.QUOTE_NONE if separator == "\t" else csv.QUOTE_MINIMAL)
            line_no = 1
            try:
                fieldnames = next(reader, [])
                missing = [c for c in (image_column, caption_column) if c not in fieldnames]
                if missing:
                    raise ValueError(f"caption file {path!r} has no column(s) {missing}; its columns are "
                                     f"{fieldnames}. Set data.image_column / data.caption_column.")
                image_at, caption_at = fieldnames.index(image_column), fieldnames.index(caption_column)
                while True:
                    line_no = reader.line_num + 1  # the first physical line of the next record
                    row = next(reader, None)
                    if row is None:
                        break
                    if not row:  # blank line
                        continue
                    add(line_no, row[image_at] if image_at < len(row) else None,
                        row[caption_at] if caption_at < len(row) else None)
            except csv.Error as e:
                raise ValueError(f"{path}:{line_no}: cannot be parsed as CSV ({e}); look for an unclosed quote "
                                 "near that line and fix or remove it.") from e
    return paths, captions, skipped


# -------------------------------------------------------------------- webdataset
def expand_shards(pattern: str | Sequence[str]) -> list[str]:
    """Shard paths from a glob, a brace range ('data/{00000..00009}.tar'), a comma list, or a list."""
    if not isinstance(pattern, str):
        return [p for item in pattern for p in expand_shards(item)]
    out: list[str] = []
    for part in (p for p in pattern.split(",") if p.strip()):
        files.check(part.strip())
        for expanded in _expand_braces(files.expand(part.strip())):
            matches = files.glob(expanded) if glob.has_magic(expanded) else [expanded]
            if not matches:
                raise ValueError(f"shard pattern {part.strip()!r} in data.path matches no shard files; fix the "
                                 "pattern (a typo?) or remove it from the list.")
            out += matches
    return out


def _expand_braces(pattern: str) -> list[str]:
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not m:
        return [pattern]
    lo, hi = m.group(1), m.group(2)
    width = len(lo)
    return [p for i in range(int(lo), int(hi) + 1)
            for p in _expand_braces(pattern[:m.start()] + str(i).zfill(width) + pattern[m.end():])]


def _split_key(name: str) -> tuple[str, str]:
    # webdataset: the key is the path up to the first '.' of the basename.
    folder, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return os.path.join(folder, stem), ext.lower() if dot else ""


def _caption_from(ext: str, data: bytes) -> str | None:
    """The caption text; None when a .json member is not an object with a text "caption"."""
    text = data.decode("utf-8", errors="replace")
    if ext == "txt":
        return text
    try:
        value = json.loads(text).get(_CAPTION_FIELD)
    except (json.JSONDecodeError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def index_shard(path: str, errors: str = "skip") -> tuple[list[tuple[str, int, int, str]], dict[str, int]]:
    """Scans one uncompressed tar shard -> (samples (key, image offset, image size, caption), skip counts)."""
    _check_policy(errors)
    skipped: dict[str, int] = {}

    def broken(why: str) -> None:
        if errors == "raise":
            raise ValueError(f"webdataset shard {path!r} {why}; re-download or re-create it, or set "
                             "data.decode_errors='skip' to use its intact samples.")
        _count(skipped, "truncated_shard")
        log.warning("webdataset shard %r %s; using its intact samples", path, why)

    if path.endswith((".gz", ".tgz", ".bz2", ".xz", ".zst")):
        raise ValueError(f"webdataset shard {path!r} is compressed; random access needs uncompressed .tar "
                         "shards (img2dataset writes them by default).")
    if not files.isfile(path):
        raise ValueError(f"webdataset shard {path!r} does not exist; check data.path.")
    file_size = files.size(path)
    members: dict[str, dict[str, tuple[int, int]]] = {}
    texts: dict[tuple[str, str], bytes] = {}  # caption members, read as the scan passes them
    # One front-to-back pass (in a bucket: a few large reads, not a request per member).
    with files.open_binary(path) as f:
        try:
            with tarfile.open(fileobj=f, mode="r:") as tar:
                while True:
                    try:
                        info = tar.next()
                    except (tarfile.ReadError, EOFError) as e:
                        broken(f"is truncated or corrupt after {len(members)} samples ({e})")
                        break
                    if info is None:
                        # A complete tar ends with >= two zero blocks; a cut inside a header
                        # reads as a quiet end of archive, so check the tail.
                        tail_size = file_size - tar.offset
                        f.seek(tar.offset)
                        tail = f.read(min(tail_size, 1 << 20))
                        if tail_size < 1024 or tail.strip(b"\0"):
                            broken(f"is truncated after {len(members)} samples (no end-of-archive marker)")
                        break
                    if not info.isfile():
                        continue
                    if info.offset_data + info.size > file_size:
                        broken(f"is truncated inside member {info.name!r}")
                        break
                    key, ext = _split_key(info.name)
                    members.setdefault(key, {})[ext] = (info.offset_data, info.size)
                    if ext in ("txt", "json"):
                        texts[key, ext] = tar.extractfile(info).read()
        except tarfile.ReadError as e:  # not a tar at all (or the first header is broken)
            broken(f"is not a readable tar file ({e})")

    samples = []
    for key, found in members.items():
        image_ext = next((e for e in IMAGE_EXTS if e in found), None)
        caption_ext = next((e for e in ("txt", "json") if e in found), None)
        if image_ext is None or caption_ext is None:
            if errors == "raise":
                raise ValueError(f"webdataset sample {key!r} in {path!r} has no "
                                 f"{'image' if image_ext is None else 'caption (.txt/.json)'}; "
                                 "fix the shard or set data.decode_errors='skip'.")
            _count(skipped, "no_image" if image_ext is None else "no_caption")
            continue
        caption = _caption_from(caption_ext, texts[key, caption_ext])
        if caption is None:  # a .json that is not an object with a text "caption"
            if errors == "raise":
                raise ValueError(f"webdataset sample {key!r} in {path!r} has no text {_CAPTION_FIELD!r} field in "
                                 "its .json; fix the shard or set data.decode_errors='skip'.")
            _count(skipped, "no_caption")
            continue
        if not caption.strip():
            _count(skipped, "empty_caption")
            continue
        samples.append((key, *found[image_ext], caption))
    return samples, skipped


# The version of index_shard's output kept in data.index_dir; part of each cache file's name, so bump it
# whenever a change to index_shard would index a shard differently: caches written before are then
# never read (they are rebuilt under the new name) instead of replaying the old indexer's mistakes.
INDEX_FORMAT = 2


def _index_tag(path: str, errors: str) -> str:
    """The cache file name (without .json) of a shard's index: the indexer version, the shard's path,
    size and version, and the error policy, so a changed shard or indexer is scanned again."""
    return hashlib.sha1(f"v{INDEX_FORMAT}|{files.fingerprint(path)}|{errors}".encode()).hexdigest()


def _cached_index(path: str, errors: str, index_dir: str | None):
    """index_shard's result, kept in `index_dir` (local or gs://) under `_index_tag`."""
    if not index_dir:
        return index_shard(path, errors)
    cache = files.join(files.expand(index_dir), f"{_index_tag(path, errors)}.json")
    if files.isfile(cache):
        data = json.loads(files.read_bytes(cache))
        return [tuple(s) for s in data["samples"]], data["skipped"]
    samples, skipped = index_shard(path, errors)
    text = json.dumps({"format": INDEX_FORMAT, "shard": path if files.is_url(path) else os.path.abspath(path),
                       "samples": samples, "skipped": skipped})
    # Atomic (an object upload, or a rename of a temporary name unique to this writer: hosts sharing
    # an NFS index_dir can run with equal PIDs), so concurrent processes never read a partial index.
    write_whole(epath.Path(cache), text)
    return samples, skipped


class WebDatasetSource:
    """Random access into webdataset tar shards through a member index.

    Records: ``dict(image=bytes, caption=str, id=int, path='<shard>:<key>')``.
    """

    def __init__(self, shards: Sequence[str], errors: str = "skip", index_dir: str | None = None,
                 num_threads: int = 16, process: tuple[int, int] = (0, 1)):
        """`process` = (index, count) of this host: with a shared `index_dir`, each host starts scanning
        at its own 1/count of the shards and reads the others' indexes as they land, so a pod scans
        every shard about once instead of once per host."""
        self.errors = _check_policy(errors)
        self.shards = list(shards)
        if not self.shards:
            raise ValueError("webdataset source got no shards; set data.path to a shard glob such as "
                             "'/data/laion/{00000..00099}.tar'.")
        n = len(self.shards)
        start = process[0] * n // max(process[1], 1) if index_dir else 0
        order = list(range(start, n)) + list(range(start))
        if index_dir is None and process[1] > 1 and files.is_url(self.shards[0]):
            log.warning("every host scans all %d webdataset shards in the bucket for their member index; set "
                        "data.index_dir=gs://... so the hosts share the work and later runs skip it", n)
        results: list = [None] * n
        with concurrent.futures.ThreadPoolExecutor(max(1, min(num_threads, n))) as pool, \
                tqdm(total=n, desc="indexing webdataset shards", unit="shard", disable=n < 16, mininterval=5) as bar:
            futures = {pool.submit(_cached_index, self.shards[i], errors, index_dir): i for i in order}
            try:
                for future in concurrent.futures.as_completed(futures):
                    results[futures[future]] = future.result()
                    bar.update(1)
            except BaseException:
                # A shard that fails under errors='raise' (or Ctrl-C): report it now, not after every
                # queued shard has been scanned (thousands in a bucket).
                for future in futures:
                    future.cancel()
                raise
        shard_ids, keys, offsets, sizes, captions = [], [], [], [], []
        self.skipped: dict[str, int] = {}
        for shard_id, (samples, skipped) in enumerate(results):
            for reason, n in skipped.items():
                self.skipped[reason] = self.skipped.get(reason, 0) + n
            for key, offset, size, caption in samples:
                shard_ids.append(shard_id)
                keys.append(key)
                offsets.append(offset)
                sizes.append(size)
                captions.append(caption)
        _log_skipped(f"webdataset {self.shards[0]!r} (+{len(self.shards) - 1} shards)", self.skipped)
        self._shard = np.asarray(shard_ids, np.int32)
        self._offset = np.asarray(offsets, np.int64)
        self._size = np.asarray(sizes, np.int64)
        self.keys, self.captions = keys, captions
        if not len(self.keys):
            raise ValueError(f"webdataset shards {self.shards[:3]} hold no usable image+caption samples; "
                             "check the layout ({key}.jpg + {key}.txt or .json).")
        self._fds: OrderedDict[int, list[int]] = OrderedDict()  # shard -> [fd, readers]: a bounded LRU
        self._lock = threading.Lock()

    @property
    def image_keys(self) -> list[str]:
        return [f"{self.shards[s]}:{k}" for s, k in zip(self._shard, self.keys)]

    def __len__(self) -> int:
        return len(self.keys)

    def __repr__(self) -> str:
        return f"WebDatasetSource(shards={len(self.shards)}, records={len(self)})"

    def __getstate__(self) -> dict[str, Any]:  # file descriptors and locks stay in their process
        state = self.__dict__.copy()
        state["_fds"], state["_lock"] = OrderedDict(), None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def subset(self, rows: Sequence[int]) -> "WebDatasetSource":
        """A source over the given records only (shares the shard index; no re-scan)."""
        rows = np.asarray(rows, np.int64)
        if not len(rows):
            raise ValueError("this webdataset split is empty; add samples or set data.eval_path.")
        out = WebDatasetSource.__new__(WebDatasetSource)
        out.__setstate__(self.__getstate__())
        out._shard, out._offset, out._size = self._shard[rows], self._offset[rows], self._size[rows]
        out.keys = [self.keys[i] for i in rows]
        out.captions = [self.captions[i] for i in rows]
        return out

    def _acquire(self, shard: int) -> list[int]:
        """The shard's [fd, readers] entry, opened if needed; at most MAX_OPEN_SHARDS idle fds stay open
        (a data set can have far more shards than the process may open files)."""
        with self._lock:
            entry = self._fds.get(shard)
            if entry is None:
                self._evict(MAX_OPEN_SHARDS - 1)
                entry = self._fds[shard] = [os.open(self.shards[shard], os.O_RDONLY), 0]
            else:
                self._fds.move_to_end(shard)
            entry[1] += 1
            return entry

    def _release(self, shard: int, entry: list[int]) -> None:
        with self._lock:
            entry[1] -= 1
            if entry[1] == 0 and self._fds.get(shard) is not entry:  # dropped by close() while in use
                os.close(entry[0])

    def _evict(self, keep: int) -> None:
        """Closes the least recently used idle fds until at most `keep` are open (fds in use stay)."""
        for shard in [s for s, e in self._fds.items() if e[1] == 0][:max(len(self._fds) - keep, 0)]:
            os.close(self._fds.pop(shard)[0])

    def close(self) -> None:
        """Closes the open shard files (reads reopen them)."""
        if getattr(self, "_lock", None) is None:
            return
        with self._lock:
            self._evict(0)
            self._fds.clear()  # fds still in use close when their read ends (_release)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def _pread(self, shard: int, size: int, offset: int) -> bytes:
        entry = self._acquire(shard)
        try:
            return os.pread(entry[0], size, offset)
        finally:
            self._release(shard, entry)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        shard, size = int(self._shard[index]), int(self._size[index])
        path = f"{self.shards[shard]}:{self.keys[index]}"
        try:
            shard_path = self.shards[shard]
            if files.is_url(shard_path):  # one ranged GET
                data = files.read_range(shard_path, int(self._offset[index]), size)
            else:
                data = self._pread(shard, size, int(self._offset[index]))
        except OSError as e:
            data = b""
            if self.errors == "raise":
                if e.errno == errno.EMFILE:
                    raise ValueError(f"cannot read {path!r}: the process has too many open files; raise the "
                                     "open-file limit (ulimit -n) or use fewer loader workers.") from e
                raise ValueError(f"cannot read {path!r} ({e}); check that the shard still exists and is "
                                 "readable (re-index it if it was rewritten).") from e
        if len(data) != size and self.errors == "raise":
            raise ValueError(f"{path!r} is shorter than its index says; the shard changed since it was indexed.")
        return dict(image=data if len(data) == size else b"", caption=self.captions[index], id=index, path=path)


# ------------------------------------------------------------------------ splits
def holdout_indices(image_keys: Sequence[str], split: str, fraction: float, seed: int = 0) -> np.ndarray:
    """Rows of `split` ('train'/'eval') when a fixed-seed `fraction` of distinct images is held out.

    All captions of one image land in the same split; the eval split gets >= 1 image when
    there are >= 2.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"data.holdout_fraction={fraction} must be in (0, 1): the share of images held out "
                     "for evaluation when the data has no eval split of its own (root/val, data.eval_path).")
    index_of: dict[str, int] = {}
    image_of_row = np.asarray([index_of.setdefault(k, len(index_of)) for k in image_keys], np.int64)
    num_images = len(index_of)
    n_eval = min(max(int(round(fraction * num_images)), 1), num_images - 1) if num_images >= 2 else 0
    is_eval = np.zeros(num_images, bool)
    is_eval[np.random.default_rng(seed).permutation(num_images)[:n_eval]] = True
    return np.flatnonzero(is_eval[image_of_row] == (split == "eval"))


def _check_holdout(what: str, image_keys: Sequence[str], rows: np.ndarray, split: str) -> None:
    """Raises the cause and the fix when the hold-out left `split` empty: with fewer than 2 distinct
    images there is nothing to hold out (the file itself may be fine)."""
    if not len(rows):
        n = len(set(image_keys))
        raise ValueError(f"{what} holds {n} distinct image(s), too few for data.holdout_fraction to hold any "
                         f"out (that needs at least 2: one to train on, one to evaluate), so the {split} split "
                         "is empty; add images, or set data.eval_path to separate eval data.")


def _split_args(data_cfg, split: str) -> tuple[str | None, bool]:
    """(path for this split, whether to hold out from the train path)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}.")
    path = data_cfg.get("path", None)
    eval_path = data_cfg.get("eval_path", None)
    if not path:
        raise ValueError("data.path is empty; set it to a caption file (.jsonl/.csv) or a shard glob.")
    if eval_path:
        return (eval_path if split == "eval" else path), False
    return path, True


def build_captions_source(data_cfg, split: str = "train") -> CaptionsSource:
    """The `captions` source for split 'train' or 'eval' (see the module docstring for the keys)."""
    path, holdout = _split_args(data_cfg, split)
    errors = data_cfg.get("decode_errors", "skip") or "skip"
    paths, captions, skipped = read_captions_file(
        path, data_cfg.get("image_column", None), data_cfg.get("caption_column", None),
        data_cfg.get("image_root", None), data_cfg.get("csv_separator", None), errors)
    _log_skipped(f"caption file {path!r}", skipped)
    if holdout and paths:
        rows = holdout_indices(paths, split, holdout_fraction(data_cfg),
                               int(data_cfg.get("holdout_seed", 0) or 0))
        _check_holdout(f"caption file {path!r}", paths, rows, split)
        paths, captions = [paths[i] for i in rows], [captions[i] for i in rows]
    return CaptionsSource(paths, captions, errors, name=f"{path} [{split}]", skipped=skipped)


def _process_position() -> tuple[int, int]:
    """(jax.process_index(), jax.process_count()) when JAX is in use, else (0, 1)."""
    jax = sys.modules.get("jax")
    return (jax.process_index(), jax.process_count()) if jax is not None else (0, 1)


def build_webdataset_source(data_cfg, split: str = "train") -> WebDatasetSource:
    """The `webdataset` source for split 'train' or 'eval' (see the module docstring for the keys)."""
    pattern, holdout = _split_args(data_cfg, split)
    shards = expand_shards(pattern)
    missing = files.missing(shards)
    if not shards or missing:
        raise ValueError(f"data.path {pattern!r} matches no shard files"
                         + (f" (missing: {missing[:3]})" if missing else "")
                         + "; point it at .tar shards, e.g. '/data/cc3m/{00000..00331}.tar'.")
    errors = data_cfg.get("decode_errors", "skip") or "skip"
    index_dir = data_cfg.get("index_dir", None)
    source = WebDatasetSource(shards, errors, index_dir, process=_process_position())
    if holdout:
        keys = source.image_keys
        rows = holdout_indices(keys, split, holdout_fraction(data_cfg), int(data_cfg.get("holdout_seed", 0) or 0))
        _check_holdout(f"webdataset {pattern!r}", keys, rows, split)
        source = source.subset(rows)
    return source
