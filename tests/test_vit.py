"""Tests for lvm_jax.models.vit.ViT: sizes, a NumPy reference forward, options, gradients."""
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvm_jax.models import ViT
from lvm_jax.models.pos_embed import bicubic_matrix

TINY = dict(variant=None, width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=4, image_size=16)


def unbox(tree):
  return flax.linen.meta.unbox(tree)


def shapes_of(model, x, **kw):
  """(boxed param shapes, output shapes) without compiling or allocating."""
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, **kw))
  return variables, jax.eval_shape(lambda v: model.apply(v, x, **kw), variables)


def jinit(model, x, **kw):
  """Jitted init (eager flax runs op by op, far slower on CPU)."""
  return jax.jit(lambda key, x: model.init(key, x, **kw))(jax.random.key(0), x)


def japply(model, variables, x, **kw):
  return jax.jit(lambda v, x: model.apply(v, x, **kw))(variables, x)


def n_params(model, size=224):
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(unbox(shapes)))


def perturb(params, seed=0, scale=0.05):
  """Random non-zero values everywhere (zero-init heads/tokens would hide bugs)."""
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(tree, [np.asarray(x) + scale * rng.normal(size=x.shape).astype(np.float32)
                                   for x in leaves])


# --- NumPy reference forward (pre-LN ViT, erf GELU) -----------------------------------------

def np_ln(x, p, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def np_block(x, p):
  erf = np.vectorize(math.erf)
  h = np_ln(x, p["norm1"])
  q, k, v = (np.einsum("btd,dnh->btnh", h, p["attn"][n]["kernel"]) + p["attn"][n]["bias"]
             for n in ("query", "key", "value"))
  logits = np.einsum("btnh,bsnh->bnts", q, k) / math.sqrt(q.shape[-1])
  logits = np.exp(logits - logits.max(-1, keepdims=True))
  attn = logits / logits.sum(-1, keepdims=True)
  y = np.einsum("bnts,bsnh->btnh", attn, v)
  y = np.einsum("btnh,nhd->btd", y, p["attn"]["out"]["kernel"]) + p["attn"]["out"]["bias"]
  x = x + (y * p["ls1"]["scale"] if "ls1" in p else y)
  h = np_ln(x, p["norm2"]) @ p["mlp"]["fc1"]["kernel"] + p["mlp"]["fc1"]["bias"]
  h = 0.5 * h * (1 + erf(h / math.sqrt(2)))
  y = h @ p["mlp"]["fc2"]["kernel"] + p["mlp"]["fc2"]["bias"]
  return x + (y * p["ls2"]["scale"] if "ls2" in p else y)


def np_vit(p, images, patch, depth, num_regs, grid_old=None, pool="cls"):
  b, hh, ww, c = images.shape
  gh, gw = hh // patch, ww // patch
  patches = images.reshape(b, gh, patch, gw, patch, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, -1)
  x = patches @ p["patch_embed"]["kernel"].reshape(-1, p["patch_embed"]["kernel"].shape[-1])
  x = x + p["patch_embed"]["bias"]
  pos = p["pos_embed"][0]
  patch_pos = pos[1:]
  if grid_old is not None and grid_old != (gh, gw):
    # torch bicubic antialias resample (matrices are tested against torch in test_layers).
    mh = bicubic_matrix(grid_old[0], gh, antialias=True)
    mw = bicubic_matrix(grid_old[1], gw, antialias=True)
    patch_pos = np.einsum("yh,hwd,xw->yxd", mh, patch_pos.reshape(*grid_old, -1), mw).reshape(gh * gw, -1)
  x = x + patch_pos
  cls = np.broadcast_to(p["cls_token"] + pos[:1], (b, 1, x.shape[-1]))
  regs = np.broadcast_to(p["reg_tokens"], (b, num_regs, x.shape[-1]))
  x = np.concatenate([cls, regs, x], axis=1)
  for i in range(depth):
    x = np_block(x, p["encoder"][f"blocks_{i}"])
  x = np_ln(x, p["norm"])
  pooled = x[:, 0] if pool == "cls" else x[:, 1 + num_regs:].mean(1)
  return x, pooled @ p["head"]["kernel"] + p["head"]["bias"]


@pytest.mark.parametrize("size,pool", [(24, "cls")])
def test_forward_matches_numpy_reference(size, pool):
  model = ViT(**TINY, num_classes=5, num_registers=2, layerscale_init=0.1, pool=pool)
  images = np.random.default_rng(0).normal(size=(2, size, size, 3)).astype(np.float32)
  params = perturb(unbox(jinit(model, jnp.zeros((1, 16, 16, 3))))["params"])
  out = japply(model, {"params": params}, images)
  p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  tokens, logits = np_vit(p64, images.astype(np.float64), 4, 2, 2, grid_old=(4, 4), pool=pool)
  np.testing.assert_allclose(out["logits"], logits, atol=2e-4, rtol=1e-4)
  np.testing.assert_allclose(out["cls"], tokens[:, 0], atol=2e-4)
  np.testing.assert_allclose(out["registers"], tokens[:, 1:3], atol=2e-4)
  np.testing.assert_allclose(out["patch_tokens"], tokens[:, 3:], atol=2e-4)


# --- sizes ----------------------------------------------------------------------

@pytest.mark.parametrize("variant,expected", [("S/16", 22.1e6), ("B/16", 86.6e6), ("L/16", 304.3e6)])
def test_param_counts(variant, expected):
  assert abs(n_params(ViT(variant, num_classes=1000)) - expected) / expected < 0.01


def test_giant_swiglu_shapes():
  model = ViT("g/14", ffn="swiglu", layerscale_init=1e-5, num_registers=4, image_size=518)
  shapes = unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 518, 518, 3)))))
  p = shapes["params"]
  assert p["pos_embed"].shape == (1, 1 + 37 * 37, 1536)
  assert p["reg_tokens"].shape == (1, 4, 1536)
  blk = p["encoder"]["blocks_39"]
  assert "blocks_40" not in p["encoder"]
  assert blk["mlp"]["w1"]["kernel"].shape == (1536, 4096)  # DINOv2 w12 = [w1 | w2] -> 8192
  assert blk["mlp"]["w3"]["kernel"].shape == (4096, 1536)
  assert blk["attn"]["query"]["kernel"].shape == (1536, 24, 64)
  assert blk["ls1"]["scale"].shape == (1536,)


