"""Random-access data sources (grain ``RandomAccessDataSource``: len + getitem).

``build_source(data_cfg, split)`` looks ``data_cfg.source`` up in ``SOURCES``,
a dict ``name -> factory(data_cfg, split)``.  A new source registers itself
with ``register_source``; a module ``lvm_jax/data/<name>.py`` that does so at
import time is found automatically the first time ``source=<name>`` is used.

Records are dicts: ``image`` (uint8 [H, W, 3] or encoded bytes), ``label``
(int), ``id`` (int), plus ``caption`` (str) where the source has one.
Labelled sources expose ``num_classes`` and ``class_names``.

Config fields read here (all optional):
  synthetic: data.synthetic.{num_train=50000, num_eval=10000, seed=0, image_size
             (default data.image_size), num_classes=10, cache=None (auto)} and
             any ``synthetic.Difficulty`` field (size_range, max_rotation, ...).
  folder:    data.path (a directory, gs:// or s3:// URL), data.holdout_fraction=0.1, data.holdout_seed=0,
             data.decode_errors='skip' (an unreadable file becomes an empty record that DecodeImage
             counts and drops; 'raise' stops naming the file).
             Layouts: root/train/<class>/ + root/val/<class>/ (or eval/, validation/) are the two
             splits; root/train/<class>/ alone is held out from (a root/test/ is not used: rename it
             root/val to evaluate on it); root/<class>/ is held out from.  A class folder without
             images is not a class (a bucket copy has no empty folders, so local and bucket copies get
             the same labels); it is logged and dropped.  Files and folders whose name starts with
             '.' (.DS_Store, macOS '._x.jpg' twins) are not images, locally and in a bucket.
  tfds:      data.name, data.path (data_dir), data.train_split='train',
             data.eval_split='validation', data.image_key='image', data.label_key='label'.
"""
from __future__ import annotations

import dataclasses
import importlib
import logging
import os
from typing import Any, Callable

import numpy as np

from lvm_jax.data import files
from lvm_jax.data.synthetic import Difficulty, SyntheticShapes

log = logging.getLogger(__name__)

SourceFactory = Callable[[Any, str], Any]
SOURCES: dict[str, SourceFactory] = {}

# The extensions torchvision's ImageFolder reads (PIL decodes them all; DecodeImage scales 16-bit
# grayscale TIFF/PGM down to 8 bits instead of clipping it).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def _hidden(name: str) -> bool:
  """A dot file or folder ('.DS_Store', macOS AppleDouble '._x.jpg' copies): metadata, not an image,
  even when its name ends in '.jpg' (it would count as a decode failure, or stop a 'raise' run)."""
  return name.startswith(".")


def register_source(name: str, factory: SourceFactory) -> SourceFactory:
  """Adds `factory(data_cfg, split) -> source` under `name` (usable as a decorator arg)."""
  SOURCES[name] = factory
  return factory


# Sources whose modules are imported only when asked for (they pull in extra dependencies).
LAZY_SOURCES = {
    "captions": "lvm_jax.data.captions:build_captions_source",
    "webdataset": "lvm_jax.data.captions:build_webdataset_source",
    "manifest": "lvm_jax.data.manifest:build_manifest_source",
}


def build_source(data_cfg, split: str = "train"):
  """The data source named by ``data_cfg.source`` for split 'train' or 'eval'."""
  if split not in ("train", "eval"):
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}.")
  name = data_cfg.get("source", "synthetic") or "synthetic"
  if name not in SOURCES and name in LAZY_SOURCES:
    module, _, factory = LAZY_SOURCES[name].partition(":")
    register_source(name, getattr(importlib.import_module(module), factory))
  if name not in SOURCES:
    try:  # convention: lvm_jax/data/<name>.py registers itself on import
      importlib.import_module(f"lvm_jax.data.{name}")
    except ModuleNotFoundError as e:
      if e.name != f"lvm_jax.data.{name}":
        raise
  if name not in SOURCES:
    raise ValueError(f"unknown data.source {name!r}; choose one of {sorted(set(SOURCES) | set(LAZY_SOURCES))}.")
  return SOURCES[name](data_cfg, split)


