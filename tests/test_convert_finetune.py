"""lvm-convert -> orbax checkpoint -> merge_pretrained into a task's sharded params (no torch needed).

The fine-tuning path is checked by what the merged model computes: at the task's new resolution it
must equal the pretrained model run at that resolution (position table resampled exactly as the
source library would at run time), in the task's scan_layers layout, with each leaf keeping the
target's sharding; a head for another label set keeps its init.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvm_jax import convert, sharding
from lvm_jax.convert.__main__ import main as convert_main
from lvm_jax.convert.core import ConversionError, flatten
from lvm_jax.models import ViT
from lvm_jax.models.clip import CLIP
from tests.helpers import convert_fixtures

fx, CASES, _ = convert_fixtures()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The HF DINOv2-with-registers fixture through `lvm-convert` (a real console-script run)."""
    tmp = tmp_path_factory.mktemp("convert")
    src = fx.write_checkpoint(CASES["hf_dinov2_registers"], tmp / "src")
    dst = tmp / "dst"
    assert convert_main([str(src), str(dst)]) == 0
    return src, dst


def test_cli_writes_a_checkpoint_that_reloads_exactly(converted, capsys):
    src, dst = converted
    model, variables, spec = convert.load_converted(dst)
    ref_model, ref_vars = convert.load(src)
    assert model == ref_model and spec["format"] == "hf"
    for key, value in flatten(ref_vars["params"]).items():
        np.testing.assert_array_equal(flatten(variables["params"])[key], value, err_msg=key)
    # A second conversion into the same directory refuses to overwrite it, in one line.
    assert convert_main([str(src), str(dst)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_cli_prints_the_config_fields_to_fine_tune_with(tmp_path, capsys):
    src = fx.write_checkpoint(CASES["openai_clip_file"], tmp_path / "src")
    assert convert_main([str(src), str(tmp_path / "dst"), "--set", "num_heads=2", "--set", "vision.scan_layers=True"]) == 0
    out = capsys.readouterr().out
    assert f"--config.init_from={tmp_path / 'dst'}" in out
    for line in ("--config.model.vision.act=quick_gelu", "--config.model.vision.scan_layers=True",
                 "--config.model.text.num_heads=2", "--config.model.embed_dim=48"):
        assert line in out
    model, variables, _ = convert.load_converted(tmp_path / "dst")
    assert model.vision["scan_layers"] and "blocks" in variables["params"]["image_tower"]["encoder"]


def _sharded_params(model: nn.Module, size: int, mesh) -> dict:
    """Boxed params created directly into their logical shardings, as the trainer does."""
    x = jnp.zeros((1, size, size, 3), jnp.float32)
    abstract = jax.eval_shape(lambda r: model.init(r, x)["params"], jax.random.PRNGKey(1))
    shardings = sharding.logical_shardings(abstract, mesh)
    unboxed = jax.jit(lambda r: nn.meta.unbox(model.init(r, x)["params"]), out_shardings=shardings)(
        jax.random.PRNGKey(1))
    return unboxed


def test_merge_resamples_restacks_keeps_head_and_sharding(converted):
    src, dst = converted
    source, source_vars = convert.load(src)
    mesh = sharding.make_mesh(dict(data=2, fsdp=4, tensor=1))
    target = source.clone(image_size=42, scan_layers=True, num_classes=3)
    with sharding.mesh_context(mesh):
        params = _sharded_params(target, 42, mesh)
        logs = []
        merged = convert.merge_pretrained(params, dst, model=target, log=logs.append)
    assert "resampled pos_embed" in logs[0] and "head/kernel" in logs[0]
    for (path, old), new in zip(flatten(params).items(), flatten(merged).values()):
        assert new.sharding == old.sharding and new.dtype == old.dtype, path
    np.testing.assert_array_equal(merged["head"]["kernel"], params["head"]["kernel"])  # kept init
    images = fx.images(42, 42)
    want = source.apply(source_vars, images)
    got = target.apply({"params": jax.device_get(merged)}, images)
    for key in ("cls", "registers", "patch_tokens"):
        np.testing.assert_allclose(got[key], want[key], atol=1e-5, err_msg=key)


def test_merge_accepts_boxed_params_and_any_loadable_checkpoint(tmp_path):
    """A CLIP checkpoint read directly (no lvm-convert step) initialises a ViT from its image tower."""
    src = fx.write_checkpoint(CASES["hf_clip"], tmp_path / "clip")
    clip, clip_vars = convert.load(src)
    vit = ViT(**{**dict(clip.vision), "num_classes": 4, "pre_norm": True, "patch_bias": False, "norm_eps": 1e-5})
    boxed = vit.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 3)))["params"]
    merged = convert.merge_pretrained(boxed, src, model=vit, log=lambda message: None)
    assert isinstance(merged["pos_embed"], nn.LogicallyPartitioned)
    tower = clip_vars["params"]["image_tower"]
    np.testing.assert_array_equal(merged["encoder"]["blocks_1"]["mlp"]["fc2"]["kernel"].value,
                                  tower["encoder"]["blocks_1"]["mlp"]["fc2"]["kernel"])
    pooled = vit.apply({"params": nn.meta.unbox(merged)}, fx.images(28, 28))["pooled"]
    want = clip.apply(clip_vars, fx.images(28, 28), method=lambda m, x: m.image_tower(x)["pooled"])
    np.testing.assert_allclose(pooled, want, atol=1e-5)


