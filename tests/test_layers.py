"""Tests for lvm_jax.models.layers / pos_embed against NumPy (and torch, when installed) references."""
import math
import pathlib

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvm_jax.models import layers as L
from lvm_jax.models import pos_embed as P

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "pos_embed_golden.npz"


def unbox(tree):
  return flax.linen.meta.unbox(tree)


def np_softmax(x, axis=-1):
  x = x - x.max(axis=axis, keepdims=True)
  e = np.exp(x)
  return e / e.sum(axis=axis, keepdims=True)


def np_attention(q, k, v, mask=None):
  """q [B,T,N,H], k/v [B,S,N,H], mask broadcastable to [B,N,T,S]."""
  logits = np.einsum("btnh,bsnh->bnts", q, k) / math.sqrt(q.shape[-1])
  if mask is not None:
    logits = np.where(mask, logits, -1e30)
  return np.einsum("bnts,bsnh->btnh", np_softmax(logits), v)


# --- attention ------------------------------------------------------------------

def test_dot_product_attention_matches_numpy():
  rng = np.random.default_rng(0)
  q, k, v = (rng.normal(size=(2, 5, 3, 8)).astype(np.float32) for _ in range(3))
  got = L.dot_product_attention(q, k, v, impl="xla")
  np.testing.assert_allclose(got, np_attention(q, k, v), atol=1e-5)
  causal = np.tril(np.ones((5, 5), bool))
  got = L.dot_product_attention(q, k, v, causal=True, impl="xla")
  np.testing.assert_allclose(got, np_attention(q, k, v, causal), atol=1e-5)
  pad = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)[:, None, None, :]
  got = L.dot_product_attention(q, k, v, mask=pad, impl="auto")
  np.testing.assert_allclose(got, np_attention(q, k, v, pad), atol=1e-5)


@pytest.mark.parametrize("causal,masked", [(False, False), (True, False), (False, True), (True, True)])
def test_even_length_attention_pads_odd_lengths_exactly(causal, masked):
  # The cuDNN path pads odd lengths to even ones; checked here with jax.nn's XLA implementation.
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 7, 3, 8)), jnp.float32) for _ in range(3))
  mask = jnp.asarray(rng.random((2, 1, 7, 7)) < 0.7).at[..., 0].set(True) if masked else None
  want = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation="xla")
  got = lambda q, k, v: L.even_length_attention(q, k, v, mask=mask, causal=causal, implementation="xla")
  np.testing.assert_allclose(got(q, k, v), want(q, k, v), atol=1e-5)
  loss = lambda f: jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(loss(got), loss(want)):
    np.testing.assert_allclose(g, w, atol=1e-5)


def test_attention_module_matches_numpy_and_layout():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 7, 12)).astype(np.float32)
  mod = L.Attention(num_heads=3)
  variables = jax.jit(mod.init)(jax.random.key(0), x)
  params = unbox(variables)["params"]
  assert params["query"]["kernel"].shape == (12, 3, 4)
  assert params["query"]["bias"].shape == (3, 4)
  assert params["out"]["kernel"].shape == (3, 4, 12)
  assert variables["params"]["query"]["kernel"].names == ("embed", "heads", "kv")
  assert variables["params"]["out"]["kernel"].names == ("heads", "kv", "embed")
  # Non-zero biases so they are exercised.
  params = jax.tree.map(lambda p: p + 0.1 * rng.normal(size=p.shape).astype(np.float32), params)
  proj = {n: np.einsum("btd,dnh->btnh", x, np.asarray(params[n]["kernel"])) + np.asarray(params[n]["bias"])
          for n in ("query", "key", "value")}
  causal = np.tril(np.ones((7, 7), bool))
  ref = np_attention(proj["query"], proj["key"], proj["value"], causal)
  ref = np.einsum("btnh,nhd->btd", ref, np.asarray(params["out"]["kernel"])) + np.asarray(params["out"]["bias"])
  got = jax.jit(lambda p: mod.apply({"params": p}, x, causal=True))(params)
  np.testing.assert_allclose(got, ref, atol=1e-5)


