"""The JAX steps `lvm-bench` times: ViT, CLIP and DINOv2 forward / training steps, and the input pipeline.

Every step is built the way the trainer builds it (train/loop.py): the state is
created already sharded from its logical-axis names, the step is
`jax.jit(step, in_shardings, out_shardings, donate_argnums=0)` and compiled
ahead of time, so `compile_s` is lowering + compilation and each timed call
is one step with no host sync inside.

ViT training runs the supervised task's own `train_step` when that module
imports (it needs grain and ml_collections, absent on some GPU images);
otherwise, and for CLIP and DINOv2, the step is assembled here from the same
pieces the tasks use (models, `lvm_jax.objectives`, AdamW, `TrainState`,
EMA teacher), and `impl` in the results says which ran.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lvm_jax import flops as F
from lvm_jax import sharding
from lvm_jax.bench.measure import Workload, jax_peak_mem_gb
from lvm_jax.models.vit import ViT, parse_variant

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
NUM_CLASSES = 1000
# open_clip's text towers by image-tower size: (text width, depth, heads, joint embed_dim).
CLIP_TEXT = {"Ti": (256, 12, 4, 256), "S": (384, 12, 6, 384), "M": (512, 12, 8, 512), "B": (512, 12, 8, 512),
             "L": (768, 12, 12, 768), "H": (1024, 24, 16, 1024), "g": (1024, 24, 16, 1024)}
CLIP_CONTEXT = 77
CLIP_VOCAB = 49408
# DINOv2 recipe pieces (configs/dinov2_vits14_in1k.py): 2 x 224 global + 8 x 98 local crops,
# shared DINO/iBOT head with 65536 prototypes, masks on half the global crops (ratio 0.1-0.5).
DINO_GLOBAL = 2
DINO_LOCAL = 8
DINO_LOCAL_SIZE = 98
DINO_PROTOTYPES = 65536
DINO_DROP_PATH = {"S": 0.1, "B": 0.1, "L": 0.4, "g": 0.4}


@dataclass(frozen=True)
class Spec:
  """One benchmark configuration (the CLI's flags)."""
  model: str  # 'vit' | 'clip' | 'dinov2' | 'data'
  variant: str
  batch: int
  res: int
  mode: str  # 'fwd' | 'train'
  dtype: str
  mesh: tuple[tuple[str, int], ...] = (("data", -1),)
  remat: str = "none"
  attention: str = "xla"
  scan_layers: bool = False
  seed: int = 0

  @property
  def mesh_dict(self) -> dict[str, int]:
    return dict(self.mesh)


# ----------------------------------------------------------------------------- shared plumbing

def _cost_flops(compiled: Any, spec: Spec, num_devices: int, notes: list[str]) -> float | None:
  """XLA's FLOP count of the whole step: the SPMD module's cost analysis is per device. None under
  scan_layers: the analysis does not multiply a loop body by its trip count."""
  if spec.scan_layers:
    notes.append("xla_tflop_per_step: not reported under --scan-layers (XLA's cost analysis counts a "
                 "scanned loop body once)")
    return None
  try:
    cost = compiled.cost_analysis()
  except Exception:  # some backends do not implement it
    return None
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0] if cost else None
  if spec.attention in ("cudnn", "auto") and jax.default_backend() == "gpu":
    # XLA:GPU's cost analysis counts cuBLAS GEMMs and cuDNN convolutions among custom calls, not
    # cuDNN's fused attention (~4% of a ViT-B step), and weighs elementwise ops by clock cycles.
    notes.append("xla_tflop_per_step: XLA:GPU's cost analysis omits cuDNN attention kernels, so it may "
                 "read below the analytic tflop_per_step")
  return float(cost["flops"]) * num_devices if cost and cost.get("flops") else None


def _unbox(tree: Any) -> Any:
  return nn.meta.unbox(tree)


def create_sharded(init_fn, mesh, rng: jax.Array, kind: str = "state") -> tuple[Any, Any]:
  """(value, shardings) of `init_fn(rng)` created directly into its logical shardings.

  kind='state': a TrainState (Adam moments follow their params); 'params': a param tree.
  The abstract trace runs outside the mesh context, as in train/loop.py.
  """
  abstract = jax.eval_shape(init_fn, rng)
  if kind == "state":
    shardings = sharding.state_shardings(abstract, mesh)
  else:
    shardings = sharding.logical_shardings(abstract, mesh)
  with sharding.mesh_context(mesh):
    value = jax.jit(lambda r: _unbox(init_fn(r)), out_shardings=shardings)(rng)
  return value, shardings


