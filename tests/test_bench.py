"""lvm-bench correctness: analytic FLOPs vs the dots XLA is given and its cost analysis, the JSON schema,
the device peak table, the suite driver and the CLI's one-line errors. No test looks at a timing."""
from __future__ import annotations

import json
import math
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lvm_jax import flops as F
from lvm_jax.bench import cli, measure, suite
from lvm_jax.bench import jax_workloads as J
from lvm_jax.models.clip import CLIP
from lvm_jax.models.heads import DINOiBOTHeads
from lvm_jax.models.vit import ViT

# ----------------------------------------------------------------------------- an independent FLOP counter

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\w+)\[([\d,]*)\]\S*\s+([\w\-]+)\((.*?)\)(.*)$")


def hlo_matmul_flops(hlo_text: str) -> int:
  """2 x MACs of every dot and convolution in an HLO module's text (shapes read from the text itself)."""
  shapes: dict[str, list[int]] = {}
  total = 0
  for line in hlo_text.splitlines():
    m = _INSTR.match(line)
    if not m:
      continue
    name, _, dims, op, operands, attrs = m.groups()
    out = [int(d) for d in dims.split(",") if d]
    shapes[name] = out
    args = re.findall(r"%?([\w.\-]+)(?:,|$)", operands.replace(" ", ""))
    if op == "dot":
      lhs = shapes[args[0]]
      contract = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", attrs).group(1)
      k = math.prod(lhs[int(i)] for i in contract.split(",") if i)
      total += 2 * math.prod(out) * k
    elif op == "convolution":
      rhs = shapes[args[1]]
      rhs_labels = re.search(r"dim_labels=\w+_(\w+)->", attrs).group(1)
      groups = re.search(r"feature_group_count=(\d+)", attrs)
      per_output = math.prod(size for size, label in zip(rhs, rhs_labels) if label not in "o")
      total += 2 * math.prod(out) * per_output // (int(groups.group(1)) if groups else 1)
  return total


def _hlo_dots(fn, *args) -> int:
  """Matmul FLOPs of the HLO JAX hands to XLA for `fn(*args)` (lowered, not compiled)."""
  return hlo_matmul_flops(jax.jit(fn).lower(*args).as_text(dialect="hlo"))


def _hlo_and_cost(fn, *args) -> tuple[int, float]:
  """(matmul FLOPs of the HLO, XLA's cost-analysis FLOPs of the compiled program)."""
  lowered = jax.jit(fn).lower(*args)
  cost = lowered.compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return hlo_matmul_flops(lowered.as_text(dialect="hlo")), float(cost["flops"])


def test_hlo_counter_counts_a_known_dot_and_conv():
  a, b = jnp.ones((2, 3, 4)), jnp.ones((2, 4, 5))
  dots, cost = _hlo_and_cost(lambda a, b: jnp.einsum("bij,bjk->bik", a, b), a, b)
  assert dots == cost == 2 * 2 * 3 * 5 * 4
  x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((4, 4, 3, 6))
  conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (4, 4), "VALID",  # noqa: E731
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
  assert _hlo_dots(conv, x, w) == 2 * (2 * 2 * 2 * 6) * (4 * 4 * 3)
  # the weight gradient is a convolution with other dim_labels: same MAC count
  assert _hlo_dots(jax.grad(lambda w: jnp.sum(conv(x, w))), w) == 2 * (2 * 2 * 2 * 6) * (4 * 4 * 3)


# ----------------------------------------------------------------------------- analytic FLOPs vs XLA

TINY_VIT = dict(variant=None, width=64, depth=2, num_heads=4, mlp_dim=256, patch_size=8, image_size=32,
                num_classes=10)


def attention_recompute(dims: F.TowerDims, batch: int, q_len: int, kv_len: int | None = None, blocks: int | None = None) -> int:
  """Dots the training step runs beyond the model FLOPs: the unmasked attention's backward recomputes
  QK^T (flash-attention style; lvm_jax.models.layers)."""
  kv_len = q_len if kv_len is None else kv_len
  inner = dims.num_heads * dims.head_dim
  blocks = dims.depth if blocks is None else blocks
  return blocks * 2 * batch * q_len * kv_len * inner


