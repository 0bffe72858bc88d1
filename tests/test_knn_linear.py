"""Evals: weighted k-NN vs brute force, linear probe, sharded feature extraction, pictures."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvm_jax import sharding
from lvm_jax.evals import pictures
from lvm_jax.evals.knn import extract_features, knn_classifier
from lvm_jax.evals.linear_probe import linear_probe


def clustered(n, num_classes=5, dim=16, noise=1.0, seed=0):
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(size=(num_classes, dim)) * 2
    labels = rng.integers(0, num_classes, n)
    return (centres[labels] + noise * rng.normal(size=(n, dim))).astype(np.float32), labels.astype(np.int32)


def brute_force_knn(train_x, train_y, test_x, test_y, k, temperature, num_classes):
    """DINO's knn_classifier, written as plainly as possible (float64, full sort)."""
    norm = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    sims = norm(test_x.astype(np.float64)) @ norm(train_x.astype(np.float64)).T
    correct1 = correct5 = 0
    for i in range(len(test_x)):
        order = np.argsort(-sims[i], kind="stable")[:k]
        scores = np.zeros(num_classes)
        for j in order:
            scores[train_y[j]] += np.exp(sims[i, j] / temperature)
        ranked = np.argsort(-scores, kind="stable")
        correct1 += ranked[0] == test_y[i]
        correct5 += test_y[i] in ranked[:5]
    return correct1 / len(test_x), correct5 / len(test_x)


@pytest.mark.parametrize("chunk_size", [7, 64])
def test_knn_matches_brute_force(chunk_size):
    train_x, train_y = clustered(150, noise=2.5, seed=0)
    test_x, test_y = clustered(45, noise=2.5, seed=1)
    got = knn_classifier(train_x, train_y, test_x, test_y, ks=(10, 20, 100), temperature=0.07,
                         num_classes=5, chunk_size=chunk_size)
    for k in (10, 20, 100):
        top1, top5 = brute_force_knn(train_x, train_y, test_x, test_y, k, 0.07, 5)
        assert got[f"knn_top1_k{k}"] == pytest.approx(top1)
        if k == 20:
            assert got["knn_top1"] == pytest.approx(top1) and got["knn_top5"] == pytest.approx(top5)
    assert 0.2 < got["knn_top1"] < 1.0  # neither trivial nor chance: the comparison means something


def test_knn_k_above_train_size_and_bad_input():
    train_x, train_y = clustered(12, seed=0)
    test_x, test_y = clustered(10, seed=1)
    got = knn_classifier(train_x, train_y, test_x, test_y, ks=(20,), num_classes=5)
    assert got["knn_top1"] == pytest.approx(brute_force_knn(train_x, train_y, test_x, test_y, 12, 0.07, 5)[0])
    with pytest.raises(ValueError, match="same D"):
        knn_classifier(train_x, train_y, test_x[:, :3], test_y)
    with pytest.raises(ValueError, match="one label per row"):
        knn_classifier(train_x, train_y[:5], test_x, test_y)


def test_linear_probe_learns_and_picks_the_informative_features():
    train_x, train_y = clustered(600, noise=1.0, seed=0)
    test_x, test_y = clustered(200, noise=1.0, seed=1)
    rng = np.random.default_rng(2)
    noise_train = rng.normal(size=train_x.shape).astype(np.float32)
    noise_test = rng.normal(size=test_x.shape).astype(np.float32)
    # signal only in the mean patch token: the cls+patch_mean set must win
    got = linear_probe({"cls": noise_train, "patch_mean": train_x}, train_y,
                       {"cls": noise_test, "patch_mean": test_x}, test_y, epochs=30, batch_size=128)
    assert got["linear_top1"] > 0.9
    assert got["linear_best_uses_patch_mean"] == 1.0
    assert got["linear_top1_cls"] < 0.45  # noise features: about chance (0.2)
    got = linear_probe(train_x, train_y, test_x, test_y, epochs=30, batch_size=128)
    assert got["linear_top1"] > 0.9 and got["linear_best_lr"] > 0


def test_extract_features_pads_shards_and_drops_padding():
    mesh = sharding.make_mesh(dict(data=4, fsdp=2, tensor=1))
    rng = np.random.default_rng(0)
    images = rng.normal(size=(21, 4, 4, 3)).astype(np.float32)
    labels = np.arange(21, dtype=np.int32)
    w = rng.normal(size=(3, 5)).astype(np.float32)

    def apply_fn(params, x):
        assert x.shape[0] == 8  # padded to a fixed, mesh-divisible batch
        return {"cls": x.mean((1, 2)) @ params, "patch_mean": x.max((1, 2))}

    batches = [{"image": images[i:i + 8], "label": labels[i:i + 8]} for i in range(0, 21, 8)]  # last has 5
    out = extract_features(apply_fn, jnp.asarray(w), batches, mesh)
    np.testing.assert_array_equal(out["label"], labels)
    np.testing.assert_allclose(out["cls"], images.mean((1, 2)) @ w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["patch_mean"], images.max((1, 2)), rtol=1e-6)
    # global batches with a valid mask (Task.eval_batches) pass straight through
    host = {"image": images[:8], "label": labels[:8], "valid": np.arange(8) < 6}
    out = extract_features(lambda p, x: x.sum((1, 2, 3)), None, [sharding.host_to_global(host, mesh)], mesh)
    np.testing.assert_allclose(out["features"], images[:6].sum((1, 2, 3)), rtol=1e-5)


