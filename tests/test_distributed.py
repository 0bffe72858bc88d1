"""2 processes x 4 CPU devices (jax.distributed on localhost) == 1 process x 8 devices."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from tests.helpers import ROOT

SCRIPT = str(ROOT / "tests" / "scripts" / "distributed_step.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(num_processes: int, devices_per_process: int, script: str = SCRIPT) -> dict:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}"}
    procs = [subprocess.Popen([sys.executable, script, str(num_processes), str(i), str(port)], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(num_processes)]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, f"process failed:\n{err[-3000:]}"
            outs.append(out)
    finally:
        for p in procs:
            p.kill()
    return json.loads(outs[0].strip().splitlines()[-1])


@pytest.mark.slow
def test_two_processes_match_one_process():
    single = _launch(1, 8)
    multi = _launch(2, 4)
    assert single["devices"] == multi["devices"] == 8
    assert multi["processes"] == 2
    assert multi["loss"] == pytest.approx(single["loss"], rel=1e-5)
    assert multi["checksum"] == pytest.approx(single["checksum"], rel=1e-5)


@pytest.mark.slow
def test_to_host_gathers_an_array_sharded_across_processes():
    """DINOv2's attention pictures read the teacher on process 0 with jax.device_get, which fails once an
    fsdp axis spans hosts; sharding.to_host (every process calls it) all-gathers instead."""
    multi = _launch(2, 4, str(ROOT / "tests" / "scripts" / "to_host.py"))
    assert multi["processes"] == 2 and not multi["fully_addressable"]
    assert multi["device_get_fails"], "device_get of a cross-host array worked: the gather may be unneeded"
    assert multi["sum"] == float(sum(range(48)))