def compile_step(fn, args: tuple, in_shardings, out_shardings, mesh, donate: tuple[int, ...] = ()):
  """AOT-compiles `fn` under the mesh context; returns (compiled, seconds for lowering + compiling)."""
  start = time.perf_counter()
  with sharding.mesh_context(mesh):
    jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings, donate_argnums=donate)
    compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - start


def train_workload(spec: Spec, mesh, init_fn, step_fn, batch: dict[str, Any], images_per_step: int,
                   flops: float, impl: str, notes: list[str]) -> Workload:
  """A donated, sharded training step as a Workload."""
  state, state_sh = create_sharded(init_fn, mesh, jax.random.PRNGKey(spec.seed))
  batch_sh = {k: sharding.batch_sharding(mesh) for k in batch}
  compiled, compile_s = compile_step(step_fn, (state, batch), (state_sh, batch_sh),
                                     (state_sh, sharding.replicated(mesh)), mesh, donate=(0,))
  holder = {"state": state}

  def run() -> None:
    holder["state"], metrics = compiled(holder["state"], batch)
    jax.block_until_ready((holder["state"], metrics))

  _, source = jax_peak_mem_gb()
  return Workload("jax", run, images_per_step, flops, compile_s, _cost_flops(compiled, spec, mesh.devices.size, notes),
                  peak_mem=lambda: jax_peak_mem_gb()[0], mem_source=source, impl=impl, notes=notes)


def forward_workload(spec: Spec, mesh, init_params, apply_fn, batch: dict[str, Any], images_per_step: int,
                     flops: float, impl: str, notes: list[str]) -> Workload:
  """A jitted inference forward pass as a Workload."""
  params, params_sh = create_sharded(init_params, mesh, jax.random.PRNGKey(spec.seed), kind="params")
  batch_sh = {k: sharding.batch_sharding(mesh) for k in batch}
  compiled, compile_s = compile_step(apply_fn, (params, batch), (params_sh, batch_sh),
                                     sharding.batch_sharding(mesh), mesh)

  def run() -> None:
    jax.block_until_ready(compiled(params, batch))

  _, source = jax_peak_mem_gb()
  return Workload("jax", run, images_per_step, flops, compile_s, _cost_flops(compiled, spec, mesh.devices.size, notes),
                  peak_mem=lambda: jax_peak_mem_gb()[0], mem_source=source, impl=impl, notes=notes)


def global_batch(arrays: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """Host arrays `[B, ...]` (the global batch, one process) -> arrays sharded over the batch axes."""
  local = sharding.check_batch_size(next(iter(arrays.values())).shape[0], mesh, "--batch")
  start = jax.process_index() * local
  return sharding.host_to_global({k: v[start:start + local] for k, v in arrays.items()}, mesh)


def bench_optimizer(b2: float = 0.999, total_steps: int = 10_000):
  """`params -> tx`: AdamW as the tasks build it (lvm_jax.optim: clip 1.0, warmup + cosine, weight decay
  on >= 2-D kernels), built once and cached -- the abstract and the real TrainState must share one tx."""
  cache: dict[str, optax.GradientTransformation] = {}

  def make(params: Any) -> optax.GradientTransformation:
    try:
      import ml_collections

      from lvm_jax.optim import build_optimizer
    except ImportError:  # ml_collections missing (some GPU images): the same chain, spelled out
      schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 100, total_steps)
      decay = lambda tree: jax.tree_util.tree_map(lambda p: jnp.ndim(p) >= 2, tree)  # noqa: E731
      return optax.chain(optax.clip_by_global_norm(1.0),
                         optax.adamw(schedule, b1=0.9, b2=b2, eps=1e-8, weight_decay=0.05, mask=decay))
    cfg = ml_collections.ConfigDict(dict(name="adamw", lr=1e-3, weight_decay=0.05, b1=0.9, b2=b2, eps=1e-8,
                                         warmup_steps=100, schedule="cosine", clip_norm=1.0))
    return build_optimizer(cfg, total_steps, _unbox(params))[0]

  def for_params(params: Any) -> optax.GradientTransformation:
    if "tx" not in cache:
      cache["tx"] = make(params)
    return cache["tx"]

  return for_params


