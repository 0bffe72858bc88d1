"""Architecture defaults the converters cannot read off the weights (timm and open_clip configs).

timm's config.json holds only the model_args a user passed to create_model, so an architecture's own
defaults (SigLIP 2's tanh GELU, giant-opt's 16 heads) come from lvm_jax/convert/timm_arch_defaults.py,
which scripts/make_timm_arch_defaults.py generates from timm's registry; `vit_*` models timm builds from
other classes (Perception Encoder with RoPE, ...) are refused. open_clip configs that leave out head_width
/ heads get open_clip's defaults. Torch-free tests use the golden fixture's weights; the others compare
against timm / open_clip themselves (skipped without them).
"""
import importlib.util
import json
import pathlib
import re

import jax
import numpy as np
import pytest

from lvm_jax import convert
from lvm_jax.convert import timm_arch_defaults
from lvm_jax.convert.core import ConversionError
from lvm_jax.convert.readers import Checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fx = _load_script("make_convert_fixtures")
CASES = json.loads((fx.FIXTURES / "cases.json").read_text())


def _siglip_tensors(scale=1):
    """The timm_siglip_map fixture's weights (width 64, MAP pool); scale>1: shapes only, width 64*scale."""
    tensors = fx.weights(CASES["timm_siglip_map"]["manifest"])
    if scale == 1:
        return tensors
    return {k: jax.ShapeDtypeStruct(tuple(d * scale if d in (64, 128, 192, 256) else d for d in v.shape), np.float32)
            for k, v in tensors.items()}


def _timm(tensors, arch, model_args=None, **overrides):
    config = {"architecture": arch, "global_pool": "map", "num_classes": 0, "model_args": model_args or {}}
    return convert.from_checkpoint(Checkpoint(tensors, config, {}, pathlib.Path("/ck/model.safetensors")),
                                   **overrides)


# --- torch-free ---------------------------------------------------------------------------------

def test_non_vision_transformer_archs_are_refused_in_one_line():
    tensors = _siglip_tensors()
    for arch, message in [("vit_pe_core_tiny_patch16_384", r"'vit_pe_core_tiny_patch16_384' is not a VisionTransf"),
                          ("vit_pe_spatial_base_patch16_512", "is not a VisionTransformer"),  # RoPE has no weights
                          ("vit_base_patch16_rope_reg1_gap_256", "is not a VisionTransformer"),
                          ("vit_base_patch16_xp_224", "uses ParallelScalingBlock blocks, which lvm_jax's ViT lacks")]:
        with pytest.raises(ConversionError, match=message) as info:
            _timm(tensors, arch)
        assert "\n" not in str(info.value)
    del tensors["blocks.0.mlp.fc1.weight"]  # was a raw KeyError
    with pytest.raises(ConversionError, match=r"not a timm VisionTransformer checkpoint: missing keys "
                                              r"\[blocks.0.mlp.fc1.weight\]"):
        _timm(tensors, "vit_base_patch16_siglip_224")


def test_table_defaults_apply_when_model_args_lack_them():
    tensors = _siglip_tensors()
    model, _ = _timm(tensors, "vit_so400m_patch16_siglip_256", {"num_heads": 2})
    assert (model.act, model.num_heads) == ("gelu_tanh", 2)  # SigLIP 2: timm's default, absent from config.json
    model, _ = _timm(tensors, "vit_base_patch16_siglip_224", {"num_heads": 2})
    assert model.act == "gelu"  # SigLIP 1 tower of the same family
    model, _ = _timm(tensors, "vit_giantopt_patch16_siglip_256", {"embed_dim": 64})
    assert (model.act, model.num_heads) == ("gelu_tanh", 16)  # timm keeps 16 heads at any embed_dim
    model, _ = _timm(tensors, "vit_so400m_patch16_siglip_256", {"num_heads": 2, "act_layer": "gelu"})
    assert model.act == "gelu"  # what the user passed wins


