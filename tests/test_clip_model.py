"""CLIP two-tower model and text tower: torch (open_clip) parity when installed, plus torch-free checks."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvm_jax.models.clip import CLIP, MAX_LOGIT_SCALE, clamp_logit_scale
from lvm_jax.models.text import TextTransformer

TINY_TEXT = dict(vocab_size=100, context_length=16, width=32, depth=2, num_heads=4)
TINY_VISION = dict(variant=None, width=32, depth=2, num_heads=4, patch_size=8, image_size=32)


def _tokens(batch=3, length=16, vocab=100, seed=0):
    """CLIP-style rows: SOT=vocab-2, words, EOT=vocab-1 (the largest id), zero padding."""
    rng = np.random.default_rng(seed)
    out = np.zeros((batch, length), np.int32)
    for i in range(batch):
        n = rng.integers(1, length - 1)
        out[i, 0] = vocab - 2
        out[i, 1:n] = rng.integers(1, vocab - 2, n - 1)
        out[i, n] = vocab - 1
    return jnp.asarray(out)


def _init(model, *args):
    return nn.meta.unbox(model.init(jax.random.PRNGKey(0), *args))


# ------------------------------------------------------------------ torch parity
def _torch_block_to_flax(sd, prefix, heads):
    t = lambda name: sd[prefix + name].detach().numpy().astype(np.float32)  # noqa: E731
    width = t("ln_1.weight").shape[0]
    qkv_w, qkv_b = t("attn.in_proj_weight"), t("attn.in_proj_bias")
    attn = {}
    for i, name in enumerate(("query", "key", "value")):
        w = qkv_w[i * width:(i + 1) * width]  # torch Linear: [out, in]
        attn[name] = {"kernel": w.T.reshape(width, heads, width // heads),
                      "bias": qkv_b[i * width:(i + 1) * width].reshape(heads, width // heads)}
    attn["out"] = {"kernel": t("attn.out_proj.weight").T.reshape(heads, width // heads, width),
                   "bias": t("attn.out_proj.bias")}
    ln = lambda n: {"scale": t(n + ".weight"), "bias": t(n + ".bias")}  # noqa: E731
    return {"norm1": ln("ln_1"), "attn": attn, "norm2": ln("ln_2"),
            "mlp": {"fc1": {"kernel": t("mlp.c_fc.weight").T, "bias": t("mlp.c_fc.bias")},
                    "fc2": {"kernel": t("mlp.c_proj.weight").T, "bias": t("mlp.c_proj.bias")}}}


def _torch_clip_to_flax(sd, depth, heads):
    t = lambda name: sd[name].detach().numpy().astype(np.float32)  # noqa: E731
    ln = lambda n: {"scale": t(n + ".weight"), "bias": t(n + ".bias")}  # noqa: E731
    image = {
        "patch_embed": {"kernel": t("visual.conv1.weight").transpose(2, 3, 1, 0)},
        "cls_token": t("visual.class_embedding")[None, None],
        "pos_embed": t("visual.positional_embedding")[None],
        "norm_pre": ln("visual.ln_pre"),
        "encoder": {f"blocks_{i}": _torch_block_to_flax(sd, f"visual.transformer.resblocks.{i}.", heads)
                    for i in range(depth)},
        "norm": ln("visual.ln_post"),
    }
    text = {
        "token_embed": {"embedding": t("token_embedding.weight")},
        "pos_embed": t("positional_embedding"),
        "encoder": {f"blocks_{i}": _torch_block_to_flax(sd, f"transformer.resblocks.{i}.", heads)
                    for i in range(depth)},
        "norm": ln("ln_final"),
    }
    return {"image_tower": image, "text_tower": text, "image_proj": {"kernel": t("visual.proj")},
            "text_proj": {"kernel": t("text_projection")}, "logit_scale": t("logit_scale").reshape(())}


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
def test_clip_matches_open_clip(act):
    torch = pytest.importorskip("torch")
    open_clip_model = pytest.importorskip("open_clip.model")
    torch.manual_seed(0)
    ref = open_clip_model.CLIP(
        embed_dim=16, quick_gelu=act == "quick_gelu",
        vision_cfg=open_clip_model.CLIPVisionCfg(layers=2, width=32, head_width=8, patch_size=8, image_size=32),
        text_cfg=open_clip_model.CLIPTextCfg(context_length=16, vocab_size=100, width=32, heads=4, layers=2),
    ).eval()
    # open_clip zero-inits some biases; randomise every parameter so a wrong mapping cannot hide.
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sd = ref.state_dict()

    model = CLIP(embed_dim=16, vision={**TINY_VISION, "act": act}, text={**TINY_TEXT, "act": act})
    images = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
    tokens = _tokens(batch=2)
    params = _init(model, jnp.asarray(images), tokens)["params"]
    ours = _torch_clip_to_flax(sd, depth=2, heads=4)
    assert jax.tree.structure(ours) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(params)):
        assert a.shape == b.shape
    out = model.apply({"params": ours}, jnp.asarray(images), tokens)

    with torch.no_grad():
        ref_img = ref.encode_image(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
        ref_txt = ref.encode_text(torch.from_numpy(np.array(tokens)).long()).numpy()
    np.testing.assert_allclose(out["image"], ref_img, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["text"], ref_txt, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["logit_scale"], sd["logit_scale"].numpy().reshape(()), rtol=1e-6)


# ------------------------------------------------------------ torch-free checks
def test_logit_scale_and_bias_init():
    model = CLIP(embed_dim=8, vision=TINY_VISION, text=TINY_TEXT)
    variables = _init(model, jnp.zeros((1, 32, 32, 3)), _tokens(batch=1))
    assert math.isclose(float(variables["params"]["logit_scale"]), math.log(1 / 0.07), rel_tol=1e-6)
    assert "logit_bias" not in variables["params"]
    siglip = CLIP(embed_dim=8, vision=TINY_VISION, text=TINY_TEXT, init_logit_scale=math.log(10),
                  init_logit_bias=-10.0)
    out = siglip.apply(_init(siglip, jnp.zeros((1, 32, 32, 3)), _tokens(batch=1)),
                       jnp.zeros((1, 32, 32, 3)), _tokens(batch=1))
    assert math.isclose(float(out["logit_scale"]), math.log(10), rel_tol=1e-6)
    assert float(out["logit_bias"]) == -10.0


def test_clamp_logit_scale_plain_and_boxed():
    params = {"logit_scale": jnp.float32(7.0), "other": jnp.ones(2)}
    assert math.isclose(float(clamp_logit_scale(params)["logit_scale"]), MAX_LOGIT_SCALE, rel_tol=1e-6)
    assert float(clamp_logit_scale({"logit_scale": jnp.float32(-1.0)})["logit_scale"]) == 0.0
    model = CLIP(embed_dim=8, vision=TINY_VISION, text=TINY_TEXT, init_logit_scale=9.0)
    boxed = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), _tokens(batch=1))["params"]
    clamped = clamp_logit_scale(boxed)["logit_scale"]
    assert isinstance(clamped, nn.LogicallyPartitioned)
    assert math.isclose(float(clamped.unbox()), MAX_LOGIT_SCALE, rel_tol=1e-6)
    with pytest.raises(ValueError, match="logit_scale"):
        clamp_logit_scale({"x": 1})


def test_encode_methods_match_call_and_are_unnormalised():
    model = CLIP(embed_dim=8, vision=TINY_VISION, text=TINY_TEXT)
    images = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
    tokens = _tokens(batch=2)
    variables = _init(model, images, tokens)
    out = model.apply(variables, images, tokens)
    img = model.apply(variables, images, method="encode_image")
    txt = model.apply(variables, tokens, method="encode_text")
    assert img.shape == txt.shape == (2, 8)
    np.testing.assert_allclose(img, out["image"], rtol=1e-6)
    np.testing.assert_allclose(txt, out["text"], rtol=1e-6)
    assert not np.allclose(np.linalg.norm(img, axis=-1), 1.0)
    # Projections are bias-free.
    assert set(variables["params"]["image_proj"]) == {"kernel"}


def test_every_param_has_logical_axes():
    model = CLIP(embed_dim=8, vision=TINY_VISION, text=TINY_TEXT, init_logit_bias=-10.0)
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), _tokens(batch=1))
    leaves = jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    plain = [x for x in leaves if not isinstance(x, nn.LogicallyPartitioned)]
    assert not plain, f"{len(plain)} params lack logical axis names"


def test_text_tower_causal_mask_and_eot_pooling():
    tower = TextTransformer(**TINY_TEXT)
    tokens = _tokens(batch=2)
    variables = _init(tower, tokens)
    out = tower.apply(variables, tokens)
    eot = np.argmax(np.asarray(tokens), axis=1)
    np.testing.assert_allclose(out["pooled"], np.asarray(out["tokens"])[np.arange(2), eot], rtol=1e-6)
    # Changing a token after position j leaves outputs up to j unchanged (causal) ...
    changed = tokens.at[:, 10].set(5)
    out2 = tower.apply(variables, changed)
    np.testing.assert_allclose(out2["tokens"][:, :10], out["tokens"][:, :10], rtol=1e-5, atol=1e-6)
    assert not np.allclose(out2["tokens"][:, 10:], out["tokens"][:, 10:])
    # ... but not in a bidirectional tower.
    bidir = TextTransformer(**TINY_TEXT, causal=False, pool="last")
    b1, b2 = bidir.apply(variables, tokens), bidir.apply(variables, changed)
    assert not np.allclose(b1["tokens"][:, :10], b2["tokens"][:, :10])
    np.testing.assert_allclose(b1["pooled"], b1["tokens"][:, -1], rtol=1e-6)


@pytest.mark.parametrize("pool", ["first", "map"])
def test_text_tower_pad_mask_ignores_padding(pool):
    tower = TextTransformer(**TINY_TEXT, causal=False, pool=pool, pad_mask=True)
    tokens = _tokens(batch=1)
    variables = _init(tower, tokens)
    n = int(np.argmax(np.asarray(tokens)[0])) + 1
    full = tower.apply(variables, tokens)["pooled"]
    # Without padding at all (shorter sequence), the non-pad tokens see the same keys (the MAP
    # probe attended to the padding too: 0.34 apart).
    short = tower.apply(variables, tokens[:, :n])["pooled"]
    np.testing.assert_allclose(full, short, rtol=1e-5, atol=1e-6)


def test_text_tower_map_pool_and_short_sequences():
    tower = TextTransformer(**TINY_TEXT, pool="map")
    variables = _init(tower, _tokens(batch=2, length=8))
    assert tower.apply(variables, _tokens(batch=2, length=8))["pooled"].shape == (2, 32)


def test_text_tower_bad_input():
    tower = TextTransformer(**TINY_TEXT)
    with pytest.raises(ValueError, match="context_length"):
        tower.init(jax.random.PRNGKey(0), jnp.zeros((1, 20), jnp.int32))
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        tower.init(jax.random.PRNGKey(0), jnp.zeros((16,), jnp.int32))
    with pytest.raises(ValueError, match="pool"):
        TextTransformer(**TINY_TEXT, pool="mean").init(jax.random.PRNGKey(0), _tokens(batch=1))


def test_from_config_rejects_unknown_keys():
    model = CLIP.from_config(dict(embed_dim=8, vision=TINY_VISION, text=TINY_TEXT, dtype="float32"))
    assert model.embed_dim == 8
    with pytest.raises(ValueError, match="Unknown CLIP config keys"):
        CLIP.from_config(dict(embed_dim=8, width=3))
