"""DINOv2 objectives: DINO CLS-token loss, iBOT masked-patch loss, KoLeo, centering, Sinkhorn-Knopp.

Pure `jnp` functions of the *global* batch. Called inside `jax.jit` on arrays
sharded along the batch over ('data', 'fsdp'), every sum over the batch (loss
means, the centre's batch mean, Sinkhorn-Knopp's per-prototype sums) is a
global sum: XLA inserts the all-reduces. That is the simplest correct way to
get DINOv2's `all_reduce`s without `shard_map`/`psum`, and the same code runs
unsharded (the tests check that both give the same numbers). Do not call these
inside `shard_map`: there they would see one shard only.

Layouts (batch first, so host arrays `[B, ...]` shard without transposes):
  teacher / student CLS logits  `[B, n_global, K]`, local crops `[B, n_local, K]`
  masked patch logits           `[G, U, K]` with weights `[G, U]` (see
                                `lvm_jax.data.masking`: G groups, U padded slots)

Formulas follow facebookresearch/dinov2 (`dinov2/loss/*.py`, `ssl_meta_arch.py`).
Deliberate differences, all to make sharded == unsharded:
  * iBOT centre: mean over the global set of masked patches (the reference
    averages per-GPU means).
  * KoLeo: computed over `num_groups` equal contiguous chunks of the batch;
    set `num_groups` to the data-parallel size to reproduce the reference's
    per-GPU computation, or 1 for the whole global batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# --------------------------------------------------------------------------- teacher targets


def softmax_center_teacher(teacher_logits: jax.Array, center: jax.Array, teacher_temp) -> jax.Array:
    """Centred, sharpened teacher targets `softmax((t - c) / teacher_temp)`.

    Args:
      teacher_logits: `[..., K]` teacher head outputs.
      center: `[K]` EMA centre (use the centre *before* this step's update).
      teacher_temp: scalar temperature (0.04 -> 0.07 in the recipe).
    Returns:
      `[..., K]` float32 probabilities (no gradient).
    """
    t = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
    return jax.nn.softmax((t - center) / teacher_temp, axis=-1)


def update_center(center: jax.Array, teacher_logits: jax.Array, momentum: float = 0.9,
                  valid: jax.Array | None = None) -> jax.Array:
    """EMA centre update `c * m + mean(t) * (1 - m)` over the global batch.

    Args:
      center: `[K]` current centre.
      teacher_logits: `[..., K]` teacher head outputs; every leading position is one row.
      momentum: EMA momentum (0.9).
      valid: optional `[...]` bool/float mask of rows to include (iBOT padding).
    Returns:
      `[K]` new centre.
    """
    t = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32)).reshape(-1, teacher_logits.shape[-1])
    if valid is None:
        batch_mean = jnp.mean(t, axis=0)
    else:
        w = valid.reshape(-1).astype(jnp.float32)
        batch_mean = jnp.sum(t * w[:, None], axis=0) / jnp.maximum(jnp.sum(w), 1.0)
    return center * momentum + batch_mean * (1.0 - momentum)


def sinkhorn_knopp(teacher_logits: jax.Array, teacher_temp, n_iterations: int = 3,
                   valid: jax.Array | None = None) -> jax.Array:
    """Sinkhorn-Knopp teacher targets (SwAV / DINOv2 `sinkhorn_knopp_teacher`).

    Q = exp(t / temp) over the global set of rows, normalised to sum 1, then
    `n_iterations` times: each prototype's total -> 1/K, each row's total -> 1/R
    (R = number of valid rows); finally rows are scaled to sum to 1.

    Args:
      teacher_logits: `[..., K]`; every leading position is one row.
      teacher_temp: scalar temperature.
      n_iterations: 3 in DINOv2.
      valid: optional `[...]` mask; invalid rows (iBOT padding) take no part and
        come back as zeros.
    Returns:
      `[..., K]` float32 assignments (no gradient).
    """
    shape = teacher_logits.shape
    k = shape[-1]
    t = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32)).reshape(-1, k) / teacher_temp
    w = jnp.ones(t.shape[:1], jnp.float32) if valid is None else valid.reshape(-1).astype(jnp.float32)
    # Subtracting each prototype's max over the valid rows scales every column by a
    # constant, which the first per-prototype normalisation removes exactly. It keeps
    # exp() finite where the reference overflows, and every column's largest entry at 1:
    # with one global max, a prototype far from every row underflows to an all-zero
    # column at sharp temperatures (0.02: logits span 100) and 0/0 turns the targets NaN.
    t_max = jnp.max(jnp.where(w[:, None] > 0, t, -jnp.inf), axis=0, keepdims=True)
    t_max = jnp.where(jnp.isfinite(t_max), t_max, 0.0)  # no valid row at all: q is all zero anyway
    # Padding rows are zeroed with where, not by a product: their logits may exceed the valid
    # rows' max by more than exp() can hold, and inf * 0 would turn every target NaN.
    q = jnp.where(w[:, None] > 0, jnp.exp(jnp.where(w[:, None] > 0, t - t_max, 0.0)), 0.0) * w[:, None]
    num_rows = jnp.sum(w)
    q = q / jnp.sum(q)
    for _ in range(n_iterations):
        q = q / jnp.sum(q, axis=0, keepdims=True) / k  # per prototype (global sum over rows)
        row_sum = jnp.sum(q, axis=1, keepdims=True)
        q = q / jnp.where(row_sum > 0, row_sum, 1.0) / num_rows  # per row; padded rows stay 0
    return (q * num_rows).reshape(shape)


# --------------------------------------------------------------------------- losses


def _log_softmax_student(student_logits: jax.Array, student_temp: float) -> jax.Array:
    return jax.nn.log_softmax(student_logits.astype(jnp.float32) / student_temp, axis=-1)


def dino_cls_loss(student_global_logits: jax.Array, student_local_logits: jax.Array | None,
                  teacher_probs: jax.Array, student_temp: float = 0.1) -> jax.Array:
    """DINO cross-entropy between teacher and student CLS outputs, averaged over loss terms.

    Terms: student global crop i vs teacher global crop j for every j != i, and
    every student local crop vs every teacher global crop. Each term is the
    batch mean of `-sum_k t_k log softmax(s / student_temp)_k`; the result is
    the sum of terms divided by their number `n_g (n_g - 1) + n_l n_g`
    (DINOv2's `dino_global_crops_loss + dino_local_crops_loss`; like the
    reference, the local count is at least 1 even without local crops).

    Args:
      student_global_logits: `[B, n_g, K]`.
      student_local_logits: `[B, n_l, K]` or None (no local crops).
      teacher_probs: `[B, n_g, K]` teacher targets (centred softmax or Sinkhorn-Knopp).
      student_temp: 0.1 in DINOv2.
    Returns:
      scalar loss.
    """
    if student_global_logits.shape != teacher_probs.shape:
        raise ValueError(
            f"dino_cls_loss: student global logits {student_global_logits.shape} and teacher probs "
            f"{teacher_probs.shape} differ; pass both as [batch, n_global_crops, prototypes].")
    n_global = teacher_probs.shape[1]
    t = jax.lax.stop_gradient(teacher_probs.astype(jnp.float32))
    # ce[b, j, i] = -sum_k t[b, j, k] * log_softmax(s[b, i])_k
    ce_global = -jnp.einsum("bjk,bik->bji", t, _log_softmax_student(student_global_logits, student_temp))
    off_diagonal = 1.0 - jnp.eye(n_global, dtype=jnp.float32)
    total = jnp.sum(jnp.mean(ce_global, axis=0) * off_diagonal)
    n_local = 0 if student_local_logits is None else student_local_logits.shape[1]
    if n_local:
        ce_local = -jnp.einsum("bjk,blk->bjl", t, _log_softmax_student(student_local_logits, student_temp))
        total = total + jnp.sum(jnp.mean(ce_local, axis=0))
    if n_global < 2 and not n_local:
        raise ValueError("dino_cls_loss has no terms (one global crop and no local crops); add crops.")
    # DINOv2 counts max(n_l * n_g, 1) local terms, so without local crops it divides by n_g (n_g - 1) + 1.
    return total / (n_global * (n_global - 1) + max(n_local * n_global, 1))


def ibot_patch_loss(student_patch_logits: jax.Array, teacher_patch_probs: jax.Array, mask_weights: jax.Array,
                    num_rows: int, student_temp: float = 0.1) -> jax.Array:
    """iBOT masked-patch loss (DINOv2 `forward_masked`).

    `-sum_p w_p sum_k t_pk log softmax(s_p / student_temp)_k / num_rows` where
    `w_p = 1 / n_masked(row of p)` for real masked patches and 0 for padding:
    each masked global-crop row contributes its mean patch loss, rows without
    masks contribute 0, and the sum is divided by all rows.

    Args:
      student_patch_logits: `[..., U, K]` student head outputs at masked slots.
      teacher_patch_probs: `[..., U, K]` teacher targets at the same slots.
      mask_weights: `[..., U]` (from `lvm_jax.data.masking`).
      num_rows: number of global-crop rows in the global batch (`B * n_global`).
    Returns:
      scalar loss.
    """
    if student_patch_logits.shape != teacher_patch_probs.shape:
        raise ValueError(
            f"ibot_patch_loss: student {student_patch_logits.shape} and teacher {teacher_patch_probs.shape} "
            "patch outputs differ; gather both with the same mask indices.")
    t = jax.lax.stop_gradient(teacher_patch_probs.astype(jnp.float32))
    ce = -jnp.sum(t * _log_softmax_student(student_patch_logits, student_temp), axis=-1)
    return jnp.sum(ce * mask_weights.astype(jnp.float32)) / num_rows


def koleo_loss(features: jax.Array, num_groups: int = 1, eps: float = 1e-8) -> jax.Array:
    """KoLeo regulariser `-mean log(d_nn + eps)` on L2-normalised features (Sablayrolles et al. 2018).

    `d_nn` is each row's Euclidean distance to its nearest other row (found by
    maximum inner product); like torch's `PairwiseDistance`, eps is added to
    the difference before the norm.

    Args:
      features: `[B, D]`, or `[B, C, D]` for C crops: the loss is then computed per
        crop and summed (DINOv2 never pairs two crops of the same image).
      num_groups: split the batch into this many equal contiguous groups and
        search neighbours within each group (the reference works per GPU).
      eps: 1e-8 as in the reference.
    Returns:
      scalar loss.
    """
    if features.ndim == 3:
        return sum(koleo_loss(features[:, c], num_groups, eps) for c in range(features.shape[1]))
    batch, dim = features.shape
    if num_groups < 1 or batch % num_groups:
        raise ValueError(
            f"koleo_loss: batch {batch} does not split into num_groups={num_groups} equal groups; "
            "use a num_groups that divides the batch.")
    group = batch // num_groups
    if group < 2:
        raise ValueError(
            f"koleo_loss needs at least 2 samples per group to find a nearest neighbour, got {group} "
            f"(batch {batch} / num_groups {num_groups}); raise the per-device batch or lower num_groups.")
    x = features.astype(jnp.float32)
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)
    x = x.reshape(num_groups, group, dim)
    dots = jnp.einsum("gid,gjd->gij", x, x)
    dots = jnp.where(jnp.eye(group, dtype=bool), -1.0, dots)  # a row is not its own neighbour
    nearest = jnp.argmax(dots, axis=-1)  # [G, group]
    neighbours = jnp.take_along_axis(x, nearest[..., None], axis=1)
    distances = jnp.linalg.norm(x - neighbours + eps, axis=-1)
    return -jnp.mean(jnp.log(distances + eps))


# --------------------------------------------------------------------------- masked-token plumbing


def gather_masked_tokens(patch_tokens: jax.Array, mask_indices: jax.Array) -> jax.Array:
    """Picks the masked patch tokens into the static padded layout of `lvm_jax.data.masking`.

    Args:
      patch_tokens: `[B, n_g, N, D]` patch tokens of the global crops.
      mask_indices: `[G, U]` int indices into each group's flattened `(B/G) * n_g * N` tokens.
    Returns:
      `[G, U, D]`; padded slots hold the group's first token (their weight is 0).
    """
    if patch_tokens.ndim != 4:
        raise ValueError(
            f"gather_masked_tokens expects patch tokens [batch, n_global_crops, patches, dim], got "
            f"{patch_tokens.shape}; reshape the backbone output per sample first.")
    groups = mask_indices.shape[0]
    if patch_tokens.shape[0] % groups:
        raise ValueError(
            f"gather_masked_tokens: batch {patch_tokens.shape[0]} is not divisible by the {groups} mask groups; "
            "build the masks with num_groups dividing the batch.")
    # Groups are contiguous runs of samples, so with G a multiple of the data-parallel
    # size this reshape and gather stay on each device.
    tokens = patch_tokens.reshape(groups, -1, patch_tokens.shape[-1])
    return jnp.take_along_axis(tokens, mask_indices[..., None].astype(jnp.int32), axis=1)