def test_merge_refuses_silent_architecture_differences(converted):
    src, dst = converted
    source, _ = convert.load(src)
    wrong_act = source.clone(act="gelu_tanh")
    params = wrong_act.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 3)))["params"]
    with pytest.raises(ConversionError, match=r"config.model.act='gelu'"):
        convert.merge_pretrained(params, dst, model=wrong_act)
    wider = source.clone(mlp_dim=192)
    params = wider.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 3)))["params"]
    with pytest.raises(ConversionError, match=r"shape mismatches .*mlp/fc1/kernel \(64, 256\) vs \(64, 192\)"):
        convert.merge_pretrained(params, dst, model=wider, log=lambda message: None)
    # Parameters the other side lacks (LayerScale, ln_pre, biases): once only named in the log line,
    # with the blocks then computing another function.
    assert source.layerscale_init is not None  # DINOv2
    for change, message in ((dict(layerscale_init=None), "layerscale_init=1.0"),
                            (dict(pre_norm=not source.pre_norm), f"pre_norm={source.pre_norm}"),
                            (dict(qkv_bias=not source.qkv_bias), f"qkv_bias={source.qkv_bias}")):
        other = source.clone(**change)
        params = other.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 3)))["params"]
        with pytest.raises(ConversionError, match=rf"config.model.{message}"):
            convert.merge_pretrained(params, dst, model=other, log=lambda message: None)


def test_load_resizes_the_stored_table_like_the_runtime_resampling(tmp_path):
    """image_size= override: the stored table becomes the one the source library uses at that size."""
    src = fx.write_checkpoint(CASES["dinov2_hub"], tmp_path / "d")
    model, variables = convert.load(src, num_heads=2)
    big, big_vars = convert.load(src, num_heads=2, image_size=42)
    assert big.image_size == 42 and big_vars["params"]["pos_embed"].shape == (1, 37, 64)
    images = fx.images(42, 42)
    np.testing.assert_allclose(big.apply(big_vars, images)["patch_tokens"],
                               model.apply(variables, images)["patch_tokens"], atol=1e-5)


def test_big_vision_image_size_uses_its_load_time_zoom(tmp_path):
    import scipy.ndimage

    src = fx.write_checkpoint(CASES["big_vision_vit_cls"], tmp_path / "bv")
    model, variables = convert.load(src, image_size=48)
    table = np.load(src)["params/pos_embedding"].reshape(4, 4, 64)
    want = scipy.ndimage.zoom(table, (1.5, 1.5, 1), order=1).reshape(1, 36, 64)
    np.testing.assert_allclose(variables["params"]["pos_embed"], want, atol=1e-6)
    assert model.apply(variables, fx.images(48, 48))["logits"].shape == (2, 5)
    # config.init_from=<the .npz itself> resamples as big_vision does too (it used jax bicubic).
    target = model.clone(num_classes=None)
    params = target.init(jax.random.PRNGKey(0), jnp.zeros((1, 48, 48, 3)))["params"]
    merged = convert.merge_pretrained(params, src, model=target, log=lambda message: None)
    np.testing.assert_allclose(np.asarray(nn.meta.unbox(merged)["pos_embed"]), want, atol=1e-6)


def test_scan_layers_override_stacks_every_tower(tmp_path):
    src = fx.write_checkpoint(CASES["hf_siglip"], tmp_path / "s")
    model, variables = convert.load(src, scan_layers=True)
    assert isinstance(model, CLIP)
    for tower in ("image_tower", "text_tower"):
        assert variables["params"][tower]["encoder"]["blocks"]["attn"]["query"]["kernel"].shape == (2, 64, 2, 32)
