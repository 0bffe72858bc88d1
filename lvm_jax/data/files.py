"""Data-set files on a local disk or in a bucket (gs://, s3://), for the data sources.

A TPU pod keeps its data in a bucket, and a GPU cluster often in S3, so ``data.path`` (image
folders, caption files and the images they name, webdataset shards, ``data.index_dir``) may be
a gs:// or s3:// URL.
Local paths take the plain ``os`` calls they always did; URLs go through fsspec
(gcsfs, s3fs), whose filesystem objects are cached per process (and rebuilt after a fork,
so grain's worker processes open their own connections). A record read is one
ranged GET (`read_range`), never a download of a whole shard.

Other URLs are refused with the fix (mount the store), as for workdirs.
"""

from __future__ import annotations

import glob as globlib
import importlib.util
import os
import posixpath
import secrets
import shutil
from collections.abc import Iterable
from typing import IO, Any

from lvm_jax.errors import UserError
from lvm_jax.workdir import is_remote, refuse_url

# Data URL schemes -> (the fsspec client package, the lvm_jax extra that installs it).
CLIENTS = {"gs": ("gcsfs", "gcs"), "s3": ("s3fs", "s3")}

# Remote shard scans read ahead in blocks this large: a tar's headers sit between the
# members, so indexing reads the shard front to back anyway; big blocks mean few requests.
SCAN_BLOCK_BYTES = 8 << 20


is_url = is_remote  # the workdir's test: a bucket URL (gs://..., s3://...) has no local file semantics


def _fs(url: str, what: str = "data.path") -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for a URL, after checking its scheme."""
    check_url(url, what)
    import fsspec

    return fsspec.core.url_to_fs(url)


def check_url(url: str, what: str = "data.path") -> None:
    """Raises the fix for a data URL this library cannot read: its scheme, or its missing client."""
    scheme = url.partition("://")[0]
    if scheme not in CLIENTS:
        refuse_url(url, what, f"{', '.join(s + '://' for s in CLIENTS)} and local paths are")
    client, extra = CLIENTS[scheme]
    if importlib.util.find_spec(client) is None:
        raise UserError(f"{what} {url} needs {client} to reach the bucket; install it with "
                        f"pip install 'lvm_jax[{extra}]' (or pip install {client}).")


def _url(fs: Any, inner: str) -> str:
    return fs.unstrip_protocol(inner)


def check(path: str, what: str = "data.path") -> None:
    """Raises the fix when `path` is a URL this library cannot read (see the module docstring)."""
    if is_url(path):
        check_url(path, what)


def join(root: str, relative: str) -> str:
    """`relative` under `root` (a directory path or URL); absolute paths and URLs stay as they are."""
    if is_url(relative) or os.path.isabs(relative):
        return relative
    return posixpath.join(root, relative) if is_url(root) else os.path.join(root, relative)


def dirname(path: str) -> str:
    """The folder holding `path` (absolute for local paths)."""
    return posixpath.dirname(path.rstrip("/")) if is_url(path) else os.path.dirname(os.path.abspath(path))


def expand(path: str) -> str:
    """`~` expanded for local paths; URLs unchanged."""
    return path if is_url(path) else os.path.expanduser(path)


def isfile(path: str) -> bool:
    if not is_url(path):
        return os.path.isfile(path)
    fs, inner = _fs(path)
    return fs.isfile(inner)


def isdir(path: str) -> bool:
    if not is_url(path):
        return os.path.isdir(path)
    fs, inner = _fs(path)
    return fs.isdir(inner)


def size(path: str) -> int:
    if not is_url(path):
        return os.path.getsize(path)
    fs, inner = _fs(path)
    return int(fs.size(inner))


def fingerprint(path: str) -> str:
    """Changes when the file does: `path|size|mtime` (local) or `url|size|generation or ETag` (bucket)."""
    if not is_url(path):
        stat = os.stat(path)
        return f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}"
    fs, inner = _fs(path)
    info = fs.info(inner)
    return f"{path}|{info['size']}|{_version(info)}"


def _version(info: dict) -> str:
    """An object's version from its listing/info entry: GCS generation, S3 ETag, else its time."""
    return str(info.get("generation") or info.get("etag") or info.get("ETag") or info.get("LastModified")
               or info.get("mtime") or info.get("updated") or "")


def version(url: str) -> str:
    """The object's current version (see `_version`): it changes whenever the object is rewritten."""
    fs, inner = _fs(url)
    return _version(fs.info(inner))


def read_bytes(path: str) -> bytes:
    """The whole file."""
    if not is_url(path):
        with open(path, "rb") as f:
            return f.read()
    fs, inner = _fs(path)
    return _as_os_error(path, fs.cat_file, inner)


