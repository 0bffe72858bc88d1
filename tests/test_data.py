"""Data layer: sources, transforms and grain loaders (sharding, resume, decode errors)."""
import io
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from lvm_jax.data import (IMAGENET_MEAN, IMAGENET_STD, benchmark_loader, build_source,
                          make_loader, supervised_transforms)
from lvm_jax.data import transforms as T
from lvm_jax.data.sources import build_image_folder, holdout_split


def data_config(**overrides) -> ml_collections.ConfigDict:
  cfg = dict(source="synthetic", image_size=32, worker_count=0, decode_errors="skip",
             synthetic=dict(num_train=256, num_eval=70, seed=0))
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


def with_ids(ops):
  """Same pipeline, but the final Normalize also keeps record ids (for bookkeeping)."""
  last = ops[-1]
  return ops[:-1] + [T.Normalize(last.mean, last.std, keys=("image", "label", "id"))]


def reference_normalize(image_u8):
  return (image_u8.astype(np.float64) / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)


def collect(loader, key="id"):
  return np.concatenate([b[key] for b in loader])


# --- loaders over the synthetic source -------------------------------------------------
def test_eval_loader_order_values_and_partial_last_batch():
  cfg = data_config()
  src = build_source(cfg, split="eval")
  loader = make_loader(src, supervised_transforms(cfg, train=False), batch_size=32, shuffle=False,
                       num_epochs=1, drop_remainder=False)
  batches = list(loader)
  assert [len(b["label"]) for b in batches] == [32, 32, 6]
  assert set(batches[0]) == {"image", "label"}
  assert batches[0]["image"].dtype == np.float32 and batches[0]["image"].shape == (32, 32, 32, 3)
  assert batches[0]["label"].dtype == np.int32
  images = np.concatenate([b["image"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  for i in (0, 33, 69):
    np.testing.assert_allclose(images[i], reference_normalize(src[i]["image"]), atol=1e-5)
    assert labels[i] == src[i]["label"]


def test_train_loader_flips_only_and_infinite():
  cfg = data_config()
  src = build_source(cfg, split="train")
  ops = with_ids(supervised_transforms(cfg, train=True))
  it = iter(make_loader(src, ops, batch_size=64, shuffle=True, seed=1))
  flipped = 0
  for _ in range(6):  # > 1 epoch of 256 records: keeps going
    batch = next(it)
    assert batch["image"].shape == (64, 32, 32, 3) and batch["label"].dtype == np.int32
    for img, i, label in zip(batch["image"][:8], batch["id"][:8], batch["label"][:8]):
      ref = reference_normalize(src[int(i)]["image"])
      same = np.allclose(img, ref, atol=1e-5)
      mirrored = np.allclose(img, ref[:, ::-1], atol=1e-5)
      assert same or mirrored
      flipped += mirrored and not same
      assert label == src[int(i)]["label"]
  assert flipped > 0


@pytest.mark.parametrize("num_records", [101, 256])
def test_two_shards_are_disjoint_and_cover_everything(num_records):
  cfg = data_config(synthetic=dict(num_train=num_records, num_eval=10))
  src = build_source(cfg, "train")
  ops = with_ids(supervised_transforms(cfg, train=False))
  shards = [collect(make_loader(src, ops, batch_size=16, shuffle=True, seed=3, num_epochs=1,
                                shard_index=k, shard_count=2, drop_remainder=False))
            for k in range(2)]
  assert not set(shards[0]) & set(shards[1])
  assert sorted(np.concatenate(shards)) == list(range(num_records))
  # Training (drop_remainder) keeps shards equal in size so processes step in lockstep.
  train = [collect(make_loader(src, ops, batch_size=8, shuffle=True, seed=3, num_epochs=1,
                               shard_index=k, shard_count=2, drop_remainder=True))
           for k in range(2)]
  assert len(train[0]) == len(train[1]) and not set(train[0]) & set(train[1])


def test_sharded_source_passes_attributes_and_pickles():
  import pickle
  from lvm_jax.data import ShardedSource
  src = build_source(data_config(synthetic=dict(num_train=11, num_eval=5)), "train")
  shards = [ShardedSource(src, k, 3, drop_remainder=False) for k in range(3)]
  assert [len(s) for s in shards] == [4, 4, 3]
  assert [s[0]["id"] for s in shards] == [0, 4, 8]
  clone = pickle.loads(pickle.dumps(shards[2]))
  assert clone.num_classes == 10 and clone.class_names == src.class_names
  assert clone[2]["image"].tobytes() == src[10]["image"].tobytes()
  assert [len(ShardedSource(src, k, 3, drop_remainder=True)) for k in range(3)] == [3, 3, 3]


def _random_train_ops(cfg):
  cfg = data_config(rrc_scale=(0.3, 1.0), randaugment=(2, 9), **cfg)
  return supervised_transforms(cfg, train=True)


@pytest.mark.parametrize("worker_count", [0, 2])
def test_resume_from_iterator_state_is_exact(worker_count):
  cfg = data_config()
  src = build_source(cfg, "train")
  ops = _random_train_ops({})
  loader = make_loader(src, ops, batch_size=16, shuffle=True, seed=7, worker_count=worker_count)
  it = iter(loader)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]
  resumed = iter(make_loader(src, ops, batch_size=16, shuffle=True, seed=7,
                             worker_count=worker_count))
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    assert np.array_equal(got["image"], want["image"]) and np.array_equal(got["label"], want["label"])


def test_augmentation_depends_on_seed_and_epoch_only():
  cfg = data_config(synthetic=dict(num_train=24, num_eval=8))
  src = build_source(cfg, "train")
  ops = with_ids(_random_train_ops({"synthetic": dict(num_train=24, num_eval=8)}))

  def two_epochs(seed):
    batches = list(make_loader(src, ops, batch_size=24, shuffle=False, seed=seed, num_epochs=2))
    assert [list(b["id"]) for b in batches] == [list(range(24))] * 2
    return batches

  a, b, c = two_epochs(0), two_epochs(0), two_epochs(1)
  assert np.array_equal(a[0]["image"], b[0]["image"]) and np.array_equal(a[1]["image"], b[1]["image"])
  assert not np.array_equal(a[0]["image"], c[0]["image"])
  # Same record, next epoch: a fresh crop/flip/RandAugment draw.
  assert not np.array_equal(a[0]["image"], a[1]["image"])


def test_benchmark_loader_reports_throughput():
  cfg = data_config()
  loader = make_loader(build_source(cfg, "train"), supervised_transforms(cfg), 32, seed=0)
  assert benchmark_loader(loader, num_batches=3) > 0


def test_bad_arguments_raise_clear_errors():
  cfg = data_config()
  src = build_source(cfg, "train")
  with pytest.raises(ValueError, match="unknown data.source 'nope'"):
    build_source(data_config(source="nope"), "train")
  with pytest.raises(ValueError, match="split"):
    build_source(cfg, "validation")
  with pytest.raises(ValueError, match="batch size"):
    make_loader(src, [], batch_size=0)
  with pytest.raises(ValueError, match="shard_index"):
    make_loader(src, [], batch_size=4, shard_index=2, shard_count=2)
  with pytest.raises(ValueError, match="decode_errors"):
    supervised_transforms(data_config(source="folder", decode_errors="ignore"))


def test_synthetic_config_fields_reach_the_source():
  cfg = data_config(image_size=48, synthetic=dict(num_train=10, num_eval=5, seed=2, num_classes=3,
                                                  max_rotation=0.0, clutter=0.0))
  src = build_source(cfg, "train")
  assert len(src) == 10 and src.num_classes == 3 and src.class_names == ("circle", "square", "triangle")
  assert src[0]["image"].shape == (48, 48, 3) and src.seed == 2
  assert src.difficulty.max_rotation == 0.0 and src.difficulty.clutter == 0.0
  assert "circle" in src.class_names and isinstance(src[1]["caption"], str)


# --- transforms ------------------------------------------------------------------------
def test_rrc_boxes_respect_scale_ratio_and_bounds():
  rng = np.random.default_rng(0)
  for _ in range(500):
    top, left, h, w = T.sample_rrc_box(60, 80, rng, scale=(0.2, 0.9), ratio=(0.75, 1.333))
    assert 0 <= top and top + h <= 60 and 0 <= left and left + w <= 80
    assert 0.2 * 4800 * 0.9 <= h * w <= 0.9 * 4800 * 1.1  # rounding slack
    assert 0.7 <= w / h <= 1.42


def test_eval_resize_center_crop_matches_reference():
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
  # crop_pct 1 and no scaling: exactly the central 40x40 window
  out = T.resize_center_crop(image, 40, crop_pct=1.0)
  np.testing.assert_allclose(out.astype(int), image[:, 10:50].astype(int), atol=1)
  # Reference by hand: an 80x120 image (the 40x60 one, upsampled 2x) at size 20 and
  # crop_pct 0.5 is resized to shorter side 40, i.e. back to the original, then centre-cropped.
  big = np.repeat(np.repeat(image, 2, 0), 2, 1)
  out = T.resize_center_crop(big, 20, crop_pct=0.5, interpolation="nearest")
  assert np.array_equal(out, image[10:30, 20:40])


def test_randaugment_and_colour_ops_keep_shape_and_are_deterministic():
  image = np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)
  for name, op in T.RANDAUGMENT_OPS.items():
    out = np.asarray(op(T.to_pil(image), 1.0, np.random.default_rng(0)))
    assert out.shape == image.shape and out.dtype == np.uint8, name
  a = T.rand_augment(image, np.random.default_rng(5), num_ops=3, magnitude=9)
  b = T.rand_augment(image, np.random.default_rng(5), num_ops=3, magnitude=9)
  assert np.array_equal(a, b)
  for fn in (T.color_jitter, T.random_grayscale, T.gaussian_blur, T.solarize):
    out = fn(image, np.random.default_rng(0), p=1.0)
    assert out.shape == image.shape and out.dtype == np.uint8
  gray = T.random_grayscale(image, np.random.default_rng(0), p=1.0)
  assert (gray[..., 0] == gray[..., 1]).all()
  assert np.array_equal(T.solarize(image, np.random.default_rng(0), p=1.0),
                        np.where(image >= 128, 255 - image, image))


def test_randaugment_magnitude_above_its_scale_is_refused_not_clipped():
  from lvm_jax.errors import UserError

  with pytest.raises(UserError, match=r"randaugment=\(2, 15\).*\[0, 10\]"):
    T.supervised_transforms(data_config(source="folder", randaugment=(2, 15)), train=True)


def test_decode_handles_grayscale_and_rgba():
  def encode(arr, fmt):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()
  gray = np.arange(64, dtype=np.uint8).reshape(8, 8)
  out = T.decode_image(encode(gray, "PNG"))
  assert out.shape == (8, 8, 3) and (out[..., 2] == gray).all()
  rgba = np.dstack([np.full((8, 8, 3), 9, np.uint8), np.full((8, 8), 200, np.uint8)])
  assert (T.decode_image(encode(rgba, "PNG")) == 9).all()


# --- image folders -----------------------------------------------------------------------
def _write_image(path, rng, size=(20, 28), mode="RGB", fmt=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  shape = (*size, 3) if mode == "RGB" else size
  Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path, fmt)


def make_folder(root, counts, rng, corrupt=None):
  for cls, n in counts.items():
    for i in range(n):
      ext = (".png", ".jpg", ".JPEG")[i % 3]
      _write_image(os.path.join(root, cls, f"{i}{ext}"), rng, mode="L" if i == 1 else "RGB")
  if corrupt:
    with open(os.path.join(root, corrupt), "wb") as f:
      f.write(b"\xff\xd8\xff\xe0 definitely not a jpeg")
  with open(os.path.join(root, list(counts)[0], "notes.txt"), "w") as f:
    f.write("ignored: not an image extension")


def test_folder_holdout_is_stratified_deterministic_and_disjoint(tmp_path):
  rng = np.random.default_rng(0)
  make_folder(str(tmp_path), {"cat": 10, "dog": 7, "emu": 1}, rng)
  cfg = data_config(source="folder", path=str(tmp_path), holdout_fraction=0.3)
  train, held = build_source(cfg, "train"), build_source(cfg, "eval")
  assert train.class_names == held.class_names == ("cat", "dog", "emu") and train.num_classes == 3
  assert not set(train.paths) & set(held.paths)
  assert len(train) + len(held) == 18
  held_labels = np.bincount(held.labels, minlength=3)
  assert list(held_labels) == [3, 2, 0]  # round(0.3 * n), >= 1 when a class has >= 2 images
  assert build_source(cfg, "eval").paths == held.paths  # fixed seed
  for path, label in zip(held.paths, held.labels):
    assert os.path.basename(os.path.dirname(path)) == held.class_names[label]
  rec = train[0]
  assert isinstance(rec["image"], bytes) and rec["label"] == 0
  with pytest.raises(ValueError, match="holdout_fraction"):
    holdout_split([["a", "b"]], 1.5)


def test_folder_train_val_subdirs_are_detected(tmp_path):
  rng = np.random.default_rng(1)
  make_folder(str(tmp_path / "train"), {"a": 4, "b": 3}, rng)
  make_folder(str(tmp_path / "val"), {"b": 2}, rng)
  cfg = data_config(source="folder", path=str(tmp_path))
  train, val = build_source(cfg, "train"), build_source(cfg, "eval")
  assert len(train) == 7 and len(val) == 2
  assert val.class_names == ("a", "b") and list(val.labels) == [1, 1]  # labels follow train
  make_folder(str(tmp_path / "val"), {"zebra": 1}, rng)
  with pytest.raises(ValueError, match="zebra"):
    build_source(cfg, "eval")


def test_folder_loader_skips_a_corrupt_jpeg_and_counts_it(tmp_path):
  rng = np.random.default_rng(2)
  make_folder(str(tmp_path / "train"), {"a": 5, "b": 4}, rng, corrupt="a/broken.jpg")
  make_folder(str(tmp_path / "val"), {"a": 2, "b": 2}, rng)
  cfg = data_config(source="folder", path=str(tmp_path), image_size=16, decode_errors="skip")
  src = build_source(cfg, "train")
  assert len(src) == 10
  ops = with_ids(supervised_transforms(cfg, train=True))
  before = T.decode_failures()
  ids = collect(make_loader(src, ops, batch_size=3, shuffle=True, seed=0, num_epochs=1,
                            drop_remainder=False))
  assert T.decode_failures() == before + 1
  broken = src.paths.index(str(tmp_path / "train" / "a" / "broken.jpg"))
  assert sorted(ids) == sorted(set(range(10)) - {broken})
  batch = next(iter(make_loader(build_source(cfg, "eval"), supervised_transforms(cfg, train=False),
                                batch_size=4, shuffle=False, num_epochs=1, drop_remainder=False)))
  assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].dtype == np.float32


