"""Zero-shot and retrieval evals against brute-force NumPy (full sorts, explicit loops)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvm_jax.evals import retrieval, zeroshot
from lvm_jax.sharding import make_mesh


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _brute_force_retrieval(images, texts, text_to_image, ks):
    scores = _unit(texts) @ _unit(images).T  # [N_txt, N_img]
    out = {}
    for k in ks:
        # A stable sort ranks ties by index, the evals' rule (torch.topk leaves the order of ties unspecified).
        t2i = [text_to_image[t] in np.argsort(-scores[t], kind="stable")[:k] for t in range(len(texts))]
        i2t = []
        for i in range(len(images)):
            top = np.argsort(-scores[:, i], kind="stable")[:k]
            i2t.append(any(text_to_image[t] == i for t in top))
        out[f"t2i_r{k}"], out[f"i2t_r{k}"] = np.mean(t2i), np.mean(i2t)
    return out


@pytest.mark.parametrize("chunk_size", [1024, 7])
def test_retrieval_matches_brute_force(chunk_size):
    rng = np.random.default_rng(0)
    n_img, dim = 40, 8
    captions_per_image = rng.integers(1, 6, n_img)  # 1..5 captions each
    text_to_image = np.repeat(np.arange(n_img), captions_per_image)
    rng.shuffle(text_to_image)
    images = rng.normal(size=(n_img, dim))
    texts = images[text_to_image] + 1.5 * rng.normal(size=(len(text_to_image), dim))  # noisy captions
    got = retrieval.retrieval_metrics(images, texts, text_to_image, chunk_size=chunk_size)
    want = _brute_force_retrieval(images, texts, text_to_image, (1, 5, 10))
    assert set(got) == {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"}
    for key, value in want.items():
        assert got[key] == pytest.approx(value), key
    assert 0 < got["t2i_r1"] < got["t2i_r10"] < 1  # the case is not degenerate


def test_retrieval_with_tied_scores_matches_top_k():
    # Embeddings drawn from 4 one-hot vectors (scores exactly 0 or 1 in any summation order): most
    # scores tie, which counting only strictly higher scores would turn into hits.
    rng = np.random.default_rng(2)
    codebook = np.eye(8)[:4]
    images = codebook[rng.integers(0, 4, 30)]
    text_to_image = np.repeat(np.arange(30), 2)
    texts = codebook[rng.integers(0, 4, 60)]
    got = retrieval.retrieval_metrics(images, texts, text_to_image, chunk_size=7)
    want = _brute_force_retrieval(images, texts, text_to_image, (1, 5, 10))
    for key, value in want.items():
        assert got[key] == pytest.approx(value), key


def test_collapsed_or_nan_embeddings_are_not_perfect():
    n, dim = 50, 8
    same = np.ones((n, dim))
    got = retrieval.retrieval_metrics(same, same, np.arange(n))
    assert got["t2i_r1"] == pytest.approx(1 / n) and got["i2t_r10"] == pytest.approx(10 / n)
    labels = np.arange(n) % 10
    z = zeroshot.zeroshot_metrics(same, labels, np.ones((10, dim)))
    assert z["zeroshot_top1"] == pytest.approx(0.1) == z["zeroshot_mean_per_class_recall"]
    assert z["zeroshot_top5"] == pytest.approx(0.5)
    nan = np.full((n, dim), np.nan)
    assert max(retrieval.retrieval_metrics(nan, nan, np.arange(n)).values()) == 0.0
    assert max(zeroshot.zeroshot_metrics(nan, labels, np.ones((10, dim))).values()) == 0.0
    # Fewer candidates than k: NaN rows were given rank C, a hit at k >= C (recall@10 of 5 NaN images was 1.0).
    assert max(retrieval.retrieval_metrics(nan[:5], nan[:5], np.arange(5)).values()) == 0.0
    assert zeroshot.zeroshot_metrics(nan[:6], labels[:6] % 3, np.ones((3, dim)))["zeroshot_top5"] == 0.0
    # One NaN caption costs its own hits only (it made every image's i2t a miss).
    eye = np.eye(8)
    texts = eye.copy()
    texts[3] = np.nan
    got = retrieval.retrieval_metrics(eye, texts, np.arange(8), ks=(1,))
    assert got == {"i2t_r1": 7 / 8, "t2i_r1": 7 / 8}
    weights = np.eye(8)[:4]
    weights[2] = np.nan  # a NaN class weight: its images miss, the others are still scored
    z = zeroshot.zeroshot_metrics(np.eye(8)[[0, 1, 2, 3]], [0, 1, 2, 3], weights)
    assert z["zeroshot_top1"] == 0.75


def test_retrieval_perfect_and_errors():
    images = np.eye(4)
    texts = np.eye(4)[[0, 0, 1, 2, 3]]
    got = retrieval.retrieval_metrics(images, texts, [0, 0, 1, 2, 3], ks=(1,))
    assert got == {"i2t_r1": 1.0, "t2i_r1": 1.0}
    with pytest.raises(ValueError, match="no caption"):
        retrieval.retrieval_metrics(images, texts[:3], [0, 0, 1])
    with pytest.raises(ValueError, match="outside"):
        retrieval.retrieval_metrics(images, texts, [0, 0, 1, 2, 9])


def test_group_captions_by_image():
    rows, text_to_image = retrieval.group_captions_by_image(["a.jpg", "b.jpg", "a.jpg", "c.jpg", "b.jpg"])
    np.testing.assert_array_equal(rows, [0, 1, 3])
    np.testing.assert_array_equal(text_to_image, [0, 1, 0, 2, 1])


def test_zeroshot_matches_brute_force():
    rng = np.random.default_rng(1)
    num_classes, num_templates, dim, n = 12, 3, 16, 300
    prompt_embeds = rng.normal(size=(num_classes, num_templates, dim))
    # Brute force classifier: loops, not vectorised.
    weights = []
    for c in range(num_classes):
        mean = sum(e / np.linalg.norm(e) for e in prompt_embeds[c]) / num_templates
        weights.append(mean / np.linalg.norm(mean))
    weights = np.stack(weights)
    np.testing.assert_allclose(zeroshot.zeroshot_weights(prompt_embeds), weights, rtol=1e-5, atol=1e-6)

    labels = rng.integers(0, num_classes, n)
    labels[labels == 3] = 4  # class 3 absent from the labels: it must not count in the per-class mean
    images = weights[labels] + 0.9 * rng.normal(size=(n, dim))
    got = zeroshot.zeroshot_metrics(images, labels, weights)
    logits = _unit(images) @ weights.T
    order = np.argsort(-logits, axis=1, kind="stable")
    top1 = np.mean(order[:, 0] == labels)
    top5 = np.mean([labels[i] in order[i, :5] for i in range(n)])
    recalls = [np.mean(order[labels == c, 0] == c) for c in range(num_classes) if np.any(labels == c)]
    assert got["zeroshot_top1"] == pytest.approx(top1)
    assert got["zeroshot_top5"] == pytest.approx(top5)
    assert got["zeroshot_mean_per_class_recall"] == pytest.approx(np.mean(recalls))
    assert got["zeroshot_top1"] < got["zeroshot_top5"] < 1


def test_build_weights_from_names_and_templates(tmp_path):
    (tmp_path / "classes.txt").write_text("cat\ndog\n\nred car\n")
    (tmp_path / "templates.json").write_text(json.dumps(["a photo of a {c}.", "art of the {}"]))
    classnames = zeroshot.load_classnames(tmp_path / "classes.txt")
    templates = zeroshot.load_templates(tmp_path / "templates.json")
    assert classnames == ["cat", "dog", "red car"]
    seen = []

    def encode(prompts):  # a fixed random embedding per prompt string
        seen.extend(prompts)
        return np.stack([np.random.default_rng(abs(hash(p)) % 2**32).normal(size=4) for p in prompts])

    weights = zeroshot.build_zeroshot_weights(encode, classnames, templates + [lambda c: f"itap of a {c}"])
    assert seen[:3] == ["a photo of a cat.", "art of the cat", "itap of a cat"]
    assert weights.shape == (3, 4)
    np.testing.assert_allclose(weights, zeroshot.zeroshot_weights(encode(seen[:9]).reshape(3, 3, 4)), rtol=1e-6)

    (tmp_path / "bad.txt").write_text("a photo of a thing\n")
    with pytest.raises(ValueError, match="placeholder"):
        zeroshot.load_templates(tmp_path / "bad.txt")
    with pytest.raises(ValueError, match="does not exist"):
        zeroshot.load_classnames(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="class names"):
        zeroshot.zeroshot_metrics(np.ones((2, 4)), [0, 5], weights)


def test_embed_arrays_on_a_mesh_matches_direct_apply():
    from lvm_jax.models.clip import CLIP

    mesh = make_mesh(dict(data=4, fsdp=2))
    model = CLIP(embed_dim=8, vision=dict(variant=None, width=16, depth=1, num_heads=2, patch_size=8,
                                          image_size=16),
                 text=dict(vocab_size=50, context_length=8, width=16, depth=1, num_heads=2))
    tokens = np.random.default_rng(0).integers(1, 50, size=(21, 8)).astype(np.int32)
    images = np.random.default_rng(1).normal(size=(21, 16, 16, 3)).astype(np.float32)
    variables = model.init(jax.random.PRNGKey(0), jnp.asarray(images[:1]), jnp.asarray(tokens[:1]))
    text = retrieval.embed_arrays(lambda p, t: model.apply(p, t, method="encode_text"), variables, tokens,
                                  mesh, batch_size=12)  # rounded up to 16; 21 rows -> 2 padded batches
    image = retrieval.embed_arrays(lambda p, x: model.apply(p, x, method="encode_image"), variables, images,
                                   mesh, batch_size=8)
    np.testing.assert_allclose(text, model.apply(variables, tokens, method="encode_text"), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(image, model.apply(variables, images, method="encode_image"), rtol=1e-5,
                               atol=1e-6)
