"""Golden fixtures for the checkpoint converters: reference outputs of timm / transformers / open_clip /
DINOv2 / big_vision models, so parity with them is also tested where torch is not installed.

    .venv/bin/python scripts/make_convert_fixtures.py      # needs torch, timm, transformers, open_clip

Writes tests/fixtures/convert/cases.json (per case: the checkpoint layout, its config files, the
state-dict manifest [key, shape] and the inputs) and tests/fixtures/convert/outputs.npz (the reference
outputs, '<case>/<output>@<H>x<W>'). Weights are not stored: `weights(manifest)` regenerates them from
a seed per key, and `write_checkpoint` lays them out as the real checkpoint is laid out (timm hub
folder, HF save_pretrained folder, open_clip hub folder, a bare state-dict file, a big_vision .npz).
Torch-free checkpoints are written as .safetensors (the converters read .pt/.pth the same way; the
torch tests cover those readers). The big_vision cases use a synthetic .npz in big_vision's official
naming (params/img/..., params/txt/..., Transformer/encoderblock_i/...), read for the reference by
timm's and open_clip's own big_vision loaders.

Everything above `# --- torch` is numpy-only: tests/test_convert_golden.py imports it without torch.
"""
from __future__ import annotations

import json
import pathlib
import re
import sys
import tempfile
import zlib
from typing import Any

import numpy as np

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "convert"
SEED = 0
_NORM_SCALE = re.compile(r"(norm|ln)[^.]*\.weight$|/scale$")


def weights(manifest: list[list[Any]], seed: int = SEED) -> dict[str, np.ndarray]:
    """Deterministic float32 weights per key: N(0, 0.1^2); LayerNorm scales 1 + N(0, 0.1^2)."""
    out = {}
    for key, shape in manifest:
        rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
        value = np.array(0.1 * rng.standard_normal(tuple(shape)), dtype=np.float32)
        if _NORM_SCALE.search(key):
            value += np.float32(1.0)
        out[key] = value
    return out


def images(height: int, width: int, seed: int = SEED) -> np.ndarray:
    """`[2, H, W, 3]` float32 inputs, NHWC."""
    return np.random.default_rng([seed, height, width]).standard_normal((2, height, width, 3)).astype(np.float32)


def tokens(spec: dict[str, Any], seed: int = SEED) -> np.ndarray:
    """`[3, L]` int32 token ids. kind 'clip': ids < vocab-1, EOT (= vocab-1) at 5, 9, L-1, zeros after."""
    rng = np.random.default_rng([seed, spec["length"]])
    vocab, length = spec["vocab"], spec["length"]
    if spec["kind"] != "clip":
        return rng.integers(0, vocab, (3, length)).astype(np.int32)
    ids = rng.integers(1, vocab - 1, (3, length)).astype(np.int32)
    for row, eot in enumerate((5, 9, length - 1)):
        ids[row, eot] = vocab - 1
        ids[row, eot + 1:] = 0
    return ids


def write_checkpoint(case: dict[str, Any], directory: pathlib.Path) -> pathlib.Path:
    """Writes the case's weights in its real layout; returns what to pass to `convert.load`."""
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tensors = weights(case["manifest"])
    layout = case["layout"]
    if layout == "npz":
        path = directory / case["filename"]
        np.savez(path, **tensors)
        return path
    if layout == "file":
        path = directory / case["filename"]
        save_file(tensors, str(path))
        return path
    weight_name = {"timm": "model.safetensors", "hf": "model.safetensors",
                   "open_clip": "open_clip_model.safetensors"}[layout]
    save_file(tensors, str(directory / weight_name))
    for name, config in case.get("configs", {}).items():
        (directory / name).write_text(json.dumps(config))
    return directory


def parse_output(name: str) -> tuple[str, tuple[int, int] | None]:
    """'patch@28x35' -> ('patch', (28, 35)); 'text' -> ('text', None)."""
    kind, _, size = name.partition("@")
    return kind, (tuple(int(s) for s in size.split("x")) if size else None)


# --- torch ---------------------------------------------------------------------------------------
# Each builder returns (case dict without 'outputs', {output name: array}).

def _nchw(x: np.ndarray):
    import torch
    return torch.from_numpy(x).permute(0, 3, 1, 2)