def _ce_grad(model, params, images, labels):
  def loss(p):
    logits = model.apply({"params": p}, images, train=True)["logits"]
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
  return jax.grad(loss)(params)


def _vit_case(**kw):
  model = ViT(**{**TINY_VIT, **kw})
  images = jnp.asarray(np.random.default_rng(0).normal(size=(3, 32, 32, 3)), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
  return model, params, images, jnp.arange(3) % 10


@pytest.mark.parametrize("kw", [dict(pool="gap"), dict(pool="cls", num_registers=2, rep_size=32),
                                dict(pool="gap", ffn="swiglu"), dict(pool="map"), dict(pool="map", mlp_dim=96)])
def test_vit_flops_match_the_dots_jax_emits(kw):
  model, params, images, labels = _vit_case(**kw)
  fwd = lambda p, x: model.apply({"params": p}, x)["logits"]  # noqa: E731
  assert F.vit_flops(model, 32, 3, train=False) == _hlo_dots(fwd, params, images)
  dims, tokens = F.vit_dims(model), 16 + 1 + model.num_registers
  extra = attention_recompute(dims, 3, tokens)
  if model.pool == "map":  # the MAP head's one-query attention recomputes too
    extra += attention_recompute(dims, 3, 1, tokens, blocks=1)
  assert F.vit_flops(model, 32, 3, train=True) + extra == _hlo_dots(lambda p: _ce_grad(model, p, images, labels), params)


def test_vit_flops_against_xla_cost_analysis():
  """XLA's cost analysis of the compiled program counts the same matmuls plus the elementwise
  work (norms, GELU, softmax), which is small next to them."""
  model, params, images, labels = _vit_case(pool="gap")
  params = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), params)
  fwd_dots, fwd_cost = _hlo_and_cost(lambda p, x: model.apply({"params": p}, x)["logits"], params, images)
  train_dots, train_cost = _hlo_and_cost(lambda p: _ce_grad(model, p, images, labels), params)
  assert fwd_dots <= fwd_cost <= 1.3 * fwd_dots
  assert train_dots <= train_cost <= 1.3 * train_dots


def test_xla_flop_count_is_per_step_and_omitted_for_scanned_layers():
  class Compiled:  # an SPMD executable: cost analysis of one device's module
    def cost_analysis(self):
      return {"flops": 10.0}

  notes = []
  assert J._cost_flops(Compiled(), J.Spec("vit", "Ti/16", 8, 32, "fwd", "float32"), 8, notes) == 80.0
  scanned = J.Spec("vit", "Ti/16", 8, 32, "fwd", "float32", scan_layers=True)
  assert J._cost_flops(Compiled(), scanned, 8, notes) is None and "scanned loop body once" in notes[0]


def test_vit_train_is_about_three_forwards():
  model = ViT(variant="S/16", num_classes=1000)
  fwd, train = F.vit_flops(model, 224, 1, False), F.vit_flops(model, 224, 1, True)
  assert 2.9 < train / fwd < 3.0
  # timm's published count for vit_small_patch16_224: 4.6 GMACs per image.
  assert abs(fwd / 2 / 1e9 - 4.6) < 0.05


def test_clip_flops_match_xla():
  from lvm_jax.objectives.contrastive import l2_normalize, softmax_contrastive_loss

  model = CLIP(embed_dim=32, vision=dict(variant=None, width=48, depth=2, num_heads=3, mlp_dim=96, patch_size=8,
                                         image_size=16),
               text=dict(vocab_size=100, context_length=12, width=32, depth=2, num_heads=2))
  batch = 4
  images = jnp.asarray(np.random.default_rng(0).normal(size=(batch, 16, 16, 3)), jnp.float32)
  tokens = jnp.asarray(np.random.default_rng(1).integers(1, 99, (batch, 12)), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.key(0), images, tokens)["params"]

  def loss(p):
    out = model.apply({"params": p}, images, tokens, train=True)
    return softmax_contrastive_loss(l2_normalize(out["image"]), l2_normalize(out["text"]),
                                    jnp.exp(out["logit_scale"]))

  fwd = lambda p: model.apply({"params": p}, images, tokens)  # noqa: E731
  logits = lambda p: (lambda o: l2_normalize(o["image"]) @ l2_normalize(o["text"]).T)(fwd(p))  # noqa: E731
  assert F.clip_flops(model, 16, 12, batch, train=False) == _hlo_dots(logits, params)
  extra = attention_recompute(F.vit_dims(model.bind({"params": params}).image_tower), batch, 4 + 1)
  assert F.clip_flops(model, 16, 12, batch, train=True) + extra == _hlo_dots(jax.grad(loss), params)
  # Without an image projection (SigLIP: embed_dim = the image width) the count drops that matmul.
  bare = CLIP(embed_dim=48, image_projection=False, vision=model.vision, text=model.text)
  bare_params = jax.eval_shape(bare.init, jax.random.key(0), images, tokens)["params"]
  bare_logits = lambda p: (lambda o: l2_normalize(o["image"]) @ l2_normalize(o["text"]).T)(  # noqa: E731
      bare.apply({"params": p}, images, tokens))
  assert F.clip_flops(bare, 16, 12, batch, train=False) == _hlo_dots(bare_logits, bare_params)


