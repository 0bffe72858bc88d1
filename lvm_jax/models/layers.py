"""Transformer building blocks shared by the ViT, the CLIP text tower and DINOv2.

Every parameter carries logical axis names (see lvm_jax/sharding.py) so the
same module shards as data-parallel, FSDP or tensor-parallel by config only.
Attention projections keep heads as their own axis (`[embed, heads, kv]`) so
tensor parallelism splits heads without reshapes.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lvm_jax.models import perf
from lvm_jax.models.pos_embed import posemb_sincos_2d, resample_pos_embed  # noqa: F401 (re-export)

Array = jax.Array
Dtype = Any

ATTENTION_IMPLS = ("xla", "cudnn", "splash", "auto")
REMAT_POLICIES = ("none", "full", "dots")
ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu", "relu", "silu")

# Dense kernels: xavier-uniform (big_vision); biases zero.
dense_init = nn.initializers.xavier_uniform()
zeros_init = nn.initializers.zeros
ones_init = nn.initializers.ones


def logical(init: Callable, names: Sequence[str | None]) -> Callable:
  """Shorthand for nn.with_logical_partitioning."""
  return nn.with_logical_partitioning(init, tuple(names))


def constrain(x: Array, names: Sequence[str | None]) -> Array:
  """Logical sharding constraint on an activation (no-op without a mesh/rules)."""
  return nn.with_logical_constraint(x, tuple(names))


def gelu(x: Array) -> Array:
  """Exact GELU as torch writes it, 0.5 x (1 + erf(x / sqrt 2)), on any shape.

  Same function as `jax.nn.gelu(approximate=False)`, whose erfc form costs an
  exp and two selects more per element: 20-25% of a ViT MLP's elementwise time on CPU.
  LVM_JAX_GELU (lvm_jax/models/perf.py) picks how the gradient is taken.
  """
  if perf.choice("LVM_JAX_GELU") == "recompute":
    return _gelu_recompute(x)
  return _gelu(x)


_SQRT_HALF = float(np.sqrt(0.5))
_INV_SQRT_2PI = float(1.0 / np.sqrt(2.0 * np.pi))


def _gelu(x: Array) -> Array:
  return x * (0.5 + 0.5 * jax.lax.erf(x * _SQRT_HALF))


@jax.custom_vjp
def _gelu_recompute(x: Array) -> Array:
  """GELU whose backward recomputes erf from the input instead of reading a saved copy.

  Autodiff keeps erf(x / sqrt 2) for the backward, so the forward is two passes
  over the `[rows, mlp]` activations (erf out, then x * (..) out) and the backward
  reads erf back; here the forward is one pass and only x is kept.
  """
  return _gelu(x)


def _gelu_recompute_fwd(x):
  return _gelu(x), x


def _gelu_recompute_bwd(x, g):
  # The barrier stops XLA from CSE-ing this erf with the forward's, which would bring back the saved copy.
  x = jax.lax.optimization_barrier(x)
  cdf = 0.5 + 0.5 * jax.lax.erf(x * _SQRT_HALF)
  pdf = _INV_SQRT_2PI * jnp.exp(-0.5 * x * x)
  return (g * (cdf + x * pdf),)


_gelu_recompute.defvjp(_gelu_recompute_fwd, _gelu_recompute_bwd)


def activation(name: str) -> Callable[[Array], Array]:
  """'gelu' is the exact erf GELU (torch nn.GELU default); 'quick_gelu' is OpenAI CLIP's."""
  if name == "gelu":
    return gelu
  if name == "gelu_tanh":
    return lambda x: nn.gelu(x, approximate=True)
  if name == "quick_gelu":
    return lambda x: x * jax.nn.sigmoid(1.702 * x)
  if name == "relu":
    return nn.relu
  if name == "silu":
    return nn.silu
  raise ValueError(f"Unknown activation {name!r}; choose one of {ACTIVATIONS}.")


def layer_norm(eps: float, dtype: Dtype, param_dtype: Dtype, name: str | None = None) -> "LayerNorm":
  return LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name)