def test_folder_corrupt_jpeg_raises_naming_the_file(tmp_path):
  rng = np.random.default_rng(3)
  make_folder(str(tmp_path / "train"), {"a": 2}, rng, corrupt="a/broken.jpg")
  make_folder(str(tmp_path / "val"), {"a": 1}, rng)
  src = build_image_folder(str(tmp_path), "train")
  assert len(src) == 3
  cfg = data_config(source="folder", decode_errors="raise")
  loader = make_loader(src, supervised_transforms(cfg, train=False), batch_size=2, shuffle=False,
                       num_epochs=1, drop_remainder=False)
  with pytest.raises(ValueError, match="broken.jpg"):
    list(loader)


def test_folder_errors_name_the_path_and_the_layout(tmp_path):
  missing = str(tmp_path / "nowhere")
  with pytest.raises(ValueError, match="nowhere.*does not exist.*root/<class>"):
    build_source(data_config(source="folder", path=missing), "train")
  with pytest.raises(ValueError, match="data.path is empty"):
    build_source(data_config(source="folder", path=""), "train")
  (tmp_path / "flat").mkdir()
  _write_image(str(tmp_path / "flat" / "x.png"), np.random.default_rng(0))
  with pytest.raises(ValueError, match="no class sub-folders"):
    build_source(data_config(source="folder", path=str(tmp_path / "flat")), "train")
  (tmp_path / "empty" / "cls").mkdir(parents=True)
  with pytest.raises(ValueError, match="no images"):
    build_source(data_config(source="folder", path=str(tmp_path / "empty")), "train")


