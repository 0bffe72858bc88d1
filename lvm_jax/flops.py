"""Analytic FLOP counts of the models' matmuls (what MFU is measured against).

Convention (PaLM appendix B, MaxText, timm's profilers): 2 FLOPs per
multiply-accumulate of every matmul-like op -- dense layers, the two attention
products (QK^T and PV) and the patch-embedding convolution. Elementwise work
(norms, activations, softmax, the optimizer update) is not counted: it is a few
percent of the total and costs bandwidth, not matmul throughput.

A training step counts each matmul three times (forward, grad wrt its input,
grad wrt its weights), except those whose input needs no gradient: the patch
embedding (images are not differentiated, so 2x) and anything run without
gradient (an EMA teacher: 1x). `tests/test_bench.py` checks these counts
against the dots and convolutions XLA actually compiles.

Attention is counted at its full T x S size even under a causal mask (the CLIP text tower), as
PaLM does and as the dense kernels compute it (a causal-aware count would be ~0.2% lower for
CLIP B/16). DINOv2's iBOT head is counted on every padded masked-patch slot, the work the step
(and facebookresearch/dinov2, which runs the head on its upper-bound buffer) really does: the
S/14 suite row's MFU counts ~6% of slots that hold no masked patch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ATTENTION_MATMULS = 2  # QK^T and PV


@dataclass(frozen=True)
class TowerDims:
  """What the FLOP count of a transformer tower depends on."""
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  head_dim: int
  ffn: str = "mlp"  # 'mlp' | 'swiglu'


def vit_dims(model: Any) -> TowerDims:
  """TowerDims of a `lvm_jax.models.ViT`."""
  width, depth, num_heads, mlp_dim, _ = model.dims()
  return TowerDims(width, depth, num_heads, mlp_dim, width // num_heads, model.ffn)


def text_dims(tower: Any) -> TowerDims:
  """TowerDims of a `lvm_jax.models.text.TextTransformer`."""
  return TowerDims(tower.width, tower.depth, tower.num_heads, tower.mlp_dim or 4 * tower.width,
                   tower.width // tower.num_heads, "mlp")


def block_flops(dims: TowerDims, q_len: int, kv_len: int | None = None) -> int:
  """Forward FLOPs of one pre-LN block on one sequence of `q_len` tokens (self-attention: kv_len = q_len)."""
  kv_len = q_len if kv_len is None else kv_len
  d, inner = dims.width, dims.num_heads * dims.head_dim
  qkv = 2 * q_len * d * inner + 2 * 2 * kv_len * d * inner
  attention = ATTENTION_MATMULS * 2 * q_len * kv_len * inner
  out = 2 * q_len * inner * d
  if dims.ffn == "swiglu":
    from lvm_jax.models.layers import swiglu_hidden_dim

    hidden = swiglu_hidden_dim(dims.mlp_dim)
    ffn = 3 * 2 * q_len * d * hidden
  else:
    ffn = 2 * 2 * q_len * d * dims.mlp_dim
  return qkv + attention + out + ffn


def vit_forward_flops(model: Any, image_size: int | tuple[int, int], batch: int = 1,
                      masked: bool = False) -> tuple[int, int]:
  """(patch-embedding FLOPs, all other FLOPs) of a ViT forward on `batch` images `[B, H, W, 3]`.

  The split exists because training differentiates the patch embedding only
  w.r.t. its weights. `masked` (mask tokens) changes no matmul. Patch dropout
  is not modelled (bench runs it at 0).
  """
  del masked
  dims = vit_dims(model)
  _, _, _, _, (ph, pw) = model.dims()
  height, width_px = (image_size, image_size) if isinstance(image_size, int) else image_size
  patches = (height // ph) * (width_px // pw)
  tokens = patches + int(model.class_token) + model.num_registers
  patch_embed = 2 * patches * (ph * pw * 3) * dims.width
  if getattr(model, "stem", "patch") != "patch":
    raise ValueError(f"vit_forward_flops counts only the patch stem, not stem={model.stem!r}; "
                     "bench a ViT with stem='patch'.")
  rest = dims.depth * block_flops(dims, tokens)
  if model.pool == "map":
    mlp = TowerDims(dims.width, 1, dims.num_heads, dims.mlp_dim, dims.head_dim)  # the MAP head's MLP: plain
    rest += block_flops(mlp, 1, tokens)
  head_in = dims.width
  if model.rep_size and model.pool != "none":
    rest += 2 * dims.width * model.rep_size
    head_in = model.rep_size
  if model.num_classes:
    rest += 2 * head_in * model.num_classes
  return batch * patch_embed, batch * rest


def vit_flops(model: Any, image_size: int | tuple[int, int], batch: int, train: bool) -> int:
  """FLOPs of one ViT forward (train=False) or forward+backward (train=True) on `batch` images."""
  patch, rest = vit_forward_flops(model, image_size, batch)
  return (2 * patch + 3 * rest) if train else (patch + rest)


def text_forward_flops(tower: Any, length: int, batch: int = 1) -> int:
  """Forward FLOPs of the CLIP text tower on `batch` sequences of `length` tokens (embedding is a gather)."""
  dims = text_dims(tower)
  flops = dims.depth * block_flops(dims, length)
  if tower.pool == "map":
    flops += block_flops(TowerDims(dims.width, 1, dims.num_heads, dims.mlp_dim, dims.head_dim), 1, length)
  return batch * flops


def clip_flops(model: Any, image_size: int, context_length: int, batch: int, train: bool) -> int:
  """FLOPs of a CLIP forward (both towers, both projections, the B x B logits) or a training step."""
  image = model.image_tower if hasattr(model, "image_tower") else _clip_image_tower(model)
  text = model.text_tower if hasattr(model, "text_tower") else _clip_text_tower(model)
  patch, image_rest = vit_forward_flops(image, image_size, batch)
  text_fwd = text_forward_flops(text, context_length, batch)
  # No image projection (SigLIP's MAP-pooled towers, image_projection=False): only the text one.
  image_width = vit_dims(image).width if getattr(model, "image_projection", True) else 0
  projections = 2 * batch * (image_width + text.width) * model.embed_dim
  logits = 2 * batch * batch * model.embed_dim
  rest = image_rest + text_fwd + projections + logits
  return (2 * patch + 3 * rest) if train else (patch + rest)


def _clip_image_tower(model: Any) -> Any:
  from lvm_jax.models.clip import DEFAULT_VISION
  from lvm_jax.models.vit import ViT

  towers = dict(dtype=model.dtype, param_dtype=model.param_dtype)
  return ViT(**{**DEFAULT_VISION, **towers, **dict(model.vision or {})})


def _clip_text_tower(model: Any) -> Any:
  from lvm_jax.models.text import TextTransformer

  return TextTransformer(**{**dict(dtype=model.dtype, param_dtype=model.param_dtype), **dict(model.text or {})})


@dataclass(frozen=True)
class DinoHeadDims:
  """A DINO head's sizes (`lvm_jax.models.heads.DINOHead`) and the width of the tokens it reads."""
  input_dim: int
  num_prototypes: int
  hidden_dim: int = 2048
  bottleneck_dim: int = 256
  num_layers: int = 3