def test_what_cannot_be_inferred_is_asked_for_and_the_override_answers():
    wide = _siglip_tensors(scale=12)  # width 768: timm's ViTs use 12 or 16 heads there
    with pytest.raises(ConversionError, match=r"'vit_base_patch16_siglip9_224' is not in lvm_jax's table .* "
                                              r"width 768 use 12 or 16 heads; pass num_heads=\.\.\."):
        _timm(wide, "vit_base_patch16_siglip9_224")
    with pytest.raises(ConversionError, match=r"SigLIP towers use either 'gelu' or 'gelu_tanh'; pass act=\.\.\."):
        _timm(wide, "vit_base_patch16_siglip9_224", num_heads=16)
    model, variables = _timm(wide, "vit_base_patch16_siglip9_224", num_heads=16, act="gelu_tanh")
    assert (model.num_heads, model.act) == (16, "gelu_tanh")
    assert variables["params"]["encoder"]["blocks_0"]["attn"]["query"]["kernel"].shape == (768, 16, 48)
    # A listed architecture whose width the user changed: its default head count is not in the weights.
    with pytest.raises(ConversionError, match=r"model_args set embed_dim but not num_heads, so timm kept "
                                              r"'vit_base_patch16_siglip_224''s default head count"):
        _timm(_siglip_tensors(), "vit_base_patch16_siglip_224", {"embed_dim": 64})
    model, _ = _timm(_siglip_tensors(), "vit_base_patch16_siglip_224", {"embed_dim": 64}, num_heads=4)
    assert model.num_heads == 4


# --- against timm / open_clip --------------------------------------------------------------------

def _timm_checkpoint(tmp_path, arch, kwargs):
    """A random tiny timm model written as a timm hub folder (config.json via timm's own writer)."""
    import timm
    from safetensors.numpy import save_file
    from timm.models._hub import save_config_for_hf

    model = timm.create_model(arch, pretrained=False, **kwargs)
    tensors = fx.weights(fx._manifest(model.state_dict()))
    fx._torch_load(model, tensors)
    save_config_for_hf(model, str(tmp_path / "config.json"), model_args=kwargs)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return model


@pytest.mark.torch
@pytest.mark.parametrize("arch, kwargs, heads, act", [
    ("vit_base_patch32_siglip_256", dict(embed_dim=64, depth=2, num_heads=2, img_size=64, num_classes=0), 2,
     "gelu_tanh"),
    ("vit_giantopt_patch16_siglip_256", dict(embed_dim=64, depth=1, img_size=32, num_classes=0), 16, "gelu_tanh"),
    ("vit_base_patch16_gap_224", dict(embed_dim=64, depth=1, img_size=32, num_classes=0), 16, "gelu"),
])
def test_tiny_timm_models_match_timm(tmp_path, arch, kwargs, heads, act):
    torch = pytest.importorskip("torch")
    pytest.importorskip("timm")
    reference = _timm_checkpoint(tmp_path, arch, kwargs)
    assert "act_layer" not in json.loads((tmp_path / "config.json").read_text())["model_args"]
    model, variables = convert.load(tmp_path)
    assert (model.num_heads, model.act) == (heads, act)
    assert reference.blocks[0].attn.num_heads == heads
    x = fx.images(kwargs["img_size"], kwargs["img_size"])
    with torch.no_grad():
        want = reference(fx._nchw(x)).numpy()
    np.testing.assert_allclose(np.asarray(model.apply(variables, x)["pooled"]), want, atol=1e-5, rtol=0)