# --- TFDS ------------------------------------------------------------------------------
def _prepare_tiny_tfds(data_dir):
  """A 3-class array_record TFDS data set written without TensorFlow (Tensor features)."""
  import tensorflow_datasets as tfds

  # Unregistered, as a user's prepared data set is: the readers find it from its files alone (and a
  # second call in the same process does not clash). A one-part __module__ keeps tfds from looking
  # for the builder's source file (that lookup needs importlib_resources, which tfds does not install).
  with tfds.core.registered.skip_registration():
    class LvmTinyShapes(tfds.core.GeneratorBasedBuilder):
      VERSION = tfds.core.Version("1.0.0")
      __module__ = "lvm_tiny_shapes"

      def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(12, 12, 3), dtype=np.uint8),
            "label": tfds.features.ClassLabel(names=["red", "green", "blue"])}))

      def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(9), "test": self._generate_examples(6)}

      def _generate_examples(self, n):
        for i in range(n):
          image = np.zeros((12, 12, 3), np.uint8)
          image[..., i % 3] = 200  # the label is the lit channel
          yield i, {"image": image, "label": i % 3}

  LvmTinyShapes(data_dir=data_dir, file_format="array_record").download_and_prepare()


def test_tfds_source_reads_array_record_without_tensorflow(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  _prepare_tiny_tfds(str(tmp_path))
  cfg = data_config(source="tfds", name="lvm_tiny_shapes", path=str(tmp_path), image_size=12,
                    train_split="train", eval_split="test")
  train, test = build_source(cfg, "train"), build_source(cfg, "eval")
  assert len(train) == 9 and len(test) == 6
  assert train.class_names == ("red", "green", "blue") and train.num_classes == 3
  batch = next(iter(make_loader(test, supervised_transforms(cfg, train=False), batch_size=6,
                                shuffle=False, num_epochs=1, drop_remainder=False)))
  lit = batch["image"].mean(axis=(1, 2)).argmax(-1)
  assert np.array_equal(lit, batch["label"])


def test_tfds_missing_data_set_says_how_to_prepare(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  cfg = data_config(source="tfds", name="mnist", path=str(tmp_path))
  with pytest.raises(ValueError, match="not prepared.*tfds build mnist"):
    build_source(cfg, "train")
  with pytest.raises(ValueError, match="data.name is empty"):
    build_source(data_config(source="tfds", name=""), "train")


def test_a_process_whose_eval_records_all_fail_to_decode_yields_padding_batches(tmp_path, monkeypatch):
  """decode_errors='skip' can leave a process with no eval batch at all; it must still join every one.

  It once took the batch layout from its own first batch and crashed (None.items()), while the
  other hosts waited in the collective eval.
  """
  import jax

  from lvm_jax import sharding
  from tests.helpers import tiny_supervised_config
  from train.tasks import get_task

  make_folder(str(tmp_path / "train"), {"a": 3}, np.random.default_rng(4), corrupt="a/broken.jpg")
  make_folder(str(tmp_path / "val"), {"a": 1}, np.random.default_rng(5))
  source = build_image_folder(str(tmp_path), "train")
  assert len(source) == 4  # one record per process below
  config = tiny_supervised_config(**{"data.source": "folder", "data.path": str(tmp_path), "data.decode_errors": "skip"})
  task = get_task(config, sharding.make_mesh({"data": 1}, devices=jax.devices()[:1]))
  # As the process of 4 whose only record is the broken file; the global arrays are not built here.
  monkeypatch.setattr(jax, "process_count", lambda: 4)
  monkeypatch.setattr(jax, "process_index", lambda: source.paths.index(str(tmp_path / "train" / "a" / "broken.jpg")))
  monkeypatch.setattr(sharding, "check_batch_size", lambda global_batch, mesh, what="": global_batch // 4)
  monkeypatch.setattr(sharding, "host_to_global", lambda batch, mesh: batch)
  ops = supervised_transforms(config.data, train=False)
  batches = list(task.eval_batches(source, ops, global_batch=32, keys=("image", "label")))
  assert len(batches) == 1  # ceil(4 records / 4 processes / 8 rows), the same on every process
  (batch,) = batches
  assert batch["image"].shape == (8, 16, 16, 3) and batch["label"].shape == (8,)
  assert not batch["valid"].any()
