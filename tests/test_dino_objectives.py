"""DINOv2 objectives and heads vs plain NumPy transcriptions of the published formulas,
and sharded (8 simulated devices) == unsharded."""

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from scipy.special import erf

from lvm_jax import sharding
from lvm_jax.data.masking import MaskCollator
from lvm_jax.models.heads import DINOHead, DINOiBOTHeads
from lvm_jax.objectives import dino

TOL = dict(rtol=1e-5, atol=1e-5)
B, NG, NL, K, D = 16, 2, 3, 64, 16  # samples, global crops, local crops, prototypes, feature dim
STUDENT_TEMP, TEACHER_TEMP = 0.1, 0.05


# ----------------------------------------------------------------------------- NumPy transcriptions
# Written from facebookresearch/dinov2 (dinov2/loss/*.py, train/ssl_meta_arch.py), in its layout:
# crops concatenated crop-major along the batch ("chunk" = one crop of every sample).

def np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def crop_major(x):  # [B, n, ...] -> [n * B, ...]
    return np.concatenate([x[:, i] for i in range(x.shape[1])])


def np_dino_loss_term(student_list, teacher_list):  # DINOLoss.forward
    total = 0.0
    for s in student_list:
        lsm = np_log_softmax(s / STUDENT_TEMP)
        for t in teacher_list:
            total -= np.sum(t * lsm, axis=-1).mean()
    return total


def np_dino_total(student_global, student_local, teacher_probs):
    """dino_global_crops_loss + dino_local_crops_loss of SSLMetaArch.forward_backward."""
    n_local = student_local.shape[1]
    n_terms = (NG - 1) * NG + max(n_local * NG, 1)
    teacher_chunks = [teacher_probs[:, i] for i in range(NG)]
    local = np_dino_loss_term([student_local[:, i] for i in range(n_local)], teacher_chunks) / n_terms
    swapped = np.concatenate([teacher_chunks[1], teacher_chunks[0]])  # A matched to B
    glob = np_dino_loss_term([crop_major(student_global)], [swapped]) * 2 / n_terms
    return local + glob


def np_sinkhorn(teacher_output, temp, n_iterations=3):  # sinkhorn_knopp_teacher, one process
    q = np.exp(teacher_output / temp).T
    b, k = q.shape[1], q.shape[0]
    q /= q.sum()
    for _ in range(n_iterations):
        q /= q.sum(axis=1, keepdims=True)
        q /= k
        q /= q.sum(axis=0, keepdims=True)
        q /= b
    q *= b
    return q.T


def np_koleo(x, eps=1e-8):  # KoLeoLoss.forward
    x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)
    dots = x @ x.T
    np.fill_diagonal(dots, -1)
    nn_idx = dots.argmax(1)
    d = np.linalg.norm(x - x[nn_idx] + eps, axis=-1)  # torch PairwiseDistance adds eps to the difference
    return -np.log(d + eps).mean()


def np_ibot_forward_masked(student_masked, teacher_masked, masks):  # iBOTPatchLoss.forward_masked
    loss = np.sum(teacher_masked * np_log_softmax(student_masked / STUDENT_TEMP), axis=-1)
    weight = np.repeat(1.0 / np.maximum(masks.sum(-1), 1.0), masks.sum(-1))
    return -(loss * weight).sum() / masks.shape[0]


def np_gelu(x):
    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    f32 = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
    return dict(
        teacher_logits=f32(B, NG, K),
        student_global=f32(B, NG, K) * 3,
        student_local=f32(B, NL, K) * 3,
        center=f32(K) * 0.1,
        cls_features=f32(B, NG, D),
        student_patches=f32(B, NG, 16, K) * 3,
        teacher_patches=f32(B, NG, 16, K),
    )


# ----------------------------------------------------------------------------- values vs NumPy


def test_softmax_center_and_update(data):
    t, c = data["teacher_logits"], data["center"]
    probs = dino.softmax_center_teacher(jnp.asarray(t), jnp.asarray(c), TEACHER_TEMP)
    np.testing.assert_allclose(probs, np_softmax((t.astype(np.float64) - c) / TEACHER_TEMP), **TOL)
    new_c = dino.update_center(jnp.asarray(c), jnp.asarray(t), momentum=0.9)
    rows = crop_major(t).astype(np.float64)
    np.testing.assert_allclose(new_c, c * 0.9 + rows.sum(0) / len(rows) * 0.1, **TOL)