def _random_images(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
  return rng.standard_normal(shape, dtype=np.float32)


# ----------------------------------------------------------------------------- ViT

def vit_model(spec: Spec, **overrides: Any) -> ViT:
  kwargs = dict(variant=spec.variant, num_classes=NUM_CLASSES, image_size=spec.res, dtype=DTYPES[spec.dtype],
                param_dtype=jnp.float32, attention_impl=spec.attention, remat=spec.remat,
                scan_layers=spec.scan_layers)
  kwargs.update(overrides)
  return ViT(**kwargs)


def build_vit(spec: Spec, mesh) -> Workload:
  model = vit_model(spec)
  rng = np.random.default_rng(spec.seed)
  images = _random_images(rng, (spec.batch, spec.res, spec.res, 3))
  flops = F.vit_flops(model, spec.res, spec.batch, train=spec.mode == "train")
  if spec.mode == "fwd":
    batch = global_batch({"image": images}, mesh)
    init = lambda r: model.init(r, jnp.zeros((1, spec.res, spec.res, 3)))["params"]  # noqa: E731
    apply = lambda p, b: model.apply({"params": p}, b["image"])["logits"]  # noqa: E731
    return forward_workload(spec, mesh, init, apply, batch, spec.batch, flops, "ViT.apply", [])
  labels = rng.integers(0, NUM_CLASSES, spec.batch).astype(np.int32)
  batch = global_batch({"image": images, "label": labels}, mesh)
  task = _supervised_task(spec, mesh)
  if task is not None:
    return train_workload(spec, mesh, task.init_state, task.train_step, batch, spec.batch, flops,
                          "train.tasks.supervised.SupervisedTask.train_step", [])
  init, step = _vit_train_step(model, spec)
  return train_workload(spec, mesh, init, step, batch, spec.batch, flops, "lvm_jax.bench (supervised step)",
                        ["train.tasks.supervised did not import (needs grain + ml_collections); "
                         "timed the same softmax-CE + AdamW step built in lvm_jax.bench"])


def _supervised_task(spec: Spec, mesh):
  """The trainer's supervised task configured like `spec`, or None when it cannot be imported."""
  try:
    import ml_collections

    from train.tasks.supervised import SupervisedTask
  except ImportError:
    return None
  cfg = ml_collections.ConfigDict(dict(
      task="supervised", seed=spec.seed,
      model=dict(variant=spec.variant, num_classes=NUM_CLASSES, image_size=spec.res, dtype=spec.dtype,
                 param_dtype="float32", attention_impl=spec.attention, remat=spec.remat,
                 scan_layers=spec.scan_layers),
      data=dict(source="synthetic", image_size=spec.res), batch_size=spec.batch, total_steps=10_000,
      label_smoothing=0.0, mixup_alpha=0.0,
      optim=dict(name="adamw", lr=1e-3, weight_decay=0.05, b1=0.9, b2=0.999, eps=1e-8, warmup_steps=100,
                 schedule="cosine", clip_norm=1.0, layer_decay=1.0, grad_accum=1)))
  return SupervisedTask(cfg, mesh)


def _vit_train_step(model: ViT, spec: Spec):
  from train.state import TrainState

  optimizer = bench_optimizer()

  def init(rng):
    params = model.init(rng, jnp.zeros((1, spec.res, spec.res, 3)))["params"]
    return TrainState.create(params=params, tx=optimizer(params), rng=rng)

  def step(state, batch):
    def loss_fn(params):
      logits = model.apply({"params": params}, batch["image"], train=True,
                           rngs={"dropout": state.step_rng()})["logits"].astype(jnp.float32)
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]))

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads), {"loss": loss}

  return init, step


# ----------------------------------------------------------------------------- CLIP

def clip_model(spec: Spec):
  from lvm_jax.models.clip import CLIP

  size = spec.variant.partition("/")[0]
  width, depth, heads, embed_dim = CLIP_TEXT.get(size, CLIP_TEXT["B"])
  common = dict(attention_impl=spec.attention, remat=spec.remat, scan_layers=spec.scan_layers)
  return CLIP(embed_dim=embed_dim, dtype=DTYPES[spec.dtype], param_dtype=jnp.float32,
              vision=dict(variant=spec.variant, image_size=spec.res, **common),
              text=dict(vocab_size=CLIP_VOCAB, context_length=CLIP_CONTEXT, width=width, depth=depth,
                        num_heads=heads, **common))


