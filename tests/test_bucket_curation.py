"""lvm-curate with its output in a bucket (gs://, s3://), and the manifest source reading it from there.

The buckets are local servers (tests/gcs_emulator.py, tests/s3_emulator.py), not real GCS or S3.
Each bucket run is compared with the same run into a local directory (test_curation_embed's
`curated_run`): same manifest, same duplicates, same training records.
"""

from __future__ import annotations

import json

import ml_collections
import numpy as np
import pytest

from lvm_jax.curation import embed
from lvm_jax.curation.__main__ import main as curate_main
from lvm_jax.curation.staging import Mirror, default_stage, local_input
from lvm_jax.data import files
from lvm_jax.data.sources import build_source
from lvm_jax.errors import UserError
from tests.gcs_emulator import BUCKET, bucket, emulator, gcs_in_process  # noqa: F401 (fixtures)
from tests.s3_emulator import s3_in_process, s3_server  # noqa: F401 (fixtures)
from tests.test_bucket_data import _same_records, store  # noqa: F401 (fixture)
from tests.test_curation_embed import curated_run  # noqa: F401 (fixture)


def _lines(path: str) -> list[dict]:
    return [json.loads(line) for line in files.read_bytes(path).decode().splitlines() if line.strip()]


def _manifest(path: str):
    return build_source(ml_collections.ConfigDict(dict(source="manifest", path=path)), "train")


def _count_embedder_calls(monkeypatch) -> list[int]:
    calls = []
    original = embed.Embedder.__call__

    def counted(self, images):
        calls.append(len(images))
        return original(self, images)

    monkeypatch.setattr(embed.Embedder, "__call__", counted)
    return calls


def test_curate_run_into_a_bucket_equals_the_local_run_and_resumes_from_it(curated_run, gcs_in_process, tmp_path,
                                                                            monkeypatch):
    """gs:// only (one run costs ~10 s); the same Mirror code reaches s3:// in the `embeddings` test."""
    run_dir, config = curated_run
    local = run_dir / "run"
    out = f"gs://{BUCKET}/curate-run"
    assert curate_main(["run", "--config", config, "--out", out, "--stage", str(tmp_path / "vm1"),
                        "--no-progress"]) == 0

    # The bucket holds what the local run wrote, with the same contents.
    for name in ("manifest.jsonl", "duplicates.jsonl"):
        assert _lines(f"{out}/{name}") == _lines(str(local / name)), name
    summary = json.loads(files.read_bytes(f"{out}/summary.json"))
    assert summary["inputs"]["curated"] == f"{out}/embeddings/curated"
    assert summary["inputs"]["references"] == [f"{out}/embeddings/reference_0"]
    listed = files.objects_under(out)
    assert {"report.html", "retrieval.png", "embeddings/pool/index.json", "embeddings/pool/emb_00002.npy"} <= set(listed)
    assert not [k for k in listed if ".tmp" in k]

    # The manifest source trains from the bucket: record for record the local run's.
    remote, here = _manifest(out), _manifest(str(local))
    _same_records(here, remote)
    assert remote.num_classes == here.num_classes and remote.class_names == here.class_names

    # Preempted: a shard never reached the bucket. A new VM (empty stage) fetches the rest and
    # embeds only that shard (64 images in batches of 16).
    gcs_in_process.rm(f"{BUCKET}/curate-run/embeddings/pool/emb_00001.npy")
    calls = _count_embedder_calls(monkeypatch)
    assert curate_main(["run", "--config", config, "--out", out, "--stage", str(tmp_path / "vm2"),
                        "--no-progress"]) == 0
    assert calls == [16, 16, 16, 16]
    assert _lines(f"{out}/manifest.jsonl") == _lines(str(local / "manifest.jsonl"))
    assert files.isfile(f"{out}/embeddings/pool/emb_00001.npy")


def test_curate_embed_writes_one_set_into_the_bucket(curated_run, gcs_in_process, tmp_path):
    """`lvm-curate embed --out gs://...` (as each pod host runs it): the shards the local run wrote, byte for byte."""
    run_dir, config = curated_run
    out = f"gs://{BUCKET}/embed-only/pool"
    assert curate_main(["embed", "--config", config, "--set", "pool", "--out", out, "--stage", str(tmp_path / "s"),
                        "--no-progress"]) == 0
    local = run_dir / "run" / "embeddings" / "pool"
    names = sorted(p.name for p in local.iterdir())
    assert sorted(files.objects_under(out)) == names
    for name in names:
        if name != "index.json":  # (it records the same plan; compared parsed below)
            assert files.read_bytes(f"{out}/{name}") == (local / name).read_bytes(), name
    assert json.loads(files.read_bytes(f"{out}/index.json")) == json.loads((local / "index.json").read_text())


