"""`lvm-bench`: JIT-compiled step benchmarks with MFU, side by side with PyTorch.

  lvm-bench --model vit --variant S/16 --batch 32 --res 224 --mode train --dtype float32 --compare torch
  lvm-bench --model clip --variant B/16 --batch 256 --dtype bfloat16 --attention cudnn --json clip.json
  lvm-bench --model dinov2 --variant S/14 --batch 64 --dtype bfloat16
  lvm-bench --model data --batch 64 --res 224            # the input pipeline's own img/s
  lvm-bench --model data --data-source webdataset --data-path 'gs://b/laion/{00000..00009}.tar' --workers 8
  lvm-bench --suite gpu --json results.json              # the H100/H200 suite (scripts/gpu_suite.sh)

Each run: compile once (AOT), `--warmup` steps, then `--steps` timed steps
(each waits for its results), interleaved step by step with the PyTorch
model when comparing, so both see the same machine load. Reported: median /
min / max `step_ms`, `img_per_s`, `compile_s`, `tflops` (analytic model
FLOPs per second, lvm_jax/flops.py; XLA's own count alongside), `mfu`
(against the chip's peak from a table, or on CPU against a large matmul
measured in the same run) and `peak_mem_gb`.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Any

MODELS = ("vit", "clip", "dinov2", "data")
DEFAULT_VARIANT = {"vit": "S/16", "clip": "B/16", "dinov2": "S/14", "data": "S/16"}
MODES = ("fwd", "train")
DTYPES = ("float32", "bfloat16")
REMATS = ("none", "full", "dots")
ATTENTIONS = ("xla", "cudnn", "auto")
MESH_AXES = ("data", "fsdp", "tensor")


class BenchError(Exception):
  """A bad flag combination, reported as one line (exit status 2)."""


def parse_mesh(text: str) -> tuple[tuple[str, int], ...]:
  """'data=-1,fsdp=2' -> (('data', -1), ('fsdp', 2))."""
  items = []
  for part in filter(None, (p.strip() for p in text.split(","))):
    name, sep, value = part.partition("=")
    if not sep or name not in MESH_AXES:
      raise BenchError(f"--mesh {text!r}: each entry must be AXIS=SIZE with AXIS in {MESH_AXES}, "
                       "e.g. --mesh data=-1,fsdp=1,tensor=1.")
    try:
      items.append((name, int(value)))
    except ValueError:
      raise BenchError(f"--mesh {text!r}: size {value!r} of axis {name!r} is not an integer.") from None
  if not items:
    raise BenchError("--mesh is empty; give e.g. --mesh data=-1.")
  return tuple(items)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="lvm-bench", description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
  p.add_argument("--model", choices=MODELS, help="what to benchmark (data = the synthetic input pipeline)")
  p.add_argument("--variant", help="ViT size/patch, e.g. S/16, B/16, L/14 (default: S/16; clip B/16; dinov2 S/14)")
  p.add_argument("--batch", type=int, default=32, help="global batch size (default 32)")
  p.add_argument("--res", type=int, default=224, help="image resolution in pixels (default 224)")
  p.add_argument("--mode", choices=MODES, default="train", help="fwd = inference forward; train = full step")
  p.add_argument("--dtype", choices=DTYPES, default="float32",
                 help="compute dtype; parameters and optimizer state stay float32")
  p.add_argument("--mesh", default="data=-1", help="mesh sizes, e.g. data=-1,fsdp=1,tensor=1 (-1 = the rest)")
  p.add_argument("--remat", choices=REMATS, default="none", help="rematerialisation policy of the encoder blocks")
  p.add_argument("--attention", choices=ATTENTIONS, default="xla",
                 help="attention implementation (cudnn = cuDNN flash attention, GPU + bfloat16)")
  p.add_argument("--scan-layers", action="store_true", help="scan over the encoder blocks (faster compiles)")
  p.add_argument("--compare", choices=("torch",), help="also time the PyTorch model (timm / open_clip)")
  p.add_argument("--torch-compile", choices=("auto", "on", "off"), default="auto",
                 help="torch.compile the PyTorch model (auto: on for CUDA, off on CPU)")
  p.add_argument("--steps", type=int, default=10, help="timed steps (default 10; the median is reported)")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation (default 2)")
  p.add_argument("--workers", type=int, default=0, help="--model data: grain worker processes (default 0)")
  p.add_argument("--data-source", default="synthetic",
                 help="--model data: a config.data.source (synthetic, folder, captions, webdataset, tfds, ...)")
  p.add_argument("--data-path", help="--model data: its config.data.path (a local path, gs:// or s3:// URL)")
  p.add_argument("--data-name", help="--model data --data-source tfds: the TFDS data set name (config.data.name)")
  p.add_argument("--read-threads", type=int, default=8,
                 help="--model data: records read in flight (config.data.read_threads; default 8)")
  p.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH (and a bar chart to PATH.png)")
  p.add_argument("--no-plot", action="store_true", help="--json without the PNG (the suite's row processes)")
  p.add_argument("--suite", choices=("gpu",), help="run a predefined suite (gpu: ViT-B/L, CLIP-B, DINOv2-S/L)")
  p.add_argument("--budget-s", type=float, default=330.0, help="--suite: wall-clock budget in seconds")
  p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
  return p


def validate(args: argparse.Namespace) -> None:
  """Flag checks that need no jax: one clear sentence per mistake."""
  if args.suite:
    return
  if not args.model:
    raise BenchError("choose what to benchmark with --model vit|clip|dinov2|data (or run --suite gpu).")
  args.variant = args.variant or DEFAULT_VARIANT[args.model]
  from lvm_jax.models.vit import parse_variant

  try:
    patch = parse_variant(args.variant)[4]
  except ValueError as e:
    raise BenchError(str(e)) from None
  if patch is None:
    raise BenchError(f"--variant {args.variant!r} has no patch size; give SIZE/PATCH, e.g. {args.variant}/16.")
  if args.batch < 1 or args.res < 1:
    raise BenchError(f"--batch and --res must be positive, got --batch {args.batch} --res {args.res}.")
  if args.model != "data" and args.res % patch:
    raise BenchError(f"--res {args.res} is not a multiple of the patch size {patch} of {args.variant}; "
                     f"use e.g. --res {max(patch, args.res // patch * patch)}.")
  if args.steps < 1 or args.warmup < 0:
    raise BenchError(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}.")
  if args.model != "data" and (args.data_source != "synthetic" or args.data_path or args.data_name):
    raise BenchError("--data-source/--data-path choose the input of --model data; the model benchmarks "
                     "feed device-resident synthetic batches.")
  if args.data_source == "tfds" and not args.data_name:
    raise BenchError("--data-source tfds needs --data-name (e.g. imagenet2012) and, unless the data set is in "
                     "~/tensorflow_datasets, --data-path DATA_DIR.")
  if args.data_source not in ("synthetic", "tfds") and not args.data_path:
    raise BenchError(f"--data-source {args.data_source} needs --data-path (a folder, caption file or shard "
                     "glob; local, gs:// or s3://).")
  if args.read_threads < 1 or args.workers < 0:
    raise BenchError(f"--read-threads must be >= 1 and --workers >= 0, got {args.read_threads} and {args.workers}.")
  if args.model == "data" and args.compare:
    raise BenchError("--compare torch needs a model; --model data times only the input pipeline.")
  if args.attention == "cudnn" and args.dtype == "float32":
    raise BenchError("--attention cudnn needs --dtype bfloat16 (cuDNN flash attention has no float32 kernel).")
  args.mesh_spec = parse_mesh(args.mesh)
  if args.json:  # a bad --json URL fails now, not after the benchmark ran
    from lvm_jax.workdir import as_path

    as_path(args.json, what="--json")


def main(argv: list[str] | None = None) -> int:
  from lvm_jax.host_memory import configure_host_allocator

  parser = build_parser()
  args = parser.parse_args(argv)
  try:
    # Before JAX allocates anything: XLA:CPU's large step buffers stay mapped between steps
    # (lvm_jax/host_memory.py); the same setting covers PyTorch under --compare torch.
    configure_host_allocator()
    validate(args)
    if args.suite:
      from lvm_jax.bench.suite import run_suite

      return run_suite(args)
    if args.compare:
      # JAX preallocates 75% of GPU memory; leave room for PyTorch in the same process.
      os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
    payload = run(args)
  except BenchError as e:
    parser.error(str(e))
  except ValueError as e:  # lvm_jax's UserError and the models' config errors: one clear sentence each
    parser.error(str(e))
  print_report(payload)
  if args.json:
    from lvm_jax.bench.measure import write_json

    from lvm_jax.bench.plot import png_path, save_results_plot

    write_json(args.json, payload)
    plotted = None if args.no_plot else save_results_plot(payload, png_path(args.json))
    print(f"wrote {args.json}" + (f" and {plotted}" if plotted else ""))
  return 0


def spec_from_args(args: argparse.Namespace):
  """The workload `Spec` (lvm_jax.bench.jax_workloads) that validated command-line `args` describe."""
  from lvm_jax.bench import jax_workloads as J

  return J.Spec(model=args.model, variant=args.variant, batch=args.batch, res=args.res, mode=args.mode,
                dtype=args.dtype, mesh=args.mesh_spec, remat=args.remat, attention=args.attention,
                scan_layers=args.scan_layers, seed=args.seed)


def run(args: argparse.Namespace) -> dict[str, Any]:
  """Builds, times and summarises the requested benchmark; returns the JSON payload."""
  import jax

  from lvm_jax import sharding
  from lvm_jax.bench import jax_workloads as J
  from lvm_jax.bench import measure as M

  spec = spec_from_args(args)
  payload: dict[str, Any] = {"schema": M.SCHEMA, "spec": _spec_dict(spec), "results": [], "ratios": []}
  if args.model == "data":
    workloads = [J.build_data(spec, workers=args.workers, source=args.data_source, path=args.data_path,
                              name=args.data_name, read_threads=args.read_threads)]
    peak, peak_source = None, "n/a (input pipeline)"
  else:
    mesh = sharding.make_mesh(spec.mesh_dict)
    workloads = [_build_jax(J, spec, mesh)]
    spec = workloads[0].spec
    payload["spec"] = _spec_dict(spec)
    torch_error = None
    if args.compare == "torch":
      from lvm_jax.bench import torch_workloads as T

      check_compare_devices(jax.default_backend(), jax.device_count())
      try:
        compile_ = args.torch_compile == "on" or (args.torch_compile == "auto" and jax.default_backend() == "gpu")
        workloads.append(T.build(spec, workloads[0].flops_per_step, compile_))
      except T.TorchMissing as e:
        torch_error = str(e)
        print(f"lvm-bench: {e} Timing JAX only.", file=sys.stderr)
      payload["torch_error"] = torch_error
    peak, peak_source = _peak(spec.dtype)
  probe = M.cpu_matmul_probe(spec.dtype) if peak is None and jax.default_backend() == "cpu" \
      and args.model != "data" else None
  probes = M.time_workloads(workloads, args.steps, args.warmup, probe)
  if probes:
    # Median of probes taken between the steps: on a shared host it sees the same load as the
    # steps (a quiet host gives the best case anyway); the best probe is reported too.
    peak = statistics.median(probes)
    payload["peak_tflops_best"] = round(max(probes), 4)
    peak_source = (f"measured: jitted {M.CPU_PEAK_SIZE}^3 {spec.dtype} matmul, median of {len(probes)} "
                   "probes interleaved with the timed steps")
  payload["env"] = M.environment()
  payload["peak_tflops"] = round(peak, 4) if peak else None
  payload["peak_source"] = peak_source
  for w in workloads:
    row = {**_spec_dict(spec), **M.summarize(w, peak)}
    payload["results"].append(row)
  jax_row = payload["results"][0]
  for row in payload["results"][1:]:
    payload["ratios"].append({"label": f"{spec.model} {spec.variant} {spec.mode} {spec.dtype} b{spec.batch}",
                              "baseline": row["impl"], "ratio": round(jax_row["img_per_s"] / row["img_per_s"], 4)})
  return payload


def check_compare_devices(backend: str, device_count: int) -> None:
  """PyTorch runs the whole batch on one accelerator; JAX would use all of them, and both rows
  would be divided by every chip's peak. (On CPU both use the same cores.)"""
  if backend != "cpu" and device_count > 1:
    raise BenchError(f"--compare torch runs PyTorch on one {backend.upper()} while JAX sees {device_count}; "
                     "make one visible (e.g. CUDA_VISIBLE_DEVICES=0) for a like-for-like comparison.")


