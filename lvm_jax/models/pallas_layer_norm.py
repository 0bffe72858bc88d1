"""LayerNorm forward and backward as Pallas (Triton) GPU kernels: one pass over the rows each way.

Why: on an H200, XLA compiles a ViT-B/16 LayerNorm into 3 kernels forward (~100 us per call)
and ~6 backward (~400 us), against ~35 us / ~60 us for one memory-bound pass (docs/benchmarks.md,
2026-11-27 profile). Here each program normalises one row `[D]` (the row is padded to a power
of two in registers, masked), keeping the statistics in float32; the backward computes dx in one
pass per row and leaves the scale/bias gradients (column sums over all rows) to XLA's reduction.

Numerics are those of `layers.LayerNorm`: float32 two-pass statistics, torch's formula. Off GPU
the kernels run in Pallas interpret mode (slow; for tests). Selected with LVM_JAX_LAYERNORM=pallas
(lvm_jax/models/perf.py).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

Array = jax.Array


def _row_block(width: int) -> tuple[int, int]:
  """(padded row length, warps): a power of two >= width; 8 warps for long rows, fewer for short."""
  block = max(128, pl.next_power_of_2(width))
  return block, min(max(block // 256, 1), 8)


def _forward_kernel(x_ref, scale_ref, bias_ref, y_ref, mean_ref, rstd_ref, *, eps: float, block: int):
  width = x_ref.shape[0]
  cols = jnp.arange(block)
  valid = cols < width
  x = plgpu.load(x_ref.at[cols], mask=valid, other=0.0).astype(jnp.float32)
  mean = jnp.sum(x) / width
  centred = jnp.where(valid, x - mean, 0.0)
  rstd = 1.0 / jnp.sqrt(jnp.sum(centred * centred) / width + eps)
  scale = plgpu.load(scale_ref.at[cols], mask=valid, other=0.0).astype(jnp.float32)
  bias = plgpu.load(bias_ref.at[cols], mask=valid, other=0.0).astype(jnp.float32)
  plgpu.store(y_ref.at[cols], (centred * rstd * scale + bias).astype(y_ref.dtype), mask=valid)
  mean_ref[...] = mean
  rstd_ref[...] = rstd


def _dx_kernel(x_ref, scale_ref, dy_ref, mean_ref, rstd_ref, dx_ref, *, block: int):
  width = x_ref.shape[0]
  cols = jnp.arange(block)
  valid = cols < width
  mean, rstd = mean_ref[...], rstd_ref[...]
  x = plgpu.load(x_ref.at[cols], mask=valid, other=0.0).astype(jnp.float32)
  dy = plgpu.load(dy_ref.at[cols], mask=valid, other=0.0).astype(jnp.float32)
  scale = plgpu.load(scale_ref.at[cols], mask=valid, other=0.0).astype(jnp.float32)
  xhat = jnp.where(valid, (x - mean) * rstd, 0.0)
  g = dy * scale
  dx = rstd * (g - jnp.sum(g) / width - xhat * (jnp.sum(g * xhat) / width))
  plgpu.store(dx_ref.at[cols], dx.astype(dx_ref.dtype), mask=valid)


def _compiled() -> bool:
  """Triton kernels on a GPU; anywhere else Pallas interprets the kernels with XLA ops."""
  return jax.default_backend() == "gpu"


def _rows_call(kernel, out_shape, num_warps: int, name: str):
  """A pallas_call over one row of `[D]`; callers vmap it: one program per row of `[R, D]`."""
  return pl.pallas_call(kernel, out_shape=out_shape, grid=(), name=name,
                        compiler_params=plgpu.CompilerParams(num_warps=num_warps),
                        interpret=not _compiled())


def _forward(x2: Array, scale: Array, bias: Array, eps: float) -> tuple[Array, Array, Array]:
  """x2 `[R, D]` -> (y `[R, D]`, mean `[R]`, rstd `[R]`); the one entry of both the primal and the VJP."""
  if _compiled() and jax.device_count() > 1:
    raise ValueError(f"LVM_JAX_LAYERNORM=pallas runs on one device only ({jax.device_count()} visible): "
                     "unset it (or set it to custom_vjp) for multi-device meshes.")
  width = x2.shape[-1]
  block, warps = _row_block(width)
  out_shape = (jax.ShapeDtypeStruct((width,), x2.dtype), jax.ShapeDtypeStruct((), jnp.float32),
               jax.ShapeDtypeStruct((), jnp.float32))
  call = _rows_call(functools.partial(_forward_kernel, eps=eps, block=block), out_shape, warps, "lvm_ln_fwd")
  return jax.vmap(call, in_axes=(0, None, None))(x2, scale, bias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def pallas_layer_norm(x: Array, scale: Array, bias: Array, eps: float) -> Array:
  """LayerNorm over the last axis: x `[..., D]`, scale/bias `[D]` -> `[..., D]` in x.dtype.

  On a GPU, one device per process only: the kernel is an opaque custom call that XLA's SPMD
  partitioner cannot split (a sharded input would be gathered), so it refuses several devices.
  Elsewhere it runs in interpret mode (ordinary XLA ops, any number of devices).
  """
  y, _, _ = _forward(x.reshape(-1, x.shape[-1]), scale, bias, eps)
  return y.reshape(x.shape)


def _vjp_fwd(x, scale, bias, eps):
  y, mean, rstd = _forward(x.reshape(-1, x.shape[-1]), scale, bias, eps)
  return y.reshape(x.shape), (x, scale, bias, mean, rstd)


def _vjp_bwd(eps, residuals, dy):
  del eps
  x, scale, bias, mean, rstd = residuals
  width = x.shape[-1]
  x2, dy2 = x.reshape(-1, width), dy.reshape(-1, width)
  block, warps = _row_block(width)
  call = _rows_call(functools.partial(_dx_kernel, block=block), jax.ShapeDtypeStruct((width,), x.dtype),
                    warps, "lvm_ln_dx")
  dx = jax.vmap(call, in_axes=(0, None, 0, 0, 0))(x2, scale, dy2, mean, rstd)
  # Column sums over all rows: XLA's reduction (one fused pass over x and dy).
  xhat = (x2.astype(jnp.float32) - mean[:, None]) * rstd[:, None]
  dy32 = dy2.astype(jnp.float32)
  return (dx.reshape(x.shape), jnp.sum(dy32 * xhat, axis=0).astype(scale.dtype),
          jnp.sum(dy32, axis=0).astype(bias.dtype))


pallas_layer_norm.defvjp(_vjp_fwd, _vjp_bwd)
