"""DINOv2 torch-hub checkpoints (`dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth`) and DINOv2 training
checkpoints' teacher backbones.

Layout: cls_token, pos_embed [1, 1+N, D] (518px grid), register_tokens, mask_token
[1, D], patch_embed.proj, blocks.{i} (or blocks.{chunk}.{i} with block_chunks),
norm; ViT-g/14 uses the fused SwiGLU (`mlp.w12`, `mlp.w3`). Heads are width // 64
as in every released model. Position embeddings are resampled as the hub
models do: without registers bicubic with the +0.1 scale-factor offset
(interpolate_offset=0.1, no antialias -> 'dinov2'); with registers
interpolate_offset=0, antialiased (-> 'bicubic_antialias').
"""
from __future__ import annotations

import re
from typing import Any

from lvm_jax.convert import infer
from lvm_jax.convert.core import (
    Rule, attention_rules, chunk, conv, count_indexed, dense_rules, linear, norm_rules, require)
from lvm_jax.convert.readers import Checkpoint

_CHUNKED = re.compile(r"^blocks\.\d+\.(\d+)\.")


def detect(ck: Checkpoint) -> bool:
    t = ck.tensors
    blocks = "blocks.0.attn.qkv.weight" in t or any(_CHUNKED.match(k) for k in t)
    return blocks and ("mask_token" in t or "register_tokens" in t)


def convert(ck: Checkpoint) -> tuple[dict[str, Any], Any, Any]:
    """ViT kwargs, make_rules(final kwargs) and an ignore predicate."""
    t = ck.tensors
    # block_chunks > 0 stores blocks.{chunk}.{global index}; map each index to its key prefix.
    chunked = {int(m.group(1)): k[:m.end()] for k in t if (m := _CHUNKED.match(k))}
    depth = len(chunked) and max(chunked) + 1
    if chunked:
        prefix = {i: chunked[i] for i in range(depth)}
    else:
        depth = count_indexed(t, r"blocks\.(\d+)\.")
        prefix = {i: f"blocks.{i}." for i in range(depth)}
    require(t, ["patch_embed.proj.weight", "pos_embed", "cls_token", "norm.weight"] +
            ([prefix[0] + "attn.qkv.weight"] if depth else ["blocks.0.attn.qkv.weight"]),
            source=ck.source, what="DINOv2 hub")
    patch_w = t["patch_embed.proj.weight"]
    width, patch = patch_w.shape[0], tuple(patch_w.shape[2:])
    registers = t["register_tokens"].shape[1] if "register_tokens" in t else 0
    grid, _ = infer.patch_grid(t["pos_embed"].shape[1], (1,), None, patch, ck.source)
    swiglu = prefix[0] + "mlp.w12.weight" in t
    hidden = t[prefix[0] + ("mlp.w3.weight" if swiglu else "mlp.fc1.weight")]
    hidden = hidden.shape[1] if swiglu else hidden.shape[0]
    heads = infer.default_num_heads(width)
    kwargs: dict[str, Any] = dict(
        variant=None, width=width, depth=depth, num_heads=heads,
        mlp_dim=infer.swiglu_mlp_dim(hidden, width) if swiglu else hidden,
        patch_size=patch[0] if patch[0] == patch[1] else patch, image_size=grid[0] * patch[0],
        num_registers=registers, layerscale_init=1e-5 if prefix[0] + "ls1.gamma" in t else None,
        ffn="swiglu" if swiglu else "mlp", qkv_bias=prefix[0] + "attn.qkv.bias" in t,
        use_mask_token="mask_token" in t, norm_eps=1e-6, act="gelu",
        pos_embed_interp="bicubic_antialias" if registers else "dinov2",
    )
    return kwargs, lambda kw: rules(kw, prefix), lambda key: False


def rules(kwargs: dict[str, Any], prefix: dict[int, str]) -> list[Rule]:
    heads = kwargs["num_heads"]
    out: list[Rule] = [("patch_embed/kernel", "patch_embed.proj.weight", conv),
                       ("patch_embed/bias", "patch_embed.proj.bias", None),
                       ("cls_token", "cls_token", None), ("pos_embed", "pos_embed", None)]
    if kwargs["num_registers"]:
        out.append(("reg_tokens", "register_tokens", None))
    if kwargs["use_mask_token"]:
        out.append(("mask_token", "mask_token", lambda m: m.reshape(1, 1, -1)))
    for i in range(kwargs["depth"]):
        b, d = prefix[i], f"encoder/blocks_{i}"
        w, bias = b + "attn.qkv.weight", (b + "attn.qkv.bias") if kwargs["qkv_bias"] else None
        out += norm_rules(f"{d}/norm1", b + "norm1.weight", b + "norm1.bias")
        out += attention_rules(f"{d}/attn", heads, (w, bias, (0, 3)), (w, bias, (1, 3)), (w, bias, (2, 3)),
                               (b + "attn.proj.weight", b + "attn.proj.bias"))
        out += norm_rules(f"{d}/norm2", b + "norm2.weight", b + "norm2.bias")
        if kwargs["layerscale_init"] is not None:
            out += [(f"{d}/ls1/scale", b + "ls1.gamma", None), (f"{d}/ls2/scale", b + "ls2.gamma", None)]
        if kwargs["ffn"] == "swiglu":
            out += [(f"{d}/mlp/w1/kernel", b + "mlp.w12.weight", chunk(0, 2, linear)),
                    (f"{d}/mlp/w1/bias", b + "mlp.w12.bias", chunk(0, 2)),
                    (f"{d}/mlp/w2/kernel", b + "mlp.w12.weight", chunk(1, 2, linear)),
                    (f"{d}/mlp/w2/bias", b + "mlp.w12.bias", chunk(1, 2))]
            out += dense_rules(f"{d}/mlp/w3", b + "mlp.w3.weight", b + "mlp.w3.bias")
        else:
            out += dense_rules(f"{d}/mlp/fc1", b + "mlp.fc1.weight", b + "mlp.fc1.bias")
            out += dense_rules(f"{d}/mlp/fc2", b + "mlp.fc2.weight", b + "mlp.fc2.bias")
    out += norm_rules("norm", "norm.weight", "norm.bias")
    return out