# ----------------------------------------------------------------------------- pictures


def test_cls_attention_from_qk_matches_numpy():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, 1 + 2 + 6, 3, 4)).astype(np.float32)  # cls + 2 registers + 2x3 patches
    k = rng.normal(size=q.shape).astype(np.float32)
    got = np.asarray(pictures.cls_attention_from_qk(jnp.asarray(q), jnp.asarray(k), 3, (2, 3)))
    logits = np.einsum("bhd,bshd->bhs", q[:, 0], k) / 2.0
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    np.testing.assert_allclose(got, attn[:, :, 3:].reshape(2, 3, 2, 3), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scan_layers, qkv", [(False, "separate"), (True, "separate"), (False, "fused")])
def test_vit_last_layer_attention_and_pngs(tmp_path, monkeypatch, scan_layers, qkv):
    # fused q/k/v is the GPU default; it never calls the query/key modules the capture reads
    monkeypatch.setenv("LVM_JAX_QKV", qkv)
    from lvm_jax.models import ViT

    kw = dict(variant=None, width=32, depth=2, num_heads=4, patch_size=8, image_size=32, num_registers=1)
    model = ViT(**kw, final_norm=False, scan_layers=scan_layers)
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    params = nn.meta.unbox(model.init(jax.random.key(1), images)["params"])
    attn, patch_tokens = pictures.vit_last_layer_attention(model, params, images)
    assert attn.shape == (2, 4, 4, 4) and patch_tokens.shape == (2, 16, 32)
    # independent: block input from return_layers, then LN + q/k projections of the last block in NumPy
    plain = ViT(**kw, final_norm=False)
    flat = pictures._unscan_params(params, 2) if scan_layers else params
    x = np.asarray(plain.apply({"params": flat}, images, return_layers=(0,))["layers"][0], np.float64)
    p = jax.tree.map(np.asarray, flat["encoder"]["blocks_1"])
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    h = (x - mu) / np.sqrt(var + 1e-6) * p["norm1"]["scale"] + p["norm1"]["bias"]
    q = np.einsum("btd,dhk->bthk", h, p["attn"]["query"]["kernel"]) + p["attn"]["query"]["bias"]
    k = np.einsum("btd,dhk->bthk", h, p["attn"]["key"]["kernel"]) + p["attn"]["key"]["bias"]
    logits = np.einsum("bhd,bshd->bhs", q[:, 0], k) / np.sqrt(8)
    ref = np.exp(logits - logits.max(-1, keepdims=True))
    ref /= ref.sum(-1, keepdims=True)
    np.testing.assert_allclose(attn, ref[:, :, 2:].reshape(2, 4, 4, 4), rtol=1e-4, atol=1e-6)
    paths = pictures.save_dino_pictures(model, params, np.asarray(images), str(tmp_path), prefix="step0_")
    for path in paths:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_pca_rgb_orders_by_variance():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(2, 48, 5)) * np.array([10.0, 3.0, 1.0, 0.1, 0.1])
    rgb = pictures.pca_rgb(feats, (6, 8))
    assert rgb.shape == (2, 6, 8, 3) and rgb.min() >= 0 and rgb.max() <= 1
    # the red channel follows the largest-variance direction (up to sign)
    corr = np.corrcoef(rgb[..., 0].reshape(-1), feats[..., 0].reshape(-1))[0, 1]
    assert abs(corr) > 0.95


def test_attention_maps_of_an_image_share_one_colour_scale_and_bad_input_is_named(tmp_path, monkeypatch):
    import matplotlib.axes

    scales = []
    orig = matplotlib.axes.Axes.imshow
    monkeypatch.setattr(matplotlib.axes.Axes, "imshow", lambda self, x, *a, **kw: (
        scales.append((np.ndim(x), kw.get("vmin"), kw.get("vmax"))), orig(self, x, *a, **kw))[1])
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(2, 16, 16, 3)).astype(np.float32)
    attention = rng.dirichlet(np.ones(16), size=(2, 3)).reshape(2, 3, 4, 4)
    attention[1, 2, 0, 0] = np.nan  # a NaN map still draws
    pictures.save_attention_grid(images, attention, str(tmp_path / "a.png"))
    # Each head was autoscaled on its own: a head with weak, flat attention looked as bright as a focused one.
    maps = [s for s in scales if s[0] == 2]
    assert maps == [(2, 0.0, pytest.approx(np.nanmax(attention[i])))
                    for i in range(2) for _ in range(3)]
    with pytest.raises(ValueError, match="No pictures to draw"):
        pictures.save_pca_grid(images[:0], np.zeros((0, 4, 4, 3)), str(tmp_path / "p.png"))
    with pytest.raises(ValueError, match=r"attention \[B, heads, h, w\] for the B=2 images"):
        pictures.save_attention_grid(images, attention[:1], str(tmp_path / "a.png"))
    with pytest.raises(ValueError, match="non-finite"):
        pictures.pca_rgb(np.full((1, 4, 3), np.nan), (2, 2))