def _torch_load(model, tensors: dict[str, np.ndarray], strict: bool = True):
    import torch
    model.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()}, strict=strict)
    return model.eval()


def _manifest(state_dict) -> list[list[Any]]:
    return [[k, list(v.shape)] for k, v in state_dict.items() if v.is_floating_point()]


def _timm_case(arch: str, kwargs: dict[str, Any], sizes: list[tuple[int, int]], outputs: tuple[str, ...]):
    import timm
    import torch
    from timm.models._hub import save_config_for_hf

    model = timm.create_model(arch, pretrained=False, **kwargs)
    manifest = _manifest(model.state_dict())
    _torch_load(model, weights(manifest))
    with tempfile.TemporaryDirectory() as tmp:
        save_config_for_hf(model, f"{tmp}/config.json", model_args=kwargs)
        config = json.loads(pathlib.Path(f"{tmp}/config.json").read_text())
    result = {}
    prefix = model.num_prefix_tokens
    for size in sizes:
        with torch.no_grad():
            feats = model.forward_features(_nchw(images(*size)))
            head = model.forward_head(feats)
        tag = f"@{size[0]}x{size[1]}"
        available = {"cls": feats[:, 0], "registers": feats[:, 1:prefix], "patch": feats[:, prefix:],
                     "logits": head, "pooled": head}
        result.update({k + tag: available[k].numpy() for k in outputs})
    case = dict(layout="timm", configs={"config.json": config}, manifest=manifest)
    return case, result


def _hf_case(model, sizes, outputs, text: dict[str, Any] | None = None, interpolate: bool = True):
    import torch
    from safetensors.numpy import save_file

    from lvm_jax.convert.readers import read_safetensors

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        config = json.loads(pathlib.Path(f"{tmp}/config.json").read_text())
        manifest = [[k, list(v.shape)] for k, v in read_safetensors(pathlib.Path(f"{tmp}/model.safetensors"),
                                                                      shapes_only=True).items()]
        save_file(weights(manifest), f"{tmp}/model.safetensors")
        model = type(model).from_pretrained(tmp).eval()
    result = {}
    regs = getattr(model.config, "num_register_tokens", 0)
    for size in sizes:
        tag = f"@{size[0]}x{size[1]}"
        pixels = _nchw(images(*size))
        kw = {"interpolate_pos_encoding": True} if interpolate else {}
        with torch.no_grad():
            if text is not None:
                img = model.get_image_features(pixel_values=pixels, **kw)
                result["image" + tag] = getattr(img, "pooler_output", img).numpy()
                continue
            out = model(pixel_values=pixels, **kw)
        if "logits" in outputs:
            result["logits" + tag] = out.logits.numpy()
            continue
        hidden = out.last_hidden_state
        available = {"cls": hidden[:, 0], "registers": hidden[:, 1:1 + regs], "patch": hidden[:, 1 + regs:],
                     "pre_logits": out.pooler_output}
        result.update({k + tag: available[k].numpy() for k in outputs})
    if text is not None:
        with torch.no_grad():
            txt = model.get_text_features(input_ids=torch.from_numpy(tokens(text)).long())
        result["text"] = getattr(txt, "pooler_output", txt).numpy()
        result["logit_scale"] = model.logit_scale.detach().numpy().reshape(())
        if hasattr(model, "logit_bias"):
            result["logit_bias"] = model.logit_bias.detach().numpy().reshape(())
    case = dict(layout="hf", configs={"config.json": config}, manifest=manifest)
    if text is not None:
        case["tokens"] = text
    return case, result


