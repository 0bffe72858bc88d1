"""The PyTorch steps `lvm-bench --compare torch` times next to ours: same model, batch, resolution, dtype.

ViT is timm's `VisionTransformer` with our variant's dims; CLIP is open_clip's
`CLIP` with the towers `lvm_jax.bench.jax_workloads.clip_model` builds; DINOv2
is timm's ViT (LayerScale, mask token, 2 global + 8 local crops) with a DINO
head, centering, iBOT, KoLeo, AdamW and an EMA teacher, as the JAX step.
bfloat16 is autocast over float32 master weights (what our `dtype=bfloat16,
param_dtype=float32` does); attention is torch's SDPA (timm's fused_attn,
open_clip's nn.MultiheadAttention); with `compile=True` the model (or
backbone) goes through `torch.compile`.
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
from typing import Any

from lvm_jax.bench.jax_workloads import (CLIP_CONTEXT, CLIP_TEXT, CLIP_VOCAB, DINO_DROP_PATH, DINO_GLOBAL,
                                         DINO_LOCAL, DINO_PROTOTYPES, NUM_CLASSES, Spec,
                                         clip_tokens, dinov2_batch)
from lvm_jax.bench.measure import Workload
from lvm_jax.models.vit import parse_variant


class TorchMissing(RuntimeError):
  """torch (or timm / open_clip) is not installed."""


def import_torch(*extra: str):
  """Imports torch and `extra` modules, or raises TorchMissing with the pip command that fixes it."""
  import importlib

  modules = []
  for name in ("torch", *extra):
    try:
      modules.append(importlib.import_module(name))
    except ImportError as e:
      pip = {"open_clip": "open_clip_torch"}.get(name, name)
      raise TorchMissing(f"--compare torch needs {name}, which is not installed ({e}); "
                         f"pip install {pip} (or pip install 'lvm_jax[torch]').") from e
  return modules


def _device(torch) -> str:
  return "cuda" if torch.cuda.is_available() else "cpu"


def _autocast(torch, device: str, dtype: str):
  if dtype == "bfloat16":
    return torch.autocast(device_type=device, dtype=torch.bfloat16)
  return contextlib.nullcontext()


def _sync(torch, device: str) -> None:
  if device == "cuda":
    torch.cuda.synchronize()


def _adamw(torch, params, device: str, b2: float = 0.999):
  kwargs = dict(lr=1e-3, betas=(0.9, b2), eps=1e-8, weight_decay=0.05)
  if device == "cuda":
    kwargs["fused"] = True  # one kernel for the whole update, as our single jitted step
  return torch.optim.AdamW(params, **kwargs)


def _finish(torch, device: str, framework_step, images: int, flops: float, impl: str, compile_: bool,
            notes: list[str]) -> Workload:
  """Runs the first step (it compiles, under torch.compile) and wraps the step as a Workload."""
  if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
  start = time.perf_counter()
  framework_step()
  _sync(torch, device)
  first = time.perf_counter() - start

  def run() -> None:
    framework_step()
    _sync(torch, device)

  if device == "cuda":
    peak = lambda: torch.cuda.max_memory_allocated() / (1 << 30)  # noqa: E731
    source = "torch.cuda.max_memory_allocated"
  else:
    peak = lambda: None  # noqa: E731
    source = "not measured: torch shares the process (and its RSS) with JAX on CPU"
  notes = list(notes) + [f"torch {torch.__version__}, {'torch.compile' if compile_ else 'eager'}, "
                         f"{torch.get_num_threads()} CPU threads" if device == "cpu" else
                         f"torch {torch.__version__}, {'torch.compile' if compile_ else 'eager'}"]
  return Workload("torch", run, images, flops, first if compile_ else 0.0, peak_mem=peak, mem_source=source,
                  impl=impl, notes=notes + ([] if compile_ else ["compile_s: eager mode has no compile step"]))


# ----------------------------------------------------------------------------- ViT (timm)

def timm_vit(spec: Spec, **overrides: Any):
  (timm,) = import_torch("timm")[1:]
  from timm.models.vision_transformer import VisionTransformer

  width, depth, heads, mlp, patch = parse_variant(spec.variant)
  kwargs = dict(img_size=spec.res, patch_size=patch or 16, embed_dim=width, depth=depth, num_heads=heads,
                mlp_ratio=mlp / width, num_classes=NUM_CLASSES, qkv_bias=True, class_token=True,
                global_pool="token")
  kwargs.update(overrides)
  return VisionTransformer(**kwargs), timm.__version__


def build_vit(spec: Spec, flops: float, compile_: bool) -> Workload:
  (torch,) = import_torch()
  device = _device(torch)
  model, timm_version = timm_vit(spec)
  model = model.to(device)
  gen = torch.Generator(device="cpu").manual_seed(spec.seed)
  images = torch.randn(spec.batch, 3, spec.res, spec.res, generator=gen).to(device)
  labels = torch.randint(0, NUM_CLASSES, (spec.batch,), generator=gen).to(device)
  net = torch.compile(model) if compile_ else model
  impl = f"timm {timm_version} VisionTransformer"
  if spec.mode == "fwd":
    model.eval()

    def step() -> None:
      with torch.inference_mode(), _autocast(torch, device, spec.dtype):
        net(images)

    return _finish(torch, device, step, spec.batch, flops, impl, compile_, [])

  opt = _adamw(torch, model.parameters(), device)
  params = list(model.parameters())

  def step() -> None:
    opt.zero_grad(set_to_none=True)
    with _autocast(torch, device, spec.dtype):
      loss = torch.nn.functional.cross_entropy(net(images).float(), labels)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()

  return _finish(torch, device, step, spec.batch, flops, impl, compile_,
                 ["softmax CE + clip 1.0 + AdamW" + (" (fused)" if device == "cuda" else "")])


# ----------------------------------------------------------------------------- CLIP (open_clip)

def build_clip(spec: Spec, flops: float, compile_: bool) -> Workload:
  torch, open_clip = import_torch("open_clip")
  import numpy as np

  device = _device(torch)
  width, depth, heads, mlp, patch = parse_variant(spec.variant)
  t_width, t_depth, t_heads, embed_dim = CLIP_TEXT.get(spec.variant.partition("/")[0], CLIP_TEXT["B"])
  model = open_clip.CLIP(
      embed_dim=embed_dim,
      vision_cfg=dict(layers=depth, width=width, head_width=width // heads, mlp_ratio=mlp / width,
                      patch_size=patch or 16, image_size=spec.res),
      text_cfg=dict(context_length=CLIP_CONTEXT, vocab_size=CLIP_VOCAB, width=t_width, heads=t_heads,
                    layers=t_depth)).to(device)
  rng = np.random.default_rng(spec.seed)
  images = torch.from_numpy(rng.standard_normal((spec.batch, 3, spec.res, spec.res), dtype=np.float32)).to(device)
  tokens = torch.from_numpy(clip_tokens(rng, spec.batch).astype(np.int64)).to(device)
  net = torch.compile(model) if compile_ else model
  impl = f"open_clip {open_clip.__version__} CLIP"
  if spec.mode == "fwd":
    model.eval()

    def step() -> None:
      with torch.inference_mode(), _autocast(torch, device, spec.dtype):
        img, txt, _ = net(images, tokens)
        img.float() @ txt.float().T

    return _finish(torch, device, step, spec.batch, flops, impl, compile_, [])

  opt = _adamw(torch, model.parameters(), device, b2=0.98)
  targets = torch.arange(spec.batch, device=device)
  max_scale = math.log(100.0)

  def step() -> None:
    opt.zero_grad(set_to_none=True)
    with _autocast(torch, device, spec.dtype):
      img, txt, scale = net(images, tokens)
      logits = scale * img.float() @ txt.float().T
      loss = 0.5 * (torch.nn.functional.cross_entropy(logits, targets)
                    + torch.nn.functional.cross_entropy(logits.T, targets))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    with torch.no_grad():
      model.logit_scale.clamp_(0, max_scale)

  return _finish(torch, device, step, spec.batch, flops, impl, compile_,
                 ["softmax contrastive loss (open_clip ClipLoss, one device) + AdamW + logit-scale clamp"])


# ----------------------------------------------------------------------------- DINOv2 (timm backbone)

def build_dinov2(spec: Spec, flops: float, compile_: bool) -> Workload:
  (torch,) = import_torch()
  import numpy as np

  nn, fn = torch.nn, torch.nn.functional
  device = _device(torch)
  size = spec.variant.partition("/")[0]
  vit, timm_version = timm_vit(spec, num_classes=0, init_values=1e-5, dynamic_img_size=True,
                               drop_path_rate=DINO_DROP_PATH.get(size, 0.1))
  width = vit.embed_dim

  class Backbone(nn.Module):
    """timm ViT with DINOv2's mask token: `[B, 3, H, W]`, mask `[B, N]` -> (cls `[B, D]`, patches `[B, N, D]`)."""

    def __init__(self, vit):
      super().__init__()
      self.vit = vit
      self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, width))

    def forward(self, x, mask=None):
      x = self.vit.patch_embed(x)  # [B, h, w, D] with dynamic_img_size
      if mask is not None:
        x = torch.where(mask.reshape(x.shape[:3])[..., None], self.mask_token.to(x.dtype), x)
      x = self.vit.norm(self.vit.blocks(self.vit.norm_pre(self.vit._pos_embed(x))))
      return x[:, 0], x[:, self.vit.num_prefix_tokens:]

  class Head(nn.Module):
    """DINO head: MLP 2048 -> 2048 -> 256, L2-normalise, weight-normalised prototypes with a trainable gain."""

    def __init__(self):
      super().__init__()
      self.mlp = nn.Sequential(nn.Linear(width, 2048), nn.GELU(), nn.Linear(2048, 2048), nn.GELU(),
                               nn.Linear(2048, 256))
      self.prototypes = nn.Parameter(torch.randn(DINO_PROTOTYPES, 256) * 0.02)
      self.gain = nn.Parameter(torch.ones(DINO_PROTOTYPES))

    def forward(self, x):
      x = fn.normalize(self.mlp(x).float(), dim=-1)
      # float32, as the JAX head: autocast would run this matmul in bfloat16 despite the casts.
      with torch.autocast(device_type=x.device.type, enabled=False):
        return (x @ fn.normalize(self.prototypes.float(), dim=1).T) * self.gain

  student = nn.ModuleDict({"backbone": Backbone(vit), "head": Head()}).to(device)
  teacher = copy.deepcopy(student)
  for blk in teacher["backbone"].vit.blocks:  # the teacher never drops paths
    blk.drop_path1 = nn.Identity()
    blk.drop_path2 = nn.Identity()
  teacher.requires_grad_(False)
  s_backbone = torch.compile(student["backbone"], dynamic=False) if compile_ else student["backbone"]
  t_backbone = torch.compile(teacher["backbone"], dynamic=False) if compile_ else teacher["backbone"]

  rng = np.random.default_rng(spec.seed)
  arrays, _ = dinov2_batch(spec, rng)
  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, -1, -3))).to(device)  # noqa: E731
  global_crops = nchw(arrays["global_crops"]).flatten(0, 1)
  local_crops = nchw(arrays["local_crops"]).flatten(0, 1)
  masks = torch.from_numpy(arrays["masks"]).to(device).flatten(0, 1)
  mask_indices = torch.from_numpy(arrays["mask_indices"].astype(np.int64)).to(device)
  mask_weights = torch.from_numpy(arrays["mask_weights"]).to(device)
  bsz = spec.batch
  centers = {"dino": torch.zeros(DINO_PROTOTYPES, device=device), "ibot": torch.zeros(DINO_PROTOTYPES, device=device)}
  opt = _adamw(torch, student.parameters(), device)
  s_params, t_params = list(student.parameters()), list(teacher.parameters())
  teacher_temp, student_temp, ema = 0.07, 0.1, 0.996

  def gather(patches):  # [2B, N, D] -> [B, U, D] (per-sample indices into its 2N global patches)
    per_sample = patches.reshape(bsz, -1, patches.shape[-1])
    return torch.gather(per_sample, 1, mask_indices[..., None].expand(-1, -1, patches.shape[-1]))

  def ce(t, s):  # -sum_k t log softmax(s / T_s)
    return -(t * fn.log_softmax(s.float() / student_temp, dim=-1)).sum(-1)

  def step() -> None:
    with torch.no_grad(), _autocast(torch, device, spec.dtype):
      t_cls, t_patch = t_backbone(global_crops)
      t_cls_logits = teacher["head"](t_cls).reshape(bsz, DINO_GLOBAL, -1)
      t_patch_logits = teacher["head"](gather(t_patch))
      t_cls_probs = fn.softmax((t_cls_logits - centers["dino"]) / teacher_temp, dim=-1)
      t_patch_probs = fn.softmax((t_patch_logits - centers["ibot"]) / teacher_temp, dim=-1)
      centers["dino"] = 0.9 * centers["dino"] + 0.1 * t_cls_logits.mean((0, 1))
      valid = (mask_weights > 0).float()[..., None]
      centers["ibot"] = 0.9 * centers["ibot"] + 0.1 * (t_patch_logits * valid).sum((0, 1)) / valid.sum()
    with _autocast(torch, device, spec.dtype):
      s_cls, s_patch = s_backbone(global_crops, masks)
      l_cls, _ = s_backbone(local_crops)
      cls = torch.cat([s_cls.reshape(bsz, DINO_GLOBAL, -1), l_cls.reshape(bsz, DINO_LOCAL, -1)], 1)
      cls_logits = student["head"](cls)
      patch_logits = student["head"](gather(s_patch))
      pair = ce(t_cls_probs[:, :, None], cls_logits[:, None])  # [B, 2, 10]: teacher crop j x student crop i
      off_diag = torch.ones(DINO_GLOBAL, DINO_GLOBAL + DINO_LOCAL, device=device)
      off_diag[torch.arange(DINO_GLOBAL), torch.arange(DINO_GLOBAL)] = 0
      loss = (pair.mean(0) * off_diag).sum() / (DINO_GLOBAL * (DINO_GLOBAL - 1) + DINO_GLOBAL * DINO_LOCAL)
      loss = loss + (ce(t_patch_probs, patch_logits) * mask_weights).sum() / (bsz * DINO_GLOBAL)
      feats = fn.normalize(s_cls.reshape(bsz, DINO_GLOBAL, -1).float(), dim=-1)
      koleo = 0.0
      for c in range(DINO_GLOBAL):
        x = feats[:, c]
        dots = x @ x.T
        dots.fill_diagonal_(-1)
        nearest = x[dots.argmax(1)]
        koleo = koleo - torch.log((x - nearest + 1e-8).norm(dim=-1) + 1e-8).mean()
      loss = loss + 0.1 * koleo
    loss.backward()
    torch.nn.utils.clip_grad_norm_(s_params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
      torch._foreach_mul_(t_params, ema)
      torch._foreach_add_(t_params, s_params, alpha=1 - ema)

  return _finish(torch, device, step, spec.batch, flops, f"timm {timm_version} ViT + DINOv2 step (lvm_jax.bench)",
                 compile_, ["same step as the JAX one: teacher fwd, student fwd+bwd on 2+8 crops, DINO/iBOT/KoLeo, "
                            "AdamW, EMA" + ("; backbones torch.compile'd" if compile_ else "")])


BUILDERS = {"vit": build_vit, "clip": build_clip, "dinov2": build_dinov2}


def build(spec: Spec, flops: float, compile_: bool) -> Workload:
  (torch,) = import_torch()
  note = match_jax_precision(torch, _device(torch), spec.dtype)
  workload = BUILDERS[spec.model](spec, flops, compile_)
  if note:
    workload.notes.append(note)
  return workload


def match_jax_precision(torch, device: str, dtype: str) -> str | None:
  """float32 on a GPU: JAX's default precision runs float32 matmuls as TF32, PyTorch's as full
  FP32 (several times slower); let PyTorch use TF32 too, so the two rows do the same arithmetic.
  Returns the note for the row, or None where nothing changed."""
  if device != "cuda" or dtype != "float32":
    return None
  torch.set_float32_matmul_precision("high")
  torch.backends.cudnn.allow_tf32 = True
  return "float32 matmuls and convolutions as TF32 (JAX's default GPU precision)"