class LayerNorm(nn.Module):
  """LayerNorm over the last axis with torch's numerics; params `scale`, `bias` `[embed]` (as flax's).

  Statistics run in float32 with the two-pass variance E[(x - mu)^2] (not
  E[x^2] - mu^2); the output is cast to `dtype`. The backward is written out
  (`_layer_norm`): it keeps only x and the per-row mean and 1/std, where
  autodiff of flax's LayerNorm saves full-size broadcasts of them.

  `normalize` returns the un-scaled xhat and the affine params instead, for a
  caller that folds the affine into its next matmul (LVM_JAX_LN_AFFINE=folded).
  """
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def affine(self, width: int) -> tuple[Array, Array]:
    """Declares (once) and returns the params scale, bias `[width]`."""
    scale = self.param("scale", logical(ones_init, ("embed",)), (width,), self.param_dtype)
    bias = self.param("bias", logical(zeros_init, ("embed",)), (width,), self.param_dtype)
    return scale, bias

  def __call__(self, x: Array) -> Array:
    """`[..., D]` -> `[..., D]`."""
    scale, bias = self.affine(x.shape[-1])
    return self._apply(x, scale, bias)

  def normalize(self, x: Array) -> tuple[Array, Array, Array]:
    """`[..., D]` -> (xhat `[..., D]` in `dtype`, scale `[D]`, bias `[D]`): LayerNorm = xhat * scale + bias."""
    scale, bias = self.affine(x.shape[-1])
    if perf.choice("LVM_JAX_LAYERNORM") == "custom_vjp":
      return _normalize(x, self.epsilon).astype(self.dtype), scale, bias
    return self._apply(x, jnp.ones_like(scale), jnp.zeros_like(bias)), scale, bias

  def _apply(self, x: Array, scale: Array, bias: Array) -> Array:
    impl = perf.choice("LVM_JAX_LAYERNORM")
    if impl == "autodiff":
      xhat, _, _ = _ln_stats(x, self.epsilon)
      return (xhat * scale.astype(xhat.dtype) + bias.astype(xhat.dtype)).astype(self.dtype)
    if impl == "pallas":
      from lvm_jax.models.pallas_layer_norm import pallas_layer_norm  # Pallas only needed here

      return pallas_layer_norm(x.astype(self.dtype), scale, bias, self.epsilon)
    return _layer_norm(x, scale, bias, self.epsilon).astype(self.dtype)


def fold_affine(kernel: Array, bias: Array | None, scale: Array, shift: Array) -> tuple[Array, Array]:
  """Folds y = (xhat * scale + shift) @ kernel + bias into y = xhat @ kernel' + bias'.

  kernel `[D, *out]`, bias `[*out]` or None, scale/shift `[D]` -> (kernel' `[D, *out]`, bias' `[*out]`).
  Weight-sized work replaces a `[rows, D]` broadcast multiply-add (and, in the backward, two
  `[rows, D]` reductions): autodiff through the fold gives scale/shift their exact gradients.
  """
  expand = (slice(None),) + (None,) * (kernel.ndim - 1)
  folded_bias = jnp.tensordot(shift.astype(kernel.dtype), kernel, axes=1)
  if bias is not None:
    folded_bias = folded_bias + bias.astype(kernel.dtype)
  return kernel * scale.astype(kernel.dtype)[expand], folded_bias


def _ln_stats(x: Array, eps: float) -> tuple[Array, Array, Array]:
  xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  mean = jnp.mean(xf, axis=-1, keepdims=True)
  centred = xf - mean
  rstd = jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + eps)
  return centred * rstd, mean, rstd


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm(x: Array, scale: Array, bias: Array, eps: float) -> Array:
  xhat, _, _ = _ln_stats(x, eps)
  return xhat * scale.astype(xhat.dtype) + bias.astype(xhat.dtype)


def _layer_norm_fwd(x, scale, bias, eps):
  xhat, mean, rstd = _ln_stats(x, eps)
  return xhat * scale.astype(xhat.dtype) + bias.astype(xhat.dtype), (x, mean, rstd, scale, bias)


def _layer_norm_bwd(eps, residuals, dy):
  del eps
  x, mean, rstd, scale, bias = residuals
  dy = dy.astype(mean.dtype)
  dx, xhat = _normalize_dx(x, mean, rstd, dy * scale.astype(mean.dtype))
  rows = tuple(range(x.ndim - 1))
  return (dx, jnp.sum(dy * xhat, axis=rows).astype(scale.dtype), jnp.sum(dy, axis=rows).astype(bias.dtype))


def _normalize_dx(x: Array, mean: Array, rstd: Array, g: Array) -> tuple[Array, Array]:
  """The backward of xhat = (x - mean) * rstd: (dx `[..., D]` in x.dtype, xhat `[..., D]`) for cotangent g."""
  xhat = (x.astype(mean.dtype) - mean) * rstd
  g = g.astype(mean.dtype)
  dx = rstd * (g - jnp.mean(g, axis=-1, keepdims=True) - xhat * jnp.mean(g * xhat, axis=-1, keepdims=True))
  return dx.astype(x.dtype), xhat


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _normalize(x: Array, eps: float) -> Array:
  """LayerNorm without its affine: `[..., D]` -> xhat `[..., D]` (float32), the backward written out."""
  return _ln_stats(x, eps)[0]


def _normalize_fwd(x, eps):
  xhat, mean, rstd = _ln_stats(x, eps)
  return xhat, (x, mean, rstd)


def _normalize_bwd(eps, residuals, g):
  del eps
  x, mean, rstd = residuals
  return (_normalize_dx(x, mean, rstd, g)[0],)


_normalize.defvjp(_normalize_fwd, _normalize_bwd)


# --- attention ----------------------------------------------------------------

def _resolve_impl(impl: str, dtype: Dtype) -> str:
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"Unknown attention_impl {impl!r}; choose one of {ATTENTION_IMPLS}.")
  if impl == "auto":
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if (jax.default_backend() == "gpu" and half) else "xla"
  return impl