def _open_clip_case(quick_gelu: bool, vision_ls: float | None, hub: bool):
    import torch
    from open_clip import model as ocm

    vision = dict(layers=2, width=64, head_width=32, patch_size=8, image_size=32)
    if vision_ls:
        vision["ls_init_value"] = vision_ls
    text = dict(context_length=16, vocab_size=100, width=64, heads=2, layers=2)
    model = ocm.CLIP(embed_dim=48, quick_gelu=quick_gelu, vision_cfg=ocm.CLIPVisionCfg(**vision),
                     text_cfg=ocm.CLIPTextCfg(**text))
    manifest = _manifest(model.state_dict())
    _torch_load(model, weights(manifest))
    spec = dict(kind="clip", vocab=100, length=16)
    with torch.no_grad():
        result = {"image@32x32": model.encode_image(_nchw(images(32, 32))).numpy(),
                  "text": model.encode_text(torch.from_numpy(tokens(spec)).long()).numpy(),
                  "logit_scale": model.logit_scale.detach().numpy().reshape(())}
    case = dict(manifest=manifest, tokens=spec)
    if hub:
        case.update(layout="open_clip", configs={"open_clip_config.json": {
            "model_cfg": dict(embed_dim=48, quick_gelu=quick_gelu, vision_cfg=vision, text_cfg=text)}})
    else:  # a bare OpenAI-style state dict: 'openai' in the name means QuickGELU, heads need an override
        case.update(layout="file", filename="openai-ViT-tiny.safetensors", load_kwargs={"num_heads": 2})
    return case, result


def _dinov2_reference(hub: dict[str, Any], blocks, norm, x, patch: int, registers: int, offset: float,
                      antialias: bool):
    """A transcription of DINOv2's DinoVisionTransformer.forward_features (prepare_tokens_with_masks,
    interpolate_pos_encoding with interpolate_offset / interpolate_antialias), blocks from timm."""
    import math

    import torch
    import torch.nn.functional as F

    batch, _, w, h = x.shape
    tok = F.conv2d(x, hub["patch_embed.proj.weight"], hub["patch_embed.proj.bias"], stride=patch)
    tok = tok.flatten(2).transpose(1, 2)
    tok = torch.cat([hub["cls_token"].expand(batch, -1, -1), tok], 1)
    pos = hub["pos_embed"]
    n = pos.shape[1] - 1
    side = int(math.sqrt(n))
    w0, h0 = w // patch, h // patch
    if not (tok.shape[1] - 1 == n and w == h):
        grid = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        kw = dict(scale_factor=((w0 + offset) / side, (h0 + offset) / side)) if offset else dict(size=(w0, h0))
        grid = F.interpolate(grid, mode="bicubic", antialias=antialias, **kw)
        pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1])], 1)
    tok = tok + pos
    if registers:
        tok = torch.cat([tok[:, :1], hub["register_tokens"].expand(batch, -1, -1), tok[:, 1:]], 1)
    for block in blocks:
        tok = block(tok)
    return norm(tok)


def _dinov2_hub_case(arch: str, kwargs: dict[str, Any], registers: int, swiglu: bool, sizes):
    """A DINOv2 torch-hub state dict (timm's blocks under the hub's key names)."""
    import timm
    import torch

    model = timm.create_model(arch, pretrained=False, embed_dim=64, depth=2, num_heads=2, patch_size=7,
                              img_size=28, **kwargs)
    rename = [("reg_token", "register_tokens")] + ([("mlp.fc1", "mlp.w12"), ("mlp.fc2", "mlp.w3")] if swiglu else [])
    manifest = []
    for key, value in model.state_dict().items():
        for old, new in rename:
            key = key.replace(old, new)
        shape = list(value.shape)
        if key == "pos_embed" and registers:
            shape[1] += 1  # timm's register models drop the class slot that the hub layout keeps
        manifest.append([key, shape])
    manifest.append(["mask_token", [1, 64]])
    hub = {k: torch.from_numpy(v) for k, v in weights(manifest).items()}
    back = {}
    for key, value in hub.items():
        if key.startswith(("blocks.", "norm.")):
            for old, new in rename:
                key = key.replace(new, old)
            back[key] = value
    model.load_state_dict(back, strict=False)
    model.eval()
    result = {}
    for size in sizes:
        with torch.no_grad():
            out = _dinov2_reference(hub, model.blocks, model.norm, _nchw(images(*size)), 7, registers,
                                    0.0 if registers else 0.1, bool(registers))
        tag = f"@{size[0]}x{size[1]}"
        result["cls" + tag] = out[:, 0].numpy()
        result["patch" + tag] = out[:, 1 + registers:].numpy()
        if registers:
            result["registers" + tag] = out[:, 1:1 + registers].numpy()
    name = f"dinov2_tiny{'_reg' if registers else ''}_pretrain.safetensors"
    return dict(layout="file", filename=name, manifest=manifest, load_kwargs={"num_heads": 2}), result


