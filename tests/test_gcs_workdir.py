"""`--workdir gs://bucket/run`: a run in a bucket equals a local run, resumes, and lvm-eval reads it.

The bucket is a local GCS emulator (gcp-storage-emulator) that both clients the loop uses
talk to: gcsfs (etils' backend: config.json, metrics.jsonl, eval/*.json, plots) through
STORAGE_EMULATOR_HOST, and tensorstore (orbax's array writes) through TENSORSTORE_GCS_HTTP_URL.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import pytest

from tests.gcs_emulator import BUCKET, bucket, emulator, env as _env  # noqa: F401 (fixtures)
from tests.helpers import ROOT

CONFIG = "tests/configs/tiny_vit.py"
ARGS = ["--config.total_steps=6", "--config.ckpt_every=3", "--config.log_every=1", "--config.eval_every=3"]


def _cmd(module: str, workdir: str, args: list[str] = ARGS) -> list[str]:
    return [sys.executable, "-m", module, "--config", CONFIG, "--workdir", workdir, *args]


def _run(module: str, workdir: str, emulator: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(_cmd(module, workdir), cwd=ROOT, env=_env(emulator), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _run_pod(workdir: str, emulator: str, processes: int = 2, devices_each: int = 4) -> list[str]:
    """lvm-train as on a TPU pod: `processes` JAX processes (localhost coordinator) on one workdir."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen(_cmd("train", workdir), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=_env(emulator, devices_each, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                                  JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(i)))
             for i in range(processes)]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=600)
            assert p.returncode == 0, err[-3000:]
            outs.append(out)
    finally:
        for p in procs:
            p.kill()
    return outs


def _metrics(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


@pytest.mark.slow  # 60-90 s on 2 cores: four lvm-train/lvm-eval processes
def test_a_gs_workdir_run_equals_a_local_run_resumes_and_evaluates(tmp_path, emulator, bucket):
    local = tmp_path / "local"
    _run("train", str(local), emulator)
    run = f"gs://{BUCKET}/run"
    _run("train", run, emulator)
    root = f"{BUCKET}/run"
    assert bucket.exists(f"{root}/config.json") and bucket.exists(f"{root}/plots/train.png")
    assert sorted(p.rsplit("/", 1)[-1] for p in bucket.ls(f"{root}/checkpoints")) == ["3", "6"]

    # A preemption after step 3's checkpoint: the run had logged steps 4-6, step 6's checkpoint is lost.
    bucket.rm(f"{root}/checkpoints/6", recursive=True)
    resumed = _run("train", run, emulator)
    assert f"Resumed from {run}/checkpoints/3" in resumed.stdout
    # The compile cache lives in the bucket too (run/compile_cache/<machine>): the restart loads from it.
    loaded = re.search(rf"compile cache {run}/compile_cache/\S+: (\d+) of \d+ programs loaded", resumed.stdout)
    assert loaded and int(loaded.group(1)) > 0, resumed.stdout[-2000:]

    # Each step logged once (the lost steps' records replaced), with the local run's exact losses.
    want = _metrics((local / "metrics.jsonl").read_text())
    got = _metrics(bucket.cat(f"{root}/metrics.jsonl").decode())
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in got] == [r["loss"] for r in want]
    local_eval = json.loads((local / "eval" / "latest.json").read_text())
    assert json.loads(bucket.cat(f"{root}/eval/latest.json")) == local_eval

    # lvm-eval restores step 6 from the bucket: the same metrics as the local run's final eval.
    _run("train.evaluate", run, emulator)
    evaluated = json.loads(bucket.cat(f"{root}/eval/lvm_eval_step_00000006.json"))
    assert evaluated == local_eval


@pytest.mark.slow
def test_a_pod_of_two_processes_shares_one_gs_workdir_and_resumes_exactly(tmp_path, emulator, bucket):
    """A TPU pod's shape: 2 processes x 4 devices write one run into the bucket (one checkpoint, one
    metrics.jsonl, each process's data-iterator position), lose the last checkpoint, resume; the
    losses and final eval equal those of the same pod run straight through on a local disk."""
    straight = tmp_path / "straight"
    _run_pod(str(straight), emulator)
    run = f"gs://{BUCKET}/pod"
    _run_pod(run, emulator)
    root = f"{BUCKET}/pod"
    data_files = [p.rsplit("/", 1)[-1] for p in bucket.ls(f"{root}/checkpoints/3/data")]
    assert sorted(f for f in data_files if f.startswith("process_")) == ["process_0-of-2.json", "process_1-of-2.json"]
    bucket.rm(f"{root}/checkpoints/6", recursive=True)
    resumed = _run_pod(run, emulator)
    assert f"Resumed from {run}/checkpoints/3" in resumed[0]

    want = _metrics((straight / "metrics.jsonl").read_text())
    got = _metrics(bucket.cat(f"{root}/metrics.jsonl").decode())
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in got] == [r["loss"] for r in want]
    assert json.loads(bucket.cat(f"{root}/eval/latest.json")) == json.loads(
        (straight / "eval" / "latest.json").read_text())


def test_init_from_reads_converted_weights_from_a_bucket(tmp_path, emulator, bucket):
    """`--config.init_from=gs://...`: the converted checkpoint is copied locally and loaded exactly."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    import orbax.checkpoint as ocp

    from lvm_jax.convert.pretrained import save_converted
    from tests.helpers import tiny_supervised_config
    from train.tasks.common import build_vit

    config = tiny_supervised_config()
    model = build_vit(config.model, num_classes=10)
    variables = nn.meta.unbox(model.init(jax.random.PRNGKey(7), jnp.zeros((1, 16, 16, 3))))
    save_converted(tmp_path / "pretrained", model, variables, format="lvm", source="test")
    bucket.put(str(tmp_path / "pretrained"), f"{BUCKET}/weights/pretrained", recursive=True)

    # lr 0: the one step changes nothing, so the checkpoint holds exactly the loaded weights.
    workdir = tmp_path / "w"
    cmd = _cmd("train", str(workdir), [f"--config.init_from=gs://{BUCKET}/weights/pretrained", "--config.optim.lr=0.0",
                                       "--config.total_steps=1", "--config.ckpt_every=0",
                                       "--config.optim.warmup_steps=0", "--config.compile_cache_dir=none"])
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(emulator), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    restored = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / "1" / "state")
    got = jax.tree_util.tree_leaves_with_path(restored["params"])
    want = jax.tree_util.tree_leaves(variables["params"])
    assert len(got) == len(want)
    for (path, g), w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=jax.tree_util.keystr(path))