def test_dinov2_flops_match_the_bench_step_within_the_loss_matmuls():
  """The analytic count leaves out the loss-level products (DINO cross-entropy pairs, KoLeo Gram
  matrix): a fraction of a percent at the recipe's sizes, a few percent in this tiny model."""
  spec = J.Spec(model="dinov2", variant="Ti/14", batch=4, res=28, mode="train", dtype="float32")
  backbone = J.dinov2_backbone(spec)
  arrays, slots = J.dinov2_batch(spec, np.random.default_rng(0))
  expected = F.dinov2_flops(backbone, F.DinoHeadDims(192, J.DINO_PROTOTYPES), 28, J.DINO_LOCAL_SIZE,
                            J.DINO_LOCAL, slots, spec.batch)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
  captured = {}
  original = J.train_workload

  def capture(spec_, mesh_, init, step, batch, *rest):
    captured.update(init=init, step=step, batch=batch)
    raise _Stop

  J.train_workload = capture
  try:
    with pytest.raises(_Stop):
      J.build_dinov2(spec, mesh)
  finally:
    J.train_workload = original
  state = jax.eval_shape(lambda: jax.tree_util.tree_map(lambda x: x, _unbox(captured["init"](jax.random.key(0)))))
  lowered = jax.jit(captured["step"]).lower(state, {k: jnp.asarray(v) for k, v in arrays.items()})
  dots = hlo_matmul_flops(lowered.as_text(dialect="hlo"))
  assert expected <= dots <= 1.05 * expected


class _Stop(Exception):
  pass


def _unbox(tree):
  import flax.linen as nn
  return nn.meta.unbox(tree)


def test_dino_head_flops_count_every_layer():
  head = F.DinoHeadDims(input_dim=8, num_prototypes=50, hidden_dim=16, bottleneck_dim=4, num_layers=3)
  x = jnp.ones((5, 8))
  module = DINOiBOTHeads(num_prototypes=50, hidden_dim=16, bottleneck_dim=4, num_layers=3)
  params = jax.eval_shape(module.init, jax.random.key(0), x)["params"]
  dots = _hlo_dots(lambda p: module.apply({"params": p}, x)[0], params)
  assert F.dino_head_flops(head, 5) == dots


# ----------------------------------------------------------------------------- peaks

@pytest.mark.parametrize("kind,dtype,peak", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989.0), ("NVIDIA H100 PCIe", "bfloat16", 756.0),
    ("NVIDIA H200", "float32", 494.7), ("NVIDIA A100-SXM4-40GB", "float32", 156.0),
    ("TPU v5 lite", "bfloat16", 197.0), ("TPU v5", "bfloat16", 459.0), ("TPU v4", "float32", 275.0),
    ("TPU v6 lite", "bfloat16", 918.0), ("NVIDIA H100 NVL", "bfloat16", 835.5), ("NVIDIA H200 NVL", "float32", 417.5),
    ("TPU v4 lite", "bfloat16", 138.0), ("cpu", "float32", None)])
def test_device_peak_table(kind, dtype, peak):
  assert measure.device_peak_tflops(kind, dtype) == peak


# ----------------------------------------------------------------------------- CLI: JSON and errors