def dot_product_attention(q: Array, k: Array, v: Array, mask: Array | None = None,
                          causal: bool = False, impl: str = "xla", kv_lengths: Array | None = None) -> Array:
  """Scaled dot-product attention on `[B, T, N, H]` q and `[B, S, N, H]` k/v.

  mask: bool, broadcastable to `[B, N, T, S]`, True = may attend.
  impl: 'xla' | 'cudnn' | 'auto' | 'splash' (Pallas TPU kernel; CPU runs it in
  interpret mode).
  kv_lengths: int `[B]`, only the first kv_lengths[b] keys of example b are
  attended to (the rest is padding; cuDNN takes it as sequence lengths).
  """
  impl = _resolve_impl(impl, q.dtype)
  if kv_lengths is not None:
    if impl == "cudnn" and mask is None and q.shape[1] % 2 == 0 and k.shape[1] % 2 == 0:
      # Every query row is valid (padded rows see the real keys; the caller drops them).
      return jax.nn.dot_product_attention(
          q, k, v, is_causal=causal, implementation="cudnn",
          query_seq_lengths=jnp.full((q.shape[0],), q.shape[1], jnp.int32),
          key_value_seq_lengths=kv_lengths.astype(jnp.int32))
    key_ok = (jnp.arange(k.shape[1])[None, :] < kv_lengths[:, None])[:, None, None, :]
    mask = key_ok if mask is None else (jnp.asarray(mask, bool) & key_ok)
  if impl == "splash":
    return splash_attention(q, k, v, mask=mask, causal=causal)
  if mask is not None:
    mask = jnp.asarray(mask, bool)
    mask = jnp.broadcast_to(mask, (q.shape[0], q.shape[2], q.shape[1], k.shape[1]))
  if q.dtype == jnp.float64:
    # jax.nn's XLA path runs the softmax in float32; keep float64 exact (gradient checks).
    logits = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    if causal:
      mask = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool)) & (True if mask is None else mask)
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, axis=-1), v)
  if impl == "xla" and mask is None and not causal:
    return _xla_attention(q, k, v)
  if impl == "cudnn":
    return even_length_attention(q, k, v, mask=mask, causal=causal, implementation="cudnn")
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation=impl)


def even_length_attention(q: Array, k: Array, v: Array, mask: Array | None = None, causal: bool = False,
                          implementation: str | None = "cudnn") -> Array:
  """`jax.nn.dot_product_attention` with the sequence lengths zero-padded to even numbers.

  jax (0.11-0.12) refuses to *train* through cuDNN flash attention when a
  length is odd ("Unsupported sequence length Q 197, KV 197": its backward
  check counts the always-present placeholder bias as a bias), and ViTs have
  odd lengths (196 patches + CLS; CLIP's 77 text tokens). Padded keys are
  hidden (per-example key lengths, or False in the mask), padded query rows
  are dropped. q `[B, T, N, H]`, k/v `[B, S, N, H]`; mask broadcastable to
  `[B, N, T, S]` (True = attend).
  """
  batch, q_len, _, _ = q.shape
  kv_len = k.shape[1]
  q_pad, kv_pad = q_len % 2, kv_len % 2
  if not (q_pad or kv_pad):
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation=implementation)
  pad_len = lambda x, n: jnp.pad(x, ((0, 0), (0, n), (0, 0), (0, 0)))
  q, k, v = pad_len(q, q_pad), pad_len(k, kv_pad), pad_len(v, kv_pad)
  if mask is None:
    out = jax.nn.dot_product_attention(
        q, k, v, is_causal=causal, implementation=implementation,
        query_seq_lengths=jnp.full((batch,), q_len, jnp.int32),
        key_value_seq_lengths=jnp.full((batch,), kv_len, jnp.int32))
  else:
    # Padded key columns are masked; padded query rows see the real keys (their output is dropped).
    mask = jnp.broadcast_to(jnp.asarray(mask, bool), (batch, q.shape[2], q_len, kv_len))
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, 0), (0, kv_pad)), constant_values=False)
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, q_pad), (0, 0)), mode="edge")
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation=implementation)
  return out[:, :q_len]


def _to_heads(x: Array) -> Array:
  """`[B, T, N, H]` <-> `[B, N, T, H]` (its own inverse)."""
  return jnp.swapaxes(x, 1, 2)


