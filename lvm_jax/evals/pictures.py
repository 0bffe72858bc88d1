"""The pictures DINO users look at first: last-layer CLS attention per head, and a PCA of patch features.

* CLS attention: softmax(q_cls k^T / sqrt(d)) of the last block, per head,
  restricted to the patch tokens and laid out on the patch grid.
* PCA: the first 3 principal components of the patch features of all shown
  images (fitted jointly, as in DINOv2's figures), each min-max scaled to
  [0, 1] and shown as RGB.

`vit_last_layer_attention` gets q and k from `lvm_jax.models.ViT` by capturing
the last block's `attn/query` and `attn/key` outputs (`capture_intermediates`),
so the ViT needs no hook. Grids are saved as PNG with matplotlib (Agg).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lvm_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from lvm_jax.models import perf
from lvm_jax.workdir import save_figure


def cls_attention_from_qk(q: jax.Array, k: jax.Array, num_prefix_tokens: int,
                          grid: tuple[int, int]) -> jax.Array:
    """CLS-to-patch attention maps.

    Args:
      q, k: `[B, T, heads, head_dim]` queries and keys of one layer (token 0 is CLS).
      num_prefix_tokens: CLS + register tokens before the patches.
      grid: `(h, w)` patch grid, `h * w = T - num_prefix_tokens`.
    Returns:
      `[B, heads, h, w]` attention of the CLS query over the patches (each head's
      full row sums to 1; the part on prefix tokens is dropped).
    """
    if q.shape[1] - num_prefix_tokens != grid[0] * grid[1]:
        raise ValueError(f"{q.shape[1]} tokens minus {num_prefix_tokens} prefix tokens do not fill a "
                         f"{grid[0]}x{grid[1]} patch grid.")
    logits = jnp.einsum("bhd,bshd->bhs", q[:, 0].astype(jnp.float32), k.astype(jnp.float32))
    attn = jax.nn.softmax(logits / jnp.sqrt(q.shape[-1]).astype(jnp.float32), axis=-1)
    return attn[:, :, num_prefix_tokens:].reshape(q.shape[0], q.shape[2], *grid)


def _unscan_params(params: dict, depth: int) -> dict:
    """Scanned ViT params (`encoder/blocks` with a leading layer axis) -> `encoder/blocks_{i}`."""
    encoder = dict(params["encoder"])
    stacked = encoder.pop("blocks")
    for i in range(depth):
        encoder[f"blocks_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return {**params, "encoder": encoder}


def vit_last_layer_attention(model: Any, params: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Runs a `lvm_jax.models.ViT` and returns its last block's CLS attention and final patch tokens.

    Args:
      model: a ViT with a class token.
      params: its `params` tree (scanned or not).
      images: `[B, H, W, 3]` normalised.
    Returns:
      `(attention [B, heads, h, w], patch_tokens [B, h * w, D])`.
    """
    if not model.class_token:
        raise ValueError("CLS attention maps need a ViT with class_token=True.")
    _, depth, _, _, patch = model.dims()
    params = nn.meta.unbox(params)
    if model.scan_layers:
        params = _unscan_params(params, depth)
    # Same numerics, plain per-block modules whose q/k outputs can be captured.
    model = model.clone(scan_layers=False, remat="none")
    last = f"blocks_{depth - 1}"

    def wanted(module, method_name):
        path = module.path
        return (method_name == "__call__" and len(path) >= 3 and path[-3:-1] == (last, "attn")
                and path[-1] in ("query", "key"))

    # Fused q/k/v (the GPU default) never calls the query/key modules, and padding the whole sequence
    # once for cuDNN would add pad keys to the softmax: capture on the separate, unpadded path.
    with perf.pinned(LVM_JAX_QKV="separate", LVM_JAX_SEQ_PAD="per_call"):
        out, state = model.apply({"params": params}, images, capture_intermediates=wanted)
    captured = state["intermediates"]["encoder"][last]["attn"]
    q, k = captured["query"]["__call__"][0], captured["key"]["__call__"][0]
    grid = (images.shape[1] // patch[0], images.shape[2] // patch[1])
    return cls_attention_from_qk(q, k, 1 + model.num_registers, grid), out["patch_tokens"]


def pca_rgb(patch_features: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """First 3 principal components of `[B, N, D]` patch features (fitted on all B*N) -> `[B, h, w, 3]` in [0, 1]."""
    b, n, d = patch_features.shape
    if b * n == 0:
        raise ValueError(f"pca_rgb needs at least one patch feature, got shape {patch_features.shape}.")
    x = np.asarray(patch_features, np.float64).reshape(b * n, d)
    if not np.isfinite(x).all():
        # SVD would fail with "did not converge": name the cause instead.
        raise ValueError("pca_rgb got non-finite (NaN/inf) patch features; the model's weights or inputs are "
                         "not finite, check the checkpoint.")
    x = x - x.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    comps = x @ vt[:3].T
    if comps.shape[1] < 3:
        comps = np.pad(comps, ((0, 0), (0, 3 - comps.shape[1])))
    lo, hi = comps.min(0), comps.max(0)
    comps = (comps - lo) / np.where(hi > lo, hi - lo, 1.0)
    return comps.reshape(b, *grid, 3).astype(np.float32)


def denormalize(images: np.ndarray, mean: Sequence[float] = IMAGENET_MEAN,
                std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
    """Normalised `[B, H, W, 3]` -> displayable [0, 1]."""
    return np.clip(np.asarray(images, np.float32) * np.asarray(std) + np.asarray(mean), 0.0, 1.0)


def _save_grid(rows: list[list[np.ndarray]], titles: list[str], path: str) -> str:
    """Saves a grid of panels: RGB `[h, w, 3]` as is; maps `[h, w]` in one colour scale per row
    (0 to the row's largest finite value, a colour bar at the row's end), so that the heads of an
    image compare by brightness."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if not rows or not rows[0]:
        raise ValueError(f"No pictures to draw for {path}; pass at least one image.")
    n_rows, n_cols = len(rows), len(rows[0])
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.6 * n_cols + 0.4, 1.6 * n_rows), squeeze=False)
    for r, row in enumerate(rows):
        maps = [np.asarray(p, np.float64) for p in row if np.ndim(p) == 2]
        finite = [m[np.isfinite(m)] for m in maps]
        top = max((float(f.max()) for f in finite if f.size), default=1.0)
        shown = None
        for c, panel in enumerate(row):
            ax = axes[r, c]
            if np.ndim(panel) == 3:
                ax.imshow(panel, interpolation="nearest")
            else:
                shown = ax.imshow(panel, cmap="inferno", vmin=0.0, vmax=top if top > 0 else 1.0,
                                  interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=7)
        if shown is not None:
            bar = fig.colorbar(shown, ax=list(axes[r]), fraction=0.02, pad=0.01)
            bar.ax.tick_params(labelsize=5)
    save_figure(fig, path)  # a local path or a gs:// URL (a run's workdir)
    plt.close(fig)
    return path


def save_attention_grid(images: np.ndarray, attention: np.ndarray, path: str) -> str:
    """PNG grid: one row per image, the image then each head's CLS attention. images `[B, H, W, 3]` in [0, 1]."""
    attention = np.asarray(attention)
    if attention.ndim != 4 or len(attention) != len(images):
        raise ValueError(f"save_attention_grid needs attention [B, heads, h, w] for the B={len(images)} images, "
                         f"got shape {attention.shape}.")
    rows = [[images[i]] + [attention[i, h] for h in range(attention.shape[1])] for i in range(len(images))]
    return _save_grid(rows, ["image"] + [f"head {h}" for h in range(attention.shape[1])], path)


def save_pca_grid(images: np.ndarray, pca: np.ndarray, path: str) -> str:
    """PNG grid: one row per image, the image and its patch-feature PCA as RGB."""
    if len(pca) != len(images):
        raise ValueError(f"save_pca_grid needs one PCA map per image: {len(images)} images, {len(pca)} maps.")
    rows = [[images[i], pca[i]] for i in range(len(images))]
    return _save_grid(rows, ["image", "patch PCA"], path)


def save_dino_pictures(model: Any, params: Any, images: np.ndarray, out_dir: str, prefix: str = "",
                       mean: Sequence[float] = IMAGENET_MEAN,
                       std: Sequence[float] = IMAGENET_STD) -> list[str]:
    """Saves `{prefix}attention.png` and `{prefix}pca.png` for a few normalised images `[B, H, W, 3]`.

    Returns the written paths.
    """
    attention, patch_tokens = jax.device_get(vit_last_layer_attention(model, params, jnp.asarray(images)))
    shown = denormalize(images, mean, std)
    pca = pca_rgb(np.asarray(patch_tokens), attention.shape[2:])
    return [save_attention_grid(shown, attention, os.path.join(out_dir, f"{prefix}attention.png")),
            save_pca_grid(shown, pca, os.path.join(out_dir, f"{prefix}pca.png"))]