def test_dino_cls_loss(data):
    t = np_softmax((data["teacher_logits"].astype(np.float64) - data["center"]) / TEACHER_TEMP)
    ours = dino.dino_cls_loss(jnp.asarray(data["student_global"]), jnp.asarray(data["student_local"]),
                              jnp.asarray(t, jnp.float32), STUDENT_TEMP)
    ref = np_dino_total(data["student_global"].astype(np.float64), data["student_local"].astype(np.float64), t)
    np.testing.assert_allclose(ours, ref, **TOL)


def test_dino_cls_loss_without_local_crops(data):
    t = np_softmax(data["teacher_logits"].astype(np.float64) / TEACHER_TEMP)
    ours = dino.dino_cls_loss(jnp.asarray(data["student_global"]), None, jnp.asarray(t, jnp.float32), STUDENT_TEMP)
    ref = np_dino_total(data["student_global"].astype(np.float64), np.zeros((B, 0, K)), t)
    np.testing.assert_allclose(ours, ref, **TOL)


def test_sinkhorn_knopp(data):
    t = data["teacher_logits"] * 0.5
    ours = dino.sinkhorn_knopp(jnp.asarray(t), TEACHER_TEMP)
    ref = np_sinkhorn(crop_major(t).astype(np.float64), TEACHER_TEMP)
    np.testing.assert_allclose(crop_major(np.asarray(ours)), ref, **TOL)
    np.testing.assert_allclose(np.asarray(ours).sum(-1), 1.0, rtol=1e-5)


def test_sinkhorn_knopp_ignores_padding_rows(data):
    t = data["teacher_logits"][:, 0] * 0.5
    valid = np.arange(B) % 3 != 0
    ours = np.asarray(dino.sinkhorn_knopp(jnp.asarray(t), TEACHER_TEMP, valid=jnp.asarray(valid)))
    np.testing.assert_allclose(ours[valid], np_sinkhorn(t[valid].astype(np.float64), TEACHER_TEMP), **TOL)
    assert np.all(ours[~valid] == 0)


def test_sinkhorn_knopp_large_logits_stay_finite():
    t = jnp.full((4, 8), 10.0).at[:, 0].set(12.0)  # exp(12 / 0.04) overflows float32 in the reference
    assert np.isfinite(np.asarray(dino.sinkhorn_knopp(t, 0.04))).all()


def test_sinkhorn_knopp_prototype_far_from_every_row_stays_finite():
    # Cosine logits at temperature 0.02: prototype 1 sits at -1 from every row while
    # prototype 0 is at +1, so exp((t - global max) / T) = exp(-100) underflows float32
    # for the whole column; float64 (the reference) keeps it, and so must we.
    t = np.full((6, 4), 0.2, np.float32)
    t[:, 0], t[:, 1] = 1.0, -1.0
    t[:, 2:] += np.linspace(-0.1, 0.1, 6, dtype=np.float32)[:, None]
    ours = np.asarray(dino.sinkhorn_knopp(jnp.asarray(t), 0.02))
    assert np.isfinite(ours).all()
    np.testing.assert_allclose(ours, np_sinkhorn(t.astype(np.float64), 0.02), **TOL)


def test_sinkhorn_knopp_padding_row_above_every_valid_row_stays_finite():
    # iBOT pads its masked-patch rows; a padding row whose logit beats every valid row's by more
    # than ~88.7 * T overflows exp() in float32 (T = 0.02: a gap of 1.8 in cosine logits).
    t = np.array([[0.1, 0.2], [0.0, 0.3], [-0.2, 0.1], [2.0, 0.0]], np.float32)
    valid = np.array([True, True, True, False])
    ours = np.asarray(dino.sinkhorn_knopp(jnp.asarray(t), 0.02, valid=jnp.asarray(valid)))
    assert np.isfinite(ours).all() and np.all(ours[3] == 0)
    np.testing.assert_allclose(ours[:3], np_sinkhorn(t[:3].astype(np.float64), 0.02), **TOL)


def test_koleo(data):
    x = data["cls_features"]
    np.testing.assert_allclose(dino.koleo_loss(jnp.asarray(x[:, 0])), np_koleo(x[:, 0].astype(np.float64)), **TOL)
    # [B, crops, D]: per crop chunk, summed (DINOv2 never pairs crops of one image).
    ref = sum(np_koleo(x[:, i].astype(np.float64)) for i in range(NG))
    np.testing.assert_allclose(dino.koleo_loss(jnp.asarray(x)), ref, **TOL)
    # num_groups: the reference run on each group (GPU) separately, averaged.
    ref4 = np.mean([np_koleo(g.astype(np.float64)) for g in np.split(x[:, 0], 4)])
    np.testing.assert_allclose(dino.koleo_loss(jnp.asarray(x[:, 0]), num_groups=4), ref4, **TOL)


