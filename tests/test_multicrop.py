"""DINOv2 multi-crop: shapes, determinism, blur probabilities (paper vs released code), photometric ops
against torchvision's float-tensor functions, bad input."""

import grain.python as grain
import numpy as np
import pytest

from lvm_jax.data import multicrop as M
from lvm_jax.data.multicrop import MultiCrop, MultiCropTransform, multicrop_rng

SMALL = dict(global_size=32, local_size=16, num_local_crops=8)


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32]
    img = np.stack([xx * 8, yy * 8, (xx + yy) * 4], -1) + rng.integers(0, 20, (32, 32, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def test_shapes_and_dtypes(image):
    out = MultiCrop(**SMALL)(image, multicrop_rng(0, 0, 0))
    assert out["global_crops"].shape == (2, 32, 32, 3) and out["global_crops"].dtype == np.float32
    assert out["local_crops"].shape == (8, 16, 16, 3) and out["local_crops"].dtype == np.float32
    assert np.isfinite(out["global_crops"]).all() and np.isfinite(out["local_crops"]).all()
    big = np.random.default_rng(1).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    out = MultiCrop(global_size=64, local_size=24, num_local_crops=2)(big, multicrop_rng(0, 0, 0))
    assert out["global_crops"].shape == (2, 64, 64, 3) and out["local_crops"].shape == (2, 24, 24, 3)
    out = MultiCrop(global_size=32, local_size=16, num_local_crops=0)(image, multicrop_rng(0, 0, 0))
    assert out["local_crops"].shape == (0, 16, 16, 3)


def test_normalised_with_imagenet_stats(image):
    # With every random photometric op off and the crop covering the image, output = (x/255 - mean) / std
    # up to the bicubic resize and flip: compare channel means.
    mc = MultiCrop(global_size=32, local_size=16, num_local_crops=0, global_scale=(1.0, 1.0), jitter_p=0.0,
                   grayscale_p=0.0, solarize_p=0.0, released_code_blur=True)  # global 1: no blur
    crop = mc(image, multicrop_rng(0, 0, 0))["global_crops"][0]
    expected = (image.mean((0, 1)) / 255 - np.array(M.T.IMAGENET_MEAN)) / np.array(M.T.IMAGENET_STD)
    np.testing.assert_allclose(crop.mean((0, 1)), expected, atol=0.05)


def test_deterministic_per_seed_index_epoch(image):
    mc = MultiCrop(**SMALL)
    a = mc(image, multicrop_rng(1, 5, 2))
    b = mc(image, multicrop_rng(1, 5, 2))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    for other in (multicrop_rng(1, 5, 3), multicrop_rng(1, 6, 2), multicrop_rng(2, 5, 2)):
        assert not np.array_equal(a["global_crops"], mc(image, other)["global_crops"])


def test_grain_adapter_is_reproducible(image):
    records = [{"image": image, "label": i} for i in range(4)]
    transform = MultiCropTransform(MultiCrop(**SMALL))

    def run():
        return grain.MapDataset.source(records).seed(7).random_map(transform)[2]

    a, b = run(), run()
    assert a["label"] == 2 and a["label"].dtype == np.int32
    np.testing.assert_array_equal(a["global_crops"], b["global_crops"])
    np.testing.assert_array_equal(a["local_crops"], b["local_crops"])


@pytest.mark.parametrize("released", [False, True])
def test_blur_probabilities(image, monkeypatch, released):
    blurred = {32: [], 16: []}
    real_blur = M.gaussian_blur

    def spy(x, sigma, size=M.BLUR_KERNEL_SIZE):
        blurred[x.shape[1]][-1] += len(x)
        return real_blur(x, sigma, size)

    monkeypatch.setattr(M, "gaussian_blur", spy)
    mc = MultiCrop(**SMALL, released_code_blur=released)
    n = 300
    for i in range(n):
        blurred[32].append(0)
        blurred[16].append(0)
        mc(image, multicrop_rng(0, i, 0))
    per_image = np.array(blurred[32])
    if released:  # global 1 never, global 2 with p 0.9
        assert mc.blur_probabilities == (0.0, 0.9, 0.5)
        assert per_image.max() <= 1 and abs(per_image.mean() - 0.9) < 0.06
    else:  # paper: global 1 always, global 2 with p 0.1
        assert mc.blur_probabilities == (1.0, 0.1, 0.5)
        assert per_image.min() >= 1 and abs(per_image.mean() - 1.1) < 0.06
    assert abs(np.sum(blurred[16]) / (8 * n) - 0.5) < 0.05


def test_explicit_blur_probabilities_and_sigma(image, monkeypatch):
    sigmas, sizes = [], []
    real_blur = M.gaussian_blur

    def spy(x, sigma, size=M.BLUR_KERNEL_SIZE):
        sigmas.extend(np.asarray(sigma).tolist())
        sizes.extend([x.shape[1]] * len(x))
        return real_blur(x, sigma, size)

    monkeypatch.setattr(M, "gaussian_blur", spy)
    # Overrides released_code_blur; only the local crops are blurred, with small-image sigmas.
    mc = MultiCrop(**SMALL, released_code_blur=True, blur_p=(0.0, 0.0, 1.0), blur_sigma=(0.1, 0.3))
    assert mc.blur_probabilities == (0.0, 0.0, 1.0)
    for i in range(20):
        mc(image, multicrop_rng(0, i, 0))
    assert sizes == [16] * (8 * 20)  # every local crop, no global crop
    assert 0.1 <= min(sigmas) and max(sigmas) <= 0.3 and max(sigmas) - min(sigmas) > 0.1


def test_bad_blur_settings_are_clear_errors():
    with pytest.raises(ValueError, match="blur_p=.*three probabilities"):
        MultiCrop(**SMALL, blur_p=(1.0, 0.5))
    with pytest.raises(ValueError, match="blur_p=.*three probabilities"):
        MultiCrop(**SMALL, blur_p=(1.0, 0.5, 1.5))
    with pytest.raises(ValueError, match="blur_sigma"):
        MultiCrop(**SMALL, blur_sigma=(0.0, 1.0))


def test_local_crop_larger_than_global_is_a_clear_error():
    with pytest.raises(ValueError, match="local crop size 48 is larger than the global crop size 32"):
        MultiCrop(global_size=32, local_size=48)
    with pytest.raises(ValueError, match="scale"):
        MultiCrop(**SMALL, local_scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="uint8 RGB"):
        MultiCrop(**SMALL)(np.zeros((32, 32), np.uint8), multicrop_rng(0, 0, 0))


@pytest.mark.torch
def test_photometric_ops_match_torchvision():
    torch = pytest.importorskip("torch")
    F = pytest.importorskip("torchvision.transforms.functional")
    rng = np.random.default_rng(0)
    x = rng.random((3, 20, 24, 3)).astype(np.float32)
    x[0, :5] = 0.5  # grey pixels (hue undefined)
    t = torch.from_numpy(x).permute(0, 3, 1, 2)

    def ref(fn, factors):
        return np.stack([fn(t[i], float(factors[i])).permute(1, 2, 0).numpy() for i in range(3)])

    f = np.array([0.6, 1.0, 1.37], np.float32)
    np.testing.assert_allclose(M.adjust_brightness(x, f), ref(F.adjust_brightness, f), atol=1e-6)
    np.testing.assert_allclose(M.adjust_contrast(x, f), ref(F.adjust_contrast, f), atol=1e-6)
    np.testing.assert_allclose(M.adjust_saturation(x, f), ref(F.adjust_saturation, f), atol=1e-6)
    h = np.array([-0.1, 0.05, 0.4], np.float32)
    np.testing.assert_allclose(M.adjust_hue(x, h), ref(F.adjust_hue, h), atol=1e-5)
    s = np.array([0.1, 1.0, 2.0], np.float32)
    np.testing.assert_allclose(M.gaussian_blur(x, s), ref(lambda im, v: F.gaussian_blur(im, [9, 9], [v, v]), s),
                               atol=1e-5)
    np.testing.assert_allclose(np.broadcast_to(M.grayscale(x), x.shape),
                               np.stack([F.rgb_to_grayscale(t[i], 3).permute(1, 2, 0).numpy() for i in range(3)]),
                               atol=1e-6)


def test_crop_k_is_cut_from_view_k_mod_v(image):
    # Plain-colour views, every photometric op off: each crop's colour names the view it came from.
    colours = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200]], np.uint8)
    views = np.broadcast_to(colours[:, None, None, :], (3, 32, 32, 3)).copy()
    mc = MultiCrop(**SMALL, jitter_p=0.0, grayscale_p=0.0, solarize_p=0.0, blur_p=(0.0, 0.0, 0.0))
    out = mc(views, multicrop_rng(0, 0, 0))
    crops = np.concatenate([out["global_crops"].mean((1, 2)), out["local_crops"].mean((1, 2))])
    pixels = (crops * np.array(M.T.IMAGENET_STD) + np.array(M.T.IMAGENET_MEAN)) * 255
    np.testing.assert_allclose(pixels, colours[np.arange(10) % 3], atol=0.5)
    # One view is exactly the single-image case (same generator draws).
    single, stacked = mc(image, multicrop_rng(0, 1, 0)), mc(image[None], multicrop_rng(0, 1, 0))
    for k in single:
        np.testing.assert_array_equal(single[k], stacked[k])
    # The grain adapter reads `views` when the record has them.
    rec = MultiCropTransform(mc).random_map({"views": views, "label": 3}, multicrop_rng(0, 0, 0))
    np.testing.assert_array_equal(rec["global_crops"], out["global_crops"])
    assert rec["label"] == 3
    with pytest.raises(ValueError, match="views"):
        mc(views[..., :2], multicrop_rng(0, 0, 0))