METRICS = ("img_per_s", "step_ms", "step_ms_min", "step_ms_max", "compile_s", "tflops", "mfu", "peak_mem_gb",
           "tflop_per_step", "xla_tflop_per_step", "framework", "impl", "notes")


@pytest.mark.slow  # 47 s: the default tier neared its ~15 min budget (CI runs the slow tier too)
def test_cli_json_schema_with_torch(tmp_path, capsys):
  pytest.importorskip("timm")
  out = tmp_path / "bench.json"
  assert cli.main(["--model", "vit", "--variant", "Ti/16", "--batch", "8", "--res", "32", "--mode", "fwd",
                   "--steps", "2", "--warmup", "0", "--compare", "torch", "--json", str(out)]) == 0
  text = capsys.readouterr().out
  assert "| framework |" in text and "MFU" in text and "jax / timm" in text
  payload = json.loads(out.read_text())
  assert payload["schema"] == "lvm-bench/1"
  assert "measured" in payload["peak_source"] and payload["peak_tflops"] > 0
  assert [r["framework"] for r in payload["results"]] == ["jax", "torch"]
  for row in payload["results"]:
    assert set(METRICS) <= set(row)
    assert row["step_ms_min"] <= row["step_ms"] <= row["step_ms_max"]
    assert row["img_per_s"] == pytest.approx(8 / (row["step_ms"] / 1e3), rel=1e-3)
    # TFLOP numbers keep 5 significant digits; MFU is rounded to 4 decimals (absolute tolerance).
    assert row["tflops"] == pytest.approx(row["tflop_per_step"] / (row["step_ms"] / 1e3), rel=1e-3)
    assert row["mfu"] == pytest.approx(row["tflops"] / payload["peak_tflops"], rel=1e-2, abs=2e-4)
    assert row["steps_timed"] == 2
  jax_row, torch_row = payload["results"]
  assert jax_row["tflop_per_step"] == torch_row["tflop_per_step"]
  # XLA's count of the whole step on the 8-device mesh (its SPMD count is per device): the dots + elementwise.
  assert jax.device_count() == 8
  assert jax_row["tflop_per_step"] <= jax_row["xla_tflop_per_step"] <= 1.3 * jax_row["tflop_per_step"]
  assert jax_row["peak_mem_gb"] > 0
  (ratio,) = payload["ratios"]
  assert ratio["ratio"] == pytest.approx(jax_row["img_per_s"] / torch_row["img_per_s"], rel=1e-3)
  assert payload["env"]["backend"] == "cpu"
  # lvm-bench sets the host allocator before anything runs and says which setting ran.
  assert payload["env"]["host_malloc"].split(":")[0] in ("retain", "system")
  assert "host allocator: " in text
  assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "and " + str(tmp_path / "bench.png") in text


def test_gpu_comparisons_are_like_for_like(monkeypatch):
  """float32 on a GPU is TF32 in both frameworks and named so; one GPU per framework."""
  from lvm_jax.bench import torch_workloads as T

  torch = pytest.importorskip("torch")
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(jax, "devices", lambda: [type("Device", (), {"device_kind": "NVIDIA H100 80GB HBM3"})()])
  monkeypatch.setattr(jax, "device_count", lambda: 1)
  peak, label = cli._peak("float32")
  assert peak == pytest.approx(494.7) and "TF32" in label
  assert "TF32" not in cli._peak("bfloat16")[1]
  with pytest.raises(cli.BenchError, match="CUDA_VISIBLE_DEVICES"):
    cli.check_compare_devices("gpu", 8)
  cli.check_compare_devices("cpu", 8)  # on CPU both frameworks use the same cores
  precision = torch.get_float32_matmul_precision()
  try:
    assert T.match_jax_precision(torch, "cpu", "float32") is None and T.match_jax_precision(
        torch, "cuda", "bfloat16") is None
    assert torch.get_float32_matmul_precision() == precision
    assert "TF32" in T.match_jax_precision(torch, "cuda", "float32")
    assert torch.get_float32_matmul_precision() == "high"
  finally:
    torch.set_float32_matmul_precision(precision)


def test_missing_torch_module_is_one_clear_message(monkeypatch):
  from lvm_jax.bench import torch_workloads as T

  monkeypatch.setitem(sys.modules, "open_clip", None)  # makes `import open_clip` raise ImportError
  with pytest.raises(T.TorchMissing, match=r"needs open_clip.*pip install open_clip_torch"):
    T.import_torch("open_clip")


