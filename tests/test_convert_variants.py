"""Numerical parity for converter paths that no other test covers (the "GAP" findings of the converter audit).

- open_clip CLIP options beyond the two golden fixtures (CLIPA-like avg pool without ln_pre, final LN after
  pooling, bidirectional text tower pooled 'last' / 'first', tanh GELU, LayerNorm eps) vs open_clip itself;
- timm register position folding when the table also has a class slot (class token + registers,
  no_embed_class=False), at the stored and at a dynamic size, vs timm;
- save_hf exports loaded by transformers that must compute the *source library's* outputs (the golden
  references): a ViT pooler, an OpenAI QuickGELU CLIP, a big_vision ViT without a class position slot;
- big_vision: a scanned two-tower SigLIP .npz vs its per-layer layout and the open_clip-loaded reference;
  MAP-head, pre_logits (rep_size) and sincos2d ('opt/target/' root) classifiers vs a NumPy forward of
  big_vision's ViT written here;
- merge_pretrained resampling a DINOv2 position table with the 'dinov2' (+0.1 offset) rule vs torch.

Weights are the golden fixture's deterministic N(0, 0.1^2) draws (LayerNorm scales 1 + N(0, 0.1^2)), so no
parameter sits at a zero init that could hide a mapping error.
"""
import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvm_jax import convert
from lvm_jax.convert.core import flatten
from tests.helpers import convert_fixtures

fx, CASES, OUTPUTS = convert_fixtures()
ATOL = 1e-5
CLIP_TOKENS = dict(kind="clip", vocab=100, length=16)  # EOT (99) at 5, 9, 15; zero padding after it


# --- open_clip options -----------------------------------------------------------------------------

_V = dict(layers=2, width=64, head_width=32, patch_size=8, image_size=32)
_T = dict(context_length=16, vocab_size=100, width=64, heads=2, layers=2)
_TANH_EPS = dict(act_kwargs={"approximate": "tanh"}, norm_kwargs={"eps": 1e-6})


@pytest.mark.torch
@pytest.mark.parametrize("vision, text", [
    # CLIPA: no ln_pre, mean-pooled patches then ln_post (-> fc_norm); text without causal mask, last token.
    ({**_V, "no_ln_pre": True, "pool_type": "avg", "final_ln_after_pool": True},
     {**_T, "no_causal_mask": True, "pool_type": "last"}),
    # class token then ln_post after pooling; causal text tower pooled at the first token.
    ({**_V, "final_ln_after_pool": True}, {**_T, "pool_type": "first"}),
    # tanh GELU and LayerNorm eps 1e-6 in both towers (tokens pooled at the EOT argmax).
    ({**_V, **_TANH_EPS}, {**_T, **_TANH_EPS}),
], ids=["clipa_avg_bidir_last", "tok_ln_after_pool_first", "gelu_tanh_eps1e-6"])
def test_open_clip_variants_match_open_clip(tmp_path, vision, text):
    torch = pytest.importorskip("torch")
    pytest.importorskip("open_clip")
    from open_clip import model as ocm
    from safetensors.numpy import save_file

    reference = ocm.CLIP(embed_dim=48, vision_cfg=ocm.CLIPVisionCfg(**vision), text_cfg=ocm.CLIPTextCfg(**text))
    tensors = fx.weights(fx._manifest(reference.state_dict()))
    fx._torch_load(reference, tensors)
    save_file(tensors, str(tmp_path / "open_clip_model.safetensors"))
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": dict(
        embed_dim=48, vision_cfg=vision, text_cfg=text)}))
    model, variables = convert.load(tmp_path)
    images, ids = fx.images(32, 32), fx.tokens(CLIP_TOKENS)
    with torch.no_grad():
        want_image = reference.encode_image(fx._nchw(images)).numpy()
        want_text = reference.encode_text(torch.from_numpy(ids).long()).numpy()
    got_image = np.asarray(model.apply(variables, images, method="encode_image"))
    got_text = np.asarray(model.apply(variables, ids, method="encode_text"))
    np.testing.assert_allclose(got_image, want_image, atol=ATOL, rtol=0, err_msg="image")
    np.testing.assert_allclose(got_text, want_text, atol=ATOL, rtol=0, err_msg="text")


# --- timm: register positions folded next to a class slot --------------------------------------------

