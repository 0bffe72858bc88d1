"""The run directory (DESIGN "Workdir contract") on a local disk or in a gs:// bucket.

Everything lvm-train and lvm-eval write goes through an `etils.epath.Path`, so
`--workdir gs://bucket/run` on a TPU pod behaves like a local directory: orbax
and XLA's compile cache take such paths as they are; JSON files and plots are
written whole (a GCS object is replaced atomically, never seen half-written);
and metrics.jsonl, appended to on a local disk, is rewritten whole in a bucket
because GCS objects cannot be appended to (`MetricsLog`). Inputs that readers
need as local files (`config.init_from`, lvm-convert's SRC) are copied out of
the bucket first (`local_copy`); tools that only write local files refuse URLs
(`require_local`) instead of creating a directory named `gs:`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pathlib
import secrets
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from etils import epath
from tqdm import tqdm

from lvm_jax.errors import UserError

# URL schemes a workdir may use. orbax 0.12 writes OCDBT checkpoints to gs:// only (its path
# normalisation turns s3:// into s3:/), so s3:// and az:// workdirs are refused with the mount fix.
REMOTE_SCHEMES = ("gs",)


def as_path(location: str | os.PathLike, what: str = "--workdir") -> epath.Path:
    """`location` (a local path or a gs:// URL) as an epath.Path; other URLs are refused with the fix.

    Local paths are made absolute: orbax requires it, and a later chdir must not move the run.
    """
    text = os.fspath(location)
    if not is_remote(text):
        return epath.Path(os.path.abspath(text))
    check_url(text, what)
    return epath.Path(text)


def check_url(url: str, what: str) -> None:
    """Raises the fix for a URL a workdir cannot use: an unsupported scheme, or gs:// without gcsfs."""
    scheme = url.partition("://")[0]
    if scheme not in REMOTE_SCHEMES:
        refuse_url(url, what, "gs:// and local paths are")
    # etils reaches gs:// through gcsfs (or TensorFlow's gfile).
    if importlib.util.find_spec("gcsfs") is None and importlib.util.find_spec("tensorflow") is None:
        raise UserError(f"{what} {url} needs gcsfs to reach the bucket; install it with "
                        "pip install 'lvm_jax[gcs]' (or pip install gcsfs).")


def require_local(location: str | os.PathLike | None, what: str) -> None:
    """Refuses a URL where a tool writes through the local filesystem (lvm-curate, lvm-convert).

    Without this, pathlib/os.makedirs would turn `gs://b/x` into a local directory `gs:/b/x`.
    """
    if location is not None and is_remote(location):
        refuse_url(os.fspath(location), what, "only local paths are")


def refuse_url(text: str, what: str, supported: str) -> None:
    """Raises: `what` cannot use this URL's scheme; mount the store and pass the mounted path."""
    scheme, _, rest = text.partition("://")
    store, _, inner = rest.partition("/")
    raise UserError(f"{what} {text}: {scheme}:// is not supported here ({supported}); mount the store "
                    f"(e.g. gcsfuse or NFS) and pass the mounted path, e.g. {what} /mnt/{store}/{inner or 'run'}.")


def is_remote(path: epath.Path | str) -> bool:
    """True for a bucket URL (no local filesystem semantics: no append, no rename)."""
    return "://" in os.fspath(path)


def write_json(path: epath.Path, obj: Any) -> None:
    """Writes `obj` as indented JSON so that a reader never sees a partial file."""
    write_whole(path, json.dumps(obj, indent=2, sort_keys=True))


def write_whole(path: epath.Path, text: str) -> None:
    """Replaces the file at `path` by `text` in one step: a reader sees the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_remote(path):
        path.write_text(text)  # an object upload is all-or-nothing
        return
    # rename is atomic on a POSIX filesystem; the name is this writer's own, so concurrent writers
    # (processes sharing a disk) never rename each other's half-written file
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}.{secrets.token_hex(4)}")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_figure(fig: Any, path: epath.Path | str, dpi: int = 100) -> None:
    """Saves a matplotlib figure as PNG to a local path or a bucket URL."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        fig.savefig(f, format="png", dpi=dpi)


@contextlib.contextmanager
def local_copy(location: str, what: str) -> Iterator[str]:
    """`location` itself when local; a gs:// file or directory copied to a temporary directory for the block.

    The weight readers (safetensors, torch.load, zip archives, orbax) then read local files. From an
    lvm-train workdir only its newest checkpoint is copied, not every checkpoint and the compile cache.
    """
    if not is_remote(location):
        yield location
        return
    src = as_path(location, what=what)
    if not src.exists():
        raise UserError(f"{what}={location} does not exist (or these credentials cannot list it); "
                        "check the URL with gsutil ls.")
    with tempfile.TemporaryDirectory(prefix="lvm_copy_") as tmp:
        dst = pathlib.Path(tmp) / src.name
        files = files_to_read(src)
        with tqdm(total=sum(f.stat().length for f in files), unit="B", unit_scale=True,
                  desc=f"copying {location}") as bar:
            for f in files:
                target = dst / f.relative_to(src) if f != src else dst
                target.parent.mkdir(parents=True, exist_ok=True)
                with f.open("rb") as r, open(target, "wb") as w:
                    while chunk := r.read(1 << 24):
                        w.write(chunk)
                        bar.update(len(chunk))
        yield str(dst)


def files_to_read(src: epath.Path) -> list[epath.Path]:
    """The files under `src` a weight reader needs: all of them, except that an lvm-train workdir
    or its checkpoints/ directory gives only the newest finished `checkpoints/<step>/`.

    Finished: in a bucket orbax writes into `<step>/` itself and marks the end with
    commit_success.txt, so a run preempted mid-save leaves a newer, unreadable step there.
    """
    import orbax.checkpoint as ocp

    if not src.is_dir():
        return [src]
    checkpoints = src / "checkpoints" if (src / "checkpoints").is_dir() else src
    step_dirs = [p for p in checkpoints.iterdir() if p.name.isdigit() and p.is_dir()]
    steps = sorted(int(p.name) for p in step_dirs if ocp.step.is_path_finalized(p))
    if steps:
        src = checkpoints / str(steps[-1])
    elif step_dirs:
        # A run whose only save was cut short: copying the whole run (compile cache included) could only
        # end in a reader error about a half-written step.
        raise UserError(f"{checkpoints} holds no finished checkpoint (unfinished: "
                        f"{', '.join(sorted((p.name for p in step_dirs), key=int))}); let the run save one, "
                        "or rerun lvm-train on it to resume.")
    files, pending = [], [src]
    while pending:  # gs:// paths have no recursive glob: walk the tree
        for p in pending.pop().iterdir():
            (pending if p.is_dir() else files).append(p)
    return sorted(files)


class MetricsLog:
    """`DIR/metrics.jsonl`: one JSON object per logged step, one file across restarts.

    Opened at `resume_step`, it drops the records a killed run logged after its last
    checkpoint: the resumed run logs those steps again, and each step must appear once.
    `records` holds the whole run's history (for the training-curve plot). A local file
    gets each record appended as it comes; a bucket object is rewritten whole at most
    every `upload_every_s` seconds and on `flush()` (the loop flushes at every
    checkpoint and at the end, so a preempted run loses none of its saved steps).
    """

    def __init__(self, path: epath.Path, resume_step: int, upload_every_s: float = 60.0):
        self.path = path
        self.remote = is_remote(path)
        self.upload_every_s = upload_every_s
        self.records: list[dict[str, Any]] = []
        lines = path.read_text().splitlines() if path.exists() else []
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # the torn last line of a run killed mid-write
                continue
            if not isinstance(record, dict) or not isinstance(record.get("step", 0), (int, float)):
                continue  # not a record of ours (a hand edit, a stray write): dropped like a torn line
            if record.get("step", 0) <= resume_step:
                self.records.append(record)
        self._unsaved = len(self.records) != len(lines)
        self._last_upload = time.monotonic()
        if self._unsaved:
            self._rewrite()

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if not self.remote:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            return
        self._unsaved = True
        if time.monotonic() - self._last_upload >= self.upload_every_s:
            self.flush()

    def flush(self) -> None:
        """Uploads the records not yet in the bucket (a no-op for a local file)."""
        if self._unsaved:
            self._rewrite()

    def _rewrite(self) -> None:
        write_whole(self.path, "".join(json.dumps(r) + "\n" for r in self.records))
        self._unsaved = False
        self._last_upload = time.monotonic()