def _attention_heads(q_h: Array, k_h: Array, v_h: Array) -> tuple[Array, Array]:
  """softmax(q k^T) v on head-major `[B, N, T, H]` q (already scaled by 1/sqrt(H)), `[B, N, S, H]` k, v
  -> (out `[B, N, T, H]`, float32 probabilities `[B, N, T, S]`), as jax.nn's XLA path: float32 softmax."""
  logits = jnp.einsum("bnth,bnsh->bnts", q_h, k_h, preferred_element_type=jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum("bnts,bnsh->bnth", probs.astype(v_h.dtype), v_h), probs


def _heads_and_scale(q: Array, k: Array, v: Array) -> tuple[Array, Array, Array]:
  scale = jnp.asarray(1.0 / np.sqrt(q.shape[-1]), q.dtype)
  return _to_heads(q * scale), _to_heads(k), _to_heads(v)


@jax.custom_vjp
def _xla_attention(q: Array, k: Array, v: Array) -> Array:
  """Unmasked attention on `[B, T, N, H]` q and `[B, S, N, H]` k, v whose backward recomputes the
  probabilities (flash-attention style) from head-major residuals.

  No `[B, N, T, S]` residual is saved by the custom VJP, and the forward
  (QK^T -> softmax -> PV with no other consumer) is one fusion on XLA:CPU.
  (Inside one jitted step XLA:CPU's CSE may merge the backward's QK^T with the
  forward's, keeping the logits live: the memory saving is not guaranteed
  there; the time saving below is what was measured.)
  autodiff of jax.nn.dot_product_attention writes and re-reads the probability
  matrix several times instead (~5% of a ViT-S training step on CPU). The
  residuals are the `[B, N, T, H]` copies the dots read, so the backward does
  not transpose q, k and v again (ViT-S/16 f32 train step on 2 CPU cores:
  1.028x, 6 alternated separate-process rounds; docs/benchmarks.md session 9).
  """
  return _xla_attention_fwd(q, k, v)[0]


def _xla_attention_fwd(q, k, v):
  q_h, k_h, v_h = _heads_and_scale(q, k, v)
  out_h, _ = _attention_heads(q_h, k_h, v_h)
  return _to_heads(out_h), (q_h, k_h, v_h, out_h)


def _xla_attention_bwd(residuals, d_out):
  q_h, k_h, v_h, out_h = residuals
  scale = jnp.asarray(1.0 / np.sqrt(q_h.shape[-1]), q_h.dtype)
  d_out_h = _to_heads(d_out)
  _, probs = _attention_heads(q_h, k_h, v_h)
  d_v = jnp.einsum("bnts,bnth->bnsh", probs.astype(d_out.dtype), d_out_h)
  d_probs = jnp.einsum("bnth,bnsh->bnts", d_out_h, v_h, preferred_element_type=jnp.float32)
  # softmax backward: p * (dp - sum_s p dp), with sum_s p dp = sum_h dout * out (one [B, N, T] row sum)
  row = jnp.sum(d_out_h.astype(jnp.float32) * out_h.astype(jnp.float32), axis=-1)
  d_logits = (probs * (d_probs - row[..., None])).astype(q_h.dtype)
  d_q = jnp.einsum("bnts,bnsh->bnth", d_logits, k_h) * scale  # q_h holds q * scale
  d_k = jnp.einsum("bnts,bnth->bnsh", d_logits, q_h)
  return _to_heads(d_q), _to_heads(d_k), _to_heads(d_v)


_xla_attention.defvjp(_xla_attention_fwd, _xla_attention_bwd)


SPLASH_BLOCK = 128  # splash tiles are multiples of the 128-lane vreg width


def splash_attention(q: Array, k: Array, v: Array, mask: Array | None = None,
                     causal: bool = False) -> Array:
  """Pallas TPU splash attention on `[B, T, N, H]` q, `[B, S, N, H]` k/v -> `[B, T, N, H]`.

  Lengths are zero-padded to multiples of 128; padded keys are hidden with
  segment ids. `mask` may only be a key-padding mask broadcastable to
  `[B, 1, 1, S]` (True = attend): splash masks are static per head, so
  arbitrary per-example masks need impl='xla'. Off TPU the kernel runs in
  Pallas interpret mode (slow; for tests).
  """
  from jax.experimental.pallas.ops.tpu import splash_attention as sa  # Pallas only needed here

  batch, q_len, heads, head_dim = q.shape
  kv_len = k.shape[1]
  key_ok = jnp.ones((batch, kv_len), bool)
  if mask is not None:
    mask = jnp.asarray(mask, bool)
    if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[2] != 1:
      raise ValueError(f"attention_impl='splash' supports only key-padding masks [B, 1, 1, S], got "
                       f"{mask.shape}; use attention_impl='xla' for general masks.")
    key_ok = jnp.broadcast_to(mask[:, 0, 0, :], (batch, kv_len))
  pad = lambda n: -n % SPLASH_BLOCK
  q_pad, kv_pad = pad(q_len), pad(kv_len)
  if causal and q_len != kv_len:
    raise ValueError("causal splash attention needs equal query and key lengths; use attention_impl='xla'.")
  # The kernel does not scale logits; heads-major layout [N, T, H] per example.
  to_heads = lambda x, n: jnp.pad(x, ((0, 0), (0, n), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
  qh = to_heads(q * (1.0 / np.sqrt(head_dim)).astype(q.dtype), q_pad)
  kh, vh = to_heads(k, kv_pad), to_heads(v, kv_pad)
  shape = (q_len + q_pad, kv_len + kv_pad)
  head_mask = sa.CausalMask(shape) if causal else sa.FullMask(shape)
  kernel = sa.make_splash_mha(sa.MultiHeadMask([head_mask] * heads), head_shards=1, q_seq_shards=1,
                              interpret=jax.default_backend() != "tpu")
  # Every query (padded ones too) has segment 1; padded or masked keys get 0,
  # so no softmax row is empty.
  q_seg = jnp.ones((batch, shape[0]), jnp.int32)
  kv_seg = jnp.pad(key_ok.astype(jnp.int32), ((0, 0), (0, kv_pad)))
  out = jax.vmap(lambda a, b, c, qs, ks: kernel(a, b, c, segment_ids=sa.SegmentIds(qs, ks)))(
      qh, kh, vh, q_seg, kv_seg)
  return out.transpose(0, 2, 1, 3)[:, :q_len].astype(q.dtype)


class MultiDense(nn.Module):
  """Dense layer contracting the last `num_in` input dims into `features` (a tuple).

  Same params as `nn.DenseGeneral` (`kernel [*in, *features]`, `bias [*features]`),
  but the kernel is created in its final N-d shape, so its logical-axis names
  (`names`) apply at init — DenseGeneral inits a flattened 2-D kernel, which
  breaks sharding constraints under jit with explicit out_shardings.
  """
  features: tuple[int, ...]
  num_in: int
  names: tuple[str | None, ...]
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def weights(self, in_shape: tuple[int, ...]) -> tuple[Array, Array | None]:
    """Declares (once) and returns the params: kernel `[*in_shape, *features]`, bias `[*features]` or None."""
    n_in = len(in_shape)
    kernel_shape = tuple(in_shape) + tuple(self.features)
    init = nn.initializers.xavier_uniform(in_axis=tuple(range(n_in)),
                                          out_axis=tuple(range(n_in, len(kernel_shape))))
    kernel = self.param("kernel", logical(init, self.names), kernel_shape, self.param_dtype)
    bias = None
    if self.use_bias:
      bias = self.param("bias", logical(zeros_init, self.names[n_in:]), tuple(self.features),
                        self.param_dtype)
    return kernel, bias

  def __call__(self, x: Array, input_affine: tuple[Array, Array] | None = None) -> Array:
    """`[..., *in]` -> `[..., *features]`.

    input_affine: (scale, shift) `[D]` of a LayerNorm whose un-scaled output x is (num_in 1):
    computes (x * scale + shift) @ kernel + bias with the affine folded into the weights.
    """
    kernel, bias = self.weights(tuple(x.shape[-self.num_in:]))
    if input_affine is not None:
      kernel, bias = fold_affine(kernel, bias, *input_affine)
    contract = (tuple(range(x.ndim - self.num_in, x.ndim)), tuple(range(self.num_in)))
    y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())))
    if bias is not None:
      y = y + bias.astype(self.dtype)
    return y


