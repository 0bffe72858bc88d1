"""Edge cases of the image-folder, TFDS and manifest sources that once gave wrong labels or crashes."""
from __future__ import annotations

import io
import json
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from lvm_jax.data import build_source, make_loader
from lvm_jax.data import transforms as T
from lvm_jax.data.sources import build_image_folder
from lvm_jax.errors import UserError
from tests.gcs_emulator import BUCKET, bucket, emulator, gcs_in_process  # noqa: F401 (fixtures)
from tests.s3_emulator import S3_BUCKET, s3_in_process, s3_server  # noqa: F401 (fixtures)
from tests.test_data import data_config


def _png(color: int, size: int = 8) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.full((size, size, 3), color, np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


def _folder(root, counts: dict[str, int]) -> None:
  for cls, n in counts.items():
    os.makedirs(os.path.join(root, cls), exist_ok=True)
    for i in range(n):
      with open(os.path.join(root, cls, f"{i}.png"), "wb") as f:
        f.write(_png(20 * i))


# --- B1: root/train without a val folder --------------------------------------------------
def test_a_class_called_train_is_a_class_not_a_split(tmp_path):
  _folder(str(tmp_path), {"bus": 4, "car": 4, "train": 4})  # vehicles: 'train' holds images itself
  cfg = data_config(source="folder", path=str(tmp_path), holdout_fraction=0.25)
  assert build_source(cfg, "train").class_names == ("bus", "car", "train")


@pytest.mark.parametrize("extra", [None, "test"])
def test_train_folder_without_val_is_held_out_from_not_taken_as_a_class(tmp_path, extra):
  _folder(str(tmp_path / "train"), {"cat": 5, "dog": 5, "fox": 5})
  if extra:
    _folder(str(tmp_path / extra), {"cat": 2, "dog": 2, "fox": 2})
  cfg = data_config(source="folder", path=str(tmp_path), holdout_fraction=0.2)
  train, held = build_source(cfg, "train"), build_source(cfg, "eval")
  assert train.class_names == held.class_names == ("cat", "dog", "fox")
  assert len(train) == 12 and len(held) == 3 and not set(train.paths) & set(held.paths)
  assert all(os.sep + "train" + os.sep in p for p in train.paths + held.paths)


def test_a_root_of_only_split_folders_is_refused(tmp_path):
  _folder(str(tmp_path / "val"), {"cat": 2, "dog": 2})
  with pytest.raises(ValueError, match="only split folders.*train"):
    build_source(data_config(source="folder", path=str(tmp_path)), "train")


# --- B7: an unreadable file -------------------------------------------------------------
def _folder_with_dangling_link(root) -> None:
  _folder(str(root / "train"), {"a": 3, "b": 3})
  _folder(str(root / "val"), {"a": 1, "b": 1})
  os.symlink(str(root / "gone.png"), str(root / "train" / "a" / "dangling.png"))


def test_an_unreadable_image_is_skipped_and_counted_under_skip(tmp_path):
  _folder_with_dangling_link(tmp_path)
  src = build_source(data_config(source="folder", path=str(tmp_path), decode_errors="skip"), "train")
  assert len(src) == 7
  before = T.decode_failures()
  loader = make_loader(src, [T.DecodeImage("skip"), T.DropFailed()], batch_size=2, shuffle=False,
                       num_epochs=1, drop_remainder=False)
  ids = [int(i) for batch in loader for i in batch["id"]]
  dangling = src.paths.index(str(tmp_path / "train" / "a" / "dangling.png"))
  assert sorted(ids) == sorted(set(range(7)) - {dangling})
  assert T.decode_failures() == before + 1


def test_an_unreadable_image_raises_naming_it_under_raise(tmp_path):
  _folder_with_dangling_link(tmp_path)
  src = build_source(data_config(source="folder", path=str(tmp_path), decode_errors="raise"), "train")
  with pytest.raises(ValueError, match="dangling.png.*cannot be read"):
    src[src.paths.index(str(tmp_path / "train" / "a" / "dangling.png"))]


# --- B8: class folders without images ---------------------------------------------------
def test_class_folders_without_images_are_not_classes(tmp_path, caplog):
  _folder(str(tmp_path), {"ant": 3, "cat": 3})
  (tmp_path / "bat").mkdir()  # empty: absent from a bucket copy
  (tmp_path / "bee").mkdir()
  (tmp_path / "bee" / "notes.txt").write_text("no images")
  with caplog.at_level("WARNING"):
    src = build_image_folder(str(tmp_path), "train", 0.34)
  assert src.class_names == ("ant", "cat") and src.num_classes == 2
  assert sorted(set(src.labels.tolist())) == [0, 1]
  assert "bat" in caplog.text and "bee" in caplog.text
  with pytest.raises(ValueError, match="no images"):  # no class with images at all is still an error
    (tmp_path / "none" / "x").mkdir(parents=True)
    build_image_folder(str(tmp_path / "none"), "train")


def test_empty_class_folders_get_the_labels_of_a_bucket_copy(tmp_path, gcs_in_process):
  _folder(str(tmp_path / "pets"), {"ant": 3, "cat": 3})
  (tmp_path / "pets" / "bat").mkdir()
  gcs_in_process.put(str(tmp_path / "pets"), f"{BUCKET}/pets", recursive=True)
  local = build_image_folder(str(tmp_path / "pets"), "train", 0.34)
  remote = build_image_folder(f"gs://{BUCKET}/pets", "train", 0.34)
  assert remote.class_names == local.class_names == ("ant", "cat")
  assert remote.labels.tolist() == local.labels.tolist()


# --- B9: a manifest whose data changed after curation -----------------------------------
def _manifest(tmp_path):
  """A curation output over a folder, written as lvm-curate writes it (no vectors needed)."""
  from lvm_jax.data.manifest import source_spec
  data, out = tmp_path / "data", tmp_path / "out"
  for c, color in (("a", 0), ("b", 255)):
    os.makedirs(data / c)
    for i in range(1, 5):
      (data / c / f"{i}.png").write_bytes(_png(color))
  spec = source_spec(data_config(source="folder", path=str(data), holdout_fraction=0.25), "train")
  src = build_source(ml_collections.ConfigDict(spec["data"]), "train")
  n = len(src)
  for name in ("cur", "pool"):
    d = out / "embeddings" / name
    os.makedirs(d)
    (d / "index.json").write_text(json.dumps(dict(count=n, num_shards=1, shard_size=4096, source=spec)))
    np.save(d / "ids_00000.npy", np.arange(n))
    np.save(d / "labels_00000.npy", src.labels)
    (d / "paths_00000.json").write_text(json.dumps(src.paths))
  (out / "summary.json").write_text(json.dumps(
      {"inputs": {"curated": str(out / "embeddings/cur"), "pool": str(out / "embeddings/pool")}}))
  (out / "manifest.jsonl").write_text("".join(json.dumps({"id": i, "source": "curated"}) + "\n"
                                              for i in range(n)))
  return data, out


def test_manifest_refuses_data_that_changed_since_curation(tmp_path):
  from lvm_jax.data.manifest import ManifestSource
  data, out = _manifest(tmp_path)
  assert len(ManifestSource(str(out))) == 6
  (data / "a" / "0.png").write_bytes(_png(0))  # one more image: every later position shifts
  with pytest.raises(UserError, match="changed since curation"):
    ManifestSource(str(out))


def test_manifest_refuses_renamed_images_with_the_same_count(tmp_path):
  from lvm_jax.data.manifest import ManifestSource
  data, out = _manifest(tmp_path)
  os.rename(data / "b" / "4.png", data / "b" / "0.png")  # same count, another order
  with pytest.raises(UserError, match="changed since curation"):
    ManifestSource(str(out))


# --- B12: TFDS errors name the choices ---------------------------------------------------
def test_tfds_missing_split_and_key_typo_name_the_choices(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  from tests.test_data import _prepare_tiny_tfds
  _prepare_tiny_tfds(str(tmp_path))
  cfg = dict(source="tfds", name="lvm_tiny_shapes", path=str(tmp_path), image_size=12)
  with pytest.raises(ValueError, match=r"no split 'validation'.*\['test', 'train'\].*eval_split"):
    build_source(data_config(**cfg), "eval")
  with pytest.raises(ValueError, match=r"no feature 'lbl'.*\['image', 'label'\].*label_key"):
    build_source(data_config(**cfg, label_key="lbl"), "train")
  assert len(build_source(data_config(**cfg, train_split="train[:5]+test"), "train")) == 11


# --- s16 DIFF 1: hidden files inside class folders ------------------------------------------
def _with_hidden_files(root) -> None:
  """Two classes of 3 images each, plus what a macOS copy adds: AppleDouble '._x.png' twins (not
  images, though named like them), .DS_Store, and a hidden sub-folder of 'images'."""
  _folder(str(root), {"cat": 3, "dog": 3})
  for cls in ("cat", "dog"):
    (root / cls / "._0.png").write_bytes(b"\0\5\26\7 AppleDouble resource fork")
    (root / cls / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
  (root / "cat" / ".thumbs").mkdir()
  (root / "cat" / ".thumbs" / "0.png").write_bytes(b"not a real thumbnail")


def test_hidden_files_in_class_folders_are_not_images(tmp_path):
  _with_hidden_files(tmp_path)
  src = build_image_folder(str(tmp_path), "train", 0.34, errors="raise")
  held = build_image_folder(str(tmp_path), "eval", 0.34, errors="raise")
  paths = src.paths + held.paths
  assert len(paths) == 6 and not [p for p in paths if "/." in p]
  for s in (src, held):  # under 'raise' every listed file decodes
    for i in range(len(s)):
      T.DecodeImage("raise").map(s[i])


@pytest.mark.parametrize("scheme", ["gs", "s3"])
def test_hidden_files_in_bucket_class_folders_are_not_images(tmp_path, scheme, request):
  fs, name = ((request.getfixturevalue("gcs_in_process"), BUCKET) if scheme == "gs"
              else (request.getfixturevalue("s3_in_process"), S3_BUCKET))
  _with_hidden_files(tmp_path / "pets")
  fs.put(str(tmp_path / "pets"), f"{name}/hidden", recursive=True)
  local = build_image_folder(str(tmp_path / "pets"), "train", 0.34)
  remote = build_image_folder(f"{scheme}://{name}/hidden", "train", 0.34)
  assert len(remote) == 4 and not [p for p in remote.paths if "/." in p]  # the bucket listing itself
  assert len(local) == 4
  assert [p.rsplit("/", 2)[1:] for p in remote.paths] == [p.rsplit("/", 2)[1:] for p in local.paths]


# --- s16 DIFF 2: TIFF and PPM/PGM images --------------------------------------------------------
def _encoded(array: np.ndarray, fmt: str) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format=fmt)
  return buf.getvalue()


def test_tiff_ppm_and_pgm_images_are_listed_and_decode_to_rgb(tmp_path):
  ramp16 = (np.arange(16 * 16, dtype=np.uint32).reshape(16, 16) * 257).astype(np.uint16)  # 0..65535
  files_ = {"a/0.tif": _encoded(ramp16, "TIFF"),                           # 16-bit grayscale
            "a/1.TIFF": _encoded(np.full((16, 16, 3), 200, np.uint8), "TIFF"),
            "b/0.pgm": _encoded(np.full((16, 16), 50, np.uint8), "PPM"),    # 8-bit grayscale
            "b/1.ppm": _encoded(np.full((16, 16, 3), 90, np.uint8), "PPM")}
  for name, data in files_.items():
    (tmp_path / name).parent.mkdir(exist_ok=True)
    (tmp_path / name).write_bytes(data)
  src = build_image_folder(str(tmp_path), "train", 0.5)
  held = build_image_folder(str(tmp_path), "eval", 0.5)
  decoded = {os.path.relpath(s.paths[i], tmp_path): T.DecodeImage("raise").map(s[i])["image"]
             for s in (src, held) for i in range(len(s))}
  assert sorted(decoded) == sorted(files_)
  for image in decoded.values():
    assert image.dtype == np.uint8 and image.shape == (16, 16, 3)
  assert decoded["b/0.pgm"].mean() == 50 and decoded["b/1.ppm"].mean() == 90 and decoded["a/1.TIFF"].mean() == 200


@pytest.mark.parametrize("fmt", ["TIFF", "PNG", "PPM"])  # PPM: a 16-bit PGM
def test_a_16_bit_grayscale_image_decodes_to_its_range_not_to_white(fmt):
  ramp16 = (np.arange(16 * 16, dtype=np.uint32).reshape(16, 16) * 257).astype(np.uint16)  # 0..65535
  image = T.decode_image(_encoded(ramp16, fmt))
  assert image.dtype == np.uint8 and image.shape == (16, 16, 3) and (image == image[..., :1]).all()
  # The high byte of each value, as an 8-bit export keeps it; clipped at 255 (PIL's convert('RGB')) the
  # ramp was white from its second value on.
  assert (image[..., 0] == np.arange(256, dtype=np.uint8).reshape(16, 16)).all()


# --- s16 DIFF 15: a malformed manifest line -------------------------------------------------------
@pytest.mark.parametrize("line, why", [
    ('{"id": 3, "source": "curated"', "not valid JSON"),      # a copy cut short
    ('{"source": "curated"}', 'no "id" field'),
    ('{"id": "x", "source": "curated"}', "its \"id\" is 'x', not an integer"),
    ('[3, "curated"]', "a JSON list, not an object"),
])
def test_a_malformed_manifest_line_names_file_line_and_fix(tmp_path, line, why):
  from lvm_jax.data.manifest import ManifestSource
  _, out = _manifest(tmp_path)
  lines = (out / "manifest.jsonl").read_text().splitlines()
  lines[2] = line
  (out / "manifest.jsonl").write_text("\n".join(lines) + "\n")
  with pytest.raises(UserError) as e:
    ManifestSource(str(out))
  message = str(e.value)
  assert message.startswith(f"{out / 'manifest.jsonl'}:3 is not a manifest entry ({why}")
  assert "restore it, or re-run `lvm-curate run`" in message
