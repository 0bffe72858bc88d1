"""Converter checks that need the PyTorch libraries (timm, transformers, open_clip): skipped without torch.

- the golden references in tests/fixtures/convert are what the installed libraries compute now
  (with test_convert_golden.py: ours == fixture == torch);
- torch readers: state dicts with training wrappers, bf16, TorchScript archives (OpenAI's format);
- save_hf output loads in transformers and reproduces the original model / another library's model;
- real sizes (B/16, L/14, g/14) map without allocating: shape-only conversion of meta-device models.
"""
import json
import pathlib

import jax
import numpy as np
import pytest

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
pytest.importorskip("timm")
pytest.importorskip("transformers")
pytest.importorskip("open_clip")

from lvm_jax import convert  # noqa: E402
from lvm_jax.convert.core import flatten  # noqa: E402
from lvm_jax.convert.readers import Checkpoint  # noqa: E402
from tests.helpers import convert_fixtures  # noqa: E402

fx, CASES, OUTPUTS = convert_fixtures()


def test_golden_fixture_is_what_the_torch_libraries_compute():
    live = fx.build_cases()
    assert sorted(live) == sorted(CASES)
    for name, (case, result) in live.items():
        assert case["manifest"] == CASES[name]["manifest"], f"{name}: state-dict layout changed"
        assert sorted(result) == CASES[name]["outputs"], name
        for key, value in result.items():
            np.testing.assert_allclose(value, OUTPUTS[f"{name}/{key}"], atol=2e-5, rtol=0, err_msg=f"{name}/{key}")


# --- torch readers -------------------------------------------------------------------------------

def _reference_params(name, tmp_path):
    case = CASES[name]
    return convert.load(fx.write_checkpoint(case, tmp_path / "ref"), **case.get("load_kwargs", {}))


def _assert_same_params(a, b):
    fa, fb = flatten(a["params"]), flatten(b["params"])
    assert set(fa) == set(fb)
    for key in fa:
        np.testing.assert_array_equal(fa[key], fb[key], err_msg=key)


def test_pth_state_dicts_with_training_wrappers_and_bf16(tmp_path):
    case = CASES["dinov2_hub_registers"]
    tensors = {k: torch.from_numpy(v) for k, v in fx.weights(case["manifest"]).items()}
    model, ref = _reference_params("dinov2_hub_registers", tmp_path)
    torch.save(tensors, tmp_path / "dinov2_vits14_reg4_pretrain.pth")  # the hub file itself
    _assert_same_params(ref, convert.load(tmp_path / "dinov2_vits14_reg4_pretrain.pth", num_heads=2)[1])
    # A DINOv2 training checkpoint: teacher backbone + heads, DDP prefix.
    wrapped = {"teacher": {**{f"module.backbone.{k}": v for k, v in tensors.items()},
                           "module.dino_head.mlp.0.weight": torch.zeros(3, 64)}, "iteration": 7}
    torch.save(wrapped, tmp_path / "model_0012499.rank_0.pth")
    loaded = convert.load(tmp_path / "model_0012499.rank_0.pth", num_heads=2)[1]
    _assert_same_params(ref, loaded)
    # bf16 weights decode to the same values as their float32 upcast.
    torch.save({k: v.bfloat16() for k, v in tensors.items()}, tmp_path / "bf16.pth")
    bf16 = convert.load(tmp_path / "bf16.pth", num_heads=2)[1]
    for key, value in flatten(bf16["params"]).items():
        assert value.dtype == np.float32
    np.testing.assert_array_equal(bf16["params"]["cls_token"], tensors["cls_token"].bfloat16().float().numpy())


def test_pickled_objects_need_allow_pickle(tmp_path):
    import argparse

    tensors = {k: torch.from_numpy(v) for k, v in fx.weights(CASES["dinov2_hub"]["manifest"]).items()}
    torch.save({"model": tensors, "args": argparse.Namespace(lr=1.0)}, tmp_path / "ckpt.pth")
    with pytest.raises(convert.ConversionError, match="pickled Python objects.*allow_pickle=True"):
        convert.load(tmp_path / "ckpt.pth", num_heads=2)
    assert convert.load(tmp_path / "ckpt.pth", num_heads=2, allow_pickle=True)[0].depth == 2


