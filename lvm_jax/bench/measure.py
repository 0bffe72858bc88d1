"""Timing, device peaks, memory and the report (markdown table + JSON) of `lvm-bench`.

Nothing here imports jax or torch at module level: `lvm-bench --help` and the
CLI's argument errors stay instant.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from lvm_jax import host_memory

SCHEMA = "lvm-bench/1"

# Dense peak TFLOP/s per chip: (bfloat16, float32). GPU float32 is the TF32
# tensor-core peak, which is what XLA uses for float32 dots at JAX's default
# precision; TPUs run float32 dots as bfloat16 passes at default precision,
# so their float32 entry is the bfloat16 peak. Matched against
# `device.device_kind` by substring, longest key first.
DEVICE_PEAK_TFLOPS: dict[str, tuple[float, float]] = {
    "TPU v4": (275.0, 275.0),
    "TPU v5 lite": (197.0, 197.0),  # v5e
    "TPU v5e": (197.0, 197.0),
    "TPU v5p": (459.0, 459.0),
    "TPU v5": (459.0, 459.0),  # v5p reports "TPU v5"
    "TPU v6 lite": (918.0, 918.0),  # v6e / Trillium
    "TPU v6e": (918.0, 918.0),
    "A100": (312.0, 156.0),
    "H100 PCIe": (756.0, 378.0),
    "H100 NVL": (835.5, 417.5),  # datasheet 1671 / 835 TFLOP/s are with sparsity
    "H100": (989.0, 494.7),  # SXM / HBM3
    "H200 NVL": (835.5, 417.5),
    "H200": (989.0, 494.7),
    "TPU v4 lite": (138.0, 138.0),  # v4i, the inference chip: "TPU v4" would give it 275
}


def device_peak_tflops(device_kind: str, dtype: str) -> float | None:
  """Dense matmul peak of one chip named `device_kind` for `dtype` ('bfloat16' | 'float32'), or None."""
  for key in sorted(DEVICE_PEAK_TFLOPS, key=len, reverse=True):
    if key.lower() in device_kind.lower():
      bf16, f32 = DEVICE_PEAK_TFLOPS[key]
      return bf16 if dtype in ("bfloat16", "float16") else f32
  return None


@dataclasses.dataclass
class Workload:
  """One benchmarked step: `run()` executes a step and waits for it to finish."""
  framework: str  # 'jax' | 'torch' | 'grain'
  run: Callable[[], None]
  images_per_step: int
  flops_per_step: float | None  # analytic model FLOPs
  compile_s: float
  xla_flops_per_step: float | None = None  # XLA cost analysis (whole program, elementwise included)
  peak_mem: Callable[[], float | None] = lambda: None  # GB
  mem_source: str = ""
  impl: str = ""  # which step was measured, e.g. 'train.tasks.supervised'
  notes: list[str] = dataclasses.field(default_factory=list)
  times: list[float] = dataclasses.field(default_factory=list)
  spec: Any = None  # the configuration that actually ran (may differ from the request, see notes)


def time_workloads(workloads: list[Workload], steps: int, warmup: int,
                   probe: Callable[[], float] | None = None) -> list[float]:
  """Warms every workload up, then times `steps` steps of each, interleaved step by step.

  Interleaving puts the frameworks under the same machine load (the CPU of a
  shared host changes from second to second), so their ratio is fair even
  when absolute numbers are not. Each step blocks until its results exist.
  `probe` (the CPU matmul peak) runs once per round, so it sees the same load
  as the steps; returns its results.
  """
  for w in workloads:
    for _ in range(warmup):
      w.run()
  probes = []
  for _ in range(steps):
    for w in workloads:
      start = time.perf_counter()
      w.run()
      w.times.append(time.perf_counter() - start)
    if probe is not None:
      probes.append(probe())
  return probes


def summarize(w: Workload, peak_tflops: float | None) -> dict[str, Any]:
  """Metrics of a timed workload (DESIGN.md names: step_ms, img_per_s, compile_s, tflops, mfu, peak_mem_gb)."""
  median = statistics.median(w.times)
  tflops = w.flops_per_step / median / 1e12 if w.flops_per_step else None
  return {
      "framework": w.framework,
      "impl": w.impl,
      "step_ms": round(median * 1e3, 3),
      "step_ms_min": round(min(w.times) * 1e3, 3),
      "step_ms_max": round(max(w.times) * 1e3, 3),
      "img_per_s": round(w.images_per_step / median, 3),
      "compile_s": round(w.compile_s, 3),
      "tflop_per_step": _sig(w.flops_per_step / 1e12 if w.flops_per_step else None),
      "xla_tflop_per_step": _sig(w.xla_flops_per_step / 1e12 if w.xla_flops_per_step else None),
      "tflops": _sig(tflops),
      "mfu": _round(tflops / peak_tflops if (tflops and peak_tflops) else None, 4),
      "peak_mem_gb": _round(w.peak_mem(), 3),
      "mem_source": w.mem_source,
      "steps_timed": len(w.times),
      "notes": list(w.notes),
  }


def _round(x: float | None, digits: int) -> float | None:
  return None if x is None else round(float(x), digits)


def _sig(x: float | None, digits: int = 5) -> float | None:
  """`digits` significant digits: a tiny model's TFLOP counts keep their precision (0.0000341, not 0.000034)."""
  return None if x is None else float(f"{float(x):.{digits}g}")


