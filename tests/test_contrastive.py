"""Contrastive losses: NumPy float64 references, sharded == naive on 8 simulated devices, ring memory."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from lvm_jax.objectives import contrastive as C
from lvm_jax.sharding import make_mesh

MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2)]


def _features(batch=32, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    img, txt = rng.normal(size=(2, batch, dim))
    txt = 0.5 * txt + 0.5 * img  # correlated pairs, so positives matter
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    return img, txt


def _np_softmax_loss_and_grads(img, txt, scale):
    """CLIP loss and its analytic gradients in float64."""
    b = len(img)
    dots = img @ txt.T
    logits = scale * dots

    def softmax(x, axis):
        e = np.exp(x - x.max(axis=axis, keepdims=True))
        return e / e.sum(axis=axis, keepdims=True)

    p_rows, p_cols = softmax(logits, 1), softmax(logits, 0)
    loss = 0.5 * (-np.mean(np.log(np.diag(p_rows))) - np.mean(np.log(np.diag(p_cols))))
    dlogits = 0.5 * ((p_rows - np.eye(b)) + (p_cols - np.eye(b))) / b
    return loss, (scale * dlogits @ txt, scale * dlogits.T @ img, np.sum(dlogits * dots))


def _np_sigmoid_loss_and_grads(img, txt, scale, bias):
    b = len(img)
    dots = img @ txt.T
    z = scale * dots + bias
    y = 2 * np.eye(b) - 1
    loss = np.sum(np.logaddexp(0, -y * z)) / b  # -log sigmoid(yz) = log(1 + exp(-yz))
    dz = -y / (1 + np.exp(y * z)) / b
    return loss, (scale * dz @ txt, scale * dz.T @ img, np.sum(dz * dots), np.sum(dz))


def test_naive_losses_match_numpy():
    img, txt = _features()
    loss, grads = jax.value_and_grad(C.softmax_contrastive_loss, argnums=(0, 1, 2))(
        jnp.float32(img), jnp.float32(txt), jnp.float32(14.0))
    ref_loss, ref_grads = _np_softmax_loss_and_grads(img, txt, 14.0)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)
    loss, grads = jax.value_and_grad(C.sigmoid_contrastive_loss, argnums=(0, 1, 2, 3))(
        jnp.float32(img), jnp.float32(txt), jnp.float32(10.0), jnp.float32(-10.0))
    ref_loss, ref_grads = _np_sigmoid_loss_and_grads(img, txt, 10.0, -10.0)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mesh_shape", MESHES)
def test_sharded_losses_equal_naive(mesh_shape):
    mesh = make_mesh(dict(zip(("data", "fsdp", "tensor"), mesh_shape)))
    img, txt = (jnp.float32(x) for x in _features(batch=32))
    sharding = NamedSharding(mesh, P(("data", "fsdp")))
    img_s, txt_s = jax.device_put(img, sharding), jax.device_put(txt, sharding)
    scale, bias = jnp.float32(10.0), jnp.float32(-5.0)
    cases = [
        (C.softmax_contrastive_loss, lambda i, t, s: C.sharded_softmax_contrastive_loss(i, t, s, mesh), (scale,)),
        (C.sigmoid_contrastive_loss,
         lambda i, t, s, b: C.sharded_sigmoid_contrastive_loss(i, t, s, b, mesh), (scale, bias)),
        (C.sigmoid_contrastive_loss,
         lambda i, t, s, b: C.ring_sigmoid_contrastive_loss(i, t, s, b, mesh), (scale, bias)),
    ]
    for naive, sharded, extra in cases:
        argnums = tuple(range(2 + len(extra)))
        ref_loss, ref_grads = jax.value_and_grad(naive, argnums=argnums)(img, txt, *extra)
        loss, grads = jax.jit(jax.value_and_grad(sharded, argnums=argnums))(img_s, txt_s, *extra)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-5)
        for g, r in zip(grads, ref_grads):
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
        # Feature gradients stay sharded like the features (no gather onto one device).
        assert grads[0].sharding.is_equivalent_to(sharding, 2)


def test_indivisible_batch_is_a_clear_error():
    mesh = make_mesh(dict(data=8))
    img, txt = (jnp.float32(x) for x in _features(batch=12))
    with pytest.raises(ValueError, match="divisible by 8"):
        C.ring_sigmoid_contrastive_loss(img, txt, 1.0, 0.0, mesh)
    with pytest.raises(ValueError, match="same shape"):
        C.sharded_softmax_contrastive_loss(img, txt[:, :4], 1.0, mesh)


def _temp_bytes(loss_name, batch_local, num_devices, dim=32):
    mesh = make_mesh(dict(data=num_devices), devices=jax.devices()[:num_devices])
    feats = jax.ShapeDtypeStruct((batch_local * num_devices, dim), jnp.float32,
                                 sharding=NamedSharding(mesh, P(("data", "fsdp"))))
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
    loss = {"ring": C.ring_sigmoid_contrastive_loss, "gather": C.sharded_sigmoid_contrastive_loss}[loss_name]
    fn = jax.value_and_grad(lambda i, t, s, b: loss(i, t, s, b, mesh), argnums=(0, 1, 2, 3))
    return jax.jit(fn).lower(feats, feats, scalar, scalar).compile().memory_analysis().temp_size_in_bytes


def test_ring_sigmoid_memory_grows_with_local_batch_squared_not_global():
    b_local = 256
    block = b_local * b_local * 4  # one [B_local, B_local] float32 block
    ring = {n: _temp_bytes("ring", b_local, n) for n in (4, 8)}
    gather = {n: _temp_bytes("gather", b_local, n) for n in (4, 8)}
    # Loss + gradient, per device: flat in the global batch B = n * B_local for the ring, ...
    assert ring[8] <= 1.1 * ring[4], ring
    assert ring[8] < 6 * block, ring
    # ... linear in B for the all-gather version (it holds [B_local, B] logits).
    assert gather[8] > 1.7 * gather[4], gather
    assert gather[8] > 8 * block, gather
    # And quadratic in B_local: doubling it roughly quadruples the ring's temporaries.
    ring_half = _temp_bytes("ring", b_local // 2, 8)
    assert 3.0 * ring_half < ring[8] < 5.0 * ring_half, (ring_half, ring[8])