def test_curate_embeddings_reads_and_writes_the_bucket(curated_run, store, tmp_path):
    run_dir, _ = curated_run
    local = run_dir / "run"
    store.put(local / "embeddings", "emb-in")  # e.g. `lvm-curate embed --out gs://...` on other hosts
    src = f"{store.url}/emb-in"
    out = f"{store.url}/emb-out"
    assert curate_main(["embeddings", "--curated", f"{src}/curated", "--pool", f"{src}/pool",
                        "--reference", f"{src}/reference_0", "--out", out, "--stage", str(tmp_path / "stage"),
                        "--dedup-threshold", "0.9999", "--reference-threshold", "0.9999", "--k", "3",
                        "--no-report", "--no-progress"]) == 0
    # Same inputs and thresholds as the config run: the same curation.
    assert _lines(f"{out}/manifest.jsonl") == _lines(str(local / "manifest.jsonl"))
    # (`run` names a reference set by its config key, `embeddings` by its directory.)
    renamed = [{**d, "reference": "reference:0"} if "reference" in d else d for d in _lines(f"{out}/duplicates.jsonl")]
    assert renamed == _lines(str(local / "duplicates.jsonl"))
    summary = json.loads(files.read_bytes(f"{out}/summary.json"))
    assert summary["inputs"]["pool"] == f"{src}/pool"  # the manifest follows it back to the bucket
    _same_records(_manifest(str(local)), _manifest(out))


def test_a_local_run_copied_into_a_bucket_trains_from_there(curated_run, store):
    run_dir, _ = curated_run
    local = run_dir / "run"
    store.put(local, "copied")  # summary.json still names the local embedding directories
    summary = json.loads((local / "summary.json").read_text())
    assert summary["inputs"]["pool"] == str(local / "embeddings" / "pool")
    with pytest.MonkeyPatch.context() as mp:  # as on another machine: the local directories are gone
        real_isdir = files.isdir
        mp.setattr(files, "isdir", lambda p: False if str(p).startswith(str(run_dir)) else real_isdir(p))
        remote = _manifest(f"{store.url}/copied")
    _same_records(_manifest(str(local)), remote)
    with pytest.raises(UserError, match="has no manifest.jsonl/summary.json"):
        _manifest(f"{store.url}/nothing-here")


def test_mirror_uploads_only_what_changed_and_keeps_compile_caches_local(gcs_in_process, tmp_path):
    out = f"gs://{BUCKET}/mirror"
    m = Mirror(out, str(tmp_path / "stage"))
    (tmp_path / "stage" / "a" / "compile_cache").mkdir(parents=True)
    (tmp_path / "stage" / "a" / "compile_cache" / "x.bin").write_bytes(b"machine-specific")
    (tmp_path / "stage" / "a" / "shard.npy").write_bytes(b"1234")
    (tmp_path / "stage" / "a" / "emb_00003.tmp77.npy").write_bytes(b"half-written")
    assert m.push() == 1 and m.push() == 0  # unchanged: not sent again
    assert Mirror(out, str(tmp_path / "stage")).push() == 0  # nor by a later run on this VM (.lvm_mirror.json)
    assert {k: size for k, (size, _) in files.objects_under(out).items()} == {"a/shard.npy": 4}
    (tmp_path / "stage" / "a" / "shard.npy").write_bytes(b"12345")
    assert m.push("a") == 1 and files.read_bytes(f"{out}/a/shard.npy") == b"12345"
    other = Mirror(out, str(tmp_path / "vm2"))
    assert other.pull(progress=False) == 1 and other.pull(progress=False) == 0
    assert (tmp_path / "vm2" / "a" / "shard.npy").read_bytes() == b"12345"
    # Another writer replaced the object by one of the same size: its new version is fetched.
    gcs_in_process.pipe(f"{BUCKET}/mirror/a/shard.npy", b"54321")
    assert Mirror(out, str(tmp_path / "vm2")).pull(progress=False) == 1
    assert (tmp_path / "vm2" / "a" / "shard.npy").read_bytes() == b"54321"
    assert default_stage(out).endswith("/lvm_jax/curate/gs/lvm-test-bucket/mirror")
    with pytest.raises(UserError, match="az:// is not supported here"):
        Mirror("az://b/curated")