# ----------------------------------------------------------------------------
# synthetic
# ----------------------------------------------------------------------------
def _synthetic(data_cfg, split: str) -> SyntheticShapes:
  syn = data_cfg.get("synthetic", None) or {}
  get = syn.get
  num = get("num_train", 50_000) if split == "train" else get("num_eval", 10_000)
  # Any Difficulty field may be overridden as data.synthetic.<field>.
  # Lists become tuples; anything else goes to Difficulty as given, whose checks name the field.
  difficulty = Difficulty(**{f.name: (tuple(get(f.name)) if isinstance(get(f.name), (list, tuple)) else get(f.name))
                             for f in dataclasses.fields(Difficulty) if get(f.name) is not None})
  return SyntheticShapes(
      num_records=int(num),
      seed=int(get("seed", 0)),
      split=split,
      image_size=int(get("image_size", None) or data_cfg.get("image_size", 32) or 32),
      num_classes=int(get("num_classes", 10)),
      difficulty=difficulty,
      cache=get("cache", None),
  )


register_source("synthetic", _synthetic)


# ----------------------------------------------------------------------------
# folder: root/<class>/*.jpg (ImageNet style)
# ----------------------------------------------------------------------------
_FOLDER_LAYOUT = ("an image folder laid out as root/<class>/*.jpg, or root/train/<class>/*.jpg "
                  "plus root/val/<class>/*.jpg")


def _list_images(class_dir: str) -> list[str]:
  files = []
  for dirpath, dirnames, names in os.walk(class_dir, followlinks=True):
    dirnames[:] = [d for d in dirnames if not _hidden(d)]  # pruned in place: os.walk skips them
    files += [os.path.join(dirpath, n) for n in names
              if n.lower().endswith(IMAGE_EXTENSIONS) and not _hidden(n)]
  return sorted(files)


def scan_image_folder(root: str) -> tuple[list[str], list[list[str]]]:
  """Class names (sorted sub-folders of root that hold images) and the image paths of each class
  (root may be gs://).  Folders without images are dropped with a warning, locally as in a bucket,
  which has no empty folders: otherwise the two copies would number their classes differently."""
  if not files.isdir(root):
    raise ValueError(f"image folder {root!r} does not exist; set data.path to {_FOLDER_LAYOUT}.")
  if files.is_url(root):
    classes, images = _scan_bucket_folder(root)
  else:
    classes = sorted(d for d in os.listdir(root)
                     if os.path.isdir(os.path.join(root, d)) and not _hidden(d))
    images = [_list_images(os.path.join(root, c)) for c in classes]
  if not classes:
    raise ValueError(f"image folder {root!r} has no class sub-folders; expected {_FOLDER_LAYOUT}.")
  if not any(images):
    raise ValueError(f"image folder {root!r} has class folders {classes[:5]} but no images "
                     f"with extensions {IMAGE_EXTENSIONS}; expected {_FOLDER_LAYOUT}.")
  empty = [c for c, fs in zip(classes, images) if not fs]
  if empty:
    log.warning("image folder %r: ignoring %d class folder(s) without images %s; they are not classes "
                "(an object-store copy has no empty folders).", root, len(empty), empty[:5])
    classes, images = map(list, zip(*[(c, fs) for c, fs in zip(classes, images) if fs]))
  return classes, images


def _scan_bucket_folder(root: str) -> tuple[list[str], list[list[str]]]:
  # One recursive listing of the bucket prefix instead of a request per class folder.
  per_class: dict[str, list[str]] = {}
  for rel in files.files_under(root):
    cls, sep, _ = rel.partition("/")
    if sep and not _hidden(cls):
      images = per_class.setdefault(cls, [])
      # The same rule as the local walk: no hidden file, nor any file inside a hidden sub-folder.
      if rel.lower().endswith(IMAGE_EXTENSIONS) and not any(map(_hidden, rel.split("/"))):
        images.append(files.join(root, rel))
  classes = sorted(per_class)
  return classes, [per_class[c] for c in classes]


