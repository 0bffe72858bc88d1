"""Training data in a bucket (gs://, s3://): every data source reads it as it reads the same files on disk.

The buckets are local servers (tests/gcs_emulator.py, tests/s3_emulator.py), not real GCS or S3.
Each test builds the source from a local copy and from the bucket copy and compares them record
by record.
"""

from __future__ import annotations

import io
import json
import pickle

import numpy as np
import pytest

from lvm_jax.data import captions as C
from lvm_jax.data import files
from lvm_jax.data.sources import build_source
from lvm_jax.errors import UserError
from tests.gcs_emulator import BUCKET, bucket, emulator, gcs_in_process  # noqa: F401 (fixtures)
from tests.s3_emulator import S3_BUCKET, s3_in_process, s3_server  # noqa: F401 (fixtures)
from tests.test_captions import _cfg, _png, _write_jsonl, shards  # noqa: F401 (fixture)

URL = f"gs://{BUCKET}"


class Store:
    """A bucket under test: its URL prefix and an fsspec client."""

    def __init__(self, scheme: str, fs, bucket_name: str):
        self.url, self.fs, self.bucket = f"{scheme}://{bucket_name}", fs, bucket_name

    def put(self, local, key: str) -> None:
        self.fs.put(str(local), f"{self.bucket}/{key}", recursive=True)

    def ls(self, key: str) -> list[str]:
        return self.fs.ls(f"{self.bucket}/{key}")


@pytest.fixture(params=["gs", "s3"])
def store(request) -> Store:
    if request.param == "gs":
        return Store("gs", request.getfixturevalue("gcs_in_process"), BUCKET)
    return Store("s3", request.getfixturevalue("s3_in_process"), S3_BUCKET)


def _same_records(a, b, n: int | None = None) -> None:
    assert len(a) == len(b)
    for i in range(len(a) if n is None else n):
        ra, rb = a[i], b[i]
        assert np.array_equal(ra["image"], rb["image"]) and ra.get("caption") == rb.get("caption")
        assert ra.get("label") == rb.get("label")