def big_vision_manifest(prefix: str, *, width: int, depth: int, heads: int, mlp: int, scanned: bool,
                        encoder: str = "Transformer/") -> list[list[Any]]:
    """[key, shape] of a big_vision encoder (official names)."""
    blk = {"LayerNorm_0/scale": [width], "LayerNorm_0/bias": [width], "LayerNorm_1/scale": [width],
           "LayerNorm_1/bias": [width], "MlpBlock_0/Dense_0/kernel": [width, mlp], "MlpBlock_0/Dense_0/bias": [mlp],
           "MlpBlock_0/Dense_1/kernel": [mlp, width], "MlpBlock_0/Dense_1/bias": [width],
           "MultiHeadDotProductAttention_0/out/kernel": [heads, width // heads, width],
           "MultiHeadDotProductAttention_0/out/bias": [width]}
    for n in ("query", "key", "value"):
        blk[f"MultiHeadDotProductAttention_0/{n}/kernel"] = [width, heads, width // heads]
        blk[f"MultiHeadDotProductAttention_0/{n}/bias"] = [heads, width // heads]
    out = []
    for name, shape in blk.items():
        if scanned:
            out.append([f"{prefix}{encoder}encoderblock/{name}", [depth] + shape])
        else:
            out += [[f"{prefix}{encoder}encoderblock_{i}/{name}", shape] for i in range(depth)]
    out += [[f"{prefix}{encoder}encoder_norm/scale", [width]], [f"{prefix}{encoder}encoder_norm/bias", [width]]]
    return out


def _big_vision_image_manifest(prefix: str, *, cls: bool, head: int, map_head: bool, scanned: bool):
    width, patch, grid = 64, 8, 4
    out = [[f"{prefix}embedding/kernel", [patch, patch, 3, width]], [f"{prefix}embedding/bias", [width]],
           [f"{prefix}pos_embedding", [1, grid * grid, width]]]
    if cls:
        out.append([f"{prefix}cls", [1, 1, width]])
    out += big_vision_manifest(prefix, width=width, depth=2, heads=2, mlp=128, scanned=scanned)
    if head:
        out += [[f"{prefix}head/kernel", [width, head]], [f"{prefix}head/bias", [head]]]
    if map_head:
        m = f"{prefix}MAPHead_0/"
        out.append([m + "probe", [1, 1, width]])
        for key, shape in big_vision_manifest("", width=width, depth=1, heads=2, mlp=128, scanned=False, encoder=""):
            if key.startswith("encoderblock_0/") and "LayerNorm_1" not in key:
                out.append([m + key[len("encoderblock_0/"):], shape])
    return out


def _big_vision_vit_case(scanned: bool, cls: bool):
    import torch
    from timm.models.vision_transformer import VisionTransformer, _load_weights

    manifest = _big_vision_image_manifest("params/", cls=cls, head=5, map_head=False, scanned=scanned)
    name = f"bv_vit{'_scan' if scanned else ''}{'_cls' if cls else '_gap'}.npz"
    case = dict(layout="npz", filename=name, manifest=manifest)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_checkpoint(case, pathlib.Path(tmp))
        ref = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2,
                                num_classes=5, no_embed_class=True, class_token=cls,
                                global_pool="token" if cls else "avg", fc_norm=False, act_layer="gelu_tanh")
        _load_weights(ref, str(path))
    with torch.no_grad():
        result = {"logits@32x32": ref.eval()(_nchw(images(32, 32))).numpy()}
    return case, result


def _augreg_case():
    """The original vision_transformer (AugReg) naming: no 'params/' root, a class slot in
    Transformer/posembed_input, sub-modules MultiHeadDotProductAttention_1 / LayerNorm_2 / MlpBlock_3."""
    import torch
    from timm.models.vision_transformer import VisionTransformer, _load_weights

    legacy = {"MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1", "LayerNorm_1": "LayerNorm_2",
              "MlpBlock_0": "MlpBlock_3"}
    manifest = []
    for key, shape in _big_vision_image_manifest("", cls=True, head=5, map_head=False, scanned=False):
        if key == "pos_embedding":
            key, shape = "Transformer/posembed_input/pos_embedding", [1, 17, 64]
        for old, new in legacy.items():
            key = key.replace(old, new)
        manifest.append([key, shape])
    case = dict(layout="npz", filename="ViT-tiny_augreg.npz", manifest=manifest)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_checkpoint(case, pathlib.Path(tmp))
        ref = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2,
                                num_classes=5, act_layer="gelu_tanh")
        _load_weights(ref, str(path))
    with torch.no_grad():
        result = {"logits@32x32": ref.eval()(_nchw(images(32, 32))).numpy()}
    return case, result


def _big_vision_siglip_case():
    import functools

    import torch
    from open_clip.convert import load_big_vision_weights
    from open_clip.transformer import LayerNorm, TextTransformer
    from timm.models.vision_transformer import VisionTransformer

    manifest = _big_vision_image_manifest("params/img/", cls=False, head=0, map_head=True, scanned=False)
    manifest += big_vision_manifest("params/txt/", width=64, depth=2, heads=2, mlp=128, scanned=False,
                                    encoder="Encoder_0/")
    manifest += [["params/txt/Embed_0/embedding", [100, 64]], ["params/txt/pos_embedding", [1, 16, 64]],
                 ["params/txt/head/kernel", [64, 64]], ["params/txt/head/bias", [64]], ["params/t", [1]],
                 ["params/b", [1]]]
    case = dict(layout="npz", filename="bv_siglip_tiny.npz", manifest=manifest,
                tokens=dict(kind="siglip", vocab=100, length=16))

    class Reference(torch.nn.Module):  # the attributes open_clip's big_vision loader fills
        def __init__(self):
            super().__init__()
            self.visual = torch.nn.Module()
            self.visual.trunk = VisionTransformer(
                img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2, num_classes=0,
                class_token=False, global_pool="map", act_layer="gelu_tanh")
            self.text = TextTransformer(
                context_length=16, vocab_size=100, width=64, heads=2, layers=2, mlp_ratio=2, output_dim=64,
                no_causal_mask=True, pool_type="last", proj_bias=True,
                act_layer=functools.partial(torch.nn.GELU, approximate="tanh"),
                norm_layer=functools.partial(LayerNorm, eps=1e-6))
            self.logit_scale = torch.nn.Parameter(torch.zeros([]))
            self.logit_bias = torch.nn.Parameter(torch.zeros([]))

    ref = Reference()
    with tempfile.TemporaryDirectory() as tmp:
        load_big_vision_weights(ref, str(write_checkpoint(case, pathlib.Path(tmp))))
    ref.eval()
    with torch.no_grad():
        result = {"image@32x32": ref.visual.trunk(_nchw(images(32, 32))).numpy(),
                  "text": ref.text(torch.from_numpy(tokens(case["tokens"])).long()).numpy(),
                  "logit_scale": ref.logit_scale.detach().numpy().reshape(()),
                  "logit_bias": ref.logit_bias.detach().numpy().reshape(())}
    return case, result


def _hf_models() -> dict[str, Any]:
    from transformers import (
        CLIPConfig, CLIPModel, Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel,
        SiglipConfig, SiglipModel, ViTConfig, ViTForImageClassification, ViTModel)

    vit = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=28,
               patch_size=7)
    dino = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=7)
    text = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, vocab_size=100,
                max_position_embeddings=16)
    vision = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=28,
                  patch_size=7)
    return {
        "hf_vit_classifier": (ViTForImageClassification(ViTConfig(**vit, num_labels=5)), ("logits",)),
        "hf_vit_pooler": (ViTModel(ViTConfig(**vit)), ("cls", "patch", "pre_logits")),
        "hf_dinov2_swiglu": (Dinov2Model(Dinov2Config(**dino, use_swiglu_ffn=True)), ("cls", "patch")),
        "hf_dinov2_registers": (Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**dino, num_register_tokens=2)),
                                ("cls", "registers", "patch")),
        "hf_clip": (CLIPModel(CLIPConfig(text_config=dict(text, eos_token_id=99, bos_token_id=98),
                                         vision_config=vision, projection_dim=48)), ()),
        "hf_siglip": (SiglipModel(SiglipConfig(text_config=text, vision_config=vision)), ()),
    }


