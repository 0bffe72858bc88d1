"""Vision Transformer: one backbone for classification, CLIP/SigLIP towers and DINOv2.

Every option is a flat dataclass field; `variant` ('B/16', 'g/14', ...) only
fills width/depth/heads/mlp/patch when those are left as None.

Param tree (top level; present only when the option is on):
  patch_embed {kernel [p, p, C, D], bias [D]}            stem='patch'
  conv_stem {conv_i {kernel [3, 3, C_i, C_i+1]}, norm_i, proj {kernel [1, 1, C_n, D], bias}}  stem='conv'
  cls_token [1, 1, D]         class_token
  reg_tokens [1, R, D]        num_registers > 0
  mask_token [1, 1, D]        use_mask_token
  pos_embed [1, P, D]         pos_embed='learned'; P = (1 if class_token and pos_embed_includes_cls) + gh*gw
  norm_pre {scale, bias}      pre_norm (CLIP's ln_pre)
  encoder {blocks_0 .. blocks_{depth-1}} or {blocks} with a leading layers axis (scan_layers)
  norm {scale, bias}          final_norm
  map_head {probe, attn, norm, mlp}   pool='map'
  fc_norm {scale, bias}       fc_norm (timm avg-pool models: norm after pooling)
  pre_logits {kernel, bias}   rep_size
  head {kernel [D', C], bias [C]}     num_classes
Rngs: 'dropout' drives dropout, drop-path and patch dropout (train=True only).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lvm_jax.models import perf
from lvm_jax.models.layers import (
    Encoder, MAPHead, constrain, dense_init, layer_norm, logical, zeros_init)
from lvm_jax.models.pos_embed import POS_EMBED_INTERP, posemb_sincos_2d, resample_pos_embed

Array = jax.Array
Dtype = Any

# name -> (width, depth, num_heads, mlp_dim); big_vision, plus DINOv2's g.
VARIANTS: dict[str, tuple[int, int, int, int]] = {
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "M": (512, 12, 8, 2048),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
    "H": (1280, 32, 16, 5120),
    "g": (1536, 40, 24, 6144),
    "G": (1664, 48, 16, 8192),
    "So400m": (1152, 27, 16, 4304),
}
POOLS = ("cls", "gap", "map", "none")
POS_EMBEDS = ("learned", "sincos2d", "none")
STEM_NORMS = ("layer", "instance")


def parse_variant(variant: str) -> tuple[int, int, int, int, int | None]:
  """'L/14' -> (width, depth, num_heads, mlp_dim, patch_size); 'L' -> patch None."""
  name, _, patch = variant.partition("/")
  if name not in VARIANTS or (patch and not patch.isdigit()):
    raise ValueError(f"Unknown ViT variant {variant!r}; use '<size>/<patch>' with size in "
                     f"{list(VARIANTS)}, e.g. 'B/16'.")
  return (*VARIANTS[name], int(patch) if patch else None)


def _pair(x: int | Sequence[int]) -> tuple[int, int]:
  return (x, x) if isinstance(x, int) else tuple(x)


class ConvStem(nn.Module):
  """Convolutional stem (Xiao et al. 2021, "Early convolutions help transformers see better").

  A stack of 3x3 convs (a norm + ReLU after each), then a 1x1 conv to `width`: same token
  grid as a patch-p embedding, much better sample efficiency for small ViTs on small data.
  `[B, H, W, C] -> [B, H/p, W/p, width]`; needs a square power-of-two patch p.

  `widths` gives each conv's output channels. With n = len(widths) and s = log2(p), the first
  n - s convs have stride 1 (they work at full resolution) and the last s have stride 2, so
  n >= s. None (the default) is s stride-2 convs with channels doubling up to width/2
  (min 16), Xiao et al.'s recipe.

  `norm` after each conv: 'layer' (LayerNorm over channels, per pixel) or 'instance'
  (each channel normalised over the image's H x W, i.e. GroupNorm with one channel per
  group; no batch statistics). 'instance' removes each image's per-channel contrast and
  offset, which makes small models learn much faster on images whose colours are random
  (measured on the synthetic shapes: see configs/vit_synthetic.py).
  """
  width: int
  patch: tuple[int, int]
  widths: Sequence[int] | None = None
  norm: str = "layer"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    p = self.patch[0]
    if self.patch[0] != self.patch[1] or p < 2 or p & (p - 1):
      raise ValueError(f"stem='conv' needs a square power-of-two patch size, got {self.patch}.")
    num_strided = p.bit_length() - 1
    if self.widths is None:
      widths = [max(self.width // 2 ** (num_strided - i), 16) for i in range(num_strided)]
    else:
      widths = [int(w) for w in self.widths]
      if len(widths) < num_strided or any(w <= 0 for w in widths):
        raise ValueError(f"stem_widths={tuple(self.widths)} must list >= log2(patch) = {num_strided} "
                         f"positive channel counts for patch {p} (one per 3x3 conv; the last "
                         f"{num_strided} have stride 2).")
    if self.norm not in STEM_NORMS:
      raise ValueError(f"Unknown stem_norm {self.norm!r}; choose one of {STEM_NORMS}.")
    num_plain = len(widths) - num_strided
    for i, channels in enumerate(widths):
      stride = 1 if i < num_plain else 2
      x = nn.Conv(channels, (3, 3), strides=(stride, stride), padding="SAME", use_bias=False,
                  dtype=self.dtype, param_dtype=self.param_dtype,
                  kernel_init=logical(nn.initializers.he_normal(), (None, None, None, None)),
                  name=f"conv_{i}")(x)
      affine = dict(scale_init=logical(nn.initializers.ones, (None,)), bias_init=logical(zeros_init, (None,)),
                    epsilon=1e-6, dtype=self.dtype, param_dtype=self.param_dtype, name=f"norm_{i}")
      if self.norm == "layer":
        x = nn.LayerNorm(**affine)(x)
      else:  # 'instance': statistics over H', W' per image and channel; [B, H', W', channels]
        x = nn.GroupNorm(num_groups=None, group_size=1, **affine)(x)
      x = nn.relu(x)
    return nn.Conv(self.width, (1, 1), dtype=self.dtype, param_dtype=self.param_dtype,
                   kernel_init=logical(nn.initializers.lecun_normal(), (None, None, None, "embed")),
                   bias_init=logical(zeros_init, ("embed",)), name="proj")(x)


class PatchEmbed(nn.Module):
  """Non-overlapping p x p patches -> `width` channels; params as nn.Conv's: `kernel [p, p, C, D]`, `bias [D]`.

  `[B, H, W, C] -> [B, H/p, W/p, D]`, computed as a strided conv or as
  patches-to-rows + one matmul (same function; LVM_JAX_PATCH_EMBED picks, see
  lvm_jax/models/perf.py).
  """
  width: int
  patch: tuple[int, int]
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    ph, pw = self.patch
    batch, height, wid, channels = x.shape
    kernel = self.param("kernel", logical(nn.initializers.lecun_normal(), (None, None, None, "embed")),
                        (ph, pw, channels, self.width), self.param_dtype).astype(self.dtype)
    x = x.astype(self.dtype)
    if perf.choice("LVM_JAX_PATCH_EMBED") == "matmul":
      gh, gw = height // ph, wid // pw
      rows = x[:, :gh * ph, :gw * pw].reshape(batch, gh, ph, gw, pw, channels).transpose(0, 1, 3, 2, 4, 5)
      y = rows.reshape(batch, gh, gw, ph * pw * channels) @ kernel.reshape(ph * pw * channels, self.width)
    else:
      y = jax.lax.conv_general_dilated(x, kernel, self.patch, "VALID",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.use_bias:
      bias = self.param("bias", logical(zeros_init, ("embed",)), (self.width,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


class ViT(nn.Module):
  """Vision Transformer over `[B, H, W, C]` images (see module docstring for the param tree)."""
  variant: str | None = "B/16"
  num_classes: int | None = None  # None: bare backbone
  width: int | None = None  # explicit fields override the variant
  depth: int | None = None
  num_heads: int | None = None
  mlp_dim: int | None = None
  patch_size: int | Sequence[int] | None = None
  image_size: int | Sequence[int] = 224  # sets the stored learned pos-emb grid
  pool: str = "cls"  # 'cls' | 'gap' | 'map' | 'none'
  class_token: bool = True
  num_registers: int = 0
  pos_embed: str = "learned"  # 'learned' | 'sincos2d' | 'none'
  pos_embed_interp: str = "bicubic_antialias"  # see pos_embed.POS_EMBED_INTERP
  pos_embed_includes_cls: bool = True  # timm/DINOv2/CLIP store a cls position; big_vision does not
  patch_bias: bool = True  # CLIP's conv1 has no bias
  stem: str = "patch"  # 'patch' (one strided conv) | 'conv' (Xiao et al. 2021 convolutional stem)
  stem_widths: Sequence[int] | None = None  # channels of each 3x3 conv (ConvStem); ignored for stem='patch'
  stem_norm: str = "layer"  # 'layer' | 'instance' (ConvStem); ignored for stem='patch'
  layerscale_init: float | None = None
  ffn: str = "mlp"  # 'mlp' | 'swiglu'
  qkv_bias: bool = True
  act: str = "gelu"  # 'gelu' (erf) | 'gelu_tanh' | 'quick_gelu'
  norm_eps: float = 1e-6
  pre_norm: bool = False
  final_norm: bool = True
  fc_norm: bool = False
  rep_size: int | None = None
  head_zero_init: bool = True
  drop_path_rate: float = 0.0
  drop_path_uniform: bool = False
  dropout_rate: float = 0.0
  patch_dropout: float = 0.0
  use_mask_token: bool = False
  attention_impl: str = "xla"  # 'xla' | 'cudnn' | 'splash' | 'auto'
  remat: str = "none"  # 'none' | 'full' | 'dots'
  scan_layers: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def dims(self) -> tuple[int, int, int, int, tuple[int, int]]:
    """(width, depth, num_heads, mlp_dim, (patch_h, patch_w)) after variant + overrides."""
    base = parse_variant(self.variant) if self.variant else (None,) * 5
    vals = [getattr(self, f) if getattr(self, f) is not None else b
            for f, b in zip(("width", "depth", "num_heads", "mlp_dim", "patch_size"), base)]
    if vals[3] is None and vals[0] is not None:
      vals[3] = 4 * vals[0]
    if any(v is None for v in vals):
      raise ValueError("ViT needs a variant (e.g. 'B/16') or explicit width, depth, num_heads "
                       "and patch_size.")
    return (*vals[:4], _pair(vals[4]))

  def _check_config(self, width: int, num_heads: int) -> None:
    if self.pool not in POOLS:
      raise ValueError(f"Unknown pool {self.pool!r}; choose one of {POOLS}.")
    if self.pool == "cls" and not self.class_token:
      raise ValueError("pool='cls' needs class_token=True; use pool='gap' or 'map' without a class token.")
    if self.pool == "none" and self.num_classes:
      raise ValueError("pool='none' cannot feed a classification head; set num_classes=None or pick a pool.")
    if self.pos_embed not in POS_EMBEDS:
      raise ValueError(f"Unknown pos_embed {self.pos_embed!r}; choose one of {POS_EMBEDS}.")
    if self.pos_embed_interp not in POS_EMBED_INTERP:
      raise ValueError(f"Unknown pos_embed_interp {self.pos_embed_interp!r}; choose one of {POS_EMBED_INTERP}.")
    if not 0.0 <= self.patch_dropout < 1.0:
      raise ValueError(f"patch_dropout must be in [0, 1), got {self.patch_dropout}.")
    if width % num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {num_heads}.")

  @nn.compact
  def __call__(self, images: Array, train: bool = False, mask: Array | None = None,
               return_layers: Sequence[int] = ()) -> dict[str, Any]:
    """Runs the backbone (and head).

    Args:
      images: `[B, H, W, C]` float, normalised; H, W multiples of the patch size.
      train: enables dropout / drop-path / patch dropout ('dropout' rng).
      mask: optional bool `[B, N]` (N = number of patches); True positions get
        the learned mask token instead of their patch embedding (before pos-emb).
      return_layers: block indices (negative from the end) whose token outputs
        are returned under 'layers', normed with the final norm (as DINOv2's
        get_intermediate_layers).
    Returns dict with 'cls' `[B, D]` (None without class token), 'registers'
    `[B, R, D]`, 'patch_tokens' `[B, N', D]` (N' < N under patch dropout),
    'pooled' `[B, D]` (None for pool='none'), 'pre_logits' `[B, D']`,
    'logits' `[B, classes]` (only with num_classes), 'layers' list of `[B, T, D]`.
    """
    width, depth, num_heads, mlp_dim, patch = self.dims()
    self._check_config(width, num_heads)
    if images.ndim != 4:
      raise ValueError(f"ViT expects images [B, H, W, C], got shape {images.shape}.")
    batch, height, wid = images.shape[:3]
    if height % patch[0] or wid % patch[1]:
      raise ValueError(f"Image size {(height, wid)} is not divisible by patch size {patch}; "
                       "resize or crop the images.")
    grid = (height // patch[0], wid // patch[1])
    num_patches = grid[0] * grid[1]

    x = images.astype(self.dtype)
    if self.stem == "conv":
      x = ConvStem(width, patch, self.stem_widths, self.stem_norm, dtype=self.dtype,
                   param_dtype=self.param_dtype, name="conv_stem")(x)
    elif self.stem != "patch":
      raise ValueError(f"Unknown stem {self.stem!r}; choose 'patch' or 'conv'.")
    else:
      x = PatchEmbed(width, patch, self.patch_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="patch_embed")(x)
    x = x.reshape(batch, num_patches, width)

    if self.use_mask_token:
      mask_token = self.param("mask_token", logical(zeros_init, (None, None, "embed")),
                              (1, 1, width), self.param_dtype)
      if mask is not None:
        if mask.shape != (batch, num_patches):
          raise ValueError(f"mask must be bool [B, N] = {(batch, num_patches)}, got {mask.shape}.")
        x = jnp.where(mask[..., None], mask_token.astype(x.dtype), x)
    elif mask is not None:
      raise ValueError("A mask was passed but use_mask_token=False; build the ViT with use_mask_token=True.")

    cls = None
    if self.class_token:
      cls = self.param("cls_token", logical(zeros_init, (None, None, "embed")), (1, 1, width),
                       self.param_dtype)
      cls = jnp.tile(cls.astype(x.dtype), (batch, 1, 1))

    if self.pos_embed == "learned":
      stored = tuple(s // p for s, p in zip(_pair(self.image_size), patch))
      num_prefix = 1 if (self.class_token and self.pos_embed_includes_cls) else 0
      pos = self.param("pos_embed", logical(nn.initializers.normal(0.02), (None, None, "embed")),
                       (1, num_prefix + stored[0] * stored[1], width), self.param_dtype)
      patch_pos = resample_pos_embed(pos[:, num_prefix:], stored, grid, self.pos_embed_interp)
      x = x + patch_pos.astype(x.dtype)
      if num_prefix:
        cls = cls + pos[:, :1].astype(x.dtype)
    elif self.pos_embed == "sincos2d":
      x = x + posemb_sincos_2d(*grid, width, dtype=x.dtype)

    if train and self.patch_dropout > 0:
      # Keep a random subset (in original order) of patch tokens, timm's PatchDropout.
      keep = max(1, int(num_patches * (1.0 - self.patch_dropout)))
      noise = jax.random.uniform(self.make_rng("dropout"), (batch, num_patches))
      idx = jnp.sort(jnp.argsort(noise, axis=1)[:, :keep], axis=1)
      x = jnp.take_along_axis(x, idx[..., None], axis=1)

    prefix = [] if cls is None else [cls]
    if self.num_registers:
      regs = self.param("reg_tokens", logical(nn.initializers.normal(1e-6), (None, None, "embed")),
                        (1, self.num_registers, width), self.param_dtype)
      prefix.append(jnp.tile(regs.astype(x.dtype), (batch, 1, 1)))
    x = jnp.concatenate(prefix + [x], axis=1)
    x = constrain(x, ("batch", "length", "act_embed"))
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    if self.pre_norm:
      x = layer_norm(self.norm_eps, self.dtype, self.param_dtype, "norm_pre")(x)

    x, layers = Encoder(
        depth, num_heads, mlp_dim, ffn=self.ffn, act=self.act, qkv_bias=self.qkv_bias,
        layerscale_init=self.layerscale_init, norm_eps=self.norm_eps, dropout_rate=self.dropout_rate,
        drop_path_rate=self.drop_path_rate, drop_path_uniform=self.drop_path_uniform,
        attention_impl=self.attention_impl, remat=self.remat, scan_layers=self.scan_layers,
        dtype=self.dtype, param_dtype=self.param_dtype, name="encoder")(
            x, train=train, return_layers=tuple(return_layers))
    if self.final_norm:
      norm = layer_norm(self.norm_eps, self.dtype, self.param_dtype, "norm")
      x = norm(x)
      layers = [norm(y) for y in layers]

    num_prefix_tokens = int(self.class_token) + self.num_registers
    out: dict[str, Any] = {
        "cls": x[:, 0] if self.class_token else None,
        "registers": x[:, int(self.class_token):num_prefix_tokens],
        "patch_tokens": x[:, num_prefix_tokens:],
        "layers": layers,
    }
    if self.pool == "cls":
      pooled = x[:, 0]
    elif self.pool == "gap":
      pooled = jnp.mean(out["patch_tokens"], axis=1)
    elif self.pool == "map":
      pooled = MAPHead(num_heads, mlp_dim, act=self.act, norm_eps=self.norm_eps,
                       attention_impl=self.attention_impl, dtype=self.dtype,
                       param_dtype=self.param_dtype, name="map_head")(x)
    else:
      pooled = None
    if pooled is not None and self.fc_norm:
      pooled = layer_norm(self.norm_eps, self.dtype, self.param_dtype, "fc_norm")(pooled)
    out["pooled"] = pooled

    pre_logits = pooled
    if self.rep_size and pooled is not None:
      # lecun_normal: big_vision's pre-logits layer is a default-initialised flax Dense.
      pre_logits = nn.tanh(nn.Dense(self.rep_size, dtype=self.dtype, param_dtype=self.param_dtype,
                                    kernel_init=logical(nn.initializers.lecun_normal(), ("embed", "proj")),
                                    bias_init=logical(zeros_init, ("proj",)), name="pre_logits")(pooled))
    out["pre_logits"] = pre_logits
    if self.num_classes:
      head_init = zeros_init if self.head_zero_init else nn.initializers.truncated_normal(0.02)
      out["logits"] = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                               kernel_init=logical(head_init, ("embed", "classes")),
                               bias_init=logical(zeros_init, ("classes",)), name="head")(pre_logits)
    return out
