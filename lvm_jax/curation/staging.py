"""lvm-curate with its output in a bucket (gs://, s3://): a local mirror that uploads as results land.

Curation memory-maps embedding shards, keeps a dedup cache and renames files into place -- none
of which a bucket can do -- so with ``--out gs://b/curated`` the work happens in a local mirror
directory (``--stage DIR``; default ``~/.cache/lvm_jax/curate/<scheme>/<bucket>/<path>``):

- at the start the mirror is filled from the bucket (objects it lacks, or holds in another
  version: GCS generation / S3 ETag, recorded in the mirror's ``.lvm_mirror.json``), so a run
  preempted on one VM resumes on another from what it had uploaded;
- each embedding shard is uploaded as soon as it is written; everything else (index.json,
  manifest.jsonl, summary.json, the report, the dedup cache, a trained backbone's checkpoints)
  when the step that writes it ends;
- compile caches stay local: they belong to one machine;
- the mirror follows the bucket's listing: an object deleted from the bucket (say ``gsutil rm -r
  gs://b/curated/embeddings``) is no longer recorded as synced, so a file the mirror still holds
  under that name is used (the run resumes from it) and uploaded again at the next push -- the
  bucket never ends up missing what summary.json points at. Delete the stage too to start over;
- a bucket input under ``--out`` (``--pool gs://b/run/emb/pool --out gs://b/run``) is read from
  the output's mirror, which holds it already, not downloaded a second time;
- several processes may share one stage: each writes ``.lvm_mirror.json`` through a temporary
  name of its own (then an atomic rename), so one never moves the file another is writing.

With several processes each uploads what it wrote, then all meet at a barrier and pull the
others' shards. A local ``--out`` is its own mirror: nothing is copied.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable

from etils import epath
from tqdm import tqdm

from lvm_jax.data import files
from lvm_jax.errors import UserError
from lvm_jax.workdir import is_remote, write_whole

# Directories never uploaded: the XLA compile cache is machine-specific (see lvm_jax.compile_cache).
LOCAL_ONLY_DIRS = ("compile_cache",)
# The mirror's own record of what matches the bucket (in the mirror's root; never uploaded, nor is
# one found deeper, e.g. an input's mirror nested in an output's by an earlier version).
STATE_FILE = ".lvm_mirror.json"


def default_stage(url: str) -> str:
    """``$XDG_CACHE_HOME/lvm_jax/curate/<scheme>/<bucket>/<path>`` (``~/.cache`` by default)."""
    scheme, _, rest = url.partition("://")
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "lvm_jax", "curate", scheme, *[p for p in rest.split("/") if p])


class Mirror:
    """The output location ``out`` (local path or bucket URL) and the local directory worked in.

    ``local``: where the tools read and write. ``location(rel)``: where ``rel`` ends up (the
    bucket URL, or the local path itself when ``out`` is local).
    """

    def __init__(self, out: str, stage: str | None = None, what: str = "--out"):
        self.remote = is_remote(out)
        if self.remote:
            files.check_url(out, what)
            self.out = out.rstrip("/")
            self.local = os.path.abspath(os.path.expanduser(stage or default_stage(self.out)))
        else:
            self.out = self.local = os.path.abspath(os.path.expanduser(out))
        # rel -> [size, mtime_ns of the local file, version of the bucket object] when the two last
        # matched; kept in STATE_FILE so that a later run on this VM neither re-sends nor trusts a
        # same-sized but rewritten object.
        self._synced: dict[str, list] = self._load_state() if self.remote else {}

    def __repr__(self) -> str:
        return f"Mirror({self.out!r}, local={self.local!r})"

    def path(self, rel: str = "") -> str:
        """The local path of ``rel`` (a '/'-separated path below ``out``)."""
        return os.path.join(self.local, *rel.split("/")) if rel else self.local

    def location(self, rel: str = "") -> str:
        """Where ``rel`` lives for readers of the output: its URL, or its local path."""
        if not self.remote:
            return self.path(rel)
        return f"{self.out}/{rel}" if rel else self.out

    def rel(self, local_path: str) -> str:
        """``local_path`` (inside the mirror) relative to it, '/'-separated."""
        rel = os.path.relpath(os.path.abspath(local_path), self.local)
        if rel.startswith(".."):
            raise ValueError(f"{local_path} is not inside the mirror {self.local}")
        return "" if rel == "." else rel.replace(os.sep, "/")

    def rel_of(self, url: str) -> str | None:
        """``url`` relative to a bucket ``out`` when it lies below (or is) it; else None."""
        if not self.remote:
            return None
        url = url.rstrip("/")
        if url == self.out:
            return ""
        return url[len(self.out) + 1:] if url.startswith(self.out + "/") else None

    def _stamp(self, rel: str) -> list:
        st = os.stat(self.path(rel))
        return [st.st_size, st.st_mtime_ns]

    def _load_state(self) -> dict[str, list]:
        try:
            with open(os.path.join(self.local, STATE_FILE)) as f:
                return json.load(f)
        except (FileNotFoundError, ValueError):
            return {}

    def _save_state(self) -> None:
        # write_whole renames a temporary name of this writer's own (processes sharing the stage never
        # move each other's file), and that name is a _temporary() one: never uploaded if left behind.
        write_whole(epath.Path(self.local) / STATE_FILE, json.dumps(self._synced))

    def _download(self, rel: str, version: str) -> None:
        files.download(self.location(rel), self.path(rel))
        self._synced[rel] = [*self._stamp(rel), version]

    def _matches(self, rel: str, version: str | None = None) -> bool:
        """The local file is what was last synced (and, given `version`, the bucket still holds that)."""
        known = self._synced.get(rel)
        if not known or not os.path.isfile(self.path(rel)) or known[:2] != self._stamp(rel):
            return False
        return version is None or known[2] == version

    def pull(self, rel: str = "", progress: bool = True) -> int:
        """Downloads the objects below ``location(rel)`` that the mirror does not hold as they are now
        (missing, or another version of the object); returns how many. A no-op for a local ``out``."""
        if not self.remote:
            return 0
        listed = files.objects_under(self.location(rel))
        todo = [(f"{rel}/{r}" if rel else r, size, version) for r, (size, version) in sorted(listed.items())]
        # Objects deleted from the bucket: no longer synced, so push() uploads the local file again.
        present = {r for r, _, _ in todo}
        gone = [r for r in self._synced if (not rel or r.startswith(rel + "/")) and r not in present]
        for r in gone:
            del self._synced[r]
        todo = [t for t in todo if not _local_only(t[0]) and not self._matches(t[0], t[2])]
        with tqdm(total=sum(size for _, size, _ in todo), unit="B", unit_scale=True, desc=f"fetching {self.out}",
                  disable=not progress or not todo) as bar:
            for r, size, version in todo:
                self._download(r, version)
                bar.update(size)
        if todo or gone:
            self._save_state()
        return len(todo)

    def fetch(self, rel: str) -> bool:
        """Downloads the one object ``rel`` unless the mirror holds its current version; True if it did."""
        version = files.version(self.location(rel))
        if self._matches(rel, version):
            return False
        self._download(rel, version)
        self._save_state()
        return True

    def push(self, rel: str = "") -> int:
        """Uploads the files below the mirror's ``rel`` that changed since they last matched the
        bucket; returns how many. A no-op for a local ``out``."""
        if not self.remote:
            return 0
        root = self.path(rel)
        if os.path.isfile(root):
            return self.push_files([root])
        found = []
        for folder, dirs, names in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d not in LOCAL_ONLY_DIRS)
            found += [os.path.join(folder, n) for n in sorted(names)]
        return self.push_files(found)

    def push_files(self, paths: Iterable[str]) -> int:
        """Uploads these local files (inside the mirror) where they changed; returns how many."""
        if not self.remote:
            return 0
        sent = 0
        for path in paths:
            r = self.rel(path)
            if (_local_only(r) or _temporary(r) or r.rpartition("/")[2] == STATE_FILE or not os.path.isfile(path)
                    or self._matches(r)):
                continue
            stamp = self._stamp(r)
            files.upload(path, self.location(r))
            self._synced[r] = [*stamp, files.version(self.location(r))]
            sent += 1
        if sent:
            self._save_state()
        return sent


def open_mirror(out: str, stage: str | None = None, what: str = "--out", rel: str = "",
                progress: bool = True) -> Mirror:
    """The Mirror of `out` with its `rel` part filled from the bucket: a run resumes what an earlier
    one (on this VM or another) uploaded."""
    mirror = Mirror(out, stage, what)
    mirror.pull(rel, progress=progress)
    return mirror


def local_input(location: str, what: str, progress: bool = True, within: Mirror | None = None) -> str:
    """A local path for an input that may be in a bucket (an .npy file or an embedding directory):
    bucket inputs are downloaded to their default stage (they are memory-mapped), again only when
    the bucket's objects changed. An input inside ``within`` (the output's Mirror) is read from that
    mirror -- which pulled it already -- rather than downloaded again into a second one."""
    if not is_remote(location):
        return location
    files.check_url(location, what)
    rel = within.rel_of(location) if within is not None else None
    if rel is not None:
        if files.isfile(location):
            within.fetch(rel)
        elif files.isdir(location):
            within.pull(rel, progress=progress)
        else:
            raise UserError(f"{what} {location} does not exist (or these credentials cannot list it); "
                            "check the URL.")
        return within.path(rel)
    if files.isfile(location):
        parent, _, name = location.rstrip("/").rpartition("/")
        mirror = Mirror(parent, None, what)
        mirror.fetch(name)
        return mirror.path(name)
    if not files.isdir(location):
        raise UserError(f"{what} {location} does not exist (or these credentials cannot list it); "
                        "check the URL.")
    mirror = Mirror(location, None, what)
    mirror.pull(progress=progress)
    return mirror.local


def _local_only(rel: str) -> bool:
    return any(part in LOCAL_ONLY_DIRS for part in rel.split("/")[:-1])


def _temporary(rel: str) -> bool:
    """Files caught mid-write (``emb_00001.tmp123.npy``, ``x.part123``, orbax's ``*-tmp-*``); their
    final names are uploaded."""
    return _TEMPORARY.search(rel) is not None


_TEMPORARY = re.compile(r"\.(tmp|part)\d*(\.|$)|-tmp-")
