"""The implementation switches of lvm_jax/models/perf.py change speed only: same params, same outputs,
same gradients as the default implementations (which tests/test_vit.py checks against NumPy and timm)."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvm_jax.models import perf
from lvm_jax.models.vit import ViT

FIRST = tuple(choices[0] for choices, _ in perf.SWITCHES.values())
# The first choices, each other choice on its own, and all last choices together.
COMBOS = [FIRST] + [FIRST[:i] + (alt,) + FIRST[i + 1:] for i, (choices, _) in enumerate(perf.SWITCHES.values())
                    for alt in choices[1:]] + [tuple(choices[-1] for choices, _ in perf.SWITCHES.values())]


def _set(monkeypatch, values):
  for name, value in zip(perf.SWITCHES, values):
    monkeypatch.setenv(name, value)


def _outputs_and_grads(monkeypatch, values):
  _set(monkeypatch, values)
  model = ViT(variant=None, width=48, depth=2, num_heads=3, mlp_dim=96, patch_size=4, image_size=16,
              num_classes=5, head_zero_init=False)
  images = jax.random.normal(jax.random.PRNGKey(1), (3, 16, 16, 3))
  params = model.init(jax.random.PRNGKey(0), images)["params"]

  def loss(p):
    out = model.apply({"params": p}, images)
    return jnp.sum(jnp.sin(3.0 * out["logits"])) + jnp.sum(out["patch_tokens"] ** 2) * 1e-2, out["logits"]

  (value, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
  return params, logits, grads


# ~47 s on 2 cores: the slow tier. The switches also have tests of their own in the default tier
# (fused q/k/v placement, sequence padding, Pallas LayerNorm, folded affine, GELU recompute).
@pytest.mark.slow
def test_every_switch_combination_gives_the_same_params_outputs_and_gradients(monkeypatch):
  ref_params, ref_logits, ref_grads = _outputs_and_grads(monkeypatch, COMBOS[0])
  for combo in COMBOS[1:]:
    params, logits, grads = _outputs_and_grads(monkeypatch, combo)
    assert jax.tree.structure(params) == jax.tree.structure(ref_params), combo
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
      np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5, err_msg=str(combo))
    for path_a, b in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
      path, a = path_a
      scale = float(jnp.max(jnp.abs(b))) + 1e-6
      assert float(jnp.max(jnp.abs(a - b))) <= 2e-5 * scale + 1e-6, (combo, jax.tree_util.keystr(path))


def test_fused_qkv_keeps_query_key_value_in_their_own_places(monkeypatch):
  """Swapping two of the projections' kernels must change the fused output exactly as it changes the
  separate one (a fused path that mixed up q/k/v would still pass a test with identical kernels)."""
  model = ViT(variant=None, width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=4, image_size=8,
              num_classes=3, head_zero_init=False)
  images = jax.random.normal(jax.random.PRNGKey(2), (2, 8, 8, 3))
  params = model.init(jax.random.PRNGKey(0), images)["params"]
  attn = params["encoder"]["blocks_0"]["attn"]
  swapped = jax.tree.map(lambda x: x, params)
  swapped["encoder"]["blocks_0"]["attn"] = dict(attn, query=attn["key"], key=attn["query"])
  outs = {}
  for mode in ("separate", "fused"):
    monkeypatch.setenv("LVM_JAX_QKV", mode)
    outs[mode] = [model.apply({"params": p}, images)["logits"] for p in (params, swapped)]
  np.testing.assert_allclose(outs["fused"][0], outs["separate"][0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(outs["fused"][1], outs["separate"][1], rtol=1e-5, atol=1e-6)
  assert float(jnp.max(jnp.abs(outs["fused"][0] - outs["fused"][1]))) > 1e-4


def test_cpu_defaults_and_recorded_values(monkeypatch):
  for name in perf.SWITCHES:
    monkeypatch.delenv(name, raising=False)
  assert jax.default_backend() == "cpu"
  assert perf.current() == {"LVM_JAX_LAYERNORM": "custom_vjp", "LVM_JAX_QKV": "separate",
                            "LVM_JAX_PATCH_EMBED": "conv", "LVM_JAX_SEQ_PAD": "per_call",
                            "LVM_JAX_LN_AFFINE": "separate", "LVM_JAX_GELU": "recompute"}
  monkeypatch.setenv("LVM_JAX_QKV", "fused")
  assert perf.current()["LVM_JAX_QKV"] == "fused"


def test_a_bad_switch_value_is_one_clear_error(monkeypatch):
  monkeypatch.setenv("LVM_JAX_PATCH_EMBED", "fft")
  with pytest.raises(ValueError, match=r"LVM_JAX_PATCH_EMBED='fft' is not a valid choice.*'conv', 'matmul'"):
    perf.choice("LVM_JAX_PATCH_EMBED")


@pytest.mark.parametrize("scan, causal", [(False, False), (True, False), (False, True)])
def test_padding_the_sequence_once_changes_nothing(monkeypatch, scan, causal):
  """LVM_JAX_SEQ_PAD=once (an odd token sequence padded once per encoder for cuDNN; the padded token is
  never a key and is dropped) gives the outputs, intermediate layers and gradients of the unpadded
  encoder. On CPU cuDNN is absent, so the XLA path is made to take the padded route too."""
  from lvm_jax.models import layers

  monkeypatch.setattr(layers, "_needs_even_lengths", lambda impl, dtype: True)
  encoder = layers.Encoder(depth=2, num_heads=2, mlp_dim=32, scan_layers=scan, remat="full" if scan else "none")
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 7, 16))
  params = encoder.init(jax.random.PRNGKey(0), x, causal=causal)["params"]

  def run(p, inputs):
    y, outs = encoder.apply({"params": p}, inputs, causal=causal, return_layers=(0,))
    return jnp.sum(jnp.sin(2.0 * y)) + jnp.sum(outs[0] ** 2), (y, outs[0])

  results = {}
  for mode in ("per_call", "once"):
    monkeypatch.setenv("LVM_JAX_SEQ_PAD", mode)
    (_, (y, first)), grads = jax.value_and_grad(run, argnums=(0, 1), has_aux=True)(params, x)
    assert y.shape == x.shape and first.shape == x.shape
    results[mode] = (y, first, grads)
  # The unpadded path runs the custom-VJP attention, the padded one jax.nn's masked one: float32
  # rounding differs. Compare against the whole tree's scale: the key-bias gradient is exactly 0
  # in exact arithmetic (softmax ignores a per-query constant), so it holds rounding noise only.
  leaves_once, leaves_ref = jax.tree.leaves(results["once"]), jax.tree.leaves(results["per_call"])
  scale = max(float(jnp.max(jnp.abs(b))) for b in leaves_ref)
  for a, b in zip(leaves_once, leaves_ref):
    assert float(jnp.max(jnp.abs(a - b))) <= 1e-5 * scale


def test_padded_keys_are_never_attended_to():
  """kv_lengths hides the keys past it: garbage written there leaves the output unchanged."""
  from lvm_jax.models.layers import dot_product_attention

  q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (2, 6, 2, 8)) for i in range(3))
  lengths = jnp.array([4, 6])
  out = dot_product_attention(q, k, v, kv_lengths=lengths)
  k2 = k.at[0, 4:].set(1e3)
  v2 = v.at[0, 4:].set(-1e3)
  np.testing.assert_allclose(dot_product_attention(q, k2, v2, kv_lengths=lengths), out, rtol=1e-6, atol=1e-6)
  ref = dot_product_attention(q[:1], k[:1, :4], v[:1, :4])
  np.testing.assert_allclose(out[:1], ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("width", [48, 130])
def test_pallas_layer_norm_matches_numpy_and_autodiff(width):
  """The Pallas kernels (interpret mode off GPU) against NumPy's two-pass LayerNorm and jax.grad of the
  plain formula, at a width that is not a power of two (the row is padded and masked in the kernel)."""
  from lvm_jax.models.pallas_layer_norm import pallas_layer_norm

  rng = np.random.default_rng(0)
  x = (rng.standard_normal((2, 3, width)) * 3 + 1).astype(np.float32)
  scale, bias = rng.standard_normal(width).astype(np.float32), rng.standard_normal(width).astype(np.float32)
  mean = x.mean(-1, keepdims=True)
  ref = (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-6) * scale + bias
  np.testing.assert_allclose(pallas_layer_norm(jnp.asarray(x), scale, bias, 1e-6), ref, rtol=1e-5, atol=1e-5)

  def plain(x, s, b, eps):
    m = jnp.mean(x, -1, keepdims=True)
    return (x - m) / jnp.sqrt(jnp.mean((x - m) ** 2, -1, keepdims=True) + eps) * s + b

  weights = jnp.asarray(rng.standard_normal(x.shape).astype(np.float32))
  loss = lambda fn: lambda *a: jnp.sum(jnp.tanh(fn(*a, 1e-6)) * weights)  # noqa: E731
  got = jax.grad(loss(pallas_layer_norm), argnums=(0, 1, 2))(jnp.asarray(x), scale, bias)
  want = jax.grad(loss(plain), argnums=(0, 1, 2))(jnp.asarray(x), scale, bias)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  y16 = pallas_layer_norm(jnp.asarray(x, jnp.bfloat16), scale, bias, 1e-6)
  assert y16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y16, np.float32), ref, rtol=2e-2, atol=5e-2)


def test_fold_affine_matches_applying_the_layer_norm_affine_first():
  from lvm_jax.models.layers import fold_affine

  rng = np.random.default_rng(0)
  xhat, kernel = rng.standard_normal((5, 6)), rng.standard_normal((6, 2, 3))
  bias, scale, shift = rng.standard_normal((2, 3)), rng.standard_normal(6), rng.standard_normal(6)
  want = np.tensordot(xhat * scale + shift, kernel, axes=1) + bias
  k2, b2 = fold_affine(jnp.asarray(kernel, jnp.float32), jnp.asarray(bias, jnp.float32), scale, shift)
  np.testing.assert_allclose(np.tensordot(xhat, np.asarray(k2), axes=1) + np.asarray(b2), want, rtol=1e-5, atol=1e-5)
  _, b_nobias = fold_affine(jnp.asarray(kernel, jnp.float32), None, scale, shift)
  np.testing.assert_allclose(b_nobias, np.tensordot(shift, kernel, axes=1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ffn, qkv", [("swiglu", "separate"), ("mlp", "fused")])
def test_folded_layer_norm_affine_gives_the_same_encoder(monkeypatch, ffn, qkv):
  """LVM_JAX_LN_AFFINE=folded with SwiGLU / fused q/k/v and non-trivial LayerNorm params (at init they
  are 1 and 0, which would hide a fold that dropped them): same outputs and gradients, scale/bias included."""
  from lvm_jax.models import layers

  monkeypatch.setenv("LVM_JAX_QKV", qkv)
  encoder = layers.Encoder(depth=2, num_heads=2, mlp_dim=32, ffn=ffn, layerscale_init=0.5)
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 5, 16))
  params = flax.linen.meta.unbox(encoder.init(jax.random.PRNGKey(0), x)["params"])
  params = jax.tree_util.tree_map_with_path(
      lambda path, p: p + 0.3 * jax.random.normal(jax.random.PRNGKey(len(jax.tree_util.keystr(path))), p.shape)
      if "norm" in jax.tree_util.keystr(path) else p, params)

  def run(p, inputs):
    y, _ = encoder.apply({"params": p}, inputs)
    return jnp.sum(jnp.sin(2.0 * y)), y

  results = {}
  for mode in ("separate", "folded"):
    monkeypatch.setenv("LVM_JAX_LN_AFFINE", mode)
    (_, y), grads = jax.value_and_grad(run, argnums=(0, 1), has_aux=True)(params, x)
    results[mode] = (y, grads)
  np.testing.assert_allclose(results["folded"][0], results["separate"][0], rtol=1e-5, atol=1e-5)
  norm_grads = results["folded"][1][0]["blocks_0"]["norm2"]["scale"]
  assert float(jnp.max(jnp.abs(norm_grads))) > 1e-3
  # Against the whole tree's scale: the key-bias gradient is 0 in exact arithmetic (rounding noise only).
  leaves, ref = jax.tree.leaves(results["folded"][1]), jax.tree.leaves(results["separate"][1])
  scale = max(float(jnp.max(jnp.abs(b))) for b in ref)
  for a, b in zip(leaves, ref):
    assert float(jnp.max(jnp.abs(a - b))) <= 2e-5 * scale


def test_folding_a_layer_norm_into_cross_attention_is_one_clear_error():
  from lvm_jax.models.layers import Attention

  q, kv = jnp.ones((1, 2, 8)), jnp.ones((1, 3, 8))
  attn = Attention(num_heads=2)
  params = attn.init(jax.random.PRNGKey(0), q, kv)
  with pytest.raises(ValueError, match="needs self-attention"):
    attn.apply(params, q, kv, input_affine=(jnp.ones(8), jnp.zeros(8)))


def test_gelu_recompute_matches_the_formula_and_autodiff_in_value_and_gradient(monkeypatch):
  """'recompute' writes GELU's derivative out by hand (cdf + x pdf): check it against the closed form
  (scipy's erf) and against autodiff of the same function, over the tails and around 0, in float64."""
  from scipy.special import erf

  from lvm_jax.models.layers import gelu

  x = np.concatenate([np.linspace(-9.0, 9.0, 181), [0.0, -1e-4, 1e-4, -40.0, 40.0]])
  expect = x * 0.5 * (1.0 + erf(x / np.sqrt(2.0)))
  expect_grad = 0.5 * (1.0 + erf(x / np.sqrt(2.0))) + x * np.exp(-0.5 * x * x) / np.sqrt(2.0 * np.pi)
  with jax.enable_x64():
    results = {}
    for mode in ("autodiff", "recompute"):
      monkeypatch.setenv("LVM_JAX_GELU", mode)
      xs = jnp.asarray(x, jnp.float64)
      value, grad = jax.vmap(jax.value_and_grad(gelu))(xs)
      jit_grad = jax.jit(jax.grad(lambda v: jnp.sum(gelu(v) * jnp.cos(v))))(xs)
      results[mode] = (np.asarray(value), np.asarray(grad), np.asarray(jit_grad))
      np.testing.assert_allclose(value, expect, rtol=1e-12, atol=1e-14, err_msg=mode)
      np.testing.assert_allclose(grad, expect_grad, rtol=1e-12, atol=1e-14, err_msg=mode)
  for a, b in zip(results["recompute"], results["autodiff"]):
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