def test_openai_torchscript_archive(tmp_path):
    """OpenAI ships CLIP as TorchScript: read via torch.jit, QuickGELU implied."""
    from open_clip import model as ocm

    case = CASES["openai_clip_file"]
    ref = ocm.CLIP(embed_dim=48, quick_gelu=True,
                   vision_cfg=ocm.CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=8, image_size=32),
                   text_cfg=ocm.CLIPTextCfg(context_length=16, vocab_size=100, width=64, heads=2, layers=2))
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in fx.weights(case["manifest"]).items()})
    image, text = torch.from_numpy(fx.images(32, 32)).permute(0, 3, 1, 2), torch.from_numpy(fx.tokens(case["tokens"]))
    torch.jit.trace(ref.eval(), (image, text.long()), check_trace=False).save(str(tmp_path / "ViT-tiny.pt"))
    model, variables = convert.load(tmp_path / "ViT-tiny.pt", num_heads=2)
    assert model.vision["act"] == model.text["act"] == "quick_gelu"
    _assert_same_params(_reference_params("openai_clip_file", tmp_path)[1], variables)


# --- export through transformers ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["hf_vit_classifier", "hf_dinov2_swiglu", "hf_dinov2_registers", "hf_clip"])
def test_save_hf_loads_in_transformers_as_the_original(name, tmp_path):
    import transformers

    case = CASES[name]
    src = fx.write_checkpoint(case, tmp_path / "src")
    cls = getattr(transformers, case["configs"]["config.json"]["architectures"][0])
    original = cls.from_pretrained(src).state_dict()
    model, variables = convert.load(src)
    exported = cls.from_pretrained(convert.save_hf(model, variables, tmp_path / "out")).state_dict()
    assert set(exported) == set(original)
    for key, value in original.items():
        torch.testing.assert_close(exported[key], value, rtol=0, atol=0, msg=key)


def test_timm_model_exported_to_hf_computes_the_same(tmp_path):
    """timm DINOv2-style ViT (registers, no class position slot) -> save_hf -> transformers model."""
    from transformers import Dinov2WithRegistersModel

    name = "timm_dinov2_registers"
    model, variables = convert.load(fx.write_checkpoint(CASES[name], tmp_path / "src"))
    hf = Dinov2WithRegistersModel.from_pretrained(convert.save_hf(model, variables, tmp_path / "out")).eval()
    with torch.no_grad():
        hidden = hf(pixel_values=torch.from_numpy(fx.images(28, 28)).permute(0, 3, 1, 2)).last_hidden_state
    np.testing.assert_allclose(hidden[:, 3:].numpy(), OUTPUTS[f"{name}/patch@28x28"], atol=1e-4)
    np.testing.assert_allclose(hidden[:, 0].numpy(), OUTPUTS[f"{name}/cls@28x28"], atol=1e-4)


# --- real sizes, shapes only ---------------------------------------------------------------------------

def _abstract(state_dict, rename=lambda k: k, extra=()):
    tensors = {rename(k): jax.ShapeDtypeStruct(tuple(v.shape), np.float32)
               for k, v in state_dict.items() if v.is_floating_point()}
    tensors.update({k: jax.ShapeDtypeStruct(s, np.float32) for k, s in extra})
    return tensors


def _count(tree):
    leaves = jax.tree_util.tree_leaves(tree)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves), "shape-only conversion allocated arrays"
    return sum(int(np.prod(x.shape)) for x in leaves)


def _meta(build):
    with torch.device("meta"):
        return build()


def test_real_sizes_map_without_allocating(tmp_path):
    import timm
    from open_clip import model as ocm
    from transformers import CLIPConfig, CLIPModel

    def check(tensors, torch_params, config=None, open_clip_config=None, name="x.safetensors", **overrides):
        ck = Checkpoint(tensors, config or {}, open_clip_config or {}, tmp_path / name)
        model, variables = convert.from_checkpoint(ck, **overrides)
        assert _count(variables["params"]) == torch_params, name
        return model

    b16 = _meta(lambda: timm.create_model("vit_base_patch16_224", pretrained=False))
    vit = check(_abstract(b16.state_dict()), sum(p.numel() for p in b16.parameters()),
                config={"architecture": "vit_base_patch16_224", "num_classes": 1000})
    assert vit.dims()[:3] == (768, 12, 12) and vit.num_classes == 1000

    # DINOv2 ViT-g/14 hub checkpoint (518 px, SwiGLU, 24 heads inferred from the width), with registers.
    g14 = _meta(lambda: timm.create_model("vit_giant_patch14_reg4_dinov2", pretrained=False))
    hub = _abstract(g14.state_dict(), lambda k: k.replace("reg_token", "register_tokens")
                    .replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3"), extra=[("mask_token", (1, 1536))])
    hub["pos_embed"] = jax.ShapeDtypeStruct((1, 1 + 37 * 37, 1536), np.float32)  # the hub keeps a cls slot
    vit = check(hub, sum(p.numel() for p in g14.parameters()) + 1536 + 1536, name="dinov2_vitg14_reg4_pretrain.pth")
    assert vit.dims()[:4] == (1536, 40, 24, 6144) and vit.ffn == "swiglu" and vit.image_size == 518

    cfg = json.loads((pathlib.Path(ocm.__file__).parent / "model_configs" / "ViT-L-14.json").read_text())
    l14 = _meta(lambda: ocm.CLIP(**cfg))
    clip = check(_abstract(l14.state_dict()), sum(p.numel() for p in l14.parameters()),
                 open_clip_config={"model_cfg": {**cfg, "quick_gelu": True}}, name="open_clip_model.safetensors")
    assert clip.vision["num_heads"] == 16 and clip.text["num_heads"] == 12 and clip.vision["act"] == "quick_gelu"

    config = CLIPConfig(text_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                         num_hidden_layers=12),
                        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                                           num_hidden_layers=24, patch_size=14), projection_dim=768)
    hf_l14 = _meta(lambda: CLIPModel(config))
    clip = check(_abstract(hf_l14.state_dict()), sum(p.numel() for p in hf_l14.parameters()),
                 config=json.loads(config.to_json_string()), name="model.safetensors")
    assert clip.embed_dim == 768 and clip.vision["image_size"] == 224