def _build_jax(J, spec, mesh):
  """Builds and compiles the JAX step; a cuDNN attention that does not compile falls back to XLA's."""
  import dataclasses

  try:
    workload = J.build(spec, mesh)
  except Exception as e:  # noqa: BLE001 - any cuDNN lowering/compile failure
    if spec.attention != "cudnn" or isinstance(e, ValueError):
      raise
    spec = dataclasses.replace(spec, attention="xla")
    workload = J.build(spec, mesh)
    workload.notes.append(f"cuDNN attention failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                          "ran attention='xla'")
  workload.spec = spec
  return workload


def _peak(dtype: str) -> tuple[float | None, str]:
  """The chip's table peak, or (None, ...) on CPU, where it is measured during the run."""
  import jax

  from lvm_jax.bench import measure as M

  if jax.default_backend() == "cpu":
    return None, "measured"
  kind = jax.devices()[0].device_kind
  peak = M.device_peak_tflops(kind, dtype)
  # GPUs run float32 dots as TF32 at JAX's default precision, and the table holds that peak.
  label = "TF32 (float32 at JAX's default precision)" if dtype == "float32" and jax.default_backend() == "gpu" \
      else dtype
  return (peak * jax.device_count() if peak else None,
          f"table: {kind} dense {label} peak x {jax.device_count()} devices" if peak else
          f"unknown device {kind!r}: no peak in lvm_jax.bench.measure.DEVICE_PEAK_TFLOPS, MFU omitted")


def _spec_dict(spec) -> dict[str, Any]:
  return {"model": spec.model, "variant": spec.variant, "mode": spec.mode, "dtype": spec.dtype,
          "batch": spec.batch, "res": spec.res, "mesh": dict(spec.mesh), "remat": spec.remat,
          "attention": spec.attention, "scan_layers": spec.scan_layers}


def print_report(payload: dict[str, Any]) -> None:
  from lvm_jax.bench import measure as M

  print(M.markdown_table(payload["results"]))
  for line in M.ratio_lines(payload.get("ratios", [])):
    print(line)
  if payload.get("peak_tflops"):
    jax_row = payload["results"][0]
    mfu = jax_row.get("mfu")
    print(f"peak {payload['peak_tflops']:.4g} TFLOP/s ({payload['peak_source']}); "
          f"{jax_row['framework']} MFU {100 * mfu:.1f}%" if mfu is not None else "")
  for row in payload["results"]:
    for note in row.get("notes", []):
      print(f"note [{row['framework']}]: {note}")
  env = payload.get("env", {})
  if env:
    print(f"device: {env.get('device_kind')} x{env.get('device_count')} ({env.get('backend')}), "
          f"jax {env.get('jax')}, load average {env.get('load_average')}")
    if env.get("host_malloc"):
      print(f"host allocator: {env['host_malloc']} (LVM_JAX_HOST_MALLOC)")


if __name__ == "__main__":
  sys.exit(main())