def test_data_pipeline_benchmark(tmp_path):
  pytest.importorskip("grain")
  out = tmp_path / "data.json"
  assert cli.main(["--model", "data", "--batch", "8", "--res", "32", "--steps", "2", "--warmup", "1",
                   "--json", str(out)]) == 0
  (row,) = json.loads(out.read_text())["results"]
  assert row["framework"] == "grain" and row["img_per_s"] > 0 and row["mfu"] is None


@pytest.mark.parametrize("argv,message", [
    ([], "choose what to benchmark"),
    (["--model", "vit", "--variant", "X/16"], "Unknown ViT variant"),
    (["--model", "vit", "--variant", "S"], "has no patch size"),
    (["--model", "vit", "--res", "100"], "not a multiple of the patch size 16"),
    (["--model", "vit", "--mesh", "data=2,pipe=1"], "--mesh"),
    (["--model", "vit", "--mesh", "data=x"], "is not an integer"),
    (["--model", "data", "--compare", "torch"], "--model data times only the input pipeline"),
    (["--model", "vit", "--data-source", "folder"], "choose the input of --model data"),
    (["--model", "data", "--data-source", "webdataset"], "needs --data-path"),
    (["--model", "data", "--data-source", "tfds"], "needs --data-name"),
    (["--model", "data", "--read-threads", "0"], "--read-threads must be >= 1"),
    (["--model", "vit", "--attention", "cudnn"], "needs --dtype bfloat16"),
    (["--model", "vit", "--steps", "0"], "--steps must be >= 1"),
    (["--model", "vit", "--variant", "Ti/16", "--res", "32", "--batch", "3", "--mesh", "data=8"],
     "not divisible by the data-parallel size 8"),
])
def test_cli_errors_are_one_line(argv, message, capsys):
  with pytest.raises(SystemExit) as exc:
    cli.main(argv)
  assert exc.value.code == 2
  err = capsys.readouterr().err
  assert message in err and "Traceback" not in err


# ----------------------------------------------------------------------------- the suite driver

def test_suite_merges_rows_skips_when_out_of_budget_and_survives_failures(tmp_path, monkeypatch):
  """Rows are stand-in processes here: the driver's bookkeeping is what is tested."""
  assert "--no-plot" in suite.row_command("vit", "B/16", 8, [], True, "r.json", 2, 1)  # rows draw no PNG
  # The CLIP row times open_clip eager (its torch.compile outran the row limit on the H200: the whole
  # row was lost), and its record says so.
  assert [r[4] for r in suite.GPU_ROWS if r[0] == "clip"] == [False]
  row = {"results": [{"framework": "jax", "model": "vit", "img_per_s": 10.0}], "ratios": [],
         "env": {"backend": "gpu"}, "peak_tflops": 989.0}
  script = "import json,sys; json.dump(%r, open(sys.argv[1], 'w'))" % row

  def fake_command(model, variant, batch, extra, torch_compile, json_path, steps, warmup):
    if model == "clip":  # a row that crashes
      return [sys.executable, "-c", "raise SystemExit(3)"]
    return [sys.executable, "-c", script, json_path]

  monkeypatch.setattr(suite, "row_command", fake_command)
  monkeypatch.setattr(suite, "GPU_ROWS", [("vit", "B/16", 8, [], True), ("clip", "B/16", 8, [], True),
                                          ("vit", "L/16", 8, [], True)])
  monkeypatch.setattr(suite, "MIN_ROW_S", 0.0)
  out = tmp_path / "suite.json"
  args = cli.build_parser().parse_args(["--suite", "gpu", "--json", str(out), "--budget-s", "120"])
  assert suite.run_suite(args) == 0
  payload = json.loads(out.read_text())
  assert [r["status"] for r in payload["rows"]] == ["ok", "failed (exit 3)", "ok"]
  assert len(payload["results"]) == 2
  assert (tmp_path / "suite.png").exists()
  # A chart that fails to draw stops nothing (the JSON is the result); row processes draw none.
  from lvm_jax.bench import plot

  monkeypatch.setattr(plot, "save_results_plot", lambda *a: 1 / 0)
  assert suite.run_suite(args) == 0
  assert [r["status"] for r in json.loads(out.read_text())["rows"]] == ["ok", "failed (exit 3)", "ok"]
  # Out of budget: every row is skipped, and the file still says why.
  monkeypatch.setattr(suite, "MIN_ROW_S", 1e9)
  assert suite.run_suite(args) == 0
  assert all(r["status"].startswith("skipped") for r in json.loads(out.read_text())["rows"])


