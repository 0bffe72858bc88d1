"""Implementation switches that change speed, never the function computed.

Each switch picks between numerically equivalent ways of computing one piece of
the model; the best choice depends on the backend (XLA:CPU and XLA:GPU fuse
differently), so the default is per backend and an environment variable
overrides it for A/B benchmarks (`scripts/gpu_ab.py`, `lvm-bench`):

  LVM_JAX_LAYERNORM    'custom_vjp' | 'autodiff' | 'pallas'   LayerNorm backward written out, jax.grad's,
                                                   or Pallas GPU kernels (one pass each way)
  LVM_JAX_QKV          'separate' | 'fused'        self-attention q/k/v as three matmuls or one
  LVM_JAX_PATCH_EMBED  'conv' | 'matmul'           patchify as a strided conv or reshape + matmul
  LVM_JAX_SEQ_PAD      'per_call' | 'once'         cuDNN's even-length padding per attention or per encoder
  LVM_JAX_LN_AFFINE    'separate' | 'folded'       a block's LayerNorm scale/bias applied to the activations,
                                                   or folded into the next matmul's weights
  LVM_JAX_GELU         'autodiff' | 'recompute'    exact GELU's backward from a saved erf, or erf recomputed

The choice is read when a model is traced (jit), so set the variable before
the first call. Params and outputs are the same for every choice (tested in
tests/test_layers.py and tests/test_vit.py).
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator

import jax

# switch -> (choices, {backend: default}); backends not listed use the first choice. GPU defaults
# from scripts/gpu_ab.py on one H200 (ViT-B/16 bf16 train, b256, 2026-11-27): fused q/k/v 1.048x,
# matmul patchify 1.016x, autodiff LayerNorm 1.008x vs the first choices (run-to-run spread 0.2%).
# On CPU the written-out LayerNorm backward is faster (docstring of layers.LayerNorm).
SWITCHES: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
    # 'pallas': lvm_jax/models/pallas_layer_norm.py, one device only; not yet measured on a GPU.
    "LVM_JAX_LAYERNORM": (("custom_vjp", "autodiff", "pallas"), {}),
    "LVM_JAX_QKV": (("separate", "fused"), {"gpu": "fused"}),
    "LVM_JAX_PATCH_EMBED": (("conv", "matmul"), {"gpu": "matmul"}),
    # cuDNN attention at odd lengths: pad q/k/v + slice the output in every block, or pad the
    # token sequence once per encoder (not yet measured on a GPU: the first choice stays default).
    "LVM_JAX_SEQ_PAD": (("per_call", "once"), {}),
    # Pre-LN blocks: (xhat * scale + bias) @ W as xhat @ (scale W) + bias W, no [rows, D] broadcast
    # multiply-add forward nor the two [rows, D] reductions backward. XLA:CPU, ViT-S/16 f32 b32 train,
    # both steps in one process, interleaved (2026-11-27): folded 0.957x of separate (0.977x in
    # separate processes once lvm_jax/host_memory.py kept buffers mapped), so not the CPU default;
    # not yet measured on a GPU (scripts/gpu_ab.py tries it first).
    "LVM_JAX_LN_AFFINE": (("separate", "folded"), {}),
    # Exact GELU: autodiff saves erf(x / sqrt 2) (forward = two passes over [rows, mlp]); 'recompute'
    # keeps only x and recomputes erf in the backward. XLA:CPU, ViT-S/16 f32 b32 train, separate
    # processes alternated, 6 rounds (2026-11-27): recompute faster in all 6, 1.021x and 1.038x
    # medians of 3; issue 7's acceptance command, 3 + 3 runs alternated (session 8): 1.07x, MFU 59.9%
    # vs 56.6% median. The CPU default since session 9, once configs/dinov2_synthetic.py had a recipe
    # that clears issue 4's +20 under both roundings (its gradients differ from autodiff's in the last
    # float bits; docs/dinov2_synthetic.md). Not yet measured on a GPU (scripts/gpu_ab.py tries it).
    "LVM_JAX_GELU": (("autodiff", "recompute"), {"cpu": "recompute"}),
}


# Switches pinned by `pinned(...)` for the code traced inside it; they win over the environment.
_PINNED: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("lvm_jax_perf_pinned", default={})


@contextlib.contextmanager
def pinned(**switches: str) -> Iterator[None]:
  """Within the block, trace with these choices whatever the environment or backend says.

  For code that needs a particular computation path, not just its result: e.g. capturing the
  q/k projections' outputs needs them called as separate modules on the unpadded sequence.
  """
  for name, value in switches.items():
    if value not in SWITCHES[name][0]:
      raise ValueError(f"{name}={value!r} is not a valid choice; use one of {SWITCHES[name][0]}.")
  token = _PINNED.set({**_PINNED.get(), **switches})
  try:
    yield
  finally:
    _PINNED.reset(token)


def choice(switch: str) -> str:
  """The implementation `switch` resolves to now: pinned, else the environment's value, else the backend's default."""
  choices, defaults = SWITCHES[switch]
  if switch in _PINNED.get():
    return _PINNED.get()[switch]
  value = os.environ.get(switch, "").strip()
  if not value:
    return defaults.get(jax.default_backend(), choices[0])
  if value not in choices:
    raise ValueError(f"{switch}={value!r} is not a valid choice; set it to one of {choices} or unset it.")
  return value


def current() -> dict[str, str]:
  """Every switch's resolved value (recorded in benchmark results)."""
  return {name: choice(name) for name in SWITCHES}
