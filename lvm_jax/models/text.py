"""CLIP text tower: token + learned position embeddings, pre-LN transformer, final LayerNorm, pooling.

Param tree:
  token_embed {embedding [vocab, embed]}
  pos_embed [context_length, embed]
  encoder {blocks_0 .. blocks_{depth-1}} (or {blocks} with a 'layers' axis under scan_layers)
  norm {scale, bias}            open_clip's ln_final
  map_head {...}                pool='map'
The projection to the joint embedding lives in `CLIP`, not here.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lvm_jax.models.layers import Encoder, MAPHead, constrain, layer_norm, logical

Array = jax.Array
Dtype = Any

TEXT_POOLS = ("eot", "first", "last", "map")


class TextTransformer(nn.Module):
    """Transformer over token ids `[B, L]` (L <= context_length); OpenAI CLIP's text tower by default.

    pool: 'eot' takes the token at argmax(ids) — the EOT token, the largest id in
    CLIP's vocabularies (open_clip's 'argmax'); 'first' / 'last' take a fixed
    position (SigLIP uses 'last' with a bidirectional encoder); 'map' is attention pooling.
    pad_mask: with `causal=False`, stop every token attending to padding (id `pad_id`),
    open_clip's `use_pad_mask`; a causal tower never sees the padding after EOT anyway.
    Every id equal to `pad_id` is hidden: with CLIP's vocabulary id 0 is also the token '!'
    (as in open_clip), so pick a `pad_id` the tokenizer never emits mid-text where that matters.
    The encoder's dense layers start from xavier-uniform (big_vision's init); open_clip's text
    tower starts its residual projections 3-5x smaller (std width^-0.5 (2 depth)^-0.5).
    """
    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    depth: int = 12
    num_heads: int = 8
    mlp_dim: int | None = None  # default 4 * width
    act: str = "gelu"  # 'gelu' (exact erf) | 'quick_gelu' (OpenAI) | ...
    causal: bool = True
    pool: str = "eot"
    pad_mask: bool = False
    pad_id: int = 0
    norm_eps: float = 1e-5  # torch LayerNorm default, as in open_clip
    dropout_rate: float = 0.0
    attention_impl: str = "xla"
    remat: str = "none"
    scan_layers: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: Array, train: bool = False) -> dict[str, Array]:
        """tokens int `[B, L]` -> {'pooled': `[B, width]`, 'tokens': `[B, L, width]`} (both after the final norm)."""
        if self.pool not in TEXT_POOLS:
            raise ValueError(f"Unknown text pool {self.pool!r}; choose one of {TEXT_POOLS}.")
        if tokens.ndim != 2:
            raise ValueError(f"Text tower expects token ids [B, L], got shape {tokens.shape}; "
                             "tokenize a list of strings, not one string.")
        if tokens.shape[1] > self.context_length:
            raise ValueError(f"Token length {tokens.shape[1]} exceeds context_length {self.context_length}; "
                             "tokenize with a context_length no larger than the model's.")
        if self.pad_mask and self.causal:
            raise ValueError("pad_mask only applies to a bidirectional text tower; set causal=False.")

        length = tokens.shape[1]

        embed = nn.Embed(self.vocab_size, self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                         embedding_init=logical(nn.initializers.normal(0.02), ("vocab", "embed")),
                         name="token_embed")
        pos = self.param("pos_embed", logical(nn.initializers.normal(0.01), (None, "embed")),
                         (self.context_length, self.width), self.param_dtype)
        x = embed(tokens) + pos[:length].astype(self.dtype)[None]
        x = constrain(x, ("batch", "length", "act_embed"))
        x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)

        attn_mask = None
        if self.pad_mask:
            attn_mask = (tokens != self.pad_id)[:, None, None, :]  # [B, 1, 1, L]: keys only
        x, _ = Encoder(
            self.depth, self.num_heads, self.mlp_dim or 4 * self.width, act=self.act,
            norm_eps=self.norm_eps, dropout_rate=self.dropout_rate, attention_impl=self.attention_impl,
            remat=self.remat, scan_layers=self.scan_layers, dtype=self.dtype,
            param_dtype=self.param_dtype, name="encoder")(
                x, train=train, attn_mask=attn_mask, causal=self.causal)
        x = layer_norm(self.norm_eps, self.dtype, self.param_dtype, "norm")(x)

        if self.pool == "eot":
            pooled = jnp.take_along_axis(x, jnp.argmax(tokens, axis=-1)[:, None, None], axis=1)[:, 0]
        elif self.pool == "first":
            pooled = x[:, 0]
        elif self.pool == "last":
            pooled = x[:, -1]
        else:
            pooled = MAPHead(self.num_heads, self.mlp_dim or 4 * self.width, act=self.act,
                             norm_eps=self.norm_eps, attention_impl=self.attention_impl, dtype=self.dtype,
                             param_dtype=self.param_dtype, name="map_head")(x, mask=attn_mask)
        return {"pooled": pooled, "tokens": x}
