"""Readers and error messages of lvm_jax.convert (no torch needed).

Readers are checked against independent readers (safetensors' own numpy loader, numpy's npz loader);
every predictable mistake must end in one ConversionError/FileNotFoundError sentence that names the
offending keys, never a deep trace.
"""
import builtins
import json
import struct

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lvm_jax import convert
from lvm_jax.convert.__main__ import main as convert_main
from lvm_jax.convert.core import ConversionError, flatten
from lvm_jax.convert.readers import read_checkpoint, read_npz, read_safetensors, read_torch
from tests.helpers import convert_fixtures

fx, CASES, _ = convert_fixtures()


# --- readers --------------------------------------------------------------------------------------

def test_safetensors_reader_matches_the_library_and_needs_no_torch(tmp_path):
    tensors = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones((2,), np.float16),
               "c": np.array(3, np.int64)}
    save_file(tensors, str(tmp_path / "x.safetensors"))
    ours, ref = read_safetensors(tmp_path / "x.safetensors"), load_file(str(tmp_path / "x.safetensors"))
    assert set(ours) == set(ref)
    for key in ref:
        assert ours[key].dtype == ref[key].dtype
        np.testing.assert_array_equal(ours[key], ref[key])
    shapes = read_safetensors(tmp_path / "x.safetensors", shapes_only=True)
    assert shapes["a"] == jax.ShapeDtypeStruct((3, 4), np.float32)


def test_safetensors_bfloat16(tmp_path):
    """bf16 (what most hub checkpoints ship) decodes via ml_dtypes, per the safetensors byte layout."""
    values = np.array([1.0, -2.5, 0.15625], ml_dtypes.bfloat16)
    header = json.dumps({"w": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]}}).encode()
    (tmp_path / "b.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + values.tobytes())
    got = read_safetensors(tmp_path / "b.safetensors")["w"]
    assert got.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got.astype(np.float32), [1.0, -2.5, 0.15625])


def test_npz_reader_and_header_only_shapes(tmp_path):
    arrays = {"params/img/embedding/kernel": np.zeros((2, 2, 3, 4), np.float32), "params/t": np.ones((1,))}
    np.savez(tmp_path / "c.npz", **arrays)
    full, shapes = read_npz(tmp_path / "c.npz"), read_npz(tmp_path / "c.npz", shapes_only=True)
    for key, value in arrays.items():
        np.testing.assert_array_equal(full[key], value)
        assert shapes[key] == jax.ShapeDtypeStruct(value.shape, value.dtype)


def test_shapes_only_load_allocates_nothing(tmp_path):
    src = fx.write_checkpoint(CASES["hf_siglip"], tmp_path / "s")
    model, abstract = convert.load(src, shapes_only=True)
    _, real = convert.load(src)
    for key, leaf in flatten(abstract["params"]).items():
        assert isinstance(leaf, jax.ShapeDtypeStruct)
        assert leaf.shape == flatten(real["params"])[key].shape, key


def test_torch_file_without_torch_is_one_clear_error(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("No module named 'torch'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    (tmp_path / "dinov2_vits14_pretrain.pth").write_bytes(b"not really")
    with pytest.raises(ConversionError, match=r"PyTorch file and reading it needs torch.*safetensors"):
        read_torch(tmp_path / "dinov2_vits14_pretrain.pth")


def test_directory_and_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="download it first"):
        read_checkpoint(tmp_path / "missing.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="holds no weight file"):
        read_checkpoint(tmp_path / "empty")
    two = tmp_path / "two"
    two.mkdir()
    save_file({"a": np.zeros(1, np.float32)}, str(two / "a.safetensors"))
    save_file({"a": np.zeros(1, np.float32)}, str(two / "b.safetensors"))
    with pytest.raises(ConversionError, match=r"several weight files \['a.safetensors', 'b.safetensors'\]"):
        read_checkpoint(two)
    (tmp_path / "w.h5").write_bytes(b"")
    with pytest.raises(ConversionError, match="unknown checkpoint suffix '.h5'"):
        read_checkpoint(tmp_path / "w.h5")
    (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", 5) + b"{oops")
    with pytest.raises(ConversionError, match="no valid safetensors header"):
        read_checkpoint(tmp_path / "bad.safetensors")


def test_sharded_hf_checkpoint_is_read_whole(tmp_path):
    case = CASES["hf_vit_pooler"]
    src = fx.write_checkpoint(case, tmp_path / "one")
    tensors = load_file(str(src / "model.safetensors"))
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for name, part in shards.items():
        save_file({k: tensors[k] for k in part}, str(sharded / name))
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: name for name, part in shards.items() for k in part}}))
    (sharded / "config.json").write_text((src / "config.json").read_text())
    _, whole = convert.load(src)
    _, parts = convert.load(sharded)
    for key, value in flatten(whole["params"]).items():
        np.testing.assert_array_equal(flatten(parts["params"])[key], value)


