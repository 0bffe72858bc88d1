"""Kill and resume: N steps straight == (SIGKILL mid-run, SIGTERM mid-run, rerun to N), bitwise."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lvm_jax.errors import PREEMPTED_EXIT_CODE
from tests.helpers import ROOT

CONFIG = "tests/configs/tiny_vit.py"
ARGS = ["--config.total_steps=12", "--config.ckpt_every=3", "--config.log_every=1",
        "--config.data.synthetic.num_train=96"]  # 96 rows / 16 per batch: epochs wrap during the run


def _cmd(workdir):
    # Every run of a test shares one XLA compile cache: the first compiles, the restarts load (and the
    # bitwise comparison below then also covers a loaded executable against a freshly compiled one).
    cache = f"--config.compile_cache_dir={workdir.parent / 'compile_cache'}"
    return [sys.executable, "-m", "train", "--config", CONFIG, "--workdir", str(workdir), *ARGS, cache]


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}


def _run(workdir):
    proc = subprocess.run(_cmd(workdir), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _run_until(workdir, ready, sig):
    """Starts a run, waits until `ready()` holds, sends `sig`, returns the exit code."""
    proc = subprocess.Popen(_cmd(workdir), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "run finished before it could be interrupted: " + proc.stderr.read()[-2000:]
    proc.send_signal(sig)
    proc.wait(timeout=120)
    return proc.returncode


def _steps_logged(workdir):
    f = workdir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in f.read_text().splitlines()] if f.exists() else []


def _checkpoints(workdir):
    d = workdir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def _load(workdir, step):
    return ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")


@pytest.mark.slow
def test_kill_and_resume_is_bitwise_exact(tmp_path):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    _run(straight)

    # SIGKILL once the first checkpoint exists: whatever was in flight is lost.
    rc = _run_until(broken, lambda: bool(_checkpoints(broken)), signal.SIGKILL)
    assert rc == -signal.SIGKILL
    killed_at = _checkpoints(broken)[-1]
    # SIGTERM after the resumed run made progress: it saves and exits 143 (unfinished, retry me).
    logged = len(_steps_logged(broken))
    rc = _run_until(broken, lambda: len(_steps_logged(broken)) >= logged + 2, signal.SIGTERM)
    assert rc == PREEMPTED_EXIT_CODE
    assert _checkpoints(broken)[-1] > killed_at
    _run(broken)

    a, b = _load(straight, 12), _load(broken, 12)
    leaves_a = jax.tree_util.tree_leaves_with_path(a)
    leaves_b = jax.tree_util.tree_leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for (path, x), y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))
    # The logged losses of the overlapping steps agree too (same data order after resume).
    loss = lambda w: {r["step"]: r["loss"] for r in map(json.loads, (w / "metrics.jsonl").read_text().splitlines())}
    la, lb = loss(straight), loss(broken)
    for step in (12, 11, 10):
        assert la[step] == lb[step]


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_saves_one_checkpoint_everywhere(tmp_path):
    """A preemption notice reaching one host only: both processes agree on a step, save it, exit 143.

    Each process once acted on its own SIGTERM: the signalled one waited at orbax's save barrier
    while the other waited in the next step's collectives, and neither ever finished.
    """
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    workdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "train", "--config", CONFIG, "--workdir", str(workdir), "--config.total_steps=100000",
           "--config.ckpt_every=0", "--config.eval_every=0", "--config.log_every=1", "--config.compile_cache_dir=none"]
    # stderr to files: an unread pipe fills with progress bars and blocks the writer.
    logs = [tmp_path / f"process{i}.log" for i in range(2)]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(logs[i], "w"),
                              env={**_env(), "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
                                   "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)})
             for i in range(2)]
    tails = lambda: "\n".join(log.read_text()[-2000:] for log in logs)  # noqa: E731
    try:
        deadline = time.time() + 300
        while len(_steps_logged(workdir)) < 3 and all(p.poll() is None for p in procs) and time.time() < deadline:
            time.sleep(0.1)
        assert all(p.poll() is None for p in procs), tails()
        procs[1].send_signal(signal.SIGTERM)  # the notice reaches process 1 only
        codes = [p.wait(timeout=180) for p in procs]
        assert codes == [PREEMPTED_EXIT_CODE] * 2, tails()
    finally:
        for p in procs:
            p.kill()
    saved = _checkpoints(workdir)
    assert len(saved) == 1 and 3 <= saved[0] < 100000, saved
    assert _steps_logged(workdir)[-1] == saved[0]  # the log ends at the saved step
    for log in logs:  # each process says where it stopped and how to go on
        assert f"preempted (SIGTERM): saved the checkpoint of step {saved[0]}/100000" in log.read_text()