def test_webdataset_shards_in_a_bucket_read_like_local_ones(shards, tmp_path, store, monkeypatch):
    url = store.url
    data = (shards / "00001.tar").read_bytes()
    (shards / "cut.tar").write_bytes(data[:len(data) // 2])  # a truncated shard: the tail check reads the bucket
    store.put(shards, "wds")

    for pattern in ("{00000..00001}.tar", "0000[01].tar", "cut.tar"):
        local = C.build_webdataset_source(_cfg(path=str(shards / pattern), eval_path=str(shards / pattern)))
        remote = C.build_webdataset_source(_cfg(path=f"{url}/wds/{pattern}", eval_path=f"{url}/wds/{pattern}"))
        assert remote.skipped == local.skipped and remote.captions == local.captions
        assert remote.shards == [f"{url}/wds/{s.rsplit('/', 1)[-1]}" for s in local.shards]
        _same_records(local, remote)
    # Pickled into a grain worker, it reads the bucket there.
    assert pickle.loads(pickle.dumps(remote))[0]["image"] == local[0]["image"]

    # The shard index can live in the bucket too; a second build reads it instead of scanning.
    cfg = _cfg(path=f"{url}/wds/00001.tar", index_dir=f"{url}/index", holdout_fraction=0.25)
    train = C.build_webdataset_source(cfg, "train")
    assert len(store.ls("index")) == 1
    monkeypatch.setattr(C, "index_shard", lambda *a, **k: pytest.fail("index was rebuilt"))
    held = C.build_webdataset_source(cfg, "eval")
    assert (len(train), len(held)) == (3, 1) and not set(train.image_keys) & set(held.image_keys)

    with pytest.raises(ValueError, match="missing: .*00007.tar"):
        C.build_webdataset_source(_cfg(path=f"{url}/wds/{{00000..00001}}.tar,{url}/wds/00007.tar"))


def test_grain_worker_processes_read_the_bucket(shards, store):
    """A worker process (forked or spawned by grain) opens its own gcsfs/s3fs client and reads the shards."""
    from lvm_jax.data.pipeline import make_loader
    from lvm_jax.data.transforms import DecodeImage, DropFailed

    store.put(shards, "wds-workers")
    path = f"{store.url}/wds-workers/00001.tar"
    src = C.build_webdataset_source(_cfg(path=path, eval_path=path))
    loader = make_loader(src, [DecodeImage("skip"), DropFailed()], batch_size=2, shuffle=False, num_epochs=1,
                         worker_count=1)
    batches = list(loader)
    assert [b["image"].shape for b in batches] == [(2, 8, 8, 3)] * 2
    assert [c for b in batches for c in b["caption"]] == [f"caption {i}" for i in range(10, 14)]


def test_hosts_sharing_a_bucket_index_dir_split_the_shard_scans(tmp_path, gcs_in_process, monkeypatch):
    """Two hosts building the same 8-shard source at once scan each shard about once, not twice."""
    import threading
    import time

    from tests.test_captions import _write_shard

    for s in range(8):
        _write_shard(tmp_path / f"{s:05d}.tar", [(f"{s}{i:04d}", {"jpg": _png(s), "txt": f"shard {s}".encode()})
                                                  for i in range(2)])
    gcs_in_process.put(str(tmp_path), f"{BUCKET}/pod", recursive=True)
    scans, real_index_shard = [], C.index_shard

    def slow_index_shard(path, errors="skip"):
        scans.append(path)
        time.sleep(0.2)  # a large shard: long enough for the other host's indexes to land meanwhile
        return real_index_shard(path, errors)

    monkeypatch.setattr(C, "index_shard", slow_index_shard)
    shards = [f"{URL}/pod/{s:05d}.tar" for s in range(8)]
    built = {}

    def host(i):
        built[i] = C.WebDatasetSource(shards, index_dir=f"{URL}/pod-index", num_threads=1, process=(i, 2))

    threads = [threading.Thread(target=host, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert built[0].captions == built[1].captions == [f"shard {s}" for s in range(8) for _ in range(2)]
    assert sorted(set(scans)) == shards and len(scans) <= 12  # each host alone would scan all 8 (16 in all)


def test_a_caption_file_in_a_bucket_names_images_in_the_bucket(tmp_path, store):
    url = store.url
    for i in range(3):
        (tmp_path / "img").mkdir(exist_ok=True)
        (tmp_path / "img" / f"{i}.png").write_bytes(_png(60 * i))
    _write_jsonl(tmp_path / "train.jsonl", [{"image": f"img/{i}.png", "caption": f"tile {i}"} for i in range(3)]
                 + [{"image": "img/gone.png", "caption": "a missing image"}])
    (tmp_path / "train.csv").write_text("filepath,title\n" + "".join(f"img/{i}.png,tile {i}\n" for i in range(3)))
    store.put(tmp_path, "cc")

    for name in ("train.jsonl", "train.csv"):
        local = C.build_captions_source(_cfg(path=str(tmp_path / name), eval_path=str(tmp_path / name)))
        remote = C.build_captions_source(_cfg(path=f"{url}/cc/{name}", eval_path=f"{url}/cc/{name}"))
        assert remote.image_paths[0] == f"{url}/cc/img/0.png"
        _same_records(local, remote)
    assert remote[0]["image"] == _png(0)
    # A missing object is skipped like a missing file (empty bytes, counted) or raises under 'raise'.
    remote = C.build_captions_source(_cfg(path=f"{url}/cc/train.jsonl", eval_path=f"{url}/cc/train.jsonl"))
    assert remote[3]["image"] == b"" and remote.missing_images == 1
    strict = C.build_captions_source(_cfg(path=f"{url}/cc/train.jsonl", eval_path=f"{url}/cc/train.jsonl",
                                          decode_errors="raise"))
    with pytest.raises(ValueError, match="gone.png.*cannot be read"):
        strict[3]
    # data.image_root may point a local caption file at images in the bucket.
    rooted = C.build_captions_source(_cfg(path=str(tmp_path / "train.csv"), eval_path=str(tmp_path / "train.csv"),
                                          image_root=f"{url}/cc"))
    assert rooted.image_paths[1] == f"{url}/cc/img/1.png" and rooted[1]["image"] == _png(60)


def test_an_image_folder_in_a_bucket_reads_like_the_local_folder(tmp_path, store):
    from tests.test_data import data_config

    url = store.url
    for split, n in (("train", 4), ("val", 2)):
        for c, color in (("cat", 30), ("dog", 90), ("eel", 150)):
            d = tmp_path / "split" / split / c
            d.mkdir(parents=True)
            for i in range(n):
                (d / f"{i}.png").write_bytes(_png(color + i))
    for c in ("a", "b"):
        (tmp_path / "flat" / c).mkdir(parents=True)
        for i in range(5):
            (tmp_path / "flat" / c / f"{i}.jpg").write_bytes(_png(10 * i + (c == "b")))
    (tmp_path / "flat" / "b" / "notes.txt").write_text("not an image")
    store.put(tmp_path / "split", "split")
    store.put(tmp_path / "flat", "flat")

    for layout in ("split", "flat"):
        for split in ("train", "eval"):
            local = build_source(data_config(source="folder", path=str(tmp_path / layout)), split)
            remote = build_source(data_config(source="folder", path=f"{url}/{layout}"), split)
            assert remote.class_names == local.class_names
            assert [p.rsplit(layout, 1)[1] for p in remote.paths] == [p.rsplit(layout, 1)[1] for p in local.paths]
            _same_records(local, remote)
    with pytest.raises(ValueError, match="does not exist"):
        build_source(data_config(source="folder", path=f"{url}/nothing"), "train")


def test_tfds_data_dir_in_a_bucket_reads_like_the_local_one(tmp_path, gcs_in_process):
    """TFDS's metadata comes through gcsfs, the array_record files through array_record's own GCS reader."""
    pytest.importorskip("tensorflow_datasets")
    from tests.test_data import _prepare_tiny_tfds, data_config

    _prepare_tiny_tfds(str(tmp_path / "tfds"))
    gcs_in_process.put(str(tmp_path / "tfds"), f"{BUCKET}/tfds", recursive=True)
    for split in ("train", "eval"):
        local, remote = (build_source(data_config(source="tfds", name="lvm_tiny_shapes", path=path, image_size=12,
                                                  train_split="train", eval_split="test"), split)
                         for path in (str(tmp_path / "tfds"), f"{URL}/tfds"))
        assert len(remote) == len(local) == (9 if split == "train" else 6)
        assert remote.class_names == local.class_names == ("red", "green", "blue")
        for i in range(len(local)):
            assert np.array_equal(remote[i]["image"], local[i]["image"]) and remote[i]["label"] == local[i]["label"]
    with pytest.raises(ValueError, match="not prepared"):
        build_source(data_config(source="tfds", name="lvm_tiny_shapes", path=f"{URL}/elsewhere"), "train")
    with pytest.raises(ValueError, match="array_record files are read from local disks and gs:// only"):
        build_source(data_config(source="tfds", name="lvm_tiny_shapes", path="s3://b/tfds"), "train")


def test_clip_tokenizer_and_class_names_read_from_a_bucket(tmp_path, store):
    from lvm_jax.data.tokenizer import ClipTokenizer
    from lvm_jax.evals.zeroshot import load_classnames
    from tests.test_captions import FIXTURES

    vocab = f"{FIXTURES}/bpe_simple_vocab_16e6.txt.gz"
    (tmp_path / "classes.txt").write_text("tabby cat\ngolden retriever\n")
    url = store.url
    store.put(vocab, "vocab/bpe.txt.gz")
    store.put(tmp_path / "classes.txt", "classes.txt")
    text = ["a photo of a tabby cat.", "Golden retrievers, playing!"]
    remote = ClipTokenizer.from_file(f"{url}/vocab/bpe.txt.gz")
    assert np.array_equal(remote(text), ClipTokenizer.from_file(vocab)(text))
    assert load_classnames(f"{url}/classes.txt") == ["tabby cat", "golden retriever"]
    with pytest.raises(ValueError, match="does not exist"):
        load_classnames(f"{url}/nope.txt")


def test_lvm_bench_times_the_input_pipeline_on_bucket_shards(shards, tmp_path, gcs_in_process):
    from lvm_jax.bench import cli

    gcs_in_process.put(str(shards), f"{BUCKET}/bench", recursive=True)
    out = tmp_path / "bench.json"
    assert cli.main(["--model", "data", "--data-source", "webdataset", "--data-path", f"{URL}/bench/0000*.tar",
                     "--batch", "4", "--res", "16", "--steps", "2", "--warmup", "1", "--read-threads", "4",
                     "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["results"]
    notes = " ".join(row["notes"])
    assert row["img_per_s"] > 0 and "webdataset gs://" in notes and "6 records" in notes  # 7 less the hold-out


def test_unsupported_data_urls_say_how_to_use_them():
    with pytest.raises(UserError, match=r"az:// is not supported.*gs://, s3://.*mount.*/mnt/data/laion"):
        C.build_webdataset_source(_cfg(path="az://data/laion/{00000..00009}.tar"))
    with pytest.raises(UserError, match=r"https:// is not supported"):
        C.build_captions_source(_cfg(path="https://example.com/cc.jsonl"))
    with pytest.raises(UserError, match=r"hdfs:// is not supported"):
        files.check("hdfs://nn/imagenet", "data.path")
    assert json.dumps(files.join("gs://b/x", "img/0.png")) == '"gs://b/x/img/0.png"'


def _train(emulator: str, workdir: str, config: str, *args: str) -> tuple[list[tuple[float, float]], dict]:
    """lvm-train in a fresh process against the emulated bucket -> ((loss, grad_norm) per step, final eval).

    `workdir` may be local or gs:// (read back through gcsfs).
    """
    import subprocess
    import sys

    from lvm_jax.workdir import as_path
    from tests.gcs_emulator import env
    from tests.helpers import ROOT

    proc = subprocess.run([sys.executable, "-m", "train", "--config", config, "--workdir", workdir, *args], cwd=ROOT,
                          env=env(emulator), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = as_path(workdir)
    steps = [(r["loss"], r["grad_norm"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
    return steps, json.loads((run / "eval" / "latest.json").read_text())


@pytest.mark.slow  # ~65 s on 2 cores: two lvm-train processes, each with a grain worker process
def test_training_on_a_bucket_image_folder_equals_training_on_the_local_copy(tmp_path, emulator, bucket):
    """lvm-train reads data.path=gs://... through a grain worker process (its own gcsfs client after the
    fork) and trains exactly as on the same folder on disk: same losses, same eval."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("val", 4)):
        for c in range(3):
            d = tmp_path / "pets" / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                color = np.zeros(3, int)
                color[c] = 120 + int(rng.integers(0, 120))
                (d / f"{i}.png").write_bytes(_png(tuple(color), size=16))
    bucket.put(str(tmp_path / "pets"), f"{BUCKET}/pets", recursive=True)

    def train(data_path: str, workdir: str) -> tuple[list[tuple[float, float]], dict]:
        return _train(emulator, workdir, "tests/configs/tiny_vit.py", "--config.total_steps=4",
                      "--config.ckpt_every=4", "--config.eval_every=4", "--config.model.num_classes=3",
                      "--config.data.source=folder", f"--config.data.path={data_path}", "--config.data.worker_count=1",
                      "--config.data.read_threads=4", "--config.eval_batch_size=8", "--config.batch_size=8")

    local_losses, local_eval = train(str(tmp_path / "pets"), str(tmp_path / "local"))
    remote_losses, remote_eval = train(f"{URL}/pets", str(tmp_path / "remote"))
    assert len(local_losses) == 4 and remote_losses == local_losses
    assert remote_eval == local_eval


@pytest.mark.slow  # ~80 s on 2 cores: two tiny CLIP lvm-train processes
def test_clip_on_bucket_shards_with_a_bucket_workdir_equals_the_local_run(tmp_path, emulator, gcs_in_process):
    bucket = gcs_in_process
    """CLIP from webdataset shards in gs:// into a gs:// workdir (a TPU pod's setup): the shard indexes land in
    the workdir (webdataset_index/, so a restart does not rescan), and the run equals the all-local one."""
    from PIL import Image

    from tests.test_captions import _write_shard

    colors = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
    (tmp_path / "shards").mkdir()
    for s in range(2):
        samples = []
        for i in range(48):
            name = list(colors)[(s * 48 + i) % 3]
            image = np.zeros((16, 16, 3), np.uint8)
            image[4:12, 4:12] = colors[name]
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, format="PNG")
            samples.append((f"{s}{i:04d}", {"png": buf.getvalue(), "txt": f"a photo of a {name} square".encode()}))
        _write_shard(tmp_path / "shards" / f"{s:05d}.tar", samples)
    bucket.put(str(tmp_path / "shards"), f"{BUCKET}/shards", recursive=True)

    def train(shards: str, workdir: str) -> tuple[list[tuple[float, float]], dict]:
        return _train(emulator, workdir, "tests/configs/tiny_clip.py", "--config.total_steps=4",
                      "--config.ckpt_every=4", "--config.data.source=webdataset",
                      f"--config.data.path={shards}/{{00000..00001}}.tar")

    local_steps, local_eval = train(str(tmp_path / "shards"), str(tmp_path / "local"))
    remote_steps, remote_eval = train(f"{URL}/shards", f"{URL}/clip-run")
    assert len(local_steps) == 4 and remote_steps == local_steps and remote_eval == local_eval
    assert len(list((tmp_path / "local" / "webdataset_index").iterdir())) == 2
    assert len(bucket.ls(f"{BUCKET}/clip-run/webdataset_index")) == 2  # one index per shard, in the bucket