def test_dinov2_block_chunks_layout(tmp_path):
    """DINOv2 training checkpoints with block_chunks store blocks.{chunk}.{global index}."""
    tensors = fx.weights(CASES["dinov2_hub"]["manifest"])
    chunked = {(f"blocks.{int(k.split('.')[1])}.{k[len('blocks.'):]}" if k.startswith("blocks.") else k): v
               for k, v in tensors.items()}
    assert "blocks.1.1.norm1.weight" in chunked
    save_file(chunked, str(tmp_path / "chunked.safetensors"))
    save_file(tensors, str(tmp_path / "plain.safetensors"))
    _, plain = convert.load(tmp_path / "plain.safetensors", num_heads=2)
    model, got = convert.load(tmp_path / "chunked.safetensors", num_heads=2)
    assert model.depth == 2
    for key, value in flatten(plain["params"]).items():
        np.testing.assert_array_equal(flatten(got["params"])[key], value, err_msg=key)


# --- conversion errors -------------------------------------------------------------------------

def _case_tensors(name):
    return fx.weights(CASES[name]["manifest"])


def test_wrong_architecture_names_the_architecture(tmp_path):
    folder = tmp_path / "resnet"
    folder.mkdir()
    save_file({"conv1.weight": np.zeros((8, 3, 7, 7), np.float32), "fc.weight": np.zeros((5, 8), np.float32)},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"architecture": "resnet50", "num_classes": 5}))
    with pytest.raises(ConversionError, match=r"timm architecture 'resnet50' is not a VisionTransformer"):
        convert.load(folder)
    hf = tmp_path / "bert"
    hf.mkdir()
    save_file({"embeddings.word_embeddings.weight": np.zeros((4, 4), np.float32)}, str(hf / "model.safetensors"))
    (hf / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ConversionError, match=r"model_type 'bert' is not supported; lvm_jax converts vit, dinov2"):
        convert.load(hf)


def test_forcing_the_wrong_reader_lists_the_missing_keys(tmp_path):
    src = fx.write_checkpoint(CASES["dinov2_hub"], tmp_path / "d")
    with pytest.raises(ConversionError, match=r"not a CLIP \(OpenAI / open_clip\) checkpoint: missing keys \[visual.conv1"):
        convert.load(src, format="open_clip")


def test_missing_unexpected_and_mismatched_keys_in_one_message(tmp_path):
    tensors = _case_tensors("dinov2_hub")
    del tensors["blocks.1.mlp.fc2.bias"]
    tensors["blocks.0.attn.q_norm.weight"] = np.ones(64, np.float32)
    tensors["blocks.1.attn.proj.weight"] = np.zeros((64, 32), np.float32)
    save_file(tensors, str(tmp_path / "dinov2_vits14_pretrain.safetensors"))
    with pytest.raises(ConversionError) as info:
        convert.load(tmp_path / "dinov2_vits14_pretrain.safetensors", num_heads=2)
    message = str(info.value)
    assert "missing keys [blocks.1.mlp.fc2.bias]" in message
    assert "unexpected keys [blocks.0.attn.q_norm.weight]" in message
    assert "blocks.1.attn.proj.weight (64, 32)" in message and "encoder/blocks_1/attn/out/kernel" in message
    assert message.count("\n") == 0


def test_wrong_head_count_is_a_shape_error_not_a_trace(tmp_path):
    src = fx.write_checkpoint(CASES["big_vision_vit_cls"], tmp_path / "bv")
    with pytest.raises(ConversionError, match=r"query/kernel \(64, 2, 32\) -> encoder/blocks_0/attn/query/kernel"):
        convert.load(src, num_heads=4)
    src = fx.write_checkpoint(CASES["dinov2_hub"], tmp_path / "d")
    with pytest.raises(ValueError, match="width 64 is not divisible by num_heads 3"):
        convert.load(src, num_heads=3)


def test_heads_cannot_be_guessed_for_odd_widths(tmp_path):
    narrow = {k: np.resize(v, [48 if s == 64 else s for s in v.shape]).astype(np.float32)
              for k, v in _case_tensors("dinov2_hub").items()}
    save_file(narrow, str(tmp_path / "dinov2_narrow.safetensors"))
    with pytest.raises(ConversionError, match=r"number of attention heads for width 48; pass num_heads"):
        convert.load(tmp_path / "dinov2_narrow.safetensors")


