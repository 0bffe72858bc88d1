"""lvm_jax.curation.staging: the local mirror of a bucket --out (against the local GCS emulator).

- objects deleted from the bucket are uploaded again from a stage that still holds them;
- an input under --out is read from the output's mirror: downloaded once, never uploaded back;
- processes sharing one stage do not break each other's writes of the mirror's state file.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np

from lvm_jax.curation import staging
from lvm_jax.curation.__main__ import main as curate_main
from lvm_jax.curation.staging import STATE_FILE, Mirror, open_mirror
from lvm_jax.data import files
from tests.gcs_emulator import BUCKET, bucket, emulator, gcs_in_process  # noqa: F401 (fixtures)


def test_objects_deleted_from_the_bucket_are_uploaded_again_from_the_stage(gcs_in_process, tmp_path):
    out, stage = f"gs://{BUCKET}/deleted", str(tmp_path / "stage")
    m = open_mirror(out, stage, progress=False)
    os.makedirs(m.path("embeddings/pool"))
    names = ["embeddings/pool/emb_00000.npy", "embeddings/pool/emb_00001.npy", "embeddings/pool/index.json"]
    for rel in names:
        with open(m.path(rel), "w") as f:
            f.write(rel)
    with open(m.path("manifest.jsonl"), "w") as f:
        f.write("{}\n")
    assert m.push() == 4
    # The user clears the embeddings in the bucket, then re-runs on the same VM (same stage).
    gcs_in_process.rm(f"{BUCKET}/deleted/embeddings", recursive=True)
    assert sorted(files.objects_under(out)) == ["manifest.jsonl"]
    again = open_mirror(out, stage, progress=False)
    assert again.pull("embeddings", progress=False) == 0  # the stage's files are used, not deleted
    assert again.push() == 3
    assert sorted(files.objects_under(out)) == sorted([*names, "manifest.jsonl"])
    assert files.read_bytes(f"{out}/embeddings/pool/index.json") == b"embeddings/pool/index.json"
    assert open_mirror(out, stage, progress=False).push() == 0  # and then in sync again


def _put_npy(fs, key: str, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array)
    fs.pipe(key, buf.getvalue())


def test_an_input_under_the_output_is_downloaded_once_and_not_uploaded_back(gcs_in_process, tmp_path, monkeypatch):
    """`lvm-curate embeddings --pool gs://b/run/emb/pool --out gs://b/run` with default stages."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    run = f"gs://{BUCKET}/nested"
    pool = rng.standard_normal((40, 8)).astype(np.float32)
    inputs = {"emb/curated.npy": rng.standard_normal((6, 8)).astype(np.float32)}
    for s in range(2):
        inputs[f"emb/pool/emb_{s:05d}.npy"] = pool[20 * s:20 * (s + 1)]
        inputs[f"emb/pool/ids_{s:05d}.npy"] = np.arange(20 * s, 20 * (s + 1), dtype=np.int64)
    for rel, array in inputs.items():
        _put_npy(gcs_in_process, f"{BUCKET}/nested/{rel}", array)
    gcs_in_process.pipe(f"{BUCKET}/nested/emb/pool/index.json", json.dumps({"num_shards": 2}).encode())
    before = files.objects_under(run)
    assert len(before) == 6

    calls = {"upload": [], "download": []}
    monkeypatch.setattr(files, "upload", lambda local, url, real=files.upload: (
        calls["upload"].append(url[len(run) + 1:]), real(local, url))[1])
    monkeypatch.setattr(files, "download", lambda url, local, real=files.download: (
        calls["download"].append(url[len(run) + 1:]), real(url, local))[1])
    assert curate_main(["embeddings", "--curated", f"{run}/emb/curated.npy", "--pool", f"{run}/emb/pool",
                        "--out", run, "--k", "2", "--no-report", "--no-progress"]) == 0

    assert sorted(calls["download"]) == sorted(before)  # each input object once
    assert not [u for u in calls["upload"] if u.startswith("emb/")], calls["upload"]
    assert "manifest.jsonl" in calls["upload"]
    after = files.objects_under(run)
    assert not [k for k in after if STATE_FILE in k], sorted(after)
    assert {k: v for k, v in after.items() if k in before} == before  # the inputs were not rewritten
    summary = json.loads(files.read_bytes(f"{run}/summary.json"))
    assert summary["inputs"]["pool"] == f"{run}/emb/pool"
    # A second run over the same stages moves nothing but what it rewrites.
    calls["download"].clear()
    calls["upload"].clear()
    assert curate_main(["embeddings", "--curated", f"{run}/emb/curated.npy", "--pool", f"{run}/emb/pool",
                        "--out", run, "--k", "2", "--no-report", "--no-progress"]) == 0
    assert not calls["download"] and not [u for u in calls["upload"] if u.startswith("emb/")]


def test_a_state_file_found_below_the_mirror_root_is_never_uploaded(gcs_in_process, tmp_path):
    """An input mirror nested in the output's by an earlier version left its state file there."""
    out, stage = f"gs://{BUCKET}/nested-state", tmp_path / "stage"
    (stage / "emb" / "pool").mkdir(parents=True)
    (stage / "emb" / "pool" / STATE_FILE).write_text("{}")
    (stage / "emb" / "pool" / "index.json").write_text("{}")
    assert Mirror(out, str(stage)).push() == 1
    assert sorted(files.objects_under(out)) == ["emb/pool/index.json"]


def test_writers_sharing_a_stage_do_not_move_each_others_state_file(tmp_path, monkeypatch):
    """Deterministic interleaving of two writers of .lvm_mirror.json on one stage (a process per
    GPU on one host): B writes and renames its state file between A's write and A's rename."""
    stage = str(tmp_path / "stage")
    a, b = Mirror(f"gs://{BUCKET}/shared", stage), Mirror(f"gs://{BUCKET}/shared", stage)
    a._synced, b._synced = {"a": [1, 2, "va"]}, {"b": [3, 4, "vb"]}
    real_replace, moved = os.replace, []

    def interleaved(src, dst, *args, **kwargs):
        moved.append(os.fspath(src))
        if len(moved) == 1:  # A is about to rename its temporary file: B saves first, whole
            b._save_state()
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", interleaved)
    a._save_state()  # before the fix: FileNotFoundError, B had moved the shared '.lvm_mirror.json.tmp'
    assert len(moved) == 2 and moved[0] != moved[1]
    assert all(staging._temporary(os.path.basename(p)) for p in moved)  # never uploaded if left behind
    assert os.listdir(stage) == [STATE_FILE]
    with open(os.path.join(stage, STATE_FILE)) as f:
        assert json.load(f) == {"a": [1, 2, "va"]}  # the last rename wins, whole
    assert Mirror(f"gs://{BUCKET}/shared", stage)._synced == {"a": [1, 2, "va"]}