def test_a_bucket_input_file_is_downloaded_again_only_when_it_changed(gcs_in_process, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    url = f"gs://{BUCKET}/inputs/pool.npy"
    gcs_in_process.pipe(url[5:], b"v1")
    local = local_input(url, "--pool")
    assert local.startswith(str(tmp_path / "cache")) and open(local, "rb").read() == b"v1"
    calls = []
    monkeypatch.setattr(files, "download", lambda *a, real=files.download: (calls.append(a), real(*a)))
    assert local_input(url, "--pool") == local and not calls
    gcs_in_process.pipe(url[5:], b"v2")  # same size, new contents
    assert open(local_input(url, "--pool"), "rb").read() == b"v2" and len(calls) == 1
    with pytest.raises(UserError, match="does not exist"):
        local_input(f"gs://{BUCKET}/inputs/nothing", "--pool")


@pytest.mark.parametrize("argv, message", [
    (["run", "--out", "hdfs://nn/curated"], "hdfs:// is not supported here"),
    (["embeddings", "--curated", "gs://b/none.npy", "--pool", "p.npy", "--out", "OUT"], "needs gcsfs"),
])
def test_bucket_mistakes_are_one_line(curated_run, tmp_path, monkeypatch, capsys, argv, message):
    _, config = curated_run
    if argv[0] == "run":
        argv = argv[:1] + ["--config", config] + argv[1:]
    else:
        import importlib.util
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gcsfs" else real(name, *a))
        argv = [str(tmp_path / "o") if a == "OUT" else a for a in argv]
    assert curate_main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow  # two JAX processes: ~40 s
def test_two_processes_curate_into_a_bucket_like_one_local_run(curated_run, emulator, bucket, tmp_path):
    """As on a pod: two hosts, each with its own disk (its own --stage), one gs:// output. Each
    uploads the shards it embedded, then pulls the other's before the sharded search."""
    import os
    import subprocess
    import sys

    from tests.gcs_emulator import env
    from tests.helpers import ROOT

    run_dir, config = curated_run
    out = f"gs://{BUCKET}/pod-curate"
    port = 22000 + os.getpid() % 20000
    procs = [subprocess.Popen([sys.executable, "-m", "lvm_jax.curation", "run", "--config", config, "--out", out,
                               "--stage", str(tmp_path / f"host{i}"), "--no-progress", "--config.embed.shard_size=32",
                               "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)],
                              cwd=ROOT, env=env(emulator, devices=2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
             for i in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    local = run_dir / "run"
    remote = {k: bucket.cat_file(f"{BUCKET}/pod-curate/{k}").decode() for k in ("manifest.jsonl", "duplicates.jsonl")}
    for name, text in remote.items():  # 2 devices per process, not 8: embeddings round differently
        got, want = [json.loads(x) for x in text.splitlines()], _lines(str(local / name))
        assert [{**g, "similarity": None} for g in got] == [{**w, "similarity": None} for w in want], name
        assert np.allclose([g["similarity"] or 0 for g in got], [w["similarity"] or 0 for w in want], atol=1e-5)
    pool = sorted(p.rsplit("/", 1)[-1] for p in bucket.ls(f"{BUCKET}/pod-curate/embeddings/pool"))
    assert [p for p in pool if p.startswith("emb_")] == [f"emb_{s:05d}.npy" for s in range(5)]  # 150 / 32
    # Each host's mirror ends up with every shard: its own, and the other's fetched from the bucket.
    assert sorted(os.listdir(tmp_path / "host1" / "embeddings" / "pool")) == sorted(
        os.listdir(tmp_path / "host0" / "embeddings" / "pool"))


@pytest.mark.slow  # ~30 s: a (2-step) lvm-train run inside
def test_a_backbone_trained_for_a_bucket_run_is_uploaded_and_reused(curated_run, gcs_in_process, tmp_path,
                                                                    monkeypatch):
    """config.backbone.train_config: lvm-train trains it in the mirror, the checkpoint goes to the bucket,
    and a re-run on a new VM restores it from there instead of training again; backbone.params may then
    name that gs:// workdir."""
    from tests.helpers import tiny_supervised_config

    _, config = curated_run
    model = {k: v for k, v in tiny_supervised_config().model.to_dict().items() if k != "num_classes"}
    text = open(config).read().replace(
        "c.backbone = mlc.ConfigDict(dict(params=\"\", train_config=\"\", seed=0))",
        "c.backbone = mlc.ConfigDict(dict(params=\"\", train_config=\"tests/configs/tiny_vit.py\", "
        "train_overrides=(\"total_steps=2\", \"ckpt_every=2\", \"optim.warmup_steps=1\"), seed=0))")
    text = text.replace("c.model = mlc.ConfigDict(", f"c.model = mlc.ConfigDict({model!r})  # was: (")
    trained = tmp_path / "trained.py"
    trained.write_text(text)
    out = f"gs://{BUCKET}/with-backbone"
    args = ["embed", "--config", str(trained), "--set", "curated", "--no-progress", f"--config.out={out}"]
    assert curate_main([*args, "--stage", str(tmp_path / "vm1")]) == 0
    assert any(k.startswith("backbone/checkpoints/2/") for k in files.objects_under(out))
    first = files.read_bytes(f"{out}/embeddings/curated/emb_00000.npy")

    import train.loop
    monkeypatch.setattr(train.loop, "train_and_evaluate", lambda *a, **k: pytest.fail("trained again"))
    gcs_in_process.rm(f"{BUCKET}/with-backbone/embeddings", recursive=True)
    assert curate_main([*args, "--stage", str(tmp_path / "vm2")]) == 0
    assert files.read_bytes(f"{out}/embeddings/curated/emb_00000.npy") == first

    # The same weights named directly as a gs:// workdir (copied locally through workdir.local_copy).
    direct = [*args[:-1], f"--config.out={out}-direct", f"--config.backbone.params={out}/backbone"]
    assert curate_main([*direct, "--stage", str(tmp_path / "vm3")]) == 0
    assert files.read_bytes(f"{out}-direct/embeddings/curated/emb_00000.npy") == first