class ImageFolder:
  """Encoded images with integer labels; records carry bytes, decoded by the transforms.

  Records: ``dict(image=bytes, label=int, id=int, path=str)``.  A file that cannot be read (deleted,
  dangling link, bucket error) gives ``image=b""`` under errors='skip' (DecodeImage counts and drops
  it; ``missing_images`` counts it in this process) and a ValueError naming it under 'raise'.
  """

  def __init__(self, paths: list[str], labels: list[int], class_names: list[str], root: str = "",
               errors: str = "skip"):
    if errors not in ("skip", "raise"):
      raise ValueError(f"data.decode_errors must be 'skip' or 'raise', got {errors!r}.")
    if not paths:
      raise ValueError(f"image folder {root!r} yields an empty split; add images or lower "
                       "data.holdout_fraction.")
    self.paths = list(paths)
    self.labels = np.asarray(labels, np.int64)
    self.class_names = tuple(class_names)
    self.num_classes = len(class_names)
    self.root = root
    self.errors = errors
    self.missing_images = 0  # per process: files found missing/unreadable at read time

  def __len__(self) -> int:
    return len(self.paths)

  def __repr__(self) -> str:
    return f"ImageFolder(root={self.root!r}, records={len(self)}, classes={self.num_classes})"

  def __getitem__(self, index: int) -> dict[str, Any]:
    path = self.paths[index]
    try:
      data = files.read_bytes(path)
    except OSError as e:
      if self.errors == "raise":
        raise ValueError(f"image {path!r} of {self.root!r} cannot be read ({type(e).__name__}: {e}); "
                         "restore or remove the file, or set data.decode_errors='skip' to drop it.") from e
      self.missing_images += 1
      log.warning("cannot read image %r (%s: %s); skipping it", path, type(e).__name__, e)
      data = b""  # DecodeImage(errors='skip') counts and drops it
    return dict(image=data, label=int(self.labels[index]), id=int(index), path=path)


_EVAL_DIRS = ("val", "eval", "validation")
_SPLIT_NAMES = ("train", "test") + _EVAL_DIRS


def _split_dirs(root: str) -> tuple[str, str | None] | None:
  """(root/train, root/val|eval|validation or None), or None without a root/train folder."""
  train = files.join(root, "train")
  if not files.isdir(train):
    return None
  if any(p.lower().endswith(IMAGE_EXTENSIONS) and not _hidden(p.rstrip("/").rsplit("/", 1)[-1])
         for p in files.glob(files.join(train, "*"))):  # a bucket glob's '*' also matches dot files
    return None  # images right in root/train: a class called 'train' (vehicles, say), not a split
  for name in _EVAL_DIRS:
    if files.isdir(files.join(root, name)):
      return train, files.join(root, name)
  return train, None


def holdout_fraction(data_cfg: Any) -> float:
  """data.holdout_fraction (default 0.1 when unset). 0 is kept as given (and refused by the split
  with its fix), not replaced by the default: a falsy fallback moved 10% of the data to eval."""
  value = data_cfg.get("holdout_fraction", None)
  return 0.1 if value is None else float(value)


def holdout_split(files_per_class: list[list[str]], fraction: float, seed: int = 0
                  ) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
  """Stratified fixed-seed hold-out: ~fraction of each class (>= 1 image when the
  class has >= 2) goes to eval.  Returns (train, eval) lists of (path, label)."""
  if not 0 < fraction < 1:
    raise ValueError(f"data.holdout_fraction={fraction} must be in (0, 1): the share of images held out "
                     "for evaluation when the data has no eval split of its own (root/val, data.eval_path).")
  rng = np.random.default_rng(seed)
  train, held = [], []
  for label, paths in enumerate(files_per_class):
    order = rng.permutation(len(paths))
    n_eval = int(round(fraction * len(paths)))
    if len(paths) >= 2:
      n_eval = min(max(n_eval, 1), len(paths) - 1)
    else:
      n_eval = 0
    held += [(paths[i], label) for i in sorted(order[:n_eval])]
    train += [(paths[i], label) for i in sorted(order[n_eval:])]
  return train, held