class Attention(nn.Module):
  """Multi-head attention with separate q/k/v projections.

  Params: query/key/value `kernel [embed, heads, kv]`, `bias [heads, kv]`;
  out `kernel [heads, kv, embed]`, `bias [embed]`.
  """
  num_heads: int
  head_dim: int | None = None  # default: width // num_heads
  out_features: int | None = None  # default: width of inputs_q
  qkv_bias: bool = True
  out_bias: bool = True
  attention_impl: str = "xla"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Array | None = None, mask: Array | None = None,
               causal: bool = False, kv_lengths: Array | None = None,
               input_affine: tuple[Array, Array] | None = None) -> Array:
    """inputs_q `[B, T, D]`, inputs_kv `[B, S, D]` (default: self-attention) -> `[B, T, D_out]`.

    mask: bool broadcastable to `[B, heads, T, S]` (True = attend); causal adds
    a lower-triangular mask (CLIP text tower); kv_lengths int `[B]`: keys past
    it are padding. input_affine: (scale, shift) `[D]` of the LayerNorm whose
    un-scaled output inputs_q is, folded into the q/k/v projections (self-attention only).
    """
    if input_affine is not None and inputs_kv is not None:
      raise ValueError("input_affine folds one LayerNorm into q/k/v and needs self-attention; "
                       "apply the LayerNorm to inputs_q and inputs_kv yourself for cross-attention.")
    inputs_kv = inputs_q if inputs_kv is None else inputs_kv
    width = inputs_q.shape[-1]
    if self.head_dim is None and width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}; "
                       "change one of them or set head_dim.")
    head_dim = self.head_dim or width // self.num_heads
    proj = lambda name: MultiDense(
        (self.num_heads, head_dim), 1, ("embed", "heads", "kv"), use_bias=self.qkv_bias,
        dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    if inputs_kv is inputs_q and perf.choice("LVM_JAX_QKV") == "fused":
      q, k, v = _fused_qkv([proj(name) for name in ("query", "key", "value")], inputs_q, self.dtype,
                           input_affine)
    else:
      q = proj("query")(inputs_q, input_affine)
      k = proj("key")(inputs_kv, input_affine)
      v = proj("value")(inputs_kv, input_affine)
    names = ("batch", "length", "act_heads", "act_kv")
    q, k, v = constrain(q, names), constrain(k, names), constrain(v, names)
    x = dot_product_attention(q, k, v, mask=mask, causal=causal, impl=self.attention_impl,
                              kv_lengths=kv_lengths)
    x = constrain(x, names)
    out = MultiDense((self.out_features or width,), 2, ("heads", "kv", "embed"), use_bias=self.out_bias,
                     dtype=self.dtype, param_dtype=self.param_dtype, name="out")(x)
    return constrain(out, ("batch", "length", "act_embed"))


def _fused_qkv(projections: Sequence[MultiDense], x: Array, dtype: Dtype,
               input_affine: tuple[Array, Array] | None = None) -> tuple[Array, Array, Array]:
  """q, k, v `[B, L, N, H]` from one `[D] x [D, 3, N, H]` matmul over the three projections' own params.

  One wide matmul instead of three narrow ones (and one for each gradient); the
  params stay separate `query` / `key` / `value` trees, stacked on the fly.
  input_affine: as MultiDense's.
  """
  weights = [p.weights((x.shape[-1],)) for p in projections]
  if input_affine is not None:
    weights = [fold_affine(kernel, bias, *input_affine) for kernel, bias in weights]
  kernel = jnp.stack([w.astype(dtype) for w, _ in weights], axis=1)  # [D, 3, N, H]
  y = jax.lax.dot_general(x.astype(dtype), kernel, (((x.ndim - 1,), (0,)), ((), ())))
  if weights[0][1] is not None:
    y = y + jnp.stack([b.astype(dtype) for _, b in weights], axis=0)
  return y[..., 0, :, :], y[..., 1, :, :], y[..., 2, :, :]


# --- feed-forward -------------------------------------------------------------

class Mlp(nn.Module):
  """Dense(mlp_dim) -> act -> dropout -> Dense(width). Params `fc1 [embed, mlp]`, `fc2 [mlp, embed]`."""
  mlp_dim: int
  act: str = "gelu"
  dropout_rate: float = 0.0
  out_features: int | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False, input_affine: tuple[Array, Array] | None = None) -> Array:
    """`[B, L, D]` -> `[B, L, out_features or D]`; input_affine: as MultiDense's (folded into fc1)."""
    width, lead = x.shape[-1], x.shape[:-1]
    # Tokens flattened to rows: the weight gradients become plain [rows, in]^T [rows, out]
    # matmuls (contracting over batch and length at once cost a transposed copy of the
    # hidden activations on XLA:CPU; ~5% of a ViT-S training step).
    x = x.reshape((-1, width))
    # MultiDense: the same params and init as nn.Dense, plus the LayerNorm fold.
    x = MultiDense((self.mlp_dim,), 1, ("embed", "mlp"), dtype=self.dtype, param_dtype=self.param_dtype,
                   name="fc1")(x, input_affine)
    x = constrain(activation(self.act)(x), ("batch", "act_mlp"))
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    x = nn.Dense(self.out_features or width, dtype=self.dtype, param_dtype=self.param_dtype,
                 kernel_init=logical(dense_init, ("mlp", "embed")),
                 bias_init=logical(zeros_init, ("embed",)), name="fc2")(x)
    return x.reshape(lead + (x.shape[-1],))