def test_koleo_batch_too_small_is_a_clear_error(data):
    x = jnp.asarray(data["cls_features"][:, 0])
    with pytest.raises(ValueError, match="at least 2 samples per group"):
        jax.jit(partial(dino.koleo_loss, num_groups=B))(x)  # the reference returns inf here
    with pytest.raises(ValueError, match="at least 2 samples"):
        dino.koleo_loss(x[:1])
    with pytest.raises(ValueError, match="equal groups"):
        dino.koleo_loss(x, num_groups=3)


def _masks(num_groups):
    return MaskCollator(grid=(4, 4), num_groups=num_groups)(np.random.default_rng(1), B)


@pytest.mark.parametrize("num_groups", [1, 8])
def test_ibot_patch_loss_and_centre(data, num_groups):
    m = _masks(num_groups)
    s_tok, t_log = data["student_patches"], data["teacher_patches"]
    t_probs = np_softmax(t_log.astype(np.float64) / TEACHER_TEMP)
    # reference: boolean-select masked patches row by row
    masks = m["masks"].reshape(B * NG, -1)
    s_masked = s_tok.reshape(B * NG, 16, K)[masks].astype(np.float64)
    t_masked = t_probs.reshape(B * NG, 16, K)[masks]
    ref = np_ibot_forward_masked(s_masked, t_masked, masks)
    # ours: static padded gather + weights
    s_g = dino.gather_masked_tokens(jnp.asarray(s_tok), jnp.asarray(m["mask_indices"]))
    t_g = dino.gather_masked_tokens(jnp.asarray(t_probs, jnp.float32), jnp.asarray(m["mask_indices"]))
    ours = dino.ibot_patch_loss(s_g, t_g, jnp.asarray(m["mask_weights"]), num_rows=B * NG,
                                student_temp=STUDENT_TEMP)
    np.testing.assert_allclose(ours, ref, **TOL)
    # centre over the masked teacher patches only
    t_logits_masked = t_log.reshape(B * NG, 16, K)[masks].astype(np.float64)
    c = data["center"]
    new_c = dino.update_center(jnp.asarray(c), dino.gather_masked_tokens(jnp.asarray(t_log), m["mask_indices"]),
                               0.9, valid=jnp.asarray(m["mask_valid"]))
    np.testing.assert_allclose(new_c, c * 0.9 + t_logits_masked.mean(0) * 0.1, **TOL)
    # Sinkhorn-Knopp over the masked patches only (DINOv2's n_masked_patches)
    sk = dino.sinkhorn_knopp(dino.gather_masked_tokens(jnp.asarray(t_log * 0.5), m["mask_indices"]),
                             TEACHER_TEMP, valid=jnp.asarray(m["mask_valid"]))
    sk = np.asarray(sk)[m["mask_valid"]]
    np.testing.assert_allclose(sk, np_sinkhorn(t_logits_masked * 0.5, TEACHER_TEMP), **TOL)


# ----------------------------------------------------------------------------- sharded == unsharded


def _batch_spec(ndim, shard_last):
    return P(sharding.BATCH_AXES, *([None] * (ndim - 2) + (["tensor"] if shard_last else [None]))) \
        if ndim > 1 else P(sharding.BATCH_AXES)


def _all_objectives(t_logits, s_global, s_local, center, feats, s_patch, t_patch, idx, w, valid):
    probs = dino.softmax_center_teacher(t_logits, center, TEACHER_TEMP)
    sk = dino.sinkhorn_knopp(t_logits, TEACHER_TEMP)
    s_m = dino.gather_masked_tokens(s_patch, idx)
    t_m = dino.gather_masked_tokens(t_patch, idx)
    sk_patch = dino.sinkhorn_knopp(t_m, TEACHER_TEMP, valid=valid)
    return dict(
        dino=dino.dino_cls_loss(s_global, s_local, probs, STUDENT_TEMP),
        dino_sk=dino.dino_cls_loss(s_global, s_local, sk, STUDENT_TEMP),
        center=dino.update_center(center, t_logits),
        ibot_center=dino.update_center(center, t_m, valid=valid),
        sk=sk,
        sk_patch=sk_patch,
        ibot=dino.ibot_patch_loss(s_m, sk_patch, w, B * NG, STUDENT_TEMP),
        koleo=dino.koleo_loss(feats),
        koleo_grouped=dino.koleo_loss(feats, num_groups=4),
    )


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_equals_unsharded(data, mesh_shape):
    m = _masks(8)
    args = (data["teacher_logits"], data["student_global"], data["student_local"], data["center"],
            data["cls_features"], data["student_patches"], data["teacher_patches"],
            m["mask_indices"], m["mask_weights"], m["mask_valid"])
    expected = jax.jit(_all_objectives)(*args)
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, mesh_shape)))
    # batch over ('data', 'fsdp'); prototypes over 'tensor' where the array has them; centre replicated
    specs = [_batch_spec(3, True), _batch_spec(3, True), _batch_spec(3, True), P(),
             _batch_spec(3, False), _batch_spec(4, True), _batch_spec(4, True),
             _batch_spec(2, False), _batch_spec(2, False), _batch_spec(2, False)]
    placed = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, specs)]
    assert len(placed[0].sharding.device_set) == 8
    got = jax.jit(_all_objectives)(*placed)
    for name in expected:
        np.testing.assert_allclose(np.asarray(got[name]), np.asarray(expected[name]), rtol=1e-5, atol=1e-6,
                                   err_msg=name)