def test_activations():
  x = np.linspace(-3, 3, 13).astype(np.float32)
  erf = np.vectorize(math.erf)
  np.testing.assert_allclose(L.activation("gelu")(x), 0.5 * x * (1 + erf(x / math.sqrt(2))), atol=1e-6)
  np.testing.assert_allclose(L.activation("quick_gelu")(x), x / (1 + np.exp(-1.702 * x)), atol=1e-6)
  with pytest.raises(ValueError, match="activation"):
    L.activation("swish2")


def test_swiglu_hidden_rule_and_numerics():
  assert L.swiglu_hidden_dim(6144) == 4096  # DINOv2 ViT-g/14
  assert L.swiglu_hidden_dim(4 * 384) == 1024
  assert L.swiglu_hidden_dim(100) == 72  # int(66.67)=66 -> 72
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, 3, 16)).astype(np.float32)
  mod = L.SwiGLU(mlp_dim=48)
  params = unbox(mod.init(jax.random.key(0), x))["params"]
  assert params["w1"]["kernel"].shape == (16, 32) and params["w3"]["kernel"].shape == (32, 16)
  h1 = x @ np.asarray(params["w1"]["kernel"]) + np.asarray(params["w1"]["bias"])
  h2 = x @ np.asarray(params["w2"]["kernel"]) + np.asarray(params["w2"]["bias"])
  ref = (h1 / (1 + np.exp(-h1)) * h2) @ np.asarray(params["w3"]["kernel"]) + np.asarray(params["w3"]["bias"])
  np.testing.assert_allclose(mod.apply({"params": params}, x), ref, atol=1e-5)


def test_layerscale_init_and_names():
  mod = L.LayerScale(0.1)
  variables = mod.init(jax.random.key(0), jnp.ones((1, 2, 5)))
  assert variables["params"]["scale"].names == ("embed",)
  np.testing.assert_allclose(mod.apply(variables, jnp.ones((1, 2, 5))), 0.1 * np.ones((1, 2, 5)), rtol=1e-6)


def test_drop_path_is_per_sample():
  x = jnp.ones((400, 3, 4))
  mod = L.DropPath()
  assert mod.apply({}, x, 0.25, False) is x
  y = np.asarray(mod.apply({}, x, 0.25, True, rngs={"dropout": jax.random.key(0)}))
  per_sample = y.reshape(400, -1)
  # Each sample is either fully dropped or fully kept and rescaled by 1/keep_prob.
  dropped = np.all(per_sample == 0, axis=1)
  kept = np.all(np.isclose(per_sample, 1 / 0.75), axis=1)
  assert np.all(dropped | kept)
  assert 0.15 < dropped.mean() < 0.35
  # A traced rate (the scanned-layers path) works too.
  y2 = jax.jit(lambda r: mod.apply({}, x, r, True, rngs={"dropout": jax.random.key(0)}))(0.25)
  np.testing.assert_allclose(y2, y)


def test_drop_path_rates_schedule():
  np.testing.assert_allclose(L.drop_path_rates(0.3, 4), [0.0, 0.1, 0.2, 0.3], atol=1e-7)
  np.testing.assert_allclose(L.drop_path_rates(0.3, 4, uniform=True), [0.3] * 4)


# --- encoder: scan / remat equivalence ------------------------------------------------

ENC = dict(depth=2, num_heads=2, mlp_dim=32, layerscale_init=0.5)