def swiglu_hidden_dim(mlp_dim: int) -> int:
  """DINOv2's SwiGLU width rule: int(2/3 * mlp_dim) rounded up to a multiple of 8 (6144 -> 4096)."""
  return (int(mlp_dim * 2 / 3) + 7) // 8 * 8


class SwiGLU(nn.Module):
  """x -> w3(silu(w1 x) * w2 x), hidden = swiglu_hidden_dim(mlp_dim).

  Params `w1`, `w2` `[embed, mlp]`, `w3 [mlp, embed]`. DINOv2's fused `w12`
  is `concat([w1, w2], out_axis)` (first half goes through SiLU).
  """
  mlp_dim: int
  dropout_rate: float = 0.0
  out_features: int | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False, input_affine: tuple[Array, Array] | None = None) -> Array:
    """`[B, L, D]` -> `[B, L, out_features or D]`; input_affine: as MultiDense's (folded into w1, w2)."""
    width, hidden = x.shape[-1], swiglu_hidden_dim(self.mlp_dim)
    dense = lambda name: MultiDense((hidden,), 1, ("embed", "mlp"), dtype=self.dtype,
                                    param_dtype=self.param_dtype, name=name)
    h = nn.silu(dense("w1")(x, input_affine)) * dense("w2")(x, input_affine)
    h = constrain(h, ("batch", "length", "act_mlp"))
    h = nn.Dropout(self.dropout_rate)(h, deterministic=not train)
    return nn.Dense(self.out_features or width, dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=logical(dense_init, ("mlp", "embed")),
                    bias_init=logical(zeros_init, ("embed",)), name="w3")(h)


