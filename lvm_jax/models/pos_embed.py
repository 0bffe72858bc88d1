"""Position embeddings: 2-D sin-cos tables and resampling of learned grids.

Resampling is done with separable interpolation matrices built in NumPy at
trace time (grid sizes are static), then applied with one einsum. The
matrices transcribe PyTorch's ``F.interpolate(mode='bicubic')`` kernels so a
checkpoint converted from timm / DINOv2 sees exactly the position embedding it
saw in PyTorch when run at a new resolution.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

POS_EMBED_INTERP = ("bicubic", "bicubic_antialias", "dinov2", "dinov2_antialias", "jax")


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0,
                     dtype=jnp.float32) -> Array:
  """Fixed 2-D sin-cos position table as in big_vision / MoCo v3.

  Returns `[1, h*w, width]`, rows in row-major (y, x) order; features are
  `[sin(x*w_k), cos(x*w_k), sin(y*w_k), cos(y*w_k)]` with
  `w_k = temperature ** (-k / (width/4 - 1))`.
  """
  if width % 4:
    raise ValueError(f"sincos2d position embedding needs width divisible by 4, got {width}; "
                     "use pos_embed='learned' or change the width.")
  y, x = np.mgrid[:h, :w]
  quarter = width // 4
  omega = np.arange(quarter) / max(quarter - 1, 1)
  omega = 1.0 / (temperature ** omega)
  y = np.einsum("m,d->md", y.flatten(), omega)
  x = np.einsum("m,d->md", x.flatten(), omega)
  pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
  return jnp.asarray(pe[None], dtype)


# --- PyTorch-equivalent 1-D interpolation matrices ----------------------------

def _cubic_keys(x: np.ndarray, a: float) -> np.ndarray:
  """Keys cubic convolution kernel (a=-0.75 torch bicubic, a=-0.5 torch antialias / PIL)."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def _torch_scale(in_size: int, out_size: int, scale_factor: float | None) -> float:
  # torch's area_pixel_compute_scale (align_corners=False): a user-given scale
  # factor wins over in/out -- this is what makes DINOv2's +0.1 offset matter.
  if scale_factor is not None and scale_factor > 0:
    return 1.0 / scale_factor
  return in_size / out_size


def bicubic_matrix(in_size: int, out_size: int, *, antialias: bool = False,
                   scale_factor: float | None = None) -> np.ndarray:
  """`[out_size, in_size]` matrix M with `out = M @ in`, matching torch bicubic.

  antialias=False: `upsample_bicubic2d` (a=-0.75, border indices clamped).
  antialias=True: `_upsample_bicubic2d_aa` (a=-0.5, support widened by the
  scale when downsampling, window cut at the border and renormalised).
  """
  scale = _torch_scale(in_size, out_size, scale_factor)
  mat = np.zeros((out_size, in_size), np.float64)
  if not antialias:
    for i in range(out_size):
      real = scale * (i + 0.5) - 0.5  # cubic: no clamp of the source coordinate
      base = math.floor(real)
      t = real - base
      weights = _cubic_keys(np.array([t + 1, t, 1 - t, 2 - t]), -0.75)
      for k, wgt in enumerate(weights):
        mat[i, min(max(base - 1 + k, 0), in_size - 1)] += wgt
    return mat
  support = 2.0 * scale if scale >= 1.0 else 2.0
  invscale = 1.0 / scale if scale >= 1.0 else 1.0
  for i in range(out_size):
    center = scale * (i + 0.5)
    lo = max(int(center - support + 0.5), 0)
    hi = min(int(center + support + 0.5), in_size)
    j = np.arange(lo, hi)
    weights = _cubic_keys((j - center + 0.5) * invscale, -0.5)
    total = weights.sum()
    mat[i, lo:hi] = weights / total if total != 0 else weights
  return mat


def resample_pos_embed(pos_embed: Array, old_grid: tuple[int, int], new_grid: tuple[int, int],
                       method: str = "bicubic") -> Array:
  """Resamples a learned patch position embedding to a new grid.

  Args:
    pos_embed: `[..., old_h*old_w, D]` patch position embeddings (no prefix tokens).
    old_grid: `(old_h, old_w)` grid the table was trained at.
    new_grid: `(new_h, new_w)` grid wanted.
    method: 'bicubic' (torch, antialias=False), 'bicubic_antialias' (torch,
      timm's default), 'dinov2' / 'dinov2_antialias' (torch with
      scale_factor=(new+0.1)/old as DINOv2), 'jax' (jax.image.resize bicubic).
  Returns:
    `[..., new_h*new_w, D]` in the input dtype (computed in float32).
  """
  if method not in POS_EMBED_INTERP:
    raise ValueError(f"Unknown pos_embed_interp {method!r}; choose one of {POS_EMBED_INTERP}.")
  old_grid, new_grid = tuple(old_grid), tuple(new_grid)
  if pos_embed.shape[-2] != old_grid[0] * old_grid[1]:
    raise ValueError(f"pos_embed has {pos_embed.shape[-2]} positions but old_grid {old_grid} "
                     f"needs {old_grid[0] * old_grid[1]}; pass the grid the table was trained at.")
  if old_grid == new_grid:
    return pos_embed
  lead, dim, dtype = pos_embed.shape[:-2], pos_embed.shape[-1], pos_embed.dtype
  grid = pos_embed.astype(jnp.float32).reshape(*lead, *old_grid, dim)
  if method == "jax":
    out = jax.image.resize(grid, (*lead, *new_grid, dim), method="bicubic")
  else:
    antialias = method.endswith("antialias")
    if method.startswith("dinov2"):
      # DINOv2 passes scale factors (new + 0.1) / old; torch then samples with
      # old / (new + 0.1) rather than old / new.
      factors = [(n + 0.1) / o for n, o in zip(new_grid, old_grid)]
    else:
      factors = [None, None]
    mh = bicubic_matrix(old_grid[0], new_grid[0], antialias=antialias, scale_factor=factors[0])
    mw = bicubic_matrix(old_grid[1], new_grid[1], antialias=antialias, scale_factor=factors[1])
    out = jnp.einsum("yh,...hwd,xw->...yxd", jnp.asarray(mh, jnp.float32), grid,
                     jnp.asarray(mw, jnp.float32), precision=jax.lax.Precision.HIGHEST)
  return out.reshape(*lead, new_grid[0] * new_grid[1], dim).astype(dtype)
