"""lvm_jax.workdir: which workdirs are accepted, and metrics.jsonl across a restart."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from lvm_jax import workdir
from tests.gcs_emulator import BUCKET, bucket, emulator, gcs_in_process  # noqa: F401 (fixtures)
from lvm_jax.errors import UserError


def test_a_local_workdir_becomes_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert os.fspath(workdir.as_path("runs/a")) == str(tmp_path / "runs" / "a")
    assert not workdir.is_remote(workdir.as_path("runs/a"))


def test_a_gs_workdir_without_a_gcs_client_names_the_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("gcsfs", "tensorflow") else real(name, *a))
    with pytest.raises(UserError, match=r"needs gcsfs .*pip install 'lvm_jax\[gcs\]'"):
        workdir.as_path("gs://bucket/run")


def test_an_unknown_scheme_names_the_mount_fix():
    with pytest.raises(UserError, match=r"az:// is not supported .* --config.init_from /mnt/acct/run/x"):
        workdir.as_path("az://acct/run/x", what="--config.init_from")


def _steps(path):
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_metrics_log_drops_what_a_killed_run_logged_after_its_checkpoint(tmp_path):
    path = workdir.as_path(tmp_path / "metrics.jsonl")
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 6)]
    path.write_text("\n".join(lines) + '\n{"step": 6, "lo')  # killed while writing step 6
    log = workdir.MetricsLog(path, resume_step=3)
    assert [r["step"] for r in log.records] == [1, 2, 3] and _steps(path) == [1, 2, 3]
    log.append({"step": 4, "loss": 0.2})
    assert _steps(path) == [1, 2, 3, 4]  # a local file is appended to at once
    assert workdir.MetricsLog(path, resume_step=0).records == [] and path.read_text() == ""
    # Valid JSON that is not a record (a stray write or hand edit) was an AttributeError at resume.
    path.write_text('{"step": 1, "loss": 1.0}\n[1, 2]\n"text"\n{"step": "two"}\n{"step": 2, "loss": 0.5}\n')
    assert [r["step"] for r in workdir.MetricsLog(path, resume_step=5).records] == [1, 2] and _steps(path) == [1, 2]


def test_a_bucket_metrics_log_uploads_at_most_every_interval_and_on_flush(tmp_path, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(workdir.time, "monotonic", lambda: clock[0])
    path = workdir.as_path(tmp_path / "metrics.jsonl")
    log = workdir.MetricsLog(path, resume_step=0, upload_every_s=60.0)
    log.remote = True  # a bucket object: no appends, whole rewrites (here through the local file's path)
    log.append({"step": 1})
    clock[0] += 59
    log.append({"step": 2})
    assert not path.exists()  # nothing uploaded within the interval
    clock[0] += 1
    log.append({"step": 3})
    assert _steps(path) == [1, 2, 3]
    log.append({"step": 4})
    assert _steps(path) == [1, 2, 3]
    log.flush()  # the loop flushes at every checkpoint
    assert _steps(path) == [1, 2, 3, 4]


def test_write_json_replaces_the_file_whole(tmp_path):
    path = workdir.as_path(tmp_path / "eval" / "latest.json")
    workdir.write_json(path, {"top1": 0.5})
    workdir.write_json(path, {"top1": 0.75})
    assert json.loads(path.read_text()) == {"top1": 0.75}
    assert sorted(p.name for p in path.parent.iterdir()) == ["latest.json"]  # no .tmp left behind
    # Each writer has its own temporary name: a concurrent writer never renames another's file away.
    import threading

    errors = []

    def write(i):
        try:
            for _ in range(50):
                workdir.write_json(path, {"writer": i})
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and json.loads(path.read_text())["writer"] in range(4)
    assert sorted(p.name for p in path.parent.iterdir()) == ["latest.json"]


@pytest.mark.parametrize("argv, supported", [
    (["lvm_jax.curation", "embeddings", "--curated", "c.npy", "--pool", "p.npy", "--out", "az://b/curated"],
     "az:// is not supported here (gs://, s3:// and local paths are)"),
    (["lvm_jax.convert", "model.safetensors", "gs://b/converted"],
     "gs:// is not supported here (only local paths are)"),
])
def test_tools_refuse_a_url_they_cannot_write_with_the_mount_fix(tmp_path, monkeypatch, capsys, argv, supported):
    import importlib

    monkeypatch.chdir(tmp_path)
    main = importlib.import_module(argv[0] + ".__main__").main
    assert main(argv[1:]) == 2
    err = capsys.readouterr().err
    assert supported in err and "/mnt/b/" in err
    assert "Traceback" not in err and not any(tmp_path.iterdir())


def test_lvm_convert_reads_gs_but_refuses_another_url_as_src(tmp_path, monkeypatch, capsys):
    from lvm_jax.convert.__main__ import main

    monkeypatch.chdir(tmp_path)
    assert main(["s3://b/model.safetensors", "converted"]) == 2
    err = capsys.readouterr().err
    assert "s3:// is not supported here (gs:// and local paths are)" in err and "Traceback" not in err


def test_lvm_bench_json_refuses_an_unsupported_url_before_it_measures(capsys):
    from lvm_jax.bench.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--model", "vit", "--variant", "Ti/16", "--json", "s3://b/bench.json"])
    assert e.value.code == 2 and "s3:// is not supported here" in capsys.readouterr().err


def test_from_a_training_run_only_its_newest_checkpoint_is_copied(tmp_path):
    run = tmp_path / "run"
    for name in ("checkpoints/3/state/a", "checkpoints/12/state/b", "checkpoints/12/data/c",
                 "compile_cache/cpu/d", "metrics.jsonl"):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("x")
    got = [os.fspath(p.relative_to(run)) for p in workdir.files_to_read(workdir.as_path(run))]
    assert got == ["checkpoints/12/data/c", "checkpoints/12/state/b"]
    got = [os.fspath(p.relative_to(run)) for p in workdir.files_to_read(workdir.as_path(run / "checkpoints"))]
    assert got == ["checkpoints/12/data/c", "checkpoints/12/state/b"]
    converted = tmp_path / "converted"  # not a training run: every file
    (converted / "params" / "x").mkdir(parents=True)
    (converted / "model.json").write_text("{}")
    (converted / "params" / "x" / "y").write_text("1")
    got = [os.fspath(p.relative_to(converted)) for p in workdir.files_to_read(workdir.as_path(converted))]
    assert got == ["model.json", "params/x/y"]


def test_from_a_bucket_run_an_unfinished_newest_checkpoint_is_skipped(gcs_in_process):
    # orbax writes a bucket checkpoint into <step>/ and adds commit_success.txt last: step 12 was
    # being saved when the run was preempted.
    for name in ("checkpoints/3/state/a", "checkpoints/3/commit_success.txt", "checkpoints/12/state/b"):
        gcs_in_process.pipe(f"{BUCKET}/run/{name}", b"x")
    got = [os.fspath(p.relative_to(workdir.as_path(f"gs://{BUCKET}/run")))
           for p in workdir.files_to_read(workdir.as_path(f"gs://{BUCKET}/run"))]
    assert got == ["checkpoints/3/commit_success.txt", "checkpoints/3/state/a"]
    # Only an unfinished step: the whole run (compile cache too) was copied for a reader to fail on.
    for name in ("checkpoints/5/state/a", "compile_cache/cpu/x"):
        gcs_in_process.pipe(f"{BUCKET}/run2/{name}", b"x")
    with pytest.raises(UserError, match=r"run2/checkpoints holds no finished checkpoint \(unfinished: 5\)"):
        workdir.files_to_read(workdir.as_path(f"gs://{BUCKET}/run2"))
