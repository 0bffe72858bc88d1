"""Flax (linen) models: the ViT backbone, the CLIP text tower and two-tower model, and their layers."""
from lvm_jax.models.layers import (
    Attention, DropPath, Encoder, EncoderBlock, LayerScale, MAPHead, Mlp, SwiGLU, activation,
    dot_product_attention, drop_path_rates, splash_attention, swiglu_hidden_dim)
from lvm_jax.models.pos_embed import bicubic_matrix, posemb_sincos_2d, resample_pos_embed
from lvm_jax.models.vit import VARIANTS, ViT, parse_variant
from lvm_jax.models.text import TextTransformer  # noqa: E402  (after ViT: clip builds on it)
from lvm_jax.models.clip import CLIP  # noqa: E402

__all__ = [
    "Attention", "CLIP", "DropPath", "Encoder", "EncoderBlock", "LayerScale", "MAPHead", "Mlp", "SwiGLU", "TextTransformer",
    "ViT", "VARIANTS", "activation", "bicubic_matrix", "dot_product_attention", "drop_path_rates",
    "parse_variant", "posemb_sincos_2d", "resample_pos_embed", "splash_attention", "swiglu_hidden_dim",
]
