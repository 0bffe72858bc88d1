"""Optimizers shared by the tasks: AdamW + warmup/cosine, decay mask, layer-wise lr decay, clipping.

Built from `config.optim` (lr, weight_decay, warmup_steps, schedule, end_lr_factor,
b1, b2, eps, layer_decay, clip_norm). The learning rate is injected as a
hyperparameter so the loop can log it without recomputing the schedule.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lvm_jax.errors import UserError

# Parameters that never get weight decay: biases and norm scales (1-D), and
# learned tokens/embeddings whose scale is meaningful (position embeddings,
# class/register/mask tokens, MAP probe, temperature).
NO_DECAY_PATTERN = re.compile(
    r"(pos_embed|posemb|pos_embedding|cls|class_token|reg|register|mask_token|probe|logit_scale|logit_bias"
    r"|scale$|bias$|gamma$)",
    re.IGNORECASE,
)


def path_str(path: tuple[Any, ...]) -> str:
    """'encoder/block_0/attn/query/kernel' from a jax key path."""
    parts = []
    for p in path:
        key = getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))
        parts.append(str(key))
    return "/".join(parts)


def decay_mask(params: Any) -> Any:
    """True where weight decay applies: >= 2-D kernels that are not tokens/embeddings."""

    def keep(path, leaf):
        name = path_str(path)
        last = name.rsplit("/", 1)[-1]
        if jnp.ndim(leaf) < 2:
            return False
        return not (NO_DECAY_PATTERN.search(last) or re.search(r"(pos_embed|posemb|cls|register|mask_token)", name))

    return jax.tree_util.tree_map_with_path(keep, params)


def warmup_cosine(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `cfg.lr`, then cosine (or constant / linear) to `lr * end_lr_factor`."""
    lr = float(cfg.lr)
    warmup = int(cfg.get("warmup_steps", 0))
    end = lr * float(cfg.get("end_lr_factor", 0.0))
    kind = cfg.get("schedule", "cosine")
    if warmup >= total_steps and total_steps > 0:
        raise UserError(
            f"config.optim.warmup_steps={warmup} is not smaller than total_steps={total_steps}; lower it."
        )
    decay_steps = max(total_steps - warmup, 1)
    if kind == "cosine":
        main = optax.cosine_decay_schedule(lr, decay_steps, alpha=end / lr if lr else 0.0)
    elif kind == "linear":
        main = optax.linear_schedule(lr, end, decay_steps)
    elif kind == "constant":
        main = optax.constant_schedule(lr)
    else:
        raise UserError(f"config.optim.schedule={kind!r} is unknown; use 'cosine', 'linear' or 'constant'.")
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def layer_decay_scales(params: Any, depth: int, decay: float,
                       layer_id: Callable[[str], int | None] | None = None) -> Any:
    """Per-parameter lr multipliers `decay ** (depth + 1 - layer_id)` (BEiT-style layer-wise decay).

    layer 0 = embeddings/tokens, 1..depth = blocks, depth + 1 = final norm and heads.
    For scanned blocks (a leading `layers` axis) the multiplier is an array `[L, 1, ...]`.
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: layer_decay_multiplier(path_str(path), len(leaf.shape), depth, decay, layer_id), params)


def layer_decay_multiplier(name: str, ndim: int, depth: int, decay: float,
                           layer_id: Callable[[str], int | None] | None = None) -> np.ndarray:
    """The lr multiplier of the parameter `name` (rank `ndim`): a float32 scalar, or `[L, 1, ...]`
    for scanned blocks (one stacked subtree with a leading layers axis).

    NumPy, not jnp: the optimizer is first built under `jax.eval_shape`, where jnp values would be
    tracers that the cached update then captures (the jitted step failed on its second call).
    """
    if re.search(r"(^|/)blocks/", name):
        ids = np.arange(1, depth + 1, dtype=np.float32)
        return (decay ** (depth + 1 - ids)).astype(np.float32).reshape((depth,) + (1,) * (ndim - 1))
    lid = (layer_id or default_layer_id)(name)
    return np.float32(decay ** (depth + 1 - (depth + 1 if lid is None else lid)))


def default_layer_id(name: str) -> int | None:
    """0 for the stem (patch embedding, pos/cls/register/mask tokens, the pre-norm), i+1 for block i,
    None (= top) for the rest (final norm, pooling, heads).

    As timm's `VisionTransformer.group_matcher`, whose stem group holds `norm_pre` (CLIP's ln_pre):
    with the top multiplier, ln_pre learned up to `1 / decay ** (depth + 1)` times faster than in timm
    when fine-tuning a CLIP tower. lvm_jax's conv stem (`conv_stem`, the hybrid recipes trained from
    scratch; timm's hybrids are not converted) keeps the top multiplier: configs/dinov2_synthetic.py's
    documented results were tuned with it so.
    """
    m = re.search(r"blocks_(\d+)", name)
    if m:
        return int(m.group(1)) + 1
    if re.search(r"(embed|cls|register|reg_tokens|mask_token|pos|norm_pre)", name):
        return 0
    return None


def scale_by_tree(scales: Any) -> optax.GradientTransformation:
    """Multiplies updates leaf-wise by a fixed tree of (broadcastable) scales."""

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        return jax.tree_util.tree_map(lambda u, s: u * s.astype(u.dtype), updates, scales), state

    return optax.GradientTransformation(init, update)


def build_optimizer(cfg: ml_collections.ConfigDict, total_steps: int, params: Any, depth: int | None = None,
                    frozen: Callable[[str], bool] | None = None) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with warmup+cosine, decay mask, optional clipping, layer decay and frozen subtrees.

    `params` may be abstract (`jax.ShapeDtypeStruct`s); only its structure/shapes are used.
    `frozen(path) -> True` marks parameters that get no update (e.g. LiT's locked tower).
    """
    schedule = warmup_cosine(cfg, total_steps)
    name = cfg.get("name", "adamw")
    if name != "adamw":
        raise UserError(f"config.optim.name={name!r} is not supported; use 'adamw'.")
    parts = []
    if cfg.get("clip_norm"):
        parts.append(optax.clip_by_global_norm(float(cfg.clip_norm)))
    parts.append(optax.scale_by_adam(b1=float(cfg.get("b1", 0.9)), b2=float(cfg.get("b2", 0.999)),
                                     eps=float(cfg.get("eps", 1e-8))))
    wd = float(cfg.get("weight_decay", 0.0))
    if wd:
        parts.append(optax.add_decayed_weights(wd, mask=decay_mask))
    layer_decay = cfg.get("layer_decay")
    if layer_decay and layer_decay != 1.0:
        if depth is None:
            raise UserError("config.optim.layer_decay needs a model depth; this task does not provide one.")
        parts.append(scale_by_tree(layer_decay_scales(params, depth, float(layer_decay))))
    parts.append(optax.scale_by_learning_rate(schedule))
    tx = optax.chain(*parts)
    if frozen is not None:
        labels = jax.tree_util.tree_map_with_path(
            lambda p, _: "frozen" if frozen(path_str(p)) else "train", params)
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return tx, schedule


def tree_size(tree: Mapping[str, Any] | Any) -> int:
    return sum(int(jnp.size(x)) for x in jax.tree_util.tree_leaves(tree))