class LayerScale(nn.Module):
  """Per-channel scale `x * scale` (CaiT / DINOv2), param `scale [embed]`."""
  init_value: float = 1e-5
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", logical(nn.initializers.constant(self.init_value), ("embed",)),
                       (x.shape[-1],), self.param_dtype)
    return x * scale.astype(x.dtype)


class DropPath(nn.Module):
  """Stochastic depth: zero the residual branch per sample with prob `rate`, rescale the rest.

  `rate` may be a traced scalar (scanned layers carry one rate per layer).
  Uses the 'dropout' rng.
  """

  @nn.compact
  def __call__(self, x: Array, rate: float | Array, train: bool = False) -> Array:
    if not train or (isinstance(rate, (int, float)) and rate == 0.0):
      return x
    keep_prob = 1.0 - jnp.asarray(rate, jnp.float32)
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    keep = jax.random.bernoulli(self.make_rng("dropout"), keep_prob, shape)
    return jnp.where(keep, x / keep_prob.astype(x.dtype), jnp.zeros_like(x))


# --- encoder ------------------------------------------------------------------

class EncoderBlock(nn.Module):
  """Pre-LN transformer block: x + ls1(attn(norm1 x)); x + ls2(ffn(norm2 x)).

  Submodules: norm1, attn, ls1 (if layerscale_init), norm2, mlp, ls2.
  """
  num_heads: int
  mlp_dim: int
  ffn: str = "mlp"  # 'mlp' | 'swiglu'
  act: str = "gelu"
  qkv_bias: bool = True
  layerscale_init: float | None = None
  norm_eps: float = 1e-6
  dropout_rate: float = 0.0
  use_drop_path: bool = False  # static switch; the rate itself is a call argument
  attention_impl: str = "xla"
  causal: bool = False
  train: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, attn_mask: Array | None = None,
               drop_path_rate: float | Array = 0.0, kv_lengths: Array | None = None) -> Array:
    """`[B, L, D]` -> `[B, L, D]`; kv_lengths int `[B]`: tokens past it are padding (never attended to)."""
    x = constrain(x, ("batch", "length", "act_embed"))
    norm = lambda name: layer_norm(self.norm_eps, self.dtype, self.param_dtype, name)
    drop = lambda y: nn.Dropout(self.dropout_rate)(y, deterministic=not self.train)

    def residual(y: Array, ls_name: str) -> Array:
      if self.layerscale_init is not None:
        y = LayerScale(self.layerscale_init, self.param_dtype, name=ls_name)(y)
      if self.use_drop_path:
        y = DropPath()(y, drop_path_rate, self.train)
      return y

    # LVM_JAX_LN_AFFINE=folded: each LayerNorm's scale/bias folded into the next matmul's weights.
    folded = perf.choice("LVM_JAX_LN_AFFINE") == "folded"

    def normed(name: str, x: Array) -> tuple[Array, tuple[Array, Array] | None]:
      if not folded:
        return norm(name)(x), None
      xhat, scale, shift = norm(name).normalize(x)
      return xhat, (scale, shift)

    h, affine = normed("norm1", x)
    y = Attention(self.num_heads, qkv_bias=self.qkv_bias, attention_impl=self.attention_impl,
                  dtype=self.dtype, param_dtype=self.param_dtype, name="attn")(
                      h, mask=attn_mask, causal=self.causal, kv_lengths=kv_lengths, input_affine=affine)
    x = x + residual(drop(y), "ls1")
    if self.ffn == "mlp":
      ffn = Mlp(self.mlp_dim, self.act, self.dropout_rate, dtype=self.dtype,
                param_dtype=self.param_dtype, name="mlp")
    elif self.ffn == "swiglu":
      ffn = SwiGLU(self.mlp_dim, self.dropout_rate, dtype=self.dtype,
                   param_dtype=self.param_dtype, name="mlp")
    else:
      raise ValueError(f"Unknown ffn {self.ffn!r}; choose 'mlp' or 'swiglu'.")
    h, affine = normed("norm2", x)
    y = ffn(h, train=self.train, input_affine=affine)
    x = x + residual(drop(y), "ls2")
    return constrain(x, ("batch", "length", "act_embed"))


def _remat_policy(name: str):
  if name == "full":
    return None  # save nothing, recompute everything
  if name == "dots":
    return jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims
  raise ValueError(f"Unknown remat {name!r}; choose one of {REMAT_POLICIES}.")


def drop_path_rates(rate: float, depth: int, uniform: bool = False) -> np.ndarray:
  """Per-block stochastic-depth rates: uniform, or linear 0 -> rate over depth (timm/DINOv2)."""
  if uniform:
    return np.full((depth,), rate, np.float32)
  return np.linspace(0.0, rate, depth, dtype=np.float32)