def test_results_plot_groups_frameworks_per_benchmark_and_labels_ratios(tmp_path, monkeypatch):
  import matplotlib.axes

  from lvm_jax.bench import plot

  bars, labels = [], []
  orig_barh, orig_text = matplotlib.axes.Axes.barh, matplotlib.axes.Axes.text
  monkeypatch.setattr(matplotlib.axes.Axes, "barh", lambda self, y, w, *a, **kw: (
      bars.append((round(float(y), 3), w, kw.get("label"))), orig_barh(self, y, w, *a, **kw))[1])
  monkeypatch.setattr(matplotlib.axes.Axes, "text", lambda self, x, y, s, *a, **kw: (
      labels.append(s), orig_text(self, x, y, s, *a, **kw))[1])
  common = {"mode": "train", "dtype": "bfloat16", "res": 224}
  payload = {"env": {"device_kind": "NVIDIA H200", "device_count": 1, "jax": "0.11"}, "results": [
      {"framework": "jax", "impl": "lvm_jax", "model": "vit", "variant": "B/16", "batch": 256, "img_per_s": 3000.0,
       "mfu": 0.45, **common},
      {"framework": "torch", "impl": "timm", "model": "vit", "variant": "B/16", "batch": 256, "img_per_s": 2000.0,
       "mfu": 0.3, **common},
      {"framework": "jax", "impl": "lvm_jax", "model": "clip", "variant": "B/16", "batch": 256, "img_per_s": 1000.0,
       "mfu": None, **common}]}
  assert plot.png_path("out/suite.json") == "out/suite.png" and plot.png_path("r") == "r.png"
  assert plot.save_results_plot(payload, str(tmp_path / "r.png")) == str(tmp_path / "r.png")
  # The two ViT frameworks share group 0 (one bar above, one below), CLIP is group 1.
  assert bars == [(-0.2, 3000.0, "lvm_jax"), (0.2, 2000.0, "torch"), (1.0, 1000.0, None)]
  assert labels[0].startswith("3000 img/s, MFU 45.0%") and "(lvm_jax 1.50x)" in labels[1]
  assert labels[2].startswith("1000 img/s  [lvm_jax]")
  assert plot.save_results_plot({"results": [{"framework": "jax", "img_per_s": None}]}, str(tmp_path / "n.png")) is None


# ----------------------------------------------------------------------------- the model's fast paths

def test_fast_attention_layernorm_gelu_match_references_with_gradients():
  """The hand-written VJPs behind the benchmarked step (lvm_jax.models.layers) against autodiff of
  independent implementations: jax.nn.dot_product_attention, flax's LayerNorm, jax.nn.gelu."""
  import flax.linen as nn

  from lvm_jax.models import layers as L

  rng = np.random.default_rng(0)
  q, k, v, d_out = (jnp.asarray(rng.normal(size=(2, 7, 3, 8)), jnp.float32) for _ in range(4))
  ours = jax.vjp(lambda *a: L.dot_product_attention(*a, impl="xla"), q, k, v)
  ref = jax.vjp(lambda *a: jax.nn.dot_product_attention(*a, implementation="xla"), q, k, v)
  np.testing.assert_allclose(ours[0], ref[0], atol=1e-6)
  for a, b in zip(ours[1](d_out), ref[1](d_out)):
    np.testing.assert_allclose(a, b, atol=2e-6)

  x = jnp.asarray(rng.normal(size=(4, 5, 16)) * 3 + 1, jnp.float32)
  dy = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  params = {"scale": jnp.asarray(rng.normal(size=16), jnp.float32), "bias": jnp.asarray(rng.normal(size=16), jnp.float32)}
  flax_ln = nn.LayerNorm(epsilon=1e-6, use_fast_variance=False)
  ours = jax.vjp(lambda p, x: L.LayerNorm(1e-6).apply({"params": p}, x), params, x)
  ref = jax.vjp(lambda p, x: flax_ln.apply({"params": p}, x), params, x)
  np.testing.assert_allclose(ours[0], ref[0], atol=2e-6)
  for a, b in zip(jax.tree_util.tree_leaves(ours[1](dy)), jax.tree_util.tree_leaves(ref[1](dy))):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)

  h = jnp.linspace(-8.0, 8.0, 101, dtype=jnp.float32)
  np.testing.assert_allclose(L.gelu(h), jax.nn.gelu(h, approximate=False), atol=1e-6)
  np.testing.assert_allclose(jax.grad(lambda t: jnp.sum(L.gelu(t)))(h),
                             jax.grad(lambda t: jnp.sum(jax.nn.gelu(t, approximate=False)))(h), atol=1e-6)