@pytest.mark.torch
def test_real_size_timm_archs_get_their_defaults_and_pe_is_refused():
    """Shape-only conversion of meta-device models at their real width, as from a hub config.json."""
    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")

    def checkpoint(arch):
        with torch.device("meta"):
            m = timm.create_model(arch, pretrained=False, depth=1)
        tensors = {k: jax.ShapeDtypeStruct(tuple(v.shape), np.float32)
                   for k, v in m.state_dict().items() if v.is_floating_point()}
        config = {"architecture": arch, "global_pool": m.global_pool, "num_classes": m.num_classes,
                  "model_args": {"depth": 1}}
        return m, Checkpoint(tensors, config, {}, pathlib.Path("/hub/model.safetensors"))

    probe_act = _load_script("make_timm_arch_defaults")._probe_act
    for arch, heads, act in [("vit_giantopt_patch16_siglip_384", 16, "gelu_tanh"),  # the width rule says 24
                             ("vit_base_patch16_gap_224", 16, "gelu"),  # the width rule says 12
                             ("vit_so400m_patch16_siglip_512", 16, "gelu_tanh")]:
        reference, ck = checkpoint(arch)
        model, variables = convert.from_checkpoint(ck)
        assert (model.num_heads, model.act) == (heads, act), arch
        assert (heads, act) == (reference.blocks[0].attn.num_heads, probe_act(reference.blocks[0].mlp.act))
        assert sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(variables)) == sum(
            p.numel() for p in reference.parameters()), arch
    for arch in ("vit_pe_core_tiny_patch16_384", "vit_pe_spatial_tiny_patch16_512"):
        with pytest.raises(ConversionError, match="is not a VisionTransformer"):
            convert.from_checkpoint(checkpoint(arch)[1])


@pytest.mark.torch
def test_open_clip_configs_without_heads_use_open_clip_defaults(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("open_clip")
    from open_clip import model as ocm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    vision = dict(layers=1, width=64, head_width=32, patch_size=8, image_size=32)
    text = dict(context_length=16, vocab_size=100, width=768, layers=1)  # no heads: open_clip's 8, not 768 // 64
    reference = ocm.CLIP(embed_dim=48, vision_cfg=ocm.CLIPVisionCfg(**vision), text_cfg=ocm.CLIPTextCfg(**text))
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()},
              str(tmp_path / "open_clip_model.safetensors"))
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": dict(embed_dim=48, vision_cfg=vision,
                                                                                   text_cfg=text)}))
    model, variables = convert.load(tmp_path)
    assert model.text["num_heads"] == reference.transformer.resblocks[0].attn.num_heads == 8
    ids = np.random.default_rng(0).integers(1, 99, (2, 16))
    ids[:, 10] = 99
    with torch.no_grad():
        want = reference.encode_text(torch.from_numpy(ids).long()).numpy()
    np.testing.assert_allclose(np.asarray(model.apply(variables, ids, method="encode_text")), want, atol=2e-5)

    # Vision: no head_width means open_clip's 64 (width 1280 -> 20 heads; the width table says 16).
    cfg = dict(embed_dim=32, vision_cfg=dict(layers=1, width=1280, patch_size=14, image_size=28),
               text_cfg=dict(context_length=8, vocab_size=10, width=64, layers=1))
    with torch.device("meta"):
        big = ocm.CLIP(**cfg)
    tensors = {k: jax.ShapeDtypeStruct(tuple(v.shape), np.float32) for k, v in big.state_dict().items()}
    model, _ = convert.from_checkpoint(Checkpoint(tensors, {}, {"model_cfg": cfg},
                                                  tmp_path / "open_clip_model.safetensors"))
    assert model.vision["num_heads"] == big.visual.transformer.resblocks[0].attn.num_heads == 20


@pytest.mark.torch
def test_committed_table_is_what_the_script_generates_from_installed_timm():
    pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    # The table is for the timm it was generated from; another timm version (a fresh install takes the
    # newest) is served by the name/width fallbacks, and the check would only flag its new architectures.
    generated_for = re.search(r"from timm (\S+);", timm_arch_defaults.__doc__).group(1)
    if timm.__version__ != generated_for:
        pytest.skip(f"table generated for timm {generated_for}, timm {timm.__version__} installed")
    live = _load_script("make_timm_arch_defaults").generate()
    committed = {key: getattr(timm_arch_defaults, key) for key in live}
    assert committed == live, (f"lvm_jax/convert/timm_arch_defaults.py is stale for timm {timm.__version__}; "
                               "rerun scripts/make_timm_arch_defaults.py")