def test_variants_and_overrides():
  assert ViT("So400m/14").dims() == (1152, 27, 16, 4304, (14, 14))
  assert ViT("Ti/8", depth=3).dims() == (192, 3, 3, 768, (8, 8))
  assert ViT(**TINY).dims() == (32, 2, 2, 64, (4, 4))
  with pytest.raises(ValueError, match="variant"):
    ViT("X/16").dims()


# --- options --------------------------------------------------------------------

def test_outputs_and_logical_names():
  model = ViT(**TINY, num_registers=3, num_classes=7, rep_size=12)
  variables = jinit(model, jnp.zeros((2, 16, 16, 3)))
  assert variables["params"]["pos_embed"].names == (None, None, "embed")
  assert variables["params"]["patch_embed"]["kernel"].names[-1] == "embed"
  assert variables["params"]["encoder"]["blocks_0"]["attn"]["query"]["kernel"].names == ("embed", "heads", "kv")
  for leaf in jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, flax.linen.LogicallyPartitioned)):
    assert isinstance(leaf, flax.linen.LogicallyPartitioned), "every param needs logical names"
  out = japply(model, variables, jnp.ones((2, 16, 16, 3)), return_layers=(0, -1))
  assert out["cls"].shape == (2, 32) and out["registers"].shape == (2, 3, 32)
  assert out["patch_tokens"].shape == (2, 16, 32) and out["pre_logits"].shape == (2, 12)
  assert out["logits"].shape == (2, 7) and len(out["layers"]) == 2
  # The last requested layer, normed, is the final token output.
  full = jnp.concatenate([out["cls"][:, None], out["registers"], out["patch_tokens"]], axis=1)
  np.testing.assert_allclose(out["layers"][1], full, atol=1e-6)


def test_no_class_token_map_pool_and_sincos():
  model = ViT(**TINY, class_token=False, pool="map", pos_embed="sincos2d")
  variables, out = shapes_of(model, jnp.ones((2, 24, 16, 3)))
  assert "cls_token" not in variables["params"] and "pos_embed" not in variables["params"]
  assert out["cls"] is None and out["pooled"].shape == (2, 32) and out["patch_tokens"].shape == (2, 24, 32)


def test_pos_embed_without_cls_slot():
  model = ViT(**TINY, pos_embed_includes_cls=False)
  p = unbox(shapes_of(model, jnp.zeros((1, 16, 16, 3)))[0])["params"]
  assert p["pos_embed"].shape == (1, 16, 32)


def _embed_only(**kw):
  """depth-0 ViT without norms: its patch_tokens are the embedded tokens themselves."""
  cfg = dict(TINY, depth=0, final_norm=False, pos_embed="none", pool="gap")
  cfg.update(kw)
  return ViT(**cfg)