def build_image_folder(root: str, split: str, holdout_fraction: float = 0.1,
                       holdout_seed: int = 0, errors: str = "skip") -> ImageFolder:
  """ImageFolder for `split`: root/train + root/val (or eval/, validation/) when present; a hold-out
  of root/train when only it exists (as torchvision's ImageFolder(root/train) would read it); else
  a hold-out of root/<class>/."""
  if not root:
    raise ValueError(f"data.path is empty; set it to {_FOLDER_LAYOUT}.")
  files.check(root)
  root = files.expand(root)
  dirs = _split_dirs(root) if files.isdir(root) else None
  if dirs is not None and dirs[1] is None:
    if files.isdir(files.join(root, "test")):
      log.warning("image folder %r has train/ and test/ but no val/: holding out %.0f%% of train/ for "
                  "evaluation; rename test/ to val/ to evaluate on it.", root, 100 * holdout_fraction)
    classes, images = scan_image_folder(dirs[0])
    train, held = holdout_split(images, holdout_fraction, holdout_seed)
    pairs = train if split == "train" else held
    return ImageFolder([p for p, _ in pairs], [l for _, l in pairs], classes, dirs[0], errors)
  if dirs is not None:
    classes, images = scan_image_folder(dirs[0])
    if split == "train":
      pairs = [(p, i) for i, fs in enumerate(images) for p in fs]
    else:
      eval_classes, eval_files = scan_image_folder(dirs[1])
      unknown = sorted(set(eval_classes) - set(classes))
      if unknown:
        raise ValueError(f"eval folder {dirs[1]!r} has classes missing from {dirs[0]!r}: "
                         f"{unknown[:5]}; both splits must use the same class folders.")
      index = {c: i for i, c in enumerate(classes)}
      pairs = [(p, index[c]) for c, fs in zip(eval_classes, eval_files) for p in fs]
    return ImageFolder([p for p, _ in pairs], [l for _, l in pairs], classes,
                       dirs[0] if split == "train" else dirs[1], errors)
  classes, images = scan_image_folder(root)
  if set(classes) <= set(_SPLIT_NAMES):
    raise ValueError(f"image folder {root!r} holds only split folders {classes} and no train/; put the "
                     f"training images in {files.join(root, 'train')}/<class>/ (or point data.path at "
                     "the folder of class folders).")
  train, held = holdout_split(images, holdout_fraction, holdout_seed)
  pairs = train if split == "train" else held
  return ImageFolder([p for p, _ in pairs], [l for _, l in pairs], classes, root, errors)


def _folder(data_cfg, split: str) -> ImageFolder:
  return build_image_folder(data_cfg.get("path", "") or "", split,
                            holdout_fraction(data_cfg),
                            int(data_cfg.get("holdout_seed", 0) or 0),
                            data_cfg.get("decode_errors", "skip") or "skip")


register_source("folder", _folder)


# ----------------------------------------------------------------------------
# tfds: prepared array_record data sets, read without TensorFlow
# ----------------------------------------------------------------------------
class TfdsSource:
  """Wraps ``tfds.data_source`` records into ``dict(image, label, id)``."""

  def __init__(self, source, image_key: str = "image", label_key: str = "label",
               class_names: tuple[str, ...] = ()):
    self._source = source
    self.image_key, self.label_key = image_key, label_key
    self.class_names = tuple(class_names)
    self.num_classes = len(class_names)

  def __len__(self) -> int:
    return len(self._source)

  def __repr__(self) -> str:
    return f"TfdsSource({self._source!r})"

  def __getitem__(self, index: int) -> dict[str, Any]:
    ex = self._source[index]
    return dict(image=ex[self.image_key], label=int(ex[self.label_key]), id=int(index))