def test_big_vision_so400m_siglip_maps_without_allocating(tmp_path):
    """A So400m/14 SigLIP .npz in big_vision naming (shapes only), heads read off the kernels."""
    manifest = [[k, s] for k, s in fx.big_vision_manifest("params/img/", width=1152, depth=27, heads=16, mlp=4304,
                                                           scanned=True)]
    manifest += [["params/img/embedding/kernel", [14, 14, 3, 1152]], ["params/img/embedding/bias", [1152]],
                 ["params/img/pos_embedding", [1, 729, 1152]], ["params/img/MAPHead_0/probe", [1, 1, 1152]]]
    manifest += [[f"params/img/MAPHead_0/{k[len('encoderblock_0/'):]}", s]
                 for k, s in fx.big_vision_manifest("", width=1152, depth=1, heads=16, mlp=4304, scanned=False,
                                                    encoder="")
                 if k.startswith("encoderblock_0/") and "LayerNorm_1" not in k]
    manifest += fx.big_vision_manifest("params/txt/", width=1152, depth=27, heads=16, mlp=4304, scanned=True,
                                       encoder="Encoder_0/")
    manifest += [["params/txt/Embed_0/embedding", [32000, 1152]], ["params/txt/pos_embedding", [1, 16, 1152]],
                 ["params/txt/head/kernel", [1152, 1152]], ["params/txt/head/bias", [1152]], ["params/t", [1]],
                 ["params/b", [1]]]
    tensors = {k: jax.ShapeDtypeStruct(tuple(s), np.float32) for k, s in manifest}
    model, variables = convert.from_checkpoint(Checkpoint(tensors, {}, {}, tmp_path / "siglip_so400m.npz"))
    assert _count(variables["params"]) == sum(int(np.prod(s)) for _, s in manifest)
    assert model.vision["num_heads"] == 16 and model.vision["image_size"] == 378 and not model.image_projection


# --- layer-wise lr decay == timm's ---------------------------------------------------------------

def test_layer_decay_multipliers_match_timm_param_groups_on_a_clip_style_tower():
    """Per-parameter lr scales of optim.layer_decay_scales vs timm's param_groups_layer_decay on the same
    tower (ln_pre, class token, avg pool + fc_norm, head), matched through the converter: a state dict
    whose every tensor is filled with its timm lr scale converts to our tree of scales."""
    import timm
    from timm.optim._param_groups import param_groups_layer_decay

    from lvm_jax.optim import layer_decay_scales

    torch.manual_seed(0)
    depth, decay = 3, 0.75
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=depth, num_heads=2, mlp_ratio=2, pre_norm=True,
        global_pool="avg", fc_norm=True, num_classes=5)
    groups = param_groups_layer_decay(model, weight_decay=0.0, layer_decay=decay)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    filled = {n: np.full(tuple(p.shape), scale_of[id(p)], np.float32) for n, p in model.named_parameters()}
    assert {round(s, 6) for s in scale_of.values()} == {round(decay ** i, 6) for i in range(depth + 2)}
    ours, variables = convert.from_checkpoint(Checkpoint(filled, {}, {}, pathlib.Path("timm_tower.pth")),
                                              "timm", num_heads=2)
    assert ours.pre_norm and ours.depth == depth
    timm_scales = flatten(variables["params"])
    our_scales = flatten(layer_decay_scales(variables["params"], depth, decay))
    assert set(our_scales) == set(timm_scales)
    for key, value in timm_scales.items():
        np.testing.assert_allclose(np.broadcast_to(our_scales[key], value.shape), value, rtol=1e-6, err_msg=key)