@pytest.mark.torch
def test_timm_register_positions_fold_with_a_class_slot(tmp_path):
    """pos_embed rows are [cls, reg x3, patches]: the register rows must be folded into reg_tokens and the
    class row kept, at the stored grid and when the patch rows are resampled for another size."""
    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    from safetensors.numpy import save_file
    from timm.models._hub import save_config_for_hf

    kwargs = dict(embed_dim=64, depth=2, num_heads=2, img_size=32, patch_size=8, reg_tokens=3,
                  dynamic_img_size=True, num_classes=0)
    reference = timm.create_model("vit_small_patch16_224", pretrained=False, **kwargs)
    assert reference.pos_embed.shape[1] == 1 + 3 + 16 and not reference.no_embed_class
    tensors = fx.weights(fx._manifest(reference.state_dict()))
    fx._torch_load(reference, tensors)
    save_config_for_hf(reference, str(tmp_path / "config.json"), model_args=kwargs)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    model, variables = convert.load(tmp_path)
    assert model.class_token and model.num_registers == 3
    for size in [(32, 32), (40, 56)]:
        images = fx.images(*size)
        with torch.no_grad():
            want = reference.forward_features(fx._nchw(images)).numpy()
        out = model.apply(variables, images)
        got = np.concatenate([np.asarray(out["cls"])[:, None], np.asarray(out["registers"]),
                              np.asarray(out["patch_tokens"])], axis=1)
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0, err_msg=f"{size}")


# --- save_hf -> transformers computes the source library's outputs -------------------------------------