def read_range(path: str, offset: int, length: int) -> bytes:
    """`length` bytes of the file from `offset`: one ranged request for a URL.

    Local callers that read many ranges keep an open descriptor and use os.pread instead.
    """
    fs, inner = _fs(path)
    return _as_os_error(path, fs.cat_file, inner, start=offset, end=offset + length)


def _as_os_error(path: str, read, *args, **kwargs) -> bytes:
    # gcsfs raises its HttpError (not an OSError) once its retries of a 5xx/429 run out (s3fs may
    # raise botocore errors); the
    # sources' decode_errors policy handles unreadable files as OSError, so it gets one.
    try:
        return read(*args, **kwargs)
    except OSError:
        raise
    except Exception as e:
        raise OSError(f"cannot read {path}: {type(e).__name__}: {e}") from e


def open_binary(path: str) -> IO[bytes]:
    """A seekable binary file object; for a URL, reading ahead in SCAN_BLOCK_BYTES blocks."""
    if not is_url(path):
        return open(path, "rb")
    fs, inner = _fs(path)
    return fs.open(inner, "rb", block_size=SCAN_BLOCK_BYTES, cache_type="readahead")


def open_text(path: str) -> IO[str]:
    """A text file object (UTF-8, universal newlines left to the csv module).

    utf-8-sig drops a byte-order mark (spreadsheet exports write one), which would otherwise
    glue itself to the first JSON line or the first CSV column's name.
    """
    if not is_url(path):
        return open(path, encoding="utf-8-sig", newline="")
    fs, inner = _fs(path)
    return fs.open(inner, "rt", encoding="utf-8-sig", newline="")


def glob(pattern: str) -> list[str]:
    """Sorted paths matching a glob pattern (local or gs://)."""
    if not is_url(pattern):
        return sorted(globlib.glob(pattern))
    fs, inner = _fs(pattern)
    return sorted(_url(fs, p) for p in fs.glob(inner))


def missing(paths: Iterable[str]) -> list[str]:
    """The paths that are not files. Bucket URLs are checked with one listing per folder,
    not one request per file (a data set may have thousands of shards)."""
    out, listed = [], {}
    for path in paths:
        if not is_url(path):
            if not os.path.isfile(path):
                out.append(path)
            continue
        folder = dirname(path)
        if folder not in listed:
            fs, inner = _fs(folder)
            try:
                listed[folder] = {_url(fs, e["name"]) for e in fs.ls(inner, detail=True)
                                  if e.get("type") == "file"}
            except FileNotFoundError:
                listed[folder] = set()
        if path not in listed[folder]:
            out.append(path)
    return out


def files_under(url: str) -> list[str]:
    """Every object below the bucket folder `url`, as '/'-separated paths relative to it, sorted.

    One (paginated) recursive listing, not one request per folder (local trees use os.walk).
    """
    return sorted(objects_under(url))


def objects_under(url: str) -> dict[str, tuple[int, str]]:
    """{path relative to the bucket folder `url`: (size in bytes, version)} of every object below it
    (one listing; empty when there is none). The version changes when an object is rewritten."""
    fs, inner = _fs(url)
    prefix = inner.rstrip("/") + "/"
    try:
        found = fs.find(inner, detail=True)
    except FileNotFoundError:
        return {}
    return {p[len(prefix):]: (int(info.get("size") or 0), _version(info))
            for p, info in found.items() if p.startswith(prefix)}


def upload(local: str, url: str) -> None:
    """Copies the local file to the object `url` (one upload: readers see the old or the new object)."""
    fs, inner = _fs(url)
    fs.put_file(local, inner)


def download(url: str, local: str) -> None:
    """Copies the object `url` to the local file (through a temporary name, then renamed)."""
    fs, inner = _fs(url)
    os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
    # This writer's own name: hosts sharing a disk (equal pids on different hosts) or threads of one
    # process never rename each other's partial file.
    tmp = f"{local}.part{os.getpid()}.{secrets.token_hex(4)}"
    try:
        fs.get_file(inner, tmp)
        os.replace(tmp, local)
    except BaseException:
        _remove_partial(tmp)
        raise  # the copy's own error, never one from the clean-up


def _remove_partial(tmp: str) -> None:
    """Removes what a failed copy left at the temporary name `tmp` (unique to its writer): a partial file,
    or the folder fsspec's generic get_file makes for a prefix. Best effort: a failure to clean up
    must not replace the error that made the copy fail."""
    try:
        if os.path.isdir(tmp) and not os.path.islink(tmp):
            shutil.rmtree(tmp)
        elif os.path.lexists(tmp):
            os.remove(tmp)
    except OSError:
        pass