def test_mask_token_replaces_exactly_masked_positions():
  model = _embed_only(use_mask_token=True)
  images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  params = perturb(unbox(jinit(model, images))["params"])
  mask = np.zeros((2, 16), bool)
  mask[0, [1, 5, 6]] = True
  mask[1, 15] = True
  plain = japply(model, {"params": params}, images)["patch_tokens"]
  masked = japply(model, {"params": params}, images, mask=jnp.asarray(mask))["patch_tokens"]
  token = np.broadcast_to(params["mask_token"][0, 0], (int(mask.sum()), 32))
  np.testing.assert_allclose(masked[mask], token, atol=1e-6)
  np.testing.assert_allclose(masked[~mask], plain[~mask], atol=1e-6)
  pooled = japply(model, {"params": params}, images)["pooled"]
  np.testing.assert_allclose(pooled, np.asarray(plain).mean(1), atol=1e-6)  # gap = mean of patch tokens
  with pytest.raises(ValueError, match="mask"):
    model.apply({"params": params}, images, mask=jnp.zeros((2, 15), bool))
  with pytest.raises(ValueError, match="use_mask_token"):
    _embed_only().init(jax.random.key(0), images, mask=jnp.asarray(mask))


def test_patch_dropout_keeps_requested_count_in_order():
  model = _embed_only(patch_dropout=0.25)
  images = jax.random.normal(jax.random.key(0), (3, 16, 16, 3))
  variables = jinit(model, images)
  full = np.asarray(japply(model, variables, images)["patch_tokens"])
  kept = np.asarray(japply(model, variables, images, train=True,
                           rngs={"dropout": jax.random.key(1)})["patch_tokens"])
  assert kept.shape == (3, 12, 32)
  for b in range(3):
    idx = [int(np.argmin(np.abs(full[b] - tok).sum(-1))) for tok in kept[b]]
    np.testing.assert_allclose(kept[b], full[b, idx], atol=1e-6)
    assert idx == sorted(set(idx))  # distinct, original order
  with pytest.raises(ValueError, match="patch_dropout"):
    _embed_only(patch_dropout=1.0).init(jax.random.key(0), images)


def test_scan_layers_param_layout():
  # Numerics of scan vs unrolled (and remat) are checked on the Encoder in test_layers.py.
  images = jnp.zeros((1, 16, 16, 3))
  plain = unbox(shapes_of(ViT(**TINY), images)[0])["params"]
  boxed, out = shapes_of(ViT(**TINY, scan_layers=True, remat="dots"), images, return_layers=(0,))
  scanned = unbox(boxed)["params"]
  assert list(scanned["encoder"]) == ["blocks"]
  stacked = jax.tree.map(lambda a, b: (2, *a.shape) == b.shape,
                         plain["encoder"]["blocks_0"], scanned["encoder"]["blocks"])
  assert all(jax.tree.leaves(stacked))
  assert boxed["params"]["encoder"]["blocks"]["mlp"]["fc1"]["kernel"].names == ("layers", "embed", "mlp")
  assert out["layers"][0].shape == (1, 17, 32)


def test_train_mode_drop_path_and_dropout_need_rng_and_change_outputs():
  model = ViT(**TINY, drop_path_rate=0.5, dropout_rate=0.1, num_classes=3, head_zero_init=False)
  images = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
  variables = jinit(model, images)
  run = jax.jit(lambda v, x, key, train: model.apply(v, x, train=train, rngs={"dropout": key})["logits"],
                static_argnums=3)
  a = run(variables, images, jax.random.key(1), True)
  b = run(variables, images, jax.random.key(2), True)
  assert not np.allclose(a, b)
  e1, e2 = (run(variables, images, jax.random.key(i), False) for i in range(2))
  np.testing.assert_array_equal(e1, e2)


def test_bad_inputs_raise_clear_errors():
  model = ViT(**TINY)
  with pytest.raises(ValueError, match="divisible by patch size"):
    model.init(jax.random.key(0), jnp.zeros((1, 18, 16, 3)))
  with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
    model.init(jax.random.key(0), jnp.zeros((16, 16, 3)))
  with pytest.raises(ValueError, match="class_token"):
    ViT(**TINY, class_token=False).init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  with pytest.raises(ValueError, match="pool"):
    ViT(**TINY, pool="max").init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))


def test_bfloat16_compute():
  model = ViT(**TINY, num_classes=3, dtype=jnp.bfloat16, attention_impl="auto")
  variables, out = shapes_of(model, jnp.ones((2, 16, 16, 3)))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(unbox(variables)))
  assert out["logits"].dtype == jnp.bfloat16