@pytest.mark.slow
def test_bench_runs_without_grain_ml_collections_and_open_clip(tmp_path):
  """The GPU image lacks grain, ml_collections and open_clip: the model benchmarks must still run,
  say which step they timed, and report the missing PyTorch package instead of failing."""
  import subprocess

  blocked = "import sys; [sys.modules.__setitem__(m, None) for m in ('grain', 'grain.python', 'ml_collections', 'open_clip')]"
  runs = {"vit": ["--variant", "Ti/16", "--res", "32"], "dinov2": ["--variant", "Ti/14", "--res", "28"],
          "clip": ["--variant", "Ti/16", "--res", "32", "--compare", "torch"]}
  # One process runs the three benchmarks (one interpreter and jax import, not three).
  argvs = [["--model", model, "--batch", "8", "--steps", "1", "--warmup", "0", "--scan-layers",
            "--json", str(tmp_path / f"{model}.json"), *extra] for model, extra in runs.items()]
  code = (f"{blocked}; from lvm_jax.bench.cli import main\n"
          f"for argv in {argvs!r}:\n  rc = main(argv)\n  assert rc == 0, (argv, rc)")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  for model in runs:
    payload = json.loads((tmp_path / f"{model}.json").read_text())
    assert payload["results"][0]["impl"].startswith("lvm_jax.bench"), payload["results"][0]["impl"]
    if model == "clip":
      assert "pip install open_clip_torch" in payload["torch_error"] and len(payload["results"]) == 1


def _load_gpu_ab():
  """scripts/gpu_ab.py as a module (scripts/ is not a package)."""
  import importlib.util
  from pathlib import Path

  spec = importlib.util.spec_from_file_location("gpu_ab", Path(__file__).parents[1] / "scripts" / "gpu_ab.py")
  gpu_ab = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(gpu_ab)
  return gpu_ab


def test_gpu_ab_profile_summary_counts_stream_kernels_once(tmp_path):
  """scripts/gpu_ab.py sums a GPU trace's kernels from the CUDA-stream lines only: the 'XLA Ops' line
  covers the same time again and goes to the per-op table; host events are ignored."""
  import gzip

  gpu_ab = _load_gpu_ab()
  meta = lambda kind, pid, tid, name: {"ph": "M", "name": kind, "pid": pid, "tid": tid, "args": {"name": name}}  # noqa: E731
  kernel = lambda tid, ts, dur, name, pid=1: {"ph": "X", "pid": pid, "tid": tid, "ts": ts, "dur": dur, "name": name}  # noqa: E731
  events = [meta("process_name", 1, 0, "/device:GPU:0"), meta("process_name", 2, 0, "/host:CPU"),
            meta("thread_name", 1, 7, "Stream #14(Compute)"), meta("thread_name", 1, 8, "XLA Ops"),
            kernel(7, 0, 300, "nvjet_sm90_tst_128x160_NNT"), kernel(7, 300, 100, "cudnn_generated_fort_native_sdpa"),
            kernel(7, 400, 50, "input_add_reduce_fusion_20"), kernel(7, 450, 50, "loop_multiply_fusion"),
            kernel(8, 0, 500, "fusion.1"), kernel(0, 0, 9999, "host work", pid=2)]
  path = tmp_path / "trace.json.gz"
  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": events}, f)
  summary = gpu_ab.summarize_trace(str(path), steps=2)
  assert summary["gpu_busy_ms_per_step"] == 0.25  # 500 us of kernels over 2 steps
  assert summary["by_kind_ms_per_step"] == {"gemm": 0.15, "attention (cuDNN)": 0.05, "reduction fusion": 0.025,
                                            "elementwise fusion": 0.025}
  assert summary["top_hlo_ops_ms_per_step"] == {"fusion.1": 0.25}
  assert summary["kernel_launches_per_step"] == 2.0