def build_tfds(name: str, split: str, data_dir: str | None = None, image_key: str = "image",
               label_key: str = "label") -> TfdsSource:
  """`tfds.data_source(name, split)` from prepared array_record files (no TensorFlow, no download).

  `data_dir` may be a gs:// URL: TFDS reads the metadata through gcsfs and array_record reads the
  records with its own GCS client (array_record 0.8.6 does; older releases read local files only).
  """
  import tensorflow_datasets as tfds

  if not name:
    raise ValueError("data.name is empty; set it to a TFDS data set name, e.g. 'imagenette'.")
  if data_dir:
    files.check(data_dir)
    if data_dir.startswith("s3://"):  # TFDS itself would list it; array_record could not open the records
      raise ValueError(f"data.path {data_dir}: TFDS's array_record files are read from local disks and gs:// "
                       "only; mount the bucket (e.g. mountpoint-s3) and set data.path to the mount.")
  how = (f"prepare it once with TensorFlow installed: `tfds build {name} --file_format=array_record"
         + (f" --data_dir={data_dir}`" if data_dir else "`")
         + " (or tfds.builder(name, data_dir=...).download_and_prepare(file_format='array_record')).")
  where = data_dir or tfds.core.constants.DATA_DIR
  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
  except tfds.core.registered.DatasetNotFoundError as e:  # its message lists the whole catalogue
    raise ValueError(f"TFDS data set {name!r} is not prepared in {where!r} (no {name}/<version>/ folder "
                     f"there) and is not a TFDS catalogue name; {how}") from e
  except Exception as e:  # broken registry, unreadable metadata, ...
    raise ValueError(f"TFDS data set {name!r} is not available ({type(e).__name__}: {e}); {how}") from e
  if not builder.is_prepared():
    raise ValueError(f"TFDS data set {name!r} is not prepared in {where!r}; {how}")
  available = sorted(builder.info.splits.keys())
  # A split spec may slice and join splits ("train[:90%]+test"); each part names a prepared split.
  wanted = [part.split("[", 1)[0].strip() for part in str(split).split("+")]
  unknown = [w for w in wanted if w not in available]
  if available and unknown:
    raise ValueError(f"TFDS data set {name!r} has no split {unknown[0]!r} (its splits: {available}); set "
                     "data.train_split / data.eval_split to one of them (e.g. data.eval_split='test').")
  features = sorted(builder.info.features.keys()) if hasattr(builder.info.features, "keys") else []
  for field, key in (("image_key", image_key), ("label_key", label_key)):
    if features and key not in features:
      raise ValueError(f"TFDS data set {name!r} has no feature {key!r} (its features: {features}); set "
                       f"data.{field} to one of them.")
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir or None,
                              download=False)
  except Exception as e:
    raise ValueError(f"cannot open TFDS {name!r} split {split!r} as a random-access source "
                     f"({type(e).__name__}: {e}); it must be stored as array_record: {how}") from e
  if data_dir and files.is_url(data_dir) and len(source):
    try:  # array_record opens its files lazily: a reader too old for gs:// fails here, not mid-run
      source[0]
    except RuntimeError as e:
      raise ValueError(f"cannot read TFDS {name!r} from {data_dir} ({e}); array_record 0.8.6 reads gs:// (older "
                       "releases read local files only): pip install 'lvm_jax[gcs]', or mount the bucket "
                       "with gcsfuse and set data.path to the mount.") from e
  label = builder.info.features[label_key] if label_key in builder.info.features else None
  names = tuple(label.names) if label is not None and hasattr(label, "names") else ()
  return TfdsSource(source, image_key, label_key, names)


def _tfds(data_cfg, split: str) -> TfdsSource:
  tfds_split = data_cfg.get("train_split", "train") if split == "train" else data_cfg.get(
      "eval_split", "validation")
  return build_tfds(data_cfg.get("name", "") or "", tfds_split, data_cfg.get("path", None) or None,
                    data_cfg.get("image_key", "image") or "image",
                    data_cfg.get("label_key", "label") or "label")


register_source("tfds", _tfds)