def test_gradients_match_finite_differences():
  """float64 jax.grad vs central differences along random directions."""
  model = ViT(variant=None, width=8, depth=1, num_heads=2, mlp_dim=16, patch_size=4, image_size=8,
              num_classes=3, layerscale_init=0.5, num_registers=1, dtype=jnp.float64,
              param_dtype=jnp.float64)
  with jax.enable_x64(True):
    images = jax.random.normal(jax.random.key(0), (2, 8, 8, 3), jnp.float64)
    params = unbox(jinit(model, images))["params"]
    leaves, tree = jax.tree.flatten(params)
    rng = np.random.default_rng(0)
    params = jax.tree.unflatten(tree, [x + 0.1 * rng.normal(size=x.shape) for x in leaves])
    loss = jax.jit(lambda p: jnp.sum(jnp.sin(model.apply({"params": p}, images)["logits"])))
    grad = jax.jit(jax.grad(loss))(params)
    assert all(g.dtype == jnp.float64 for g in jax.tree.leaves(grad))
    eps = 1e-5
    for _ in range(3):
      direction = jax.tree.unflatten(tree, [rng.normal(size=x.shape) for x in leaves])
      shift = lambda s: jax.tree.map(lambda p, d: p + s * eps * d, params, direction)
      numeric = (loss(shift(1.0)) - loss(shift(-1.0))) / (2 * eps)
      analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(direction)))
      np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)