def build_cases(names: list[str] | None = None) -> dict[str, tuple[dict[str, Any], dict[str, np.ndarray]]]:
    """{case: (case spec, reference outputs)} computed with the torch libraries."""
    import torch

    torch.manual_seed(0)
    builders = {
        "timm_dinov2_registers": lambda: _timm_case(
            "vit_small_patch14_reg4_dinov2", dict(embed_dim=64, depth=2, num_heads=2, patch_size=7, img_size=28,
                                                  reg_tokens=2, dynamic_img_size=True),
            [(28, 28), (35, 49)], ("cls", "registers", "patch")),
        "timm_clip_quickgelu_head": lambda: _timm_case(
            "vit_base_patch16_clip_quickgelu_224", dict(embed_dim=64, depth=2, num_heads=2, patch_size=8,
                                                        img_size=32, num_classes=5), [(32, 32)], ("patch", "logits")),
        "timm_giant_swiglu": lambda: _timm_case(
            "vit_giant_patch14_dinov2", dict(embed_dim=64, depth=2, num_heads=2, patch_size=7, img_size=28,
                                             mlp_ratio=5.5), [(28, 28)], ("cls", "patch")),
        "timm_avgpool_fcnorm_registers": lambda: _timm_case(
            "vit_small_patch16_224", dict(embed_dim=64, depth=2, num_heads=2, patch_size=8, img_size=32,
                                          reg_tokens=2, class_token=False, global_pool="avg", fc_norm=True,
                                          num_classes=5), [(32, 32)], ("patch", "logits")),
        "timm_siglip_map": lambda: _timm_case(
            "vit_base_patch16_siglip_224", dict(embed_dim=64, depth=2, num_heads=2, patch_size=8, img_size=32),
            [(32, 32)], ("patch", "pooled")),
        "openai_clip_file": lambda: _open_clip_case(quick_gelu=True, vision_ls=None, hub=False),
        "open_clip_hub_layerscale": lambda: _open_clip_case(quick_gelu=False, vision_ls=0.1, hub=True),
        "dinov2_hub": lambda: _dinov2_hub_case("vit_small_patch14_dinov2", {}, 0, False,
                                               [(28, 28), (42, 35), (56, 56)]),
        "dinov2_hub_registers": lambda: _dinov2_hub_case("vit_small_patch14_reg4_dinov2", dict(reg_tokens=2), 2,
                                                         False, [(28, 28), (42, 35)]),
        "dinov2_hub_swiglu": lambda: _dinov2_hub_case("vit_giant_patch14_dinov2", dict(mlp_ratio=5.5), 0, True,
                                                      [(28, 28), (35, 35)]),
        "big_vision_vit_cls": lambda: _big_vision_vit_case(scanned=False, cls=True),
        "big_vision_vit_scanned_gap": lambda: _big_vision_vit_case(scanned=True, cls=False),
        "big_vision_siglip": _big_vision_siglip_case,
        "big_vision_augreg_vit": _augreg_case,
    }
    hf_models = _hf_models()
    for name, (model, outputs) in hf_models.items():
        if name in ("hf_clip", "hf_siglip"):
            spec = dict(kind="clip" if name == "hf_clip" else "siglip", vocab=100, length=16)
            sizes = [(28, 28), (42, 42)] if name == "hf_clip" else [(28, 28), (35, 42)]
            builders[name] = (lambda m=model, s=spec, z=sizes: _hf_case(m, z, (), text=s))
        else:
            builders[name] = (lambda m=model, o=outputs: _hf_case(m, [(28, 28), (42, 35)], o))
    return {name: builders[name]() for name in (names or sorted(builders))}


def main() -> None:
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    cases = build_cases()
    FIXTURES.mkdir(parents=True, exist_ok=True)
    specs, outputs = {}, {}
    for name, (case, result) in cases.items():
        specs[name] = {**case, "outputs": sorted(result)}
        outputs.update({f"{name}/{k}": np.asarray(v, np.float32) for k, v in result.items()})
    (FIXTURES / "cases.json").write_text(json.dumps(specs, indent=1, sort_keys=True))
    np.savez_compressed(FIXTURES / "outputs.npz", **outputs)
    print(f"wrote {len(specs)} cases, {len(outputs)} outputs to {FIXTURES}")


if __name__ == "__main__":
    main()