def dino_head_flops(head: DinoHeadDims, rows: int) -> int:
  """Forward FLOPs of a DINO head (MLP -> bottleneck -> prototypes) on `rows` tokens."""
  if head.num_layers == 1:
    mlp = 2 * head.input_dim * head.bottleneck_dim
  else:
    mlp = 2 * head.input_dim * head.hidden_dim
    mlp += (head.num_layers - 2) * 2 * head.hidden_dim * head.hidden_dim
    mlp += 2 * head.hidden_dim * head.bottleneck_dim
  return rows * (mlp + 2 * head.bottleneck_dim * head.num_prototypes)


def dinov2_flops(backbone: Any, head: DinoHeadDims, global_size: int, local_size: int, num_local: int,
                 masked_per_sample: int, batch: int, ibot_head: DinoHeadDims | None = None) -> int:
  """FLOPs of one DINOv2 training step on `batch` samples.

  Student (forward + backward): backbone on 2 global + `num_local` local
  crops, the DINO head on every crop's CLS token and the iBOT head (the DINO
  head unless `ibot_head`) on `masked_per_sample` padded masked-patch slots.
  Teacher (forward only): backbone on the 2 global crops, heads on their CLS
  tokens and the same masked slots. The EMA update and losses are elementwise.
  """
  g_patch, g_rest = vit_forward_flops(backbone, global_size, 2 * batch)
  l_patch, l_rest = vit_forward_flops(backbone, local_size, num_local * batch) if num_local else (0, 0)
  ibot_head = ibot_head or head
  student_heads = dino_head_flops(head, (2 + num_local) * batch) + dino_head_flops(ibot_head, masked_per_sample * batch)
  teacher_heads = dino_head_flops(head, 2 * batch) + dino_head_flops(ibot_head, masked_per_sample * batch)
  student = 2 * (g_patch + l_patch) + 3 * (g_rest + l_rest + student_heads)
  teacher = g_patch + g_rest + teacher_heads
  return student + teacher
