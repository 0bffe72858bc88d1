"""DINO / iBOT projection heads (DINOv2 `dinov2/layers/dino_head.py`).

MLP (hidden 2048, GELU) -> bottleneck 256 -> L2-normalise -> weight-normalised
linear onto K prototypes (65536 in the recipe). DINOv2 keeps the weight norm's
gain g (one per prototype, initialised to 1) trainable: it is frozen with the
prototypes for the first epoch, decayed and EMA'd like any weight (DINO v1's
`norm_last_layer=True` fixed it to 1). With `learn_prototype_gain=False` the
gain stays 1 and the logits are cosine similarities in [-1, 1].
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# torch's trunc_normal_(std=0.02) cuts at +-2 (absolute), i.e. +-100 std: effectively a plain normal.
_mlp_init = nn.initializers.normal(0.02)
# torch nn.Linear's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)); only the direction matters after weight norm.
_prototype_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _batch_names(ndim: int, last: str | None) -> tuple[str | None, ...]:
    return ("batch",) + (None,) * (ndim - 2) + (last,)


class DINOHead(nn.Module):
    """Projection head: `[..., D] -> [..., num_prototypes]` logits.

    Attributes:
      num_prototypes: K (65536 in DINOv2; tests use tiny values).
      hidden_dim: MLP width (2048).
      bottleneck_dim: width before the prototypes (256).
      num_layers: MLP layers including the bottleneck projection (3).
      learn_prototype_gain: a trainable per-prototype gain `[K]` (DINOv2) or a fixed 1 (DINO v1).
      dtype: compute dtype of the MLP; normalisation and prototypes run in float32.
    """

    num_prototypes: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    num_layers: int = 3
    learn_prototype_gain: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.num_layers < 1:
            raise ValueError(f"DINOHead num_layers={self.num_layers} must be >= 1.")
        x = x.astype(self.dtype)
        if self.num_layers == 1:
            x = self._dense(x, self.bottleneck_dim, ("embed", "proj"), "fc_0")
        else:
            # Megatron-style pairs: a layer whose input features are whole is column-parallel
            # (kernel ('embed', 'mlp'), output split on 'tensor'); the next one is row-parallel
            # (kernel ('mlp', 'embed'), output whole). Every kernel keeps an FSDP ('embed') dim.
            # Not ('embed', 'mlp') twice in a row: with data, fsdp and tensor all > 1, XLA's SPMD
            # partitioner (jax 0.11/0.12) silently miscompiles that layer's input gradient, g @ W.T
            # with g P(('data', 'fsdp'), 'tensor') and W P('fsdp', 'tensor'): it hands each device
            # the rows of the batch tile with 'data' and 'fsdp' swapped.
            split = False  # are the current features split over 'tensor' ('act_mlp')?
            for i in range(self.num_layers - 1):
                names = ("mlp", "embed") if split else ("embed", "mlp")
                x = self._dense(x, self.hidden_dim, names, f"fc_{i}")
                split = not split
                x = nn.with_logical_constraint(nn.gelu(x, approximate=False),
                                               _batch_names(x.ndim, "act_mlp" if split else "act_embed"))
            names = ("mlp", "proj") if split else ("embed", "proj")
            x = self._dense(x, self.bottleneck_dim, names, f"fc_{self.num_layers - 1}")
        x = x.astype(jnp.float32)
        # F.normalize(eps=1e-12): x / max(||x||, eps)
        x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
        direction = self.param(
            "prototypes",
            nn.with_logical_partitioning(_prototype_init, ("proj", "prototypes")),
            (self.bottleneck_dim, self.num_prototypes),
            jnp.float32,
        )
        # Weight norm: every prototype (column) is a unit direction times its gain.
        prototypes = direction * jax.lax.rsqrt(jnp.sum(direction**2, axis=0, keepdims=True))
        logits = x @ prototypes
        if not self.learn_prototype_gain:
            return logits
        gain = self.param("prototype_gain", nn.with_logical_partitioning(nn.initializers.ones_init(), ("prototypes",)),
                          (self.num_prototypes,), jnp.float32)
        return logits * gain

    def _dense(self, x: jax.Array, features: int, names: tuple[str, str], name: str) -> jax.Array:
        return nn.Dense(
            features,
            dtype=self.dtype,
            kernel_init=nn.with_logical_partitioning(_mlp_init, names),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), names[1:]),
            name=name,
        )(x)


class DINOiBOTHeads(nn.Module):
    """The DINO head on CLS tokens and the iBOT head on masked patch tokens.

    With `separate_ibot_head=False` (DINOv2's default) one head serves both and
    the `ibot_*` fields are unused. Initialise with patch tokens so a separate
    iBOT head gets its parameters.
    """

    num_prototypes: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    num_layers: int = 3
    separate_ibot_head: bool = False
    ibot_num_prototypes: int = 65536
    ibot_hidden_dim: int = 2048
    ibot_bottleneck_dim: int = 256
    ibot_num_layers: int = 3
    learn_prototype_gain: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, cls_tokens: jax.Array, patch_tokens: jax.Array | None = None):
        """Args: cls_tokens `[..., D]`; patch_tokens `[..., D]` (e.g. masked `[G, U, D]`) or None.

        Returns: `(cls_logits [..., K], patch_logits [..., K_ibot] or None)`.
        """
        dino_head = DINOHead(self.num_prototypes, self.hidden_dim, self.bottleneck_dim, self.num_layers,
                             self.learn_prototype_gain, self.dtype, name="dino_head")
        cls_logits = dino_head(cls_tokens)
        if patch_tokens is None:
            return cls_logits, None
        if not self.separate_ibot_head:
            return cls_logits, dino_head(patch_tokens)
        ibot_head = DINOHead(self.ibot_num_prototypes, self.ibot_hidden_dim, self.ibot_bottleneck_dim,
                             self.ibot_num_layers, self.learn_prototype_gain, self.dtype, name="ibot_head")
        return cls_logits, ibot_head(patch_tokens)
