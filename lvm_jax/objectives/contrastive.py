"""Image-text contrastive losses: softmax (CLIP) and sigmoid (SigLIP), naive and sharded.

All losses take L2-normalised features `[B, D]` (row i of `image_feats` pairs with
row i of `text_feats`) and the logit `scale` (= exp(log temperature), already
clamped by the caller); the sigmoid losses also take a logit `bias`. They return
a scalar averaged over the *global* batch, so the gradient of the sharded
versions equals the gradient of the naive single-device loss.

- `softmax_contrastive_loss`, `sigmoid_contrastive_loss`: naive, materialise B x B.
- `sharded_softmax_contrastive_loss`: each device scores its local rows against
  all-gathered columns, O(B_local x B) memory; the transpose of `all_gather` is a
  reduce-scatter, so this is open_clip's local-loss + gather-with-grad.
- `sharded_sigmoid_contrastive_loss`: the same scheme for the sigmoid loss.
- `ring_sigmoid_contrastive_loss`: each device keeps its image block and passes
  text blocks around a ring (`ppermute`), O(B_local^2) memory in the forward
  *and* backward pass (custom VJP that rotates the text gradients with the blocks).
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")

try:  # jax >= 0.7
    from jax import shard_map as _shard_map

    def shard_map(f, mesh, in_specs, out_specs):
        return _shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs)
except ImportError:  # older jax
    from jax.experimental.shard_map import shard_map as _experimental_shard_map

    def shard_map(f, mesh, in_specs, out_specs):
        return _experimental_shard_map(f, mesh, in_specs, out_specs)


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Unit-norm rows of `[..., D]`, in float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


# ------------------------------------------------------------------ naive losses
def softmax_contrastive_loss(image_feats: jax.Array, text_feats: jax.Array, scale: jax.Array) -> jax.Array:
    """CLIP loss: mean of image->text and text->image cross-entropy over `[B, B]` logits."""
    image_feats, text_feats = image_feats.astype(jnp.float32), text_feats.astype(jnp.float32)
    logits = scale * image_feats @ text_feats.T
    diag = jnp.diagonal(logits)
    i2t = jax.nn.logsumexp(logits, axis=1) - diag
    t2i = jax.nn.logsumexp(logits, axis=0) - diag
    return 0.5 * (i2t.mean() + t2i.mean())


def sigmoid_contrastive_loss(image_feats: jax.Array, text_feats: jax.Array, scale: jax.Array,
                             bias: jax.Array) -> jax.Array:
    """SigLIP loss: -sum_ij log sigmoid(y_ij (scale x_i.t_j + bias)) / B, y = +1 on the diagonal else -1."""
    image_feats, text_feats = image_feats.astype(jnp.float32), text_feats.astype(jnp.float32)
    logits = scale * image_feats @ text_feats.T + bias
    labels = 2.0 * jnp.eye(logits.shape[0], dtype=jnp.float32) - 1.0
    return -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / logits.shape[0]


# ---------------------------------------------------------------- sharded losses
def _num_shards(mesh: Mesh, batch_axes: Sequence[str], batch: int) -> int:
    n = int(np.prod([mesh.shape[a] for a in batch_axes]))
    if batch % n:
        raise ValueError(f"Contrastive batch {batch} does not split over the {n} devices of mesh axes "
                         f"{tuple(batch_axes)}; use a batch size divisible by {n}.")
    return n


def _check_pair(image_feats: jax.Array, text_feats: jax.Array) -> None:
    if image_feats.ndim != 2 or image_feats.shape != text_feats.shape:
        raise ValueError(f"Image and text features must both be [B, D] with the same shape, got "
                         f"{image_feats.shape} and {text_feats.shape}; project both towers to one width.")


def sharded_softmax_contrastive_loss(image_feats: jax.Array, text_feats: jax.Array, scale: jax.Array,
                                     mesh: Mesh, batch_axes: Sequence[str] = BATCH_AXES) -> jax.Array:
    """`softmax_contrastive_loss` over the global batch; each device holds `[B_local, B]` logits.

    Args:
      image_feats, text_feats: `[B, D]`, batch sharded over `batch_axes` (resharded if not).
      scale: scalar logit scale.
    """
    _check_pair(image_feats, text_feats)
    batch = image_feats.shape[0]
    _num_shards(mesh, batch_axes, batch)
    axes = tuple(batch_axes)

    def local(img, txt, scale):
        img, txt = img.astype(jnp.float32), txt.astype(jnp.float32)
        all_img = jax.lax.all_gather(img, axes, tiled=True)
        all_txt = jax.lax.all_gather(txt, axes, tiled=True)
        i2t = scale * img @ all_txt.T  # [B_local, B]: local images vs every text
        t2i = scale * txt @ all_img.T  # [B_local, B]: local texts vs every image
        pos = scale * jnp.sum(img * txt, axis=-1)  # row i's positive is its own local pair
        local_sum = jnp.sum(jax.nn.logsumexp(i2t, axis=1) - pos) + jnp.sum(jax.nn.logsumexp(t2i, axis=1) - pos)
        return 0.5 * jax.lax.psum(local_sum, axes) / batch

    spec = P(axes, None)
    return shard_map(local, mesh, in_specs=(spec, spec, P()), out_specs=P())(image_feats, text_feats, scale)


def sharded_sigmoid_contrastive_loss(image_feats: jax.Array, text_feats: jax.Array, scale: jax.Array,
                                     bias: jax.Array, mesh: Mesh,
                                     batch_axes: Sequence[str] = BATCH_AXES) -> jax.Array:
    """`sigmoid_contrastive_loss` with all-gathered texts; each device holds `[B_local, B]` logits."""
    _check_pair(image_feats, text_feats)
    batch = image_feats.shape[0]
    _num_shards(mesh, batch_axes, batch)
    axes = tuple(batch_axes)

    def local(img, txt, scale, bias):
        img, txt = img.astype(jnp.float32), txt.astype(jnp.float32)
        all_txt = jax.lax.all_gather(txt, axes, tiled=True)
        n_local = img.shape[0]
        cols = jnp.arange(batch)[None, :]
        rows = (jax.lax.axis_index(axes) * n_local + jnp.arange(n_local))[:, None]
        labels = jnp.where(rows == cols, 1.0, -1.0)
        logits = scale * img @ all_txt.T + bias
        return -jax.lax.psum(jnp.sum(jax.nn.log_sigmoid(labels * logits)), axes) / batch

    spec = P(axes, None)
    return shard_map(local, mesh, in_specs=(spec, spec, P(), P()), out_specs=P())(
        image_feats, text_feats, scale, bias)


def _block_dlogits(img, txt, scale, bias, positive: bool):
    """Logits of one `[B_local, B_local]` block and d(-sum log sigmoid(y z))/dz."""
    dots = img @ txt.T
    z = scale * dots + bias
    y = 2.0 * jnp.eye(z.shape[0], dtype=z.dtype) - 1.0 if positive else -1.0
    return dots, z, y, -y * jax.nn.sigmoid(-y * z)


def ring_sigmoid_contrastive_loss(image_feats: jax.Array, text_feats: jax.Array, scale: jax.Array,
                                  bias: jax.Array, mesh: Mesh,
                                  batch_axes: Sequence[str] = BATCH_AXES) -> jax.Array:
    """`sigmoid_contrastive_loss`, never holding more than one `[B_local, B_local]` block per device.

    Device r scores its images against its own texts (the positives), then n-1 times
    receives the next text block from its ring neighbour. The backward pass replays the
    ring and sends each block's accumulated gradient along with it, so it returns home.
    """
    _check_pair(image_feats, text_feats)
    batch = image_feats.shape[0]
    n = _num_shards(mesh, batch_axes, batch)
    return _ring_sigmoid(image_feats, text_feats, jnp.asarray(scale, jnp.float32),
                         jnp.asarray(bias, jnp.float32), mesh, tuple(batch_axes), n)


@partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _ring_sigmoid(image_feats, text_feats, scale, bias, mesh, axes, n):
    return _ring_forward(image_feats, text_feats, scale, bias, mesh, axes, n)


def _ring_forward(image_feats, text_feats, scale, bias, mesh, axes, n):
    batch = image_feats.shape[0]
    to_next = [(i, (i + 1) % n) for i in range(n)]

    def local(img, txt, scale, bias):
        img, txt = img.astype(jnp.float32), txt.astype(jnp.float32)
        _, z, y, _ = _block_dlogits(img, txt, scale, bias, positive=True)
        total = jnp.sum(jax.nn.log_sigmoid(y * z))

        def step(carry, _):
            txt, total = carry
            txt = jax.lax.ppermute(txt, axes, to_next)
            total += jnp.sum(jax.nn.log_sigmoid(-(scale * img @ txt.T + bias)))
            return (txt, total), None

        (_, total), _ = jax.lax.scan(step, (txt, total), None, length=n - 1)
        return -jax.lax.psum(total, axes) / batch

    spec = P(axes, None)
    return shard_map(local, mesh, in_specs=(spec, spec, P(), P()), out_specs=P())(
        image_feats, text_feats, scale, bias)


def _ring_fwd(image_feats, text_feats, scale, bias, mesh, axes, n):
    loss = _ring_forward(image_feats, text_feats, scale, bias, mesh, axes, n)
    return loss, (image_feats, text_feats, scale, bias)


def _ring_bwd(mesh, axes, n, residuals, g):
    image_feats, text_feats, scale, bias = residuals
    batch = image_feats.shape[0]
    to_next = [(i, (i + 1) % n) for i in range(n)]

    def local(img, txt, scale, bias, g):
        in_dtypes = img.dtype, txt.dtype
        img, txt = img.astype(jnp.float32), txt.astype(jnp.float32)
        coef = g / batch  # d loss / d(sum of -log sigmoid terms)

        def block(img_grad, txt_grad, scale_grad, bias_grad, txt, positive):
            dots, _, _, dz = _block_dlogits(img, txt, scale, bias, positive)
            dz = coef * dz
            return (img_grad + scale * dz @ txt, txt_grad + scale * dz.T @ img,
                    scale_grad + jnp.sum(dz * dots), bias_grad + jnp.sum(dz))

        zero = jnp.zeros((), jnp.float32)
        img_grad, txt_grad, scale_grad, bias_grad = block(
            jnp.zeros_like(img), jnp.zeros_like(txt), zero, zero, txt, positive=True)

        def step(carry, _):
            txt, txt_grad, img_grad, scale_grad, bias_grad = carry
            # A text block travels with the gradient accumulated for it so far.
            txt, txt_grad = jax.lax.ppermute((txt, txt_grad), axes, to_next)
            img_grad, txt_grad, scale_grad, bias_grad = block(
                img_grad, txt_grad, scale_grad, bias_grad, txt, positive=False)
            return (txt, txt_grad, img_grad, scale_grad, bias_grad), None

        (_, txt_grad, img_grad, scale_grad, bias_grad), _ = jax.lax.scan(
            step, (txt, txt_grad, img_grad, scale_grad, bias_grad), None, length=n - 1)
        txt_grad = jax.lax.ppermute(txt_grad, axes, to_next)  # one more hop: back to its owner
        return (img_grad.astype(in_dtypes[0]), txt_grad.astype(in_dtypes[1]),
                jax.lax.psum(scale_grad, axes), jax.lax.psum(bias_grad, axes))

    spec = P(axes, None)
    grads = shard_map(local, mesh, in_specs=(spec, spec, P(), P(), P()),
                      out_specs=(spec, spec, P(), P()))(image_feats, text_feats, scale, bias, g)
    return grads


_ring_sigmoid.defvjp(_ring_fwd, _ring_bwd)