def _stack_blocks(params, depth):
  enc = dict(params)
  blocks = [enc.pop(f"blocks_{i}") for i in range(depth)]
  enc["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
  return enc


def test_encoder_scan_matches_unscanned_and_remat():
  x = jax.random.normal(jax.random.key(1), (2, 6, 16))
  plain = L.Encoder(**ENC)
  params = unbox(jax.jit(plain.init)(jax.random.key(0), x))["params"]
  assert sorted(params) == ["blocks_0", "blocks_1"]
  ref, ref_layers = jax.jit(lambda p: plain.apply({"params": p}, x, return_layers=(1, -2)))(params)

  scanned = L.Encoder(**ENC, scan_layers=True)
  boxed = jax.eval_shape(scanned.init, jax.random.key(0), x)["params"]
  assert boxed["blocks"]["attn"]["query"]["kernel"].names == ("layers", "embed", "heads", "kv")
  sparams = _stack_blocks(params, 2)
  assert jax.tree.map(jnp.shape, sparams) == jax.tree.map(jnp.shape, unbox(boxed))
  got, got_layers = jax.jit(lambda p: scanned.apply({"params": p}, x, return_layers=(1, -2)))(sparams)
  np.testing.assert_allclose(got, ref, atol=1e-5)
  for a, b in zip(got_layers, ref_layers):
    np.testing.assert_allclose(a, b, atol=1e-5)

  def loss(mod, p):
    return jnp.sum(mod.apply({"params": p}, x, causal=True)[0] ** 2)
  g_ref = jax.jit(jax.grad(lambda p: loss(plain, p)))(params)
  # Key-bias grads are exactly 0 in theory (softmax shift invariance): compare on the tree's scale.
  atol = 1e-5 * max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_ref))
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=atol)
  g = jax.jit(jax.grad(lambda p: loss(L.Encoder(**ENC, remat="full"), p)))(params)
  jax.tree.map(close, g, g_ref)
  g = jax.jit(jax.grad(lambda p: loss(L.Encoder(**ENC, remat="dots", scan_layers=True), p)))(sparams)
  jax.tree.map(close, g, _stack_blocks(g_ref, 2))


def test_encoder_scan_drop_path_uses_per_layer_rates():
  # With drop_path_rate on, train=True differs from eval; layer 0's rate is 0 in the linear schedule.
  x = jax.random.normal(jax.random.key(2), (64, 4, 16))
  enc = L.Encoder(depth=2, num_heads=2, mlp_dim=32, drop_path_rate=0.9, scan_layers=True)
  variables = jax.jit(enc.init)(jax.random.key(0), x)
  run = jax.jit(lambda v, train: enc.apply(v, x, train=train, return_layers=(0,),
                                           rngs={"dropout": jax.random.key(1)}), static_argnums=1)
  out, (first,) = run(variables, True)
  out_eval, (first_eval,) = run(variables, False)
  np.testing.assert_allclose(first, first_eval, atol=1e-6)
  assert not np.allclose(out, out_eval)


def test_encoder_bad_return_layers():
  enc = L.Encoder(depth=2, num_heads=2, mlp_dim=8)
  with pytest.raises(ValueError, match="return_layers"):
    enc.init(jax.random.key(0), jnp.ones((1, 3, 8)), return_layers=(2,))


def test_map_head_shapes():
  head = L.MAPHead(num_heads=2, mlp_dim=16)
  variables = jax.jit(head.init)(jax.random.key(0), jnp.ones((3, 5, 8)))
  params = unbox(variables)["params"]
  assert params["probe"].shape == (1, 1, 8)
  assert sorted(params) == ["attn", "mlp", "norm", "probe"]
  assert jax.eval_shape(head.apply, variables, jnp.ones((3, 5, 8))).shape == (3, 8)


# --- position embeddings ---------------------------------------------------------

def test_posemb_sincos_2d_values():
  h, w, d = 3, 4, 16
  pe = np.asarray(P.posemb_sincos_2d(h, w, d))
  assert pe.shape == (1, h * w, d)
  # Independent transcription of the big_vision / MoCo v3 formula.
  q = d // 4
  omega = 10000.0 ** (-np.arange(q) / (q - 1))
  for row in range(h):
    for col in range(w):
      ref = np.concatenate([np.sin(col * omega), np.cos(col * omega),
                            np.sin(row * omega), np.cos(row * omega)])
      np.testing.assert_allclose(pe[0, row * w + col], ref, atol=1e-6)
  # Position (0, 0): sines 0, cosines 1.
  np.testing.assert_allclose(pe[0, 0], [0] * q + [1] * q + [0] * q + [1] * q, atol=1e-7)
  with pytest.raises(ValueError, match="divisible by 4"):
    P.posemb_sincos_2d(2, 2, 10)


def test_bicubic_matrix_properties():
  for antialias in (False, True):
    for n_in, n_out in ((7, 7), (4, 9), (14, 5), (16, 37)):
      m = P.bicubic_matrix(n_in, n_out, antialias=antialias)
      np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-12)  # partition of unity
      if n_in == n_out:
        np.testing.assert_allclose(m, np.eye(n_in), atol=1e-12)
  # Hand-computed torch bicubic (a=-0.75) weights for 2 -> 4 upsampling, output 0:
  # src = 0.5*(0+0.5)-0.5 = -0.25 -> base -1, t=0.75; all taps clamp into {0, 1}.
  a = -0.75
  c1 = lambda t: ((a + 2) * t - (a + 3)) * t * t + 1
  c2 = lambda t: ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
  t = 0.75
  w = [c2(t + 1), c1(t), c1(1 - t), c2(2 - t)]  # taps at -2, -1, 0, 1 -> 0, 0, 0, 1
  np.testing.assert_allclose(P.bicubic_matrix(2, 4)[0], [w[0] + w[1] + w[2], w[3]], atol=1e-12)