def test_unknown_override_and_format(tmp_path):
    src = fx.write_checkpoint(CASES["timm_giant_swiglu"], tmp_path / "t")
    with pytest.raises(ConversionError, match=r"Unknown override\(s\) \['num_head'\] for ViT"):
        convert.load(src, num_head=2)
    with pytest.raises(ConversionError, match="Unknown format 'flax'"):
        convert.load(src, format="flax")
    save_file({"weird": np.zeros(2, np.float32)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ConversionError, match=r"cannot tell which library wrote this checkpoint \(keys start \[weird\]\)"):
        convert.load(tmp_path / "w.safetensors")


def test_cli_errors_are_one_line(tmp_path, capsys):
    src = fx.write_checkpoint(CASES["timm_giant_swiglu"], tmp_path / "t")
    assert convert_main([str(src), str(tmp_path / "out"), "--set", "num_head=2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Unknown override(s) ['num_head']") and err.count("\n") == 1
    assert convert_main([str(src), str(tmp_path / "out"), "--set", "oops"]) == 2
    assert "is not KEY=VALUE" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["hf_vit_classifier", "hf_vit_pooler", "hf_dinov2_swiglu", "hf_dinov2_registers",
                                  "hf_clip", "dinov2_hub_registers", "dinov2_hub_swiglu", "openai_clip_file"])
def test_save_hf_round_trip_restores_every_param(name, tmp_path):
    """ours -> HF files -> ours is the identity (torch-free half; test_convert_torch loads them in transformers)."""
    case = CASES[name]
    model, variables = convert.load(fx.write_checkpoint(case, tmp_path / "src"), **case.get("load_kwargs", {}))
    out = convert.save_hf(model, variables, tmp_path / "hf")
    again, again_vars = convert.load(out)
    want, got = flatten(variables["params"]), flatten(again_vars["params"])
    assert set(got) == set(want) or set(got) - set(want) <= {"mask_token"} | {
        k for k in got if "/ls1/" in k or "/ls2/" in k}
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_save_hf_refuses_models_without_an_hf_twin(tmp_path):
    src = fx.write_checkpoint(CASES["timm_avgpool_fcnorm_registers"], tmp_path / "t")
    model, variables = convert.load(src)
    with pytest.raises(ConversionError, match="no Hugging Face equivalent: HF ViT/DINOv2 need a class token"):
        convert.save_hf(model, variables, tmp_path / "out")
    src = fx.write_checkpoint(CASES["hf_siglip"], tmp_path / "s")
    model, variables = convert.load(src)
    with pytest.raises(ConversionError, match="no Hugging Face CLIPModel equivalent"):
        convert.save_hf(model, variables, tmp_path / "out2")


def test_hf_pooler_counts_only_without_a_classifier(tmp_path):
    """transformers' ViTForImageClassification classifies the CLS token without the pooler (it drops
    pooler weights next to a classifier): import does the same, and export refuses a model whose
    head sits on a pre-logits layer (HF would silently compute other logits)."""
    src = fx.write_checkpoint(CASES["hf_vit_pooler"], tmp_path / "pooler")
    tensors = load_file(str(src / "model.safetensors"))
    width = tensors["embeddings.cls_token"].shape[-1]
    rng = np.random.default_rng(0)
    both, plain = tmp_path / "both", tmp_path / "plain"
    head = {"classifier.weight": rng.normal(size=(5, width)).astype(np.float32),
            "classifier.bias": np.zeros(5, np.float32)}
    for out, keep_pooler in ((both, True), (plain, False)):
        out.mkdir()
        save_file({**{k: v for k, v in tensors.items() if keep_pooler or not k.startswith("pooler.")}, **head},
                  str(out / "model.safetensors"))
        (out / "config.json").write_text((src / "config.json").read_text())
    model, variables = convert.load(both)
    assert model.rep_size is None and model.num_classes == 5
    _, want = convert.load(plain)
    assert flatten(variables["params"]).keys() == flatten(want["params"]).keys()
    pooled, pooled_vars = convert.load(src)
    assert pooled.rep_size == width  # a headless ViTModel keeps its pooler
    classifier = pooled.clone(num_classes=5)
    params = {**pooled_vars["params"], "head": {"kernel": np.zeros((width, 5), np.float32),
                                                "bias": np.zeros(5, np.float32)}}
    with pytest.raises(ConversionError, match="classifies the CLS token without a pooler"):
        convert.save_hf(classifier, {"params": params}, tmp_path / "out")


def test_an_override_that_removes_weights_the_checkpoint_has_is_a_conversion_error(tmp_path):
    """Was a bare AssertionError ('converter rule targets ...') from assemble."""
    src = fx.write_checkpoint(CASES["hf_clip"], tmp_path / "clip")
    with pytest.raises(ConversionError) as info:
        convert.load(src, vision=dict(pre_norm=False))
    message = str(info.value)
    assert "has weights for image_tower/norm_pre (vision_model.pre_layrnorm.bias" in message
    assert ("the override vision=dict(pre_norm=False) removes it from the model; drop the override or set it "
            "to match the checkpoint (vision=dict(pre_norm=True)).") in message
    src = fx.write_checkpoint(CASES["dinov2_hub"], tmp_path / "d")
    with pytest.raises(ConversionError, match=r"has weights for norm \(norm.bias, norm.weight\), but the override "
                                              r"final_norm=False removes it .* \(final_norm=True\)\.$"):
        convert.load(src, num_heads=2, final_norm=False)
    convert.load(src, num_heads=2)  # without the override it loads


def test_a_rule_for_a_param_no_model_has_stays_an_internal_error(tmp_path, monkeypatch):
    """A converter bug (no override involved) is not blamed on the user."""
    from lvm_jax.convert import dinov2

    real = dinov2.convert

    def buggy(ck):
        kwargs, make_rules, ignore = real(ck)
        return kwargs, lambda kw: [*make_rules(kw), ("no_such/param", "norm.weight", None)], ignore

    monkeypatch.setattr(dinov2, "convert", buggy)
    src = fx.write_checkpoint(CASES["dinov2_hub"], tmp_path / "d")
    with pytest.raises(AssertionError, match=r"no_such/param") as info:
        convert.load(src, num_heads=2)
    assert not isinstance(info.value, ConversionError)
    with pytest.raises(AssertionError, match=r"no_such/param"):  # an unrelated override is not blamed either
        convert.load(src, num_heads=2, final_norm=True)


def _timm_with_act_layer(tmp_path, act_layer, case="timm_clip_quickgelu_head"):
    src = fx.write_checkpoint(CASES[case], tmp_path / f"{case}_{act_layer}")
    config = json.loads((src / "config.json").read_text())
    config["model_args"]["act_layer"] = act_layer
    (src / "config.json").write_text(json.dumps(config))
    return src


def test_timm_act_layer_names_map_as_timm_reads_them_and_unknown_ones_are_refused(tmp_path):
    for act_layer, act in (("swish", "silu"), ("GELU_TANH", "gelu_tanh"), ("quick_gelu", "quick_gelu")):
        model, _ = convert.load(_timm_with_act_layer(tmp_path, act_layer))
        assert model.act == act, act_layer
    src = _timm_with_act_layer(tmp_path, "mish")
    for overrides in ({}, {"act": "gelu"}):  # no override can stand in for another activation
        with pytest.raises(ConversionError, match=r"act_layer='mish' has no equivalent in lvm_jax's ViT; supported: "
                                                  r"\['gelu', 'gelu_tanh', 'quick_gelu', 'relu', 'silu', 'swish'\]"):
            convert.load(src, **overrides)
    # SwiGLU gates with SiLU here (as in every timm SwiGLU arch): another gate would load and compute wrongly.
    assert convert.load(_timm_with_act_layer(tmp_path, "silu", "timm_giant_swiglu"))[0].ffn == "swiglu"
    with pytest.raises(ConversionError, match=r"SwiGLU MLP gated by act_layer='gelu'; lvm_jax's SwiGLU gates with silu"):
        convert.load(_timm_with_act_layer(tmp_path, "gelu", "timm_giant_swiglu"))


def test_hf_dinov2_classifier_head_is_logged_as_not_loaded(tmp_path, caplog):
    src = fx.write_checkpoint(CASES["hf_dinov2_swiglu"], tmp_path / "src")
    tensors = {"dinov2." + k: v for k, v in load_file(str(src / "model.safetensors")).items()}
    width = tensors["dinov2.embeddings.cls_token"].shape[-1]
    tensors |= {"classifier.weight": np.zeros((5, 2 * width), np.float32), "classifier.bias": np.zeros(5, np.float32)}
    out = tmp_path / "cls"
    out.mkdir()
    save_file(tensors, str(out / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "architectures": ["Dinov2ForImageClassification"]}))
    with caplog.at_level("WARNING", logger="lvm_jax.convert.hf"):
        model, variables = convert.load(out)
    assert model.num_classes is None and "head" not in variables["params"]
    lines = [r.getMessage() for r in caplog.records if r.name == "lvm_jax.convert.hf"]
    assert len(lines) == 1 and "dinov2 classifier head (classifier.*, 5 classes" in lines[0]
    assert "not loaded" in lines[0] and "only the backbone is returned" in lines[0]
    caplog.clear()
    convert.load(src)  # a headless Dinov2Model logs nothing
    assert not [r for r in caplog.records if r.name == "lvm_jax.convert.hf"]
