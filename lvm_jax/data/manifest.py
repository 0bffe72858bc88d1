"""``manifest`` source: train on the images a curation run kept.

``--config.data.source=manifest --config.data.path=DIR`` where DIR (a local path, or the
gs:// / s3:// URL ``lvm-curate --out`` wrote to) holds the ``manifest.jsonl`` and
``summary.json`` written by ``lvm-curate``.  The
summary names the embedding directories of the curated set and the pool; each
of those records (``index.json`` -> ``"source"``) how to rebuild the image
source it embedded, and manifest ids are record positions in those sources.

Labels: a curated image keeps its own label; a retrieved pool image takes the
label of the curated image it was retrieved for (label propagation -- pool
images have no labels of their own).  Class names come from the curated source.
The ``eval`` split is the curated source's eval split, so evaluation measures
the same classes on held-out images.

Manifest ids are positions, so each rebuilt source is checked against what was embedded: its record
count must equal ``index.json``'s ``count``, and where the embedding recorded file paths
(``paths_*.json``) a sample of them (the first and last shard) must name the same files (by
their last two path parts: data moved to another root or bucket still matches).  If the
data changed since curation, a UserError says so instead of pairing images with other images' labels.

Records: ``dict(image=uint8 [H, W, 3] or encoded bytes, label=int, id=int)``
(+ ``caption`` / ``path`` where the underlying source has them).
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np

from lvm_jax.data import files
from lvm_jax.data.sources import build_source, register_source
from lvm_jax.errors import UserError


# ----------------------------------------------------------------------------
# Source specs: JSON descriptions that rebuild an image source
# ----------------------------------------------------------------------------
def source_spec(data_cfg, split: str = "train") -> dict[str, Any]:
  """JSON-able spec of ``build_source(data_cfg, split)``; a list of data configs concatenates."""
  if isinstance(data_cfg, (list, tuple)):
    return {"concat": [source_spec(c, split) for c in data_cfg]}
  cfg = data_cfg.to_dict() if hasattr(data_cfg, "to_dict") else dict(data_cfg)
  split = cfg.pop("split", split)
  return {"data": cfg, "split": split}


class ConcatSource:
  """Several sources end to end; record i of the whole is record i - offset of one part."""

  def __init__(self, parts: list[Any]):
    if not parts:
      raise UserError("a concatenated source needs at least one part.")
    self.parts = parts
    self.offsets = np.cumsum([0] + [len(p) for p in parts])
    labelled = [p for p in parts if getattr(p, "num_classes", 0)]
    self.num_classes = max((int(p.num_classes) for p in labelled), default=0)
    widest = max(labelled, key=lambda p: int(p.num_classes), default=None)
    self.class_names = tuple(getattr(widest, "class_names", ())) if widest is not None else ()

  def __len__(self) -> int:
    return int(self.offsets[-1])

  def __repr__(self) -> str:
    return f"ConcatSource({self.parts!r})"

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    part = int(np.searchsorted(self.offsets, index, side="right")) - 1
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range for {len(self)} records")
    record = dict(self.parts[part][index - int(self.offsets[part])])
    record["id"] = index
    return record


def open_image_source(spec: dict[str, Any]):
  """Rebuilds the source a ``source_spec`` describes."""
  import ml_collections
  if "concat" in spec:
    return ConcatSource([open_image_source(s) for s in spec["concat"]])
  return build_source(ml_collections.ConfigDict(spec["data"]), spec.get("split", "train"))


def open_embedded_source(emb_dir: str) -> tuple[Any, np.ndarray] | None:
  """(image source, ids ``[N]`` of the embedded rows) of an embedding directory (local or a bucket
  URL), or None when it records no source (plain .npy vectors)."""
  from lvm_jax.curation.index import read_ids_labels
  meta = _read_index(emb_dir)
  if not meta or not meta.get("source"):
    return None
  return open_image_source(meta["source"]), read_ids_labels(emb_dir, meta)[0]


def _read_index(emb_dir: str) -> dict | None:
  from lvm_jax.curation.index import INDEX_FILE
  meta_file = files.join(emb_dir, INDEX_FILE)
  if not files.isfile(meta_file):
    return None
  return json.loads(files.read_bytes(meta_file))


_PATH_SAMPLES = 8  # recorded paths compared per checked shard


def _path_at(source, index: int) -> str | None:
  for attr in ("paths", "image_paths"):  # ImageFolder, CaptionsSource: no image read needed
    paths = getattr(source, attr, None)
    if isinstance(paths, (list, tuple)):
      return paths[index]
  return source[index].get("path")


def _tail(path: str) -> tuple[str, ...]:
  """The last two path parts (class folder / file name): data moved to another root or bucket, or a
  path recorded relative vs absolute, still names the same image."""
  return tuple(path.replace("\\", "/").rstrip("/").split("/")[-2:])


def _check_unchanged(source, emb_dir: str, meta: dict, key: str) -> None:
  """Raises UserError when `source` no longer holds the records embedded into `emb_dir`."""
  from lvm_jax.curation.index import shard_file
  fix = ("the data changed since curation; restore it, or re-run `lvm-curate embed` / `lvm-curate run` "
         "with a new --out to curate the current data.")
  count = meta.get("count")
  if count is not None and int(count) != len(source):
    raise UserError(f"the {key} source rebuilt for {emb_dir} has {len(source)} records but {int(count)} "
                    f"were embedded: {fix}")
  num_shards, shard_size = int(meta.get("num_shards", 0) or 0), int(meta.get("shard_size", 0) or 0)
  for s in sorted({0, num_shards - 1} if num_shards and shard_size else ()):
    paths_file = files.join(emb_dir, shard_file("paths", s, "json"))
    if not files.isfile(paths_file):
      continue
    recorded = json.loads(files.read_bytes(paths_file))
    picks = sorted(set(np.linspace(0, len(recorded) - 1, min(_PATH_SAMPLES, len(recorded))).astype(int)))
    for j in picks:
      index = s * shard_size + int(j)
      if index >= len(source):
        continue
      now = _path_at(source, index)
      if now is not None and recorded[j] is not None and _tail(now) != _tail(recorded[j]):
        raise UserError(f"record {index} of the {key} source rebuilt for {emb_dir} is {now!r} but "
                        f"{recorded[j]!r} was embedded: {fix}")


def _resolve_input(root: str, recorded: str) -> str:
  """The embedding directory summary.json names, or -- when the output was moved or copied (e.g.
  `gsutil cp -r` into a bucket) -- its namesake under ``root/embeddings``."""
  if not recorded or files.isdir(recorded):
    return recorded
  moved = files.join(root, "embeddings/" + recorded.rstrip("/").rsplit("/", 1)[-1])
  return moved if files.isdir(moved) else recorded


# ----------------------------------------------------------------------------
# The manifest source
# ----------------------------------------------------------------------------
def _manifest_entry(line: str, where: str) -> dict[str, Any]:
  """One manifest.jsonl line, checked: a line lvm-curate would not have written (a copy cut short, a
  hand edit) gives a UserError naming `where` (file:line) and the fix, not a bare JSON/KeyError."""
  try:
    entry = json.loads(line)
  except json.JSONDecodeError as e:
    why = f"not valid JSON: {e}"
  else:
    id_ = entry.get("id") if isinstance(entry, dict) else None
    if isinstance(id_, int) and not isinstance(id_, bool):
      return entry
    why = (f"its \"id\" is {id_!r}, not an integer" if isinstance(entry, dict) and "id" in entry
           else "no \"id\" field" if isinstance(entry, dict) else f"a JSON {type(entry).__name__}, not an object")
  raise UserError(f"{where} is not a manifest entry ({why}); lvm-curate writes one JSON object with an integer "
                  "\"id\" per line, so the file was cut short or edited: restore it, or re-run `lvm-curate run` "
                  "with a new --out.")


class ManifestSource:
  """grain RandomAccessDataSource over a curation manifest (see module docstring)."""

  def __init__(self, root: str):
    from lvm_jax.curation.index import read_ids_labels
    manifest = files.join(root, "manifest.jsonl")
    summary_file = files.join(root, "summary.json")
    if files.missing([manifest, summary_file]):
      raise UserError(f"{root!r} has no manifest.jsonl/summary.json; set data.path to the --out "
                      "directory of a finished `lvm-curate run` or `lvm-curate embeddings`.")
    inputs = json.loads(files.read_bytes(summary_file)).get("inputs", {})
    self.root = root
    self.sources, labels, metas = {}, {}, {}
    for kind, key in (("curated", "curated"), ("retrieved", "pool")):
      path = _resolve_input(root, inputs.get(key, ""))
      meta = _read_index(path) if path and files.isdir(path) else None
      if not meta or not meta.get("source"):
        raise UserError(f"the {key} set of {root!r} ({path or 'unknown'}) records no image source "
                        "(plain .npy vectors?); curate embedding directories from `lvm-curate embed` "
                        "or `lvm-curate run` to train on the manifest.")
      ids, set_labels = read_ids_labels(path, meta)
      self.sources[kind], metas[kind] = open_image_source(meta["source"]), meta
      _check_unchanged(self.sources[kind], path, meta, key)
      if kind == "curated":
        labels = dict(zip(ids.tolist(), (set_labels if set_labels is not None
                                         else np.full(len(ids), -1)).tolist()))
    self.curated_spec = metas["curated"]["source"]
    kinds, ids, record_labels = [], [], []
    for n, line in enumerate(files.read_bytes(manifest).decode("utf-8").splitlines()):
      if not line.strip():
        continue
      entry = _manifest_entry(line, f"{manifest}:{n + 1}")
      kind = entry.get("source")
      if kind not in self.sources:
        raise UserError(f"{manifest}:{n + 1} has source {kind!r}; expected 'curated' or 'retrieved'.")
      owner = entry["id"] if kind == "curated" else entry.get("query")
      kinds.append(kind == "retrieved")
      ids.append(entry["id"])
      record_labels.append(int(labels.get(owner, -1)) if owner is not None else -1)
    if not ids:
      raise UserError(f"{manifest} is empty; nothing to train on.")
    self.retrieved = np.asarray(kinds, bool)
    self.ids = np.asarray(ids, np.int64)
    self.labels = np.asarray(record_labels, np.int64)
    curated = self.sources["curated"]
    self.num_classes = int(getattr(curated, "num_classes", 0) or (self.labels.max() + 1))
    self.class_names = tuple(getattr(curated, "class_names", ()))

  def __len__(self) -> int:
    return len(self.ids)

  def __repr__(self) -> str:
    return (f"ManifestSource({self.root!r}, records={len(self)}, "
            f"retrieved={int(self.retrieved.sum())}, classes={self.num_classes})")

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    source = self.sources["retrieved" if self.retrieved[index] else "curated"]
    record = source[int(self.ids[index])]
    out = dict(image=record["image"], label=int(self.labels[index]), id=index)
    for key in ("caption", "path"):
      if key in record:
        out[key] = record[key]
    return out


def build_manifest_source(data_cfg, split: str = "train"):
  """The manifest in ``data_cfg.path`` (split 'train'), or the curated source's eval split."""
  root = data_cfg.get("path", "") or ""
  if not root:
    raise UserError("data.path is empty; set it to the output directory of `lvm-curate run`.")
  files.check(root)
  source = ManifestSource(files.expand(root))
  if split == "train":
    return source
  spec = dict(source.curated_spec)
  return open_image_source(_with_split(spec, "eval"))


def _with_split(spec: dict[str, Any], split: str) -> dict[str, Any]:
  if "concat" in spec:
    return {"concat": [_with_split(s, split) for s in spec["concat"]]}
  return {**spec, "split": split}


register_source("manifest", build_manifest_source)