# ----------------------------------------------------------------------------- heads


def test_dino_head_matches_numpy_and_has_unit_prototypes():
    head = DINOHead(num_prototypes=K, hidden_dim=32, bottleneck_dim=8)
    x = jax.random.normal(jax.random.key(0), (5, D))
    variables = head.init(jax.random.key(1), x)
    p = jax.tree.map(np.asarray, nn.meta.unbox(variables)["params"])
    h = np_gelu(x @ p["fc_0"]["kernel"] + p["fc_0"]["bias"])
    h = np_gelu(h @ p["fc_1"]["kernel"] + p["fc_1"]["bias"])
    h = h @ p["fc_2"]["kernel"] + p["fc_2"]["bias"]
    h = h / np.linalg.norm(h, axis=-1, keepdims=True)
    w = p["prototypes"] / np.linalg.norm(p["prototypes"], axis=0, keepdims=True)  # weight norm, g = 1
    np.testing.assert_allclose(head.apply(variables, x), h @ w, rtol=1e-5, atol=1e-5)
    # Scaling the direction parameters changes nothing; the gain (DINOv2's weight_g, init 1) scales
    # each prototype's logits, and fixing it (DINO v1's norm_last_layer) leaves cosine similarities.
    scaled = jax.tree.map(lambda a: a, nn.meta.unbox(variables))
    scaled["params"]["prototypes"] = scaled["params"]["prototypes"] * 7.0
    gain = np.linspace(0.5, 2.0, K, dtype=np.float32)
    scaled["params"]["prototype_gain"] = jnp.asarray(gain)
    np.testing.assert_allclose(head.apply(scaled, x), (h @ w) * gain, rtol=1e-5, atol=1e-5)
    fixed = DINOHead(num_prototypes=K, hidden_dim=32, bottleneck_dim=8, learn_prototype_gain=False)
    fixed_params = {k: v for k, v in nn.meta.unbox(variables)["params"].items() if k != "prototype_gain"}
    assert set(nn.meta.unbox(fixed.init(jax.random.key(1), x))["params"]) == set(fixed_params)
    np.testing.assert_allclose(fixed.apply({"params": fixed_params}, x), h @ w, rtol=1e-5, atol=1e-5)
    specs = nn.get_partition_spec(variables)["params"]
    assert specs["fc_0"]["kernel"] == P("embed", "mlp")
    assert specs["prototypes"] == P("proj", "prototypes")
    assert specs["prototype_gain"] == P("prototypes")


def test_ibot_head_shared_or_separate():
    cls, patches = jnp.ones((4, D)), jnp.ones((2, 3, D))
    shared = DINOiBOTHeads(num_prototypes=K, hidden_dim=32, bottleneck_dim=8)
    v = shared.init(jax.random.key(0), cls, patches)
    assert set(v["params"]) == {"dino_head"}
    c, p = shared.apply(v, cls, patches)
    assert c.shape == (4, K) and p.shape == (2, 3, K)
    np.testing.assert_allclose(p[0, 0], c[0], rtol=1e-6)  # same head, same input
    separate = DINOiBOTHeads(num_prototypes=K, hidden_dim=32, bottleneck_dim=8, separate_ibot_head=True,
                             ibot_num_prototypes=12, ibot_hidden_dim=16, ibot_bottleneck_dim=4)
    v = separate.init(jax.random.key(0), cls, patches)
    assert set(v["params"]) == {"dino_head", "ibot_head"}
    c, p = separate.apply(v, cls, patches)
    assert c.shape == (4, K) and p.shape == (2, 3, 12)