def test_gpu_ab_kernel_kinds_and_winners_need_a_measured_reference():
  """Cast kernels are not convolutions; a variant never 'wins' against a baseline that failed (0 img/s)."""
  gpu_ab = _load_gpu_ab()
  assert gpu_ab.kernel_kind("loop_convert_fusion") == "elementwise fusion"
  assert gpu_ab.kernel_kind("input_convert_reduce_fusion") == "reduction fusion"
  assert gpu_ab.kernel_kind("convolution.3") == "conv"
  row = lambda v: {"results": [{"img_per_s": v}]}  # noqa: E731
  assert gpu_ab.wins(row(102), row(100)) and not gpu_ab.wins(row(100.5), row(100))
  assert not gpu_ab.wins(row(80), {}) and not gpu_ab.wins(row(80), row(0))  # a timed-out baseline


def test_gpu_ab_profile_summary_reads_a_cpu_trace_from_the_xla_worker_threads(tmp_path):
  """--preset cpu: with no GPU in the trace, the HLO ops on XLA:CPU's worker threads are summed (YNNPACK
  fusions as dots, transposes as copies); the executor's own spans, pool waits and python are not."""
  import gzip

  gpu_ab = _load_gpu_ab()
  meta = lambda kind, tid, name: {"ph": "M", "name": kind, "pid": 1, "tid": tid, "args": {"name": name}}  # noqa: E731
  op = lambda tid, ts, dur, name: {"ph": "X", "pid": 1, "tid": tid, "ts": ts, "dur": dur, "name": name}  # noqa: E731
  events = [meta("process_name", 0, "/host:CPU"), meta("thread_name", 3, "tf_XLAEigen/123"),
            meta("thread_name", 4, "tf_XLAEigen/456"), meta("thread_name", 5, "python"),
            op(3, 0, 1000, "ThunkExecutor::Execute"), op(3, 0, 600, "ynn_fusion.12"),
            op(3, 600, 200, "transpose_copy_fusion.3"), op(4, 100, 300, "ynn_fusion.13"),
            op(4, 400, 50, "SlinkyThreadPool::Await"), op(4, 450, 100, "add_multiply_fusion.2"),
            op(4, 550, 1, "end: ynn_fusion.13"), op(5, 0, 5000, "run")]
  path = tmp_path / "trace.json.gz"
  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": events}, f)
  summary = gpu_ab.summarize_trace(str(path), steps=1)
  assert summary["by_kind_ms_per_step"] == {"gemm": 0.9, "copy/memset": 0.2, "elementwise fusion": 0.1}
  assert summary["gpu_busy_ms_per_step"] == 1.2
  assert summary["kernel_launches_per_step"] == 4.0


@pytest.mark.slow
def test_gpu_ab_cpu_profile_stage_runs_end_to_end(tmp_path):
  """`scripts/gpu_ab.py --preset cpu --stages profile` (here with --smoke's tiny ViT) builds the preset's
  step -- XLA attention, not the GPU preset's cuDNN -- traces it and writes a summary with dots in it."""
  import os
  import subprocess
  from pathlib import Path

  script = Path(__file__).parents[1] / "scripts" / "gpu_ab.py"
  env = {k: v for k, v in os.environ.items() if not k.startswith("LVM_AB_")}  # no preset leaking in
  proc = subprocess.run([sys.executable, str(script), "--out", str(tmp_path), "--smoke", "--preset", "cpu",
                         "--stages", "profile"], capture_output=True, text=True, timeout=600, env=env)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  summary = json.loads((tmp_path / "profile_summary.json").read_text())
  assert summary["by_kind_ms_per_step"].get("gemm", 0.0) > 0.0, summary["by_kind_ms_per_step"]
  assert summary["span_ms_per_step"] > 0.0