def rss_peak_gb() -> float:
  """Peak resident set size of this process so far (Linux reports KiB, macOS bytes)."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak / (1 << 30) if sys.platform == "darwin" else peak * 1024 / (1 << 30)


def jax_peak_mem_gb() -> tuple[float | None, str]:
  """(peak GB, source): device memory_stats where the backend has them, else process RSS."""
  import jax

  stats = jax.local_devices()[0].memory_stats()
  if stats and "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"] / (1 << 30), "device memory_stats peak_bytes_in_use"
  return rss_peak_gb(), "process peak RSS (CPU backend has no device memory stats)"


CPU_PEAK_SIZE = 2048


def cpu_matmul_probe(dtype: str, size: int = CPU_PEAK_SIZE) -> Callable[[], float]:
  """`probe() -> TFLOP/s` of one jitted `size`^3 matmul in `dtype` (best of 3 back-to-back calls).

  The CPU has no datasheet peak here: MFU on CPU is measured against what
  XLA's own matmul reaches on this machine, in the same run.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np

  dt = jnp.dtype(dtype)
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.standard_normal((size, size), np.float32)).astype(dt)
  b = jnp.asarray(rng.standard_normal((size, size), np.float32)).astype(dt)
  matmul = jax.jit(jnp.dot)
  matmul(a, b).block_until_ready()

  def probe() -> float:
    best = float("inf")
    for _ in range(3):
      start = time.perf_counter()
      matmul(a, b).block_until_ready()
      best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12

  return probe


def load_average() -> list[float] | None:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


def environment() -> dict[str, Any]:
  """Versions and machine facts recorded with every result."""
  import jax

  dev = jax.devices()[0]
  env = {
      "python": platform.python_version(),
      "jax": jax.__version__,
      "backend": jax.default_backend(),
      "device_kind": dev.device_kind,
      "device_count": jax.device_count(),
      "process_count": jax.process_count(),
      "cpu_count": os.cpu_count(),
      "load_average": load_average(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "host_malloc": host_memory.applied(),
  }
  from lvm_jax.models import perf

  env["impl_switches"] = perf.current()
  try:
    import flax

    env["flax"] = flax.__version__
  except ImportError:
    pass
  if "torch" in sys.modules:
    env["torch"] = sys.modules["torch"].__version__
  return env


# ----------------------------------------------------------------------------- report

COLUMNS = [("framework", "framework"), ("model", "model"), ("variant", "variant"), ("mode", "mode"),
           ("dtype", "dtype"), ("batch", "batch"), ("res", "res"), ("img_per_s", "img/s"),
           ("step_ms", "step ms (median)"), ("step_ms_min", "min"), ("step_ms_max", "max"),
           ("compile_s", "compile s"), ("tflops", "TFLOP/s"), ("mfu", "MFU"), ("peak_mem_gb", "peak GB")]


def markdown_table(rows: list[dict[str, Any]]) -> str:
  """The results as a GitHub markdown table (missing values as '-')."""
  def cell(key: str, value: Any) -> str:
    if value is None:
      return "-"
    if key == "mfu":
      return f"{100 * value:.1f}%"
    if isinstance(value, float):
      return f"{value:.3g}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)

  head = "| " + " | ".join(title for _, title in COLUMNS) + " |"
  rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
  body = ["| " + " | ".join(cell(k, r.get(k)) for k, _ in COLUMNS) + " |" for r in rows]
  return "\n".join([head, rule, *body])


def ratio_lines(ratios: list[dict[str, Any]]) -> list[str]:
  return [f"{r['label']}: jax / {r['baseline']} img/s = {r['ratio']:.3f}x" for r in ratios]


def write_json(path: str, payload: dict[str, Any]) -> None:
  """Writes the results to a local path or a gs:// URL, whole (a reader never sees half a file)."""
  from lvm_jax.workdir import as_path, write_whole

  write_whole(as_path(path, what="--json"), json.dumps(payload, indent=2, sort_keys=False))