def test_resample_pos_embed_matches_golden_fixture():
  golden = np.load(FIXTURE)
  src = golden["src"]  # [1, 4*5, 6], old grid (4, 5)
  for key in golden.files:
    if key == "src":
      continue
    method, gh, gw = key.rsplit("_", 2)
    got = P.resample_pos_embed(jnp.asarray(src), (4, 5), (int(gh), int(gw)), method)
    np.testing.assert_allclose(got, golden[key], atol=2e-6, err_msg=key)


@pytest.mark.parametrize("method", ["bicubic", "bicubic_antialias", "dinov2", "dinov2_antialias"])
@pytest.mark.parametrize("new", [(3, 3), (6, 8), (12, 9), (2, 5)])
def test_resample_pos_embed_matches_torch(method, new):
  torch = pytest.importorskip("torch")
  F = torch.nn.functional
  old = (5, 7)
  rng = np.random.default_rng(3)
  src = rng.normal(size=(1, old[0] * old[1], 4)).astype(np.float32)
  grid = torch.from_numpy(src).reshape(1, *old, 4).permute(0, 3, 1, 2)
  antialias = method.endswith("antialias")
  if method.startswith("dinov2"):
    kw = dict(scale_factor=((new[0] + 0.1) / old[0], (new[1] + 0.1) / old[1]))
  else:
    kw = dict(size=new)
  ref = F.interpolate(grid, mode="bicubic", antialias=antialias, align_corners=False, **kw)
  assert tuple(ref.shape[-2:]) == new
  ref = ref.permute(0, 2, 3, 1).reshape(1, -1, 4).numpy()
  got = P.resample_pos_embed(jnp.asarray(src), old, new, method)
  np.testing.assert_allclose(got, ref, atol=2e-6)


def test_resample_pos_embed_jax_method_and_errors():
  src = jax.random.normal(jax.random.key(0), (1, 16, 3))
  got = P.resample_pos_embed(src, (4, 4), (6, 6), "jax")
  ref = jax.image.resize(src.reshape(4, 4, 3), (6, 6, 3), "bicubic").reshape(1, 36, 3)
  np.testing.assert_allclose(got, ref, atol=1e-6)
  with pytest.raises(ValueError, match="pos_embed_interp"):
    P.resample_pos_embed(src, (4, 4), (6, 6), "nearest")
  with pytest.raises(ValueError, match="positions"):
    P.resample_pos_embed(src, (3, 4), (6, 6))


def test_splash_attention_interpret_matches_numpy():
  """Pallas splash kernel (interpret mode off TPU): full, causal, key padding, and its gradient."""
  pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention")
  rng = np.random.default_rng(4)
  q, k, v = (rng.normal(size=(2, 5, 2, 8)).astype(np.float32) for _ in range(3))
  pad = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)[:, None, None, :]
  causal = np.tril(np.ones((5, 5), bool))
  run = jax.jit(L.splash_attention, static_argnames="causal")
  np.testing.assert_allclose(run(q, k, v), np_attention(q, k, v), atol=1e-5)
  np.testing.assert_allclose(run(q, k, v, causal=True), np_attention(q, k, v, causal), atol=1e-5)
  np.testing.assert_allclose(run(q, k, v, mask=pad), np_attention(q, k, v, pad), atol=1e-5)
  grad = lambda impl: jax.grad(lambda a: jnp.sum(jnp.sin(L.dot_product_attention(a, k, v, impl=impl))))(q)
  np.testing.assert_allclose(jax.jit(lambda: grad("splash"))(), grad("xla"), atol=1e-5)
  with pytest.raises(ValueError, match="key-padding"):
    L.splash_attention(q, k, v, mask=np.ones((2, 1, 5, 5), bool))