@pytest.mark.torch
def test_hf_vit_pooler_export_into_vit_model(tmp_path):
    """HF ViTModel with its tanh pooler -> ours (pre_logits) -> save_hf -> ViTModel: the pooler output is
    transformers' own reference, at the stored size and interpolated."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    model, variables = convert.load(fx.write_checkpoint(CASES["hf_vit_pooler"], tmp_path / "src"))
    hf = transformers.ViTModel.from_pretrained(convert.save_hf(model, variables, tmp_path / "out")).eval()
    for size in [(28, 28), (42, 35)]:
        with torch.no_grad():
            out = hf(pixel_values=fx._nchw(fx.images(*size)), interpolate_pos_encoding=True)
        tag = f"@{size[0]}x{size[1]}"
        np.testing.assert_allclose(out.pooler_output.numpy(), OUTPUTS["hf_vit_pooler/pre_logits" + tag],
                                   atol=ATOL, rtol=0, err_msg=tag)
        np.testing.assert_allclose(out.last_hidden_state[:, 0].numpy(), OUTPUTS["hf_vit_pooler/cls" + tag],
                                   atol=ATOL, rtol=0, err_msg=tag)


@pytest.mark.torch
def test_openai_quickgelu_clip_export_into_clip_model(tmp_path):
    """An OpenAI-layout (QuickGELU) CLIP -> save_hf -> CLIPModel: image / text features equal open_clip's."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    case = CASES["openai_clip_file"]
    model, variables = convert.load(fx.write_checkpoint(case, tmp_path / "src"), **case["load_kwargs"])
    assert model.vision["act"] == model.text["act"] == "quick_gelu"
    hf = transformers.CLIPModel.from_pretrained(convert.save_hf(model, variables, tmp_path / "out")).eval()
    assert hf.config.vision_config.hidden_act == hf.config.text_config.hidden_act == "quick_gelu"
    with torch.no_grad():
        image = hf.get_image_features(pixel_values=fx._nchw(fx.images(32, 32)))
        text = hf.get_text_features(input_ids=torch.from_numpy(fx.tokens(case["tokens"])).long())
    image, text = getattr(image, "pooler_output", image), getattr(text, "pooler_output", text)
    np.testing.assert_allclose(image.numpy(), OUTPUTS["openai_clip_file/image@32x32"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(text.numpy(), OUTPUTS["openai_clip_file/text"], atol=ATOL, rtol=0)


@pytest.mark.torch
def test_big_vision_vit_export_into_vit_classifier(tmp_path):
    """A big_vision ViT (class token outside the position table, tanh GELU, eps 1e-6) -> save_hf ->
    ViTForImageClassification: logits equal timm's big_vision loader reference."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    model, variables = convert.load(fx.write_checkpoint(CASES["big_vision_vit_cls"], tmp_path / "src"))
    assert model.class_token and not model.pos_embed_includes_cls
    hf = transformers.ViTForImageClassification.from_pretrained(
        convert.save_hf(model, variables, tmp_path / "out")).eval()
    with torch.no_grad():
        logits = hf(pixel_values=fx._nchw(fx.images(32, 32))).logits.numpy()
    np.testing.assert_allclose(logits, OUTPUTS["big_vision_vit_cls/logits@32x32"], atol=ATOL, rtol=0)


# --- big_vision .npz (torch-free) ---------------------------------------------------------------------

def _scan(tensors):
    """Per-layer `encoderblock_{i}/...` arrays stacked into big_vision's scanned `encoderblock/...`."""
    out, stacked = {}, {}
    for key, value in tensors.items():
        match = re.fullmatch(r"(.*encoderblock)_(\d+)(/.*)", key)
        if match:
            stacked.setdefault(match[1] + match[3], {})[int(match[2])] = value
        else:
            out[key] = value
    for key, layers in stacked.items():
        out[key] = np.stack([layers[i] for i in range(len(layers))])
    return out


def test_big_vision_scanned_siglip_equals_unscanned_and_reference(tmp_path):
    """The two-tower SigLIP fixture re-saved with scanned blocks in both towers converts to the same params
    and outputs, which are open_clip's / timm's big_vision-loader reference."""
    case = CASES["big_vision_siglip"]
    flat_path = fx.write_checkpoint(case, tmp_path / "flat")
    tensors = fx.weights(case["manifest"])
    scanned = _scan(tensors)
    assert "params/img/Transformer/encoderblock/LayerNorm_0/scale" in scanned
    assert "params/txt/Encoder_0/encoderblock/MlpBlock_0/Dense_0/kernel" in scanned
    assert not any("encoderblock_" in k for k in scanned)
    np.savez(tmp_path / "bv_siglip_tiny_scan.npz", **scanned)
    flat_model, flat_vars = convert.load(flat_path)
    model, variables = convert.load(tmp_path / "bv_siglip_tiny_scan.npz")
    assert model == flat_model
    want = flatten(flat_vars["params"])
    assert set(flatten(variables["params"])) == set(want)
    for key, value in flatten(variables["params"]).items():
        np.testing.assert_array_equal(value, want[key], err_msg=key)
    image = np.asarray(model.apply(variables, fx.images(32, 32), method="encode_image"))
    text = np.asarray(model.apply(variables, fx.tokens(case["tokens"]), method="encode_text"))
    np.testing.assert_allclose(image, OUTPUTS["big_vision_siglip/image@32x32"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(text, OUTPUTS["big_vision_siglip/text"], atol=ATOL, rtol=0)


# A NumPy (float64) transcription of big_vision's models/vit.py forward: stem conv, + posemb, [cls], Encoder
# (pre-LN blocks, encoder_norm), pool 'map' (MAPHead) / 'tok' / 'gap', optional tanh(pre_logits), head.
# flax defaults: LayerNorm eps 1e-6, nn.gelu = tanh approximation.

def _ln(x, p, name):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-6) * p[f"{name}/scale"] + p[f"{name}/bias"]


def _mha(q_in, kv_in, p, name):
    q, k, v = (np.einsum("bld,dhk->blhk", x, p[f"{name}/{n}/kernel"]) + p[f"{name}/{n}/bias"]
               for x, n in ((q_in, "query"), (kv_in, "key"), (kv_in, "value")))
    logits = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(q.shape[-1])
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bhqs,bshk,hkd->bqd", weights, v, p[f"{name}/out/kernel"]) + p[f"{name}/out/bias"]


def _mlp(x, p, name):
    h = x @ p[f"{name}/Dense_0/kernel"] + p[f"{name}/Dense_0/bias"]
    h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
    return h @ p[f"{name}/Dense_1/kernel"] + p[f"{name}/Dense_1/bias"]


def _sincos2d(h, w, width):
    """big_vision's posemb_sincos_2d (temperature 10000)."""
    y, x = np.mgrid[:h, :w]
    omega = 1.0 / 10_000 ** (np.arange(width // 4) / (width // 4 - 1))
    y, x = np.outer(y.flatten(), omega), np.outer(x.flatten(), omega)
    return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)[None]


def _big_vision_vit(p, images, pool, depth=2):
    kernel = p["embedding/kernel"]
    patch, width = kernel.shape[0], kernel.shape[-1]
    b, h, w, c = images.shape
    grid = (h // patch, w // patch)
    patches = images.reshape(b, grid[0], patch, grid[1], patch, c).transpose(0, 1, 3, 2, 4, 5)
    x = np.einsum("byxijc,ijcd->byxd", patches, kernel).reshape(b, -1, width) + p["embedding/bias"]
    x = x + (p["pos_embedding"] if "pos_embedding" in p else _sincos2d(*grid, width))
    if pool == "tok":
        x = np.concatenate([np.tile(p["cls"], (b, 1, 1)), x], axis=1)
    for i in range(depth):
        blk = f"Transformer/encoderblock_{i}/"
        y = _ln(x, p, blk + "LayerNorm_0")
        x = x + _mha(y, y, p, blk + "MultiHeadDotProductAttention_0")
        x = x + _mlp(_ln(x, p, blk + "LayerNorm_1"), p, blk + "MlpBlock_0")
    x = _ln(x, p, "Transformer/encoder_norm")
    if pool == "map":
        x = _mha(np.tile(p["MAPHead_0/probe"], (b, 1, 1)), x, p, "MAPHead_0/MultiHeadDotProductAttention_0")
        x = (x + _mlp(_ln(x, p, "MAPHead_0/LayerNorm_0"), p, "MAPHead_0/MlpBlock_0"))[:, 0]
    else:
        x = x[:, 0] if pool == "tok" else x.mean(1)
    if "pre_logits/kernel" in p:
        x = np.tanh(x @ p["pre_logits/kernel"] + p["pre_logits/bias"])
    return x @ p["head/kernel"] + p["head/bias"]


@pytest.mark.parametrize("root, pool, rep_size, sincos", [
    ("params/", "map", None, False),   # MAPHead classifier
    ("params/", "tok", 32, False),     # class token + pre_logits (rep_size != width) + head
    ("opt/target/", "gap", None, True),  # a train-state root, no pos_embedding: fixed sincos2d table
], ids=["map_head", "tok_pre_logits", "gap_sincos_opt_target"])
def test_big_vision_classifiers_match_a_numpy_forward(tmp_path, root, pool, rep_size, sincos):
    manifest = fx._big_vision_image_manifest(root, cls=pool == "tok", head=5, map_head=pool == "map",
                                             scanned=False)
    if sincos:
        manifest = [[k, s] for k, s in manifest if not k.endswith("pos_embedding")]
    if rep_size:  # big_vision: pre_logits Dense(rep_size) + tanh, then the head reads rep_size features
        manifest = [[k, [rep_size, 5] if k.endswith("head/kernel") else s] for k, s in manifest]
        manifest += [[f"{root}pre_logits/kernel", [64, rep_size]], [f"{root}pre_logits/bias", [rep_size]]]
    tensors = fx.weights(manifest)
    np.savez(tmp_path / "bv_vit.npz", **tensors)
    model, variables = convert.load(tmp_path / "bv_vit.npz")
    assert (model.pool, model.rep_size) == ({"tok": "cls"}.get(pool, pool), rep_size)
    assert model.pos_embed == ("sincos2d" if sincos else "learned")
    images = fx.images(32, 32)
    want = _big_vision_vit({k[len(root):]: v.astype(np.float64) for k, v in tensors.items()},
                           images.astype(np.float64), pool)
    got = np.asarray(model.apply(variables, images)["logits"])
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


# --- merge_pretrained: DINOv2's offset resampling --------------------------------------------------------

@pytest.mark.torch
def test_merge_pretrained_resamples_dinov2_tables_with_the_offset_rule(tmp_path):
    """A DINOv2 hub model (pos_embed_interp='dinov2', class slot in the table) merged into a task at a
    non-square 42x35 grid: the table is DINOv2's F.interpolate(scale_factor=(new + 0.1) / old, bicubic,
    antialias=False), (H, W) order, class row kept."""
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    source, variables = convert.load(fx.write_checkpoint(CASES["dinov2_hub"], tmp_path / "src"), num_heads=2)
    assert source.pos_embed_interp == "dinov2" and source.pos_embed_includes_cls
    convert.save_converted(tmp_path / "conv", source, variables, format="dinov2")
    target = source.clone(image_size=(42, 35))
    # The task's params: only their shapes and dtypes matter here (every leaf is loaded), so skip the slow init.
    shapes = jax.eval_shape(lambda r: nn.meta.unbox(target.init(r, jnp.zeros((1, 42, 35, 3)))["params"]),
                            jax.random.PRNGKey(0))
    params = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    logs = []
    merged = convert.merge_pretrained(params, tmp_path / "conv", model=target, log=logs.append)
    assert "resampled pos_embed (1, 17, 64) -> (1, 31, 64)" in logs[0]
    table = variables["params"]["pos_embed"]  # [1, 1 + 4*4, 64]
    grid = torch.from_numpy(np.array(table[:, 1:])).reshape(1, 4, 4, 64).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, scale_factor=((6 + 0.1) / 4, (5 + 0.1) / 4), mode="bicubic",
                            antialias=False, align_corners=False)
    assert tuple(resized.shape[2:]) == (6, 5)
    want = np.concatenate([table[:, :1], resized.permute(0, 2, 3, 1).reshape(1, 30, 64).numpy()], axis=1)
    np.testing.assert_allclose(np.asarray(merged["pos_embed"]), want, atol=1e-6, rtol=0)
