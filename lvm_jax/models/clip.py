"""Two-tower image-text model (CLIP / SigLIP): ViT image tower, text tower, bias-free projections.

    model = CLIP(embed_dim=512, vision=dict(variant="B/16"), text=dict(width=512, depth=12, num_heads=8))
    variables = model.init(rng, images, tokens)
    img = model.apply(variables, images, method="encode_image")   # [B, embed_dim], unnormalised
    out = model.apply(variables, images, tokens)                    # dict(image, text, logit_scale, logit_bias)

Param tree: image_tower (ViT), text_tower (TextTransformer), image_proj {kernel [width, embed_dim]}
(absent with image_projection=False), text_proj {kernel [width, embed_dim]} (+ bias [embed_dim] with
projection_bias), logit_scale [] (log of the logit scale), logit_bias [] (SigLIP only).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lvm_jax.models.layers import constrain, logical
from lvm_jax.models.text import TextTransformer
from lvm_jax.models.vit import ViT

Array = jax.Array
Dtype = Any

# CLIP's image tower differs from the classification ViT: LayerNorm before the
# encoder (ln_pre), no patch-embedding bias, torch's LayerNorm eps.
DEFAULT_VISION: dict[str, Any] = dict(variant="B/16", image_size=224, pre_norm=True, patch_bias=False,
                                      norm_eps=1e-5, pool="cls", num_classes=None)
CLIP_INIT_LOGIT_SCALE = math.log(1 / 0.07)
SIGLIP_INIT_LOGIT_SCALE = math.log(10.0)
SIGLIP_INIT_LOGIT_BIAS = -10.0
MAX_LOGIT_SCALE = math.log(100.0)


class CLIP(nn.Module):
    """CLIP/SigLIP two-tower model.

    vision: ViT fields, merged over DEFAULT_VISION (e.g. `dict(variant="S/16", act="quick_gelu")`).
    text: TextTransformer fields (e.g. `dict(vocab_size=1024, context_length=32, width=256)`).
    init_logit_bias: None for CLIP's softmax loss; -10 (with init_logit_scale=ln 10) for SigLIP.
    image_projection=False: the image embedding is the pooled image-tower output itself (SigLIP's MAP
    head; embed_dim must equal the image width). projection_bias: biases on the projections (SigLIP /
    big_vision text head). Both exist so converted SigLIP checkpoints are represented exactly.
    The towers inherit `dtype`/`param_dtype` unless their dicts set them.
    """
    embed_dim: int = 512
    vision: Mapping[str, Any] | None = None
    text: Mapping[str, Any] | None = None
    init_logit_scale: float = CLIP_INIT_LOGIT_SCALE
    init_logit_bias: float | None = None
    image_projection: bool = True
    projection_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "CLIP":
        """Builds from a (ConfigDict or dict) model config with the fields above."""
        cfg = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
        unknown = set(cfg) - {"embed_dim", "vision", "text", "init_logit_scale", "init_logit_bias",
                              "image_projection", "projection_bias", "dtype", "param_dtype"}
        if unknown:
            raise ValueError(f"Unknown CLIP config keys {sorted(unknown)}; put tower options under "
                             "model.vision / model.text.")
        for key in ("dtype", "param_dtype"):
            if isinstance(cfg.get(key), str):
                cfg[key] = jnp.dtype(cfg[key])
        return cls(**cfg)

    def setup(self):
        towers = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        vision = {**DEFAULT_VISION, **towers, **dict(self.vision or {})}
        if vision.get("num_classes"):
            raise ValueError("The CLIP image tower has no classification head; drop vision.num_classes.")
        text = {**towers, **dict(self.text or {})}
        self.image_tower = ViT(**vision)
        self.text_tower = TextTransformer(**text)
        image_width = self.image_tower.dims()[0]
        text_width = self.text_tower.width

        def projection(width: int) -> nn.Dense:
            init = nn.initializers.normal(width ** -0.5)  # open_clip's proj init
            return nn.Dense(self.embed_dim, use_bias=self.projection_bias, dtype=self.dtype,
                            param_dtype=self.param_dtype, kernel_init=logical(init, ("embed", "proj")),
                            bias_init=logical(nn.initializers.zeros, ("proj",)))

        if self.image_projection:
            self.image_proj = projection(image_width)
        elif image_width != self.embed_dim:
            raise ValueError(f"image_projection=False needs embed_dim == image width, got {self.embed_dim} "
                             f"and {image_width}; set embed_dim={image_width} or keep the projection.")
        self.text_proj = projection(text_width)
        scalar = lambda value: logical(nn.initializers.constant(value), ())  # noqa: E731
        self.logit_scale = self.param("logit_scale", scalar(self.init_logit_scale), (), jnp.float32)
        self.logit_bias = (None if self.init_logit_bias is None else
                           self.param("logit_bias", scalar(self.init_logit_bias), (), jnp.float32))

    def encode_image(self, images: Array, train: bool = False) -> Array:
        """images `[B, H, W, 3]` (normalised) -> `[B, embed_dim]`, not L2-normalised."""
        pooled = self.image_tower(images, train=train)["pooled"]
        embedding = self.image_proj(pooled) if self.image_projection else pooled
        return constrain(embedding, ("batch", "act_embed"))

    def encode_text(self, tokens: Array, train: bool = False) -> Array:
        """tokens int `[B, L]` -> `[B, embed_dim]`, not L2-normalised."""
        pooled = self.text_tower(tokens, train=train)["pooled"]
        return constrain(self.text_proj(pooled), ("batch", "act_embed"))

    def __call__(self, images: Array, tokens: Array, train: bool = False) -> dict[str, Array | None]:
        """Both towers. Returns {'image': `[B, E]`, 'text': `[B, E]`, 'logit_scale': log scale `[]`,
        'logit_bias': `[]` or None}. The loss uses exp(logit_scale); training keeps logit_scale
        <= ln 100 by clamping the parameter after every update (`clamp_logit_scale`, as open_clip)."""
        return {"image": self.encode_image(images, train), "text": self.encode_text(tokens, train),
                "logit_scale": self.logit_scale, "logit_bias": self.logit_bias}


def clamp_logit_scale(params: Mapping[str, Any], max_value: float = MAX_LOGIT_SCALE) -> dict[str, Any]:
    """Returns `params` with 'logit_scale' clipped to [0, max_value] (open_clip clamps after every step).

    Works on plain or logically-boxed params (the top level of a CLIP param tree).
    """
    if "logit_scale" not in params:
        raise ValueError("params has no 'logit_scale'; pass the CLIP params (variables['params']).")
    leaf = params["logit_scale"]
    if isinstance(leaf, nn.meta.AxisMetadata):
        clipped = leaf.replace_boxed(jnp.clip(leaf.unbox(), 0.0, max_value))
    else:
        clipped = jnp.clip(leaf, 0.0, max_value)
    return {**params, "logit_scale": clipped}