def clip_tokens(rng: np.random.Generator, batch: int) -> np.ndarray:
  """Caption ids `[B, 77]`: random words, an EOT (the largest id) at a random position, padding after."""
  tokens = rng.integers(1, CLIP_VOCAB - 2, (batch, CLIP_CONTEXT)).astype(np.int32)
  ends = rng.integers(8, CLIP_CONTEXT, batch)
  for i, end in enumerate(ends):
    tokens[i, end] = CLIP_VOCAB - 1
    tokens[i, end + 1:] = 0
  return tokens


def build_clip(spec: Spec, mesh) -> Workload:
  from lvm_jax.models.clip import clamp_logit_scale
  from lvm_jax.objectives.contrastive import l2_normalize, softmax_contrastive_loss
  from train.state import TrainState

  model = clip_model(spec)
  rng = np.random.default_rng(spec.seed)
  arrays = {"image": _random_images(rng, (spec.batch, spec.res, spec.res, 3)),
            "tokens": clip_tokens(rng, spec.batch)}
  batch = global_batch(arrays, mesh)
  flops = F.clip_flops(model, spec.res, CLIP_CONTEXT, spec.batch, train=spec.mode == "train")
  dummy = (jnp.zeros((1, spec.res, spec.res, 3)), jnp.zeros((1, CLIP_CONTEXT), jnp.int32))
  note = ["CLIP step built in lvm_jax.bench: both towers, softmax contrastive loss over the global batch, "
          "AdamW (b2 0.98), logit-scale clamp; batch = random images + random 77-token captions"]
  if spec.mode == "fwd":
    init = lambda r: model.init(r, *dummy)["params"]  # noqa: E731

    def apply(params, b):
      out = model.apply({"params": params}, b["image"], b["tokens"])
      return l2_normalize(out["image"]) @ l2_normalize(out["text"]).T

    return forward_workload(spec, mesh, init, apply, batch, spec.batch, flops, "CLIP.apply", note[:0])

  optimizer = bench_optimizer(b2=0.98)

  def init(r):
    params = model.init(r, *dummy)["params"]
    return TrainState.create(params=params, tx=optimizer(params), rng=r)

  def step(state, b):
    def loss_fn(params):
      out = model.apply({"params": params}, b["image"], b["tokens"], train=True,
                        rngs={"dropout": state.step_rng()})
      scale = jnp.exp(out["logit_scale"])
      return softmax_contrastive_loss(l2_normalize(out["image"]), l2_normalize(out["text"]), scale)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    state = state.apply_gradients(grads)
    return state.replace(params=clamp_logit_scale(state.params)), {"loss": loss}

  return train_workload(spec, mesh, init, step, batch, spec.batch, flops, "lvm_jax.bench (CLIP step)", note)


# ----------------------------------------------------------------------------- DINOv2

def dinov2_backbone(spec: Spec, student: bool = True) -> ViT:
  size = spec.variant.partition("/")[0]
  return vit_model(spec, num_classes=None, image_size=spec.res, layerscale_init=1e-5, use_mask_token=True,
                   pos_embed_interp="dinov2", drop_path_rate=DINO_DROP_PATH.get(size, 0.1) if student else 0.0,
                   drop_path_uniform=True)