def _timm_to_flax(sd, depth, heads):
  """Test-local mapping of a timm VisionTransformer state dict onto our tree."""
  t = {k: v.detach().numpy().astype(np.float32) for k, v in sd.items()}
  width = t["cls_token"].shape[-1]
  hd = width // heads
  p = {"patch_embed": {"kernel": t["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
                       "bias": t["patch_embed.proj.bias"]},
       "cls_token": t["cls_token"], "reg_tokens": t["reg_token"], "pos_embed": t["pos_embed"],
       "norm": {"scale": t["norm.weight"], "bias": t["norm.bias"]},
       "head": {"kernel": t["head.weight"].T, "bias": t["head.bias"]}, "encoder": {}}
  for i in range(depth):
    b = f"blocks.{i}."
    qkv_w = t[b + "attn.qkv.weight"].reshape(3, heads, hd, width)
    qkv_b = t[b + "attn.qkv.bias"].reshape(3, heads, hd)
    attn = {n: {"kernel": qkv_w[j].transpose(2, 0, 1), "bias": qkv_b[j]}
            for j, n in enumerate(("query", "key", "value"))}
    attn["out"] = {"kernel": t[b + "attn.proj.weight"].T.reshape(heads, hd, width),
                   "bias": t[b + "attn.proj.bias"]}
    p["encoder"][f"blocks_{i}"] = {
        "norm1": {"scale": t[b + "norm1.weight"], "bias": t[b + "norm1.bias"]},
        "norm2": {"scale": t[b + "norm2.weight"], "bias": t[b + "norm2.bias"]},
        "attn": attn, "ls1": {"scale": t[b + "ls1.gamma"]}, "ls2": {"scale": t[b + "ls2.gamma"]},
        "mlp": {"fc1": {"kernel": t[b + "mlp.fc1.weight"].T, "bias": t[b + "mlp.fc1.bias"]},
                "fc2": {"kernel": t[b + "mlp.fc2.weight"].T, "bias": t[b + "mlp.fc2.bias"]}}}
  return p


@pytest.mark.parametrize("size", [28])
def test_matches_timm_vision_transformer(size):
  """Random-init timm ViT (registers, LayerScale, dynamic size -> antialiased bicubic pos-emb)."""
  torch = pytest.importorskip("torch")
  timm_vit = pytest.importorskip("timm.models.vision_transformer")
  torch.manual_seed(0)
  ref = timm_vit.VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                                   mlp_ratio=2.0, num_classes=5, reg_tokens=2, no_embed_class=True,
                                   init_values=0.1, dynamic_img_size=True).eval()
  with torch.no_grad():  # timm zero-inits some params; randomise everything
    for prm in ref.parameters():
      prm.add_(0.05 * torch.randn_like(prm))
  images = np.random.default_rng(0).normal(size=(2, size, size, 3)).astype(np.float32)
  with torch.no_grad():
    want = ref(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
  model = ViT(**TINY, num_classes=5, num_registers=2, layerscale_init=0.1, pos_embed_includes_cls=False)
  got = model.apply({"params": _timm_to_flax(ref.state_dict(), 2, 2)}, images)["logits"]
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_conv_stem_keeps_the_token_grid_and_rejects_odd_patches():
  import jax
  import jax.numpy as jnp
  import flax.linen as nn
  import pytest as _pytest
  from lvm_jax.models import ViT
  model = ViT(None, width=32, depth=1, num_heads=2, patch_size=4, image_size=16, num_classes=3,
              stem="conv", pool="gap", class_token=False)
  x = jnp.ones((2, 16, 16, 3))
  variables = model.init(jax.random.PRNGKey(0), x)
  out = model.apply(variables, x)
  assert out["patch_tokens"].shape == (2, 16, 32) and out["logits"].shape == (2, 3)
  stem = nn.meta.unbox(variables["params"])["conv_stem"]
  assert [stem[f"conv_{i}"]["kernel"].shape for i in range(2)] == [(3, 3, 3, 16), (3, 3, 16, 16)]
  with _pytest.raises(ValueError, match="power-of-two patch"):
    ViT(None, width=32, depth=1, num_heads=2, patch_size=6, image_size=12, stem="conv").init(
        jax.random.PRNGKey(0), jnp.ones((1, 12, 12, 3)))


def test_conv_stem_widths_add_full_resolution_convs_and_reject_bad_values():
  import jax
  import jax.numpy as jnp
  import flax.linen as nn
  import pytest as _pytest
  from lvm_jax.models import ViT
  kw = dict(width=32, depth=1, num_heads=2, patch_size=4, image_size=16, num_classes=3,
            stem="conv", pool="gap", class_token=False)
  model = ViT(None, stem_widths=(8, 12, 24), **kw)  # one stride-1 conv, then two stride-2 convs
  x = jnp.ones((2, 16, 16, 3))
  variables = model.init(jax.random.PRNGKey(0), x)
  out = model.apply(variables, x)
  assert out["patch_tokens"].shape == (2, 16, 32) and out["logits"].shape == (2, 3)
  stem = nn.meta.unbox(variables["params"])["conv_stem"]
  assert [stem[f"conv_{i}"]["kernel"].shape for i in range(3)] == [
      (3, 3, 3, 8), (3, 3, 8, 12), (3, 3, 12, 24)]
  assert stem["proj"]["kernel"].shape == (1, 1, 24, 32)
  # Stem kernels carry logical names (the 1x1 projection is sharded on 'embed').
  boxed = variables["params"]["conv_stem"]
  assert boxed["conv_0"]["kernel"].names == (None, None, None, None)
  assert boxed["proj"]["kernel"].names == (None, None, None, "embed")
  for bad in [(8,), (8, 0, 16)]:  # fewer convs than log2(patch) strides; a zero width
    with _pytest.raises(ValueError, match="stem_widths"):
      ViT(None, stem_widths=bad, **kw).init(jax.random.PRNGKey(0), x)
  # stem='patch' ignores the conv-stem options (so `model.stem=patch` alone switches a config).
  plain = ViT(None, stem_widths=(8, 16), stem_norm="instance", **{**kw, "stem": "patch"}).init(
      jax.random.PRNGKey(0), x)
  assert "patch_embed" in plain["params"] and "conv_stem" not in plain["params"]


def test_conv_stem_instance_norm_normalises_per_image_channel_and_rejects_unknown_norms():
  import jax
  import jax.numpy as jnp
  import flax.linen as nn
  import numpy as np
  import pytest as _pytest
  from lvm_jax.models import ViT
  kw = dict(width=32, depth=1, num_heads=2, patch_size=4, image_size=16, num_classes=3,
            stem="conv", pool="gap", class_token=False)
  model = ViT(None, stem_norm="instance", **kw)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
  variables = model.init(jax.random.PRNGKey(0), x)
  stem = nn.meta.unbox(variables["params"])["conv_stem"]
  assert stem["norm_0"]["scale"].shape == (16,) and stem["norm_1"]["bias"].shape == (16,)
  assert variables["params"]["conv_stem"]["norm_0"]["scale"].names == (None,)
  assert model.apply(variables, x)["patch_tokens"].shape == (2, 16, 32)
  # 'instance' normalises each channel over the image's H x W (no batch statistics): the first
  # norm's output has zero mean and unit variance per (image, channel) at init.
  _, state = model.apply(variables, x, capture_intermediates=True)
  normed = state["intermediates"]["conv_stem"]["norm_0"]["__call__"][0]  # [2, 8, 8, 16]
  np.testing.assert_allclose(normed.mean(axis=(1, 2)), 0.0, atol=1e-4)
  np.testing.assert_allclose(normed.var(axis=(1, 2)), 1.0, atol=1e-2)
  with _pytest.raises(ValueError, match="stem_norm"):
    ViT(None, stem_norm="batch", **kw).init(jax.random.PRNGKey(0), x)