class Encoder(nn.Module):
  """A stack of `depth` EncoderBlocks (no final norm: the caller owns it).

  Params: `blocks_{i}` per block, or with scan_layers one `blocks` subtree whose
  leaves have a leading 'layers' axis of size depth (same numerics).
  """
  depth: int
  num_heads: int
  mlp_dim: int
  ffn: str = "mlp"
  act: str = "gelu"
  qkv_bias: bool = True
  layerscale_init: float | None = None
  norm_eps: float = 1e-6
  dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  drop_path_uniform: bool = False
  attention_impl: str = "xla"
  remat: str = "none"  # 'none' | 'full' | 'dots'
  scan_layers: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False, attn_mask: Array | None = None,
               causal: bool = False, return_layers: Sequence[int] = ()) -> tuple[Array, list[Array]]:
    """x `[B, L, D]` -> (x `[B, L, D]`, [outputs `[B, L, D]` of blocks in return_layers]).

    return_layers: block indices (negative counts from the end), outputs
    un-normalised. attn_mask: bool broadcastable to `[B, heads, L, L]`.
    """
    wanted = [i + self.depth if i < 0 else i for i in return_layers]
    if any(not 0 <= i < self.depth for i in wanted):
      raise ValueError(f"return_layers {tuple(return_layers)} out of range for depth {self.depth}.")
    rates = drop_path_rates(self.drop_path_rate, self.depth, self.drop_path_uniform)
    block_cls = EncoderBlock
    if self.remat != "none":
      block_cls = nn.remat(block_cls, policy=_remat_policy(self.remat),
                           prevent_cse=not self.scan_layers)
    block_kw = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, ffn=self.ffn, act=self.act,
                    qkv_bias=self.qkv_bias, layerscale_init=self.layerscale_init,
                    norm_eps=self.norm_eps, dropout_rate=self.dropout_rate,
                    use_drop_path=self.drop_path_rate > 0, attention_impl=self.attention_impl,
                    causal=causal, train=train, dtype=self.dtype, param_dtype=self.param_dtype)

    length = x.shape[1]
    kv_lengths = None
    if (length % 2 and attn_mask is None and _needs_even_lengths(self.attention_impl, self.dtype)
        and perf.choice("LVM_JAX_SEQ_PAD") == "once"):
      # cuDNN attention trains only at even lengths: pad the token sequence once here rather
      # than q/k/v and the output in every block. The padded token is never a key (kv_lengths)
      # and is dropped below, so outputs and gradients are unchanged.
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 0)))
      kv_lengths = jnp.full((x.shape[0],), length, jnp.int32)

    if not self.scan_layers:
      outs = []
      for i in range(self.depth):
        x = block_cls(**block_kw, name=f"blocks_{i}")(x, attn_mask, float(rates[i]), kv_lengths)
        outs.append(x)
      return x[:, :length], [outs[i][:, :length] for i in wanted]

    collect = bool(wanted)

    def body(block, carry, rate, mask, lengths):
      y = block(carry, mask, rate, lengths)
      return y, (y if collect else None)

    scan = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                   in_axes=(0, nn.broadcast, nn.broadcast), length=self.depth,
                   metadata_params={nn.PARTITION_NAME: "layers"})
    x, stacked = scan(block_cls(**block_kw, name="blocks"), x, jnp.asarray(rates), attn_mask, kv_lengths)
    return x[:, :length], [stacked[i][:, :length] for i in wanted]


def _needs_even_lengths(impl: str, dtype: Dtype) -> bool:
  """Whether `impl` (resolved for `dtype`) is cuDNN's flash attention, which trains only at even lengths."""
  return _resolve_impl(impl, dtype) == "cudnn"


class MAPHead(nn.Module):
  """Multihead attention pooling with a learned probe (big_vision).

  Params: `probe [1, 1, embed]`, `attn` (Attention), `norm`, `mlp`.
  """
  num_heads: int
  mlp_dim: int | None = None  # default 4 * width
  act: str = "gelu"
  norm_eps: float = 1e-6
  attention_impl: str = "xla"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, mask: Array | None = None) -> Array:
    """`[B, L, D]` -> `[B, D]`; mask: optional bool broadcastable to `[B, heads, 1, L]`, True for
    the tokens the probe may attend to (a text tower's non-padding tokens)."""
    batch, width = x.shape[0], x.shape[-1]
    probe = self.param("probe", logical(dense_init, (None, None, "embed")), (1, 1, width),
                       self.param_dtype)
    probe = jnp.tile(probe.astype(self.dtype), (batch, 1, 1))
    x = Attention(self.num_heads, attention_impl=self.attention_impl, dtype=self.dtype,
                  param_dtype=self.param_dtype, name="attn")(probe, x, mask=mask)
    y = layer_norm(self.norm_eps, self.dtype, self.param_dtype, "norm")(x)
    x = x + Mlp(self.mlp_dim or 4 * width, self.act, dtype=self.dtype,
                param_dtype=self.param_dtype, name="mlp")(y)
    return x[:, 0]