def _mask_collator_class():
  """lvm_jax.data.masking.MaskCollator; masking.py needs only NumPy, but importing it through the
  package runs lvm_jax/data/__init__.py, which needs grain (absent on some GPU images)."""
  try:
    from lvm_jax.data.masking import MaskCollator
  except ImportError:
    import importlib.util
    import pathlib
    import sys

    path = pathlib.Path(__file__).resolve().parents[1] / "data" / "masking.py"
    spec = importlib.util.spec_from_file_location("lvm_jax_bench_masking", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module by name
    spec.loader.exec_module(module)
    MaskCollator = module.MaskCollator
  return MaskCollator


def dinov2_batch(spec: Spec, rng: np.random.Generator) -> tuple[dict[str, np.ndarray], int]:
  """Multi-crop images and per-sample iBOT masks in the dinov2 task's layout; returns (arrays, U)."""
  MaskCollator = _mask_collator_class()
  patch = parse_variant(spec.variant)[4] or 14
  grid = (spec.res // patch, spec.res // patch)
  collator = MaskCollator(grid, mask_ratio=(0.1, 0.5), mask_probability=0.5, n_global_crops=DINO_GLOBAL,
                          num_groups=spec.batch)
  masks = collator(rng, spec.batch)
  arrays = {
      "global_crops": _random_images(rng, (spec.batch, DINO_GLOBAL, spec.res, spec.res, 3)),
      "local_crops": _random_images(rng, (spec.batch, DINO_LOCAL, DINO_LOCAL_SIZE, DINO_LOCAL_SIZE, 3)),
      "masks": masks["masks"], "mask_indices": masks["mask_indices"], "mask_weights": masks["mask_weights"],
  }
  return arrays, masks["mask_indices"].shape[1]


def build_dinov2(spec: Spec, mesh) -> Workload:
  from lvm_jax.models.heads import DINOiBOTHeads
  from lvm_jax.objectives import dino
  from train.state import TrainState

  backbone = dinov2_backbone(spec)
  width = backbone.dims()[0]
  patch = backbone.dims()[4][0]
  if spec.res % patch or DINO_LOCAL_SIZE % patch:
    raise ValueError(f"--res {spec.res} and the {DINO_LOCAL_SIZE} px local crops must be multiples of the "
                     f"patch size {patch}; use a /14 variant with --res 224.")
  rng = np.random.default_rng(spec.seed)
  if spec.mode == "fwd":  # feature extraction: the teacher backbone on single images
    images = global_batch({"image": _random_images(rng, (spec.batch, spec.res, spec.res, 3))}, mesh)
    model = dinov2_backbone(spec, student=False)
    init = lambda r: model.init(r, jnp.zeros((1, spec.res, spec.res, 3)))["params"]  # noqa: E731
    apply = lambda p, b: model.apply({"params": p}, b["image"])["cls"]  # noqa: E731
    flops = F.vit_flops(model, spec.res, spec.batch, train=False)
    return forward_workload(spec, mesh, init, apply, images, spec.batch, flops, "ViT.apply (DINOv2 backbone)", [])

  heads = DINOiBOTHeads(num_prototypes=DINO_PROTOTYPES, dtype=DTYPES[spec.dtype])
  arrays, masked_slots = dinov2_batch(spec, rng)
  batch = global_batch(arrays, mesh)
  flops = F.dinov2_flops(backbone, F.DinoHeadDims(width, DINO_PROTOTYPES), spec.res, DINO_LOCAL_SIZE,
                         DINO_LOCAL, masked_slots, spec.batch)
  optimizer = bench_optimizer()
  teacher_temp, student_temp, center_momentum, ema = 0.07, 0.1, 0.9, 0.996

  def init(r):
    b_rng, h_rng, s_rng = jax.random.split(r, 3)
    tokens = jnp.zeros((1, width))
    params = {"backbone": backbone.init(b_rng, jnp.zeros((1, spec.res, spec.res, 3)))["params"],
              "heads": heads.init(h_rng, tokens, tokens)["params"]}
    extra = {"teacher": jax.tree_util.tree_map(lambda x: x, params),
             "dino_center": jnp.zeros((DINO_PROTOTYPES,)), "ibot_center": jnp.zeros((DINO_PROTOTYPES,))}
    return TrainState.create(params=params, tx=optimizer(params), rng=s_rng, extra=extra)

  def step(state, b):
    crops = b["global_crops"]
    bsz = crops.shape[0]
    flat_global = crops.reshape((bsz * DINO_GLOBAL,) + crops.shape[2:])
    flat_local = b["local_crops"].reshape((bsz * DINO_LOCAL,) + b["local_crops"].shape[2:])
    masks = b["masks"].reshape(bsz * DINO_GLOBAL, -1)
    per_sample = lambda x: x.reshape((bsz, -1) + x.shape[1:])  # noqa: E731
    g_rng, l_rng = jax.random.split(state.step_rng())

    teacher = state.extra["teacher"]
    t_out = backbone.apply({"params": teacher["backbone"]}, flat_global)
    t_cls = per_sample(t_out["cls"])
    t_masked = dino.gather_masked_tokens(per_sample(t_out["patch_tokens"]), b["mask_indices"])
    t_cls_logits, t_patch_logits = heads.apply({"params": teacher["heads"]}, t_cls, t_masked)
    t_cls_probs = dino.softmax_center_teacher(t_cls_logits, state.extra["dino_center"], teacher_temp)
    t_patch_probs = dino.softmax_center_teacher(t_patch_logits, state.extra["ibot_center"], teacher_temp)
    centers = {"dino_center": dino.update_center(state.extra["dino_center"], t_cls_logits, center_momentum),
               "ibot_center": dino.update_center(state.extra["ibot_center"], t_patch_logits, center_momentum,
                                                 valid=b["mask_weights"] > 0)}

    def loss_fn(params):
      s_out = backbone.apply({"params": params["backbone"]}, flat_global, train=True, mask=masks,
                             rngs={"dropout": g_rng})
      l_out = backbone.apply({"params": params["backbone"]}, flat_local, train=True, rngs={"dropout": l_rng})
      s_cls = per_sample(s_out["cls"])
      cls_tokens = jnp.concatenate([s_cls, per_sample(l_out["cls"])], axis=1)
      s_masked = dino.gather_masked_tokens(per_sample(s_out["patch_tokens"]), b["mask_indices"])
      cls_logits, patch_logits = heads.apply({"params": params["heads"]}, cls_tokens, s_masked)
      loss = dino.dino_cls_loss(cls_logits[:, :DINO_GLOBAL], cls_logits[:, DINO_GLOBAL:], t_cls_probs,
                                student_temp)
      loss += dino.ibot_patch_loss(patch_logits, t_patch_probs, b["mask_weights"], bsz * DINO_GLOBAL,
                                   student_temp)
      return loss + 0.1 * dino.koleo_loss(s_cls)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    state = state.apply_gradients(grads)
    teacher = jax.tree_util.tree_map(lambda t, s: t * ema + s * (1.0 - ema), state.extra["teacher"], state.params)
    return state.replace(extra={**state.extra, **centers, "teacher": teacher}), {"loss": loss}

  note = [f"DINOv2 step built in lvm_jax.bench: {DINO_GLOBAL}x{spec.res} global + {DINO_LOCAL}x{DINO_LOCAL_SIZE} "
          f"local crops, shared DINO/iBOT head ({DINO_PROTOTYPES} prototypes), centering, KoLeo, AdamW, EMA teacher; "
          f"img/s counts samples (each = {DINO_GLOBAL + DINO_LOCAL} crops)"]
  return train_workload(spec, mesh, init, step, batch, spec.batch, flops, "lvm_jax.bench (DINOv2 step)", note)


# ----------------------------------------------------------------------------- input pipeline

def build_data(spec: Spec, workers: int = 0, source: str = "synthetic", path: str | None = None,
               name: str | None = None, read_threads: int = 8) -> Workload:
  """A data source + supervised train transforms + grain loader: the input pipeline's own img/s.

  `source`/`path`/`name` as config.data.source/path/name (any source; local, gs:// or s3://): records
  are decoded, random-resized-cropped to `spec.res`, flipped and normalised. One timed "step" draws enough
  batches for 512 images: the synthetic source renders (and caches) 256 images at a time, so
  shorter steps would time the cache.
  """
  try:
    from lvm_jax import data as lvm_data
  except ImportError as e:
    raise SystemExit(f"lvm-bench --model data needs the input pipeline's dependencies ({e.name} is not "
                     "installed); pip install grain.") from e
  import ml_collections

  from lvm_jax.bench.measure import rss_peak_gb

  cfg = ml_collections.ConfigDict(dict(source=source, path=path or "", name=name or "", image_size=spec.res,
                                        hflip=True, synthetic=dict(num_train=1_000_000, seed=spec.seed,
                                                                   image_size=spec.res)))
  records = lvm_data.build_source(cfg, split="train")
  loader = lvm_data.make_loader(records, lvm_data.supervised_transforms(cfg, train=True), batch_size=spec.batch,
                                shuffle=True, seed=spec.seed, num_epochs=None, worker_count=workers,
                                read_threads=read_threads)
  iterator = iter(loader)
  num_batches = max(1, -(-512 // spec.batch))

  def run() -> None:
    for _ in range(num_batches):
      next(iterator)

  what = "synthetic shapes rendered" if source == "synthetic" else f"{source} {path} decoded, random-resized-cropped"
  return Workload("grain", run, spec.batch * num_batches, None, 0.0, impl=f"lvm_jax.data.make_loader ({source})",
                  peak_mem=rss_peak_gb, mem_source="process peak RSS",
                  notes=[f"{what} at {spec.res} px, flip + normalise, worker_count={workers}, "
                         f"read_threads={read_threads}; {len(records)} records; one step = {num_batches} batches"])


BUILDERS = {"vit": build_vit, "clip": build_clip, "dinov2": build_dinov2}


def build(spec: Spec, mesh) -> Workload:
  return BUILDERS[spec.model](spec, mesh)
