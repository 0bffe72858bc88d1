"""DINOv2 multi-crop augmentation on the host (`dinov2/data/augmentations.py`).

Per image: 2 global crops (random-resized crop, scale 0.32-1) and N local crops
(scale 0.05-0.32), each flipped with p 0.5, colour-jittered (0.4, 0.4, 0.2, 0.1)
with p 0.8, greyscaled with p 0.2, then Gaussian-blurred (kernel 9, sigma
0.1-2); the second global crop is also solarised with p 0.2. All crops are
normalised with the ImageNet mean/std and returned as float32 NHWC.

Blur probabilities. The paper (and DINO v1) blurs global crop 1 always, global
crop 2 with p 0.1 and local crops with p 0.5. DINOv2's released code passes
`1 - p` to torchvision's `RandomApply` (whose p is the probability of
*applying* the blur), so it effectively blurs global 1 never, global 2 with p
0.9 and local crops with p 0.5. `released_code_blur=True` reproduces that;
the default follows the paper.

Speed: crops are cut and resized with PIL (bicubic, as the reference), then the
photometric ops run in NumPy on the float stack of all crops of one size at
once (torchvision's float-tensor formulas), so 10 crops of a 32x32 image cost
about as much as one.

Randomness comes only from the `np.random.Generator` passed in: the grain
adapter gets it from grain (per record and position in the stream), and
`multicrop_rng(seed, index, epoch)` gives the same crops for the same
(seed, record index, epoch) anywhere.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain.python as grain
import numpy as np

from lvm_jax.data import transforms as T

PAPER_BLUR_P = (1.0, 0.1, 0.5)  # global crop 1, global crop 2, local crops
RELEASED_CODE_BLUR_P = (0.0, 0.9, 0.5)
BLUR_KERNEL_SIZE = 9
BLUR_SIGMA = (0.1, 2.0)
SOLARIZE_THRESHOLD = 128 / 255  # the reference solarises uint8 pixels >= 128


def multicrop_rng(seed: int, index: int, epoch: int) -> np.random.Generator:
    """A generator that depends only on (seed, record index, epoch)."""
    return np.random.default_rng([int(seed), int(epoch), int(index)])


# --------------------------------------------------------------------------- photometric ops
# All take x float32 [n, H, W, 3] in [0, 1] and per-crop factors [n].


def grayscale(x: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma `[n, H, W, 1]` (torchvision's weights)."""
    return (0.2989 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2])[..., None]


def _blend(x: np.ndarray, other, factor: np.ndarray) -> np.ndarray:
    f = factor[:, None, None, None]
    return np.clip(f * x + (1.0 - f) * other, 0.0, 1.0)


def adjust_brightness(x, factor):
    return _blend(x, 0.0, factor)


def adjust_contrast(x, factor):
    return _blend(x, grayscale(x).mean(axis=(1, 2, 3), keepdims=True), factor)


def adjust_saturation(x, factor):
    return _blend(x, grayscale(x), factor)


def adjust_hue(x, shift):
    """Rotates the hue by `shift` turns: RGB -> HSV, h += shift (mod 1), HSV -> RGB."""
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    v = np.maximum(np.maximum(r, g), b)
    delta = v - np.minimum(np.minimum(r, g), b)
    d = np.where(delta > 0, delta, 1.0)
    # hue in sixths of a turn; 0 for grey pixels (delta = 0 makes every branch 0 or ignored)
    h6 = np.where(v == r, (g - b) / d, np.where(v == g, 2.0 + (b - r) / d, 4.0 + (r - g) / d))
    h6 = (h6 + 6.0 * shift[:, None, None]) % 6.0
    chroma = delta  # = v * s
    # HSV -> RGB without branches: channel n takes v - chroma * clip(min(k, 4 - k), 0, 1), k = (n + h6) mod 6.
    out = np.empty_like(x)
    for c, n in enumerate((5.0, 3.0, 1.0)):
        k = (n + h6) % 6.0
        out[..., c] = v - chroma * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
    return np.clip(out, 0.0, 1.0)


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def color_jitter(x: np.ndarray, rng: np.random.Generator, strengths, p: float) -> np.ndarray:
    """torchvision ColorJitter(b, c, s, h) in a random order per crop, applied to each crop with probability p."""
    n = len(x)
    brightness, contrast, saturation, hue = strengths
    apply = rng.random(n) < p
    factors = (rng.uniform(1 - brightness, 1 + brightness, n), rng.uniform(1 - contrast, 1 + contrast, n),
               rng.uniform(1 - saturation, 1 + saturation, n), rng.uniform(-hue, hue, n))
    order = np.argsort(rng.random((n, 4)), axis=1)  # a random permutation of the 4 ops per crop
    for position in range(4):
        for op, fn in enumerate(_JITTER_OPS):
            idx = np.flatnonzero(apply & (order[:, position] == op))
            if idx.size:
                x[idx] = fn(x[idx], factors[op][idx])
    return x


def gaussian_kernels(sigma: np.ndarray, size: int = BLUR_KERNEL_SIZE) -> np.ndarray:
    """Normalised 1-D Gaussian kernels `[n, size]`."""
    t = np.arange(size, dtype=np.float32) - (size - 1) / 2
    k = np.exp(-0.5 * (t[None] / sigma[:, None]) ** 2)
    return (k / k.sum(axis=1, keepdims=True)).astype(np.float32)


def gaussian_blur(x: np.ndarray, sigma: np.ndarray, size: int = BLUR_KERNEL_SIZE) -> np.ndarray:
    """Separable Gaussian blur with reflect padding (torchvision's), one sigma per crop."""
    k = gaussian_kernels(sigma, size)
    r = size // 2
    pad = np.pad(x, ((0, 0), (r, r), (r, r), (0, 0)), mode="reflect")
    h, w = x.shape[1:3]
    rows = sum(k[:, i, None, None, None] * pad[:, i:i + h] for i in range(size))
    return sum(k[:, i, None, None, None] * rows[:, :, i:i + w] for i in range(size)).astype(np.float32)


def _random_subset(rng: np.random.Generator, p: np.ndarray) -> np.ndarray:
    return np.flatnonzero(rng.random(len(p)) < p)


@dataclasses.dataclass(frozen=True)
class MultiCrop:
    """DINOv2's augmentation: image -> global and local crops.

    Attributes:
      global_size: side of the global crops (224; 32 on the synthetic set).
      local_size: side of the local crops (96 or 98; 16 on the synthetic set).
      num_local_crops: N (8 in the recipe; 0 disables local crops).
      global_scale / local_scale: area fractions of the random-resized crops.
      jitter: ColorJitter (brightness, contrast, saturation, hue).
      jitter_p / grayscale_p / solarize_p: probabilities (0.8 / 0.2 / 0.2).
      released_code_blur: use the released code's blur probabilities (see module doc).
      blur_p: explicit (global 1, global 2, local) blur probabilities; overrides
        `released_code_blur` when given.
      blur_sigma: range of the blur's sigma in output pixels ((0.1, 2.0) for 224 px
        crops; scale it with the crop size, e.g. (0.1, 0.3) at 32 px, or the blur
        erases small images).
      mean / std: normalisation in [0, 1] pixel units.
    """

    global_size: int = 224
    local_size: int = 96
    num_local_crops: int = 8
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    solarize_p: float = 0.2
    released_code_blur: bool = False
    blur_p: tuple[float, float, float] | None = None
    blur_sigma: tuple[float, float] = BLUR_SIGMA
    mean: tuple[float, float, float] = T.IMAGENET_MEAN
    std: tuple[float, float, float] = T.IMAGENET_STD

    def __post_init__(self):
        if self.local_size > self.global_size:
            raise ValueError(
                f"local crop size {self.local_size} is larger than the global crop size {self.global_size}; "
                "local crops must be the smaller views (e.g. 96 with 224, 16 with 32).")
        if min(self.global_size, self.local_size) <= BLUR_KERNEL_SIZE // 2 or self.num_local_crops < 0:
            raise ValueError(
                f"crop sizes must exceed {BLUR_KERNEL_SIZE // 2} pixels (the blur's reach) and num_local_crops "
                f"must be >= 0 (got global {self.global_size}, local {self.local_size}, "
                f"{self.num_local_crops} local crops).")
        for name in ("global_scale", "local_scale"):
            lo, hi = getattr(self, name)
            if not 0.0 < lo <= hi <= 1.0:
                raise ValueError(f"{name}={(lo, hi)} must satisfy 0 < min <= max <= 1.")
        if self.blur_p is not None and (len(self.blur_p) != 3 or not all(0.0 <= p <= 1.0 for p in self.blur_p)):
            raise ValueError(f"blur_p={self.blur_p} must be three probabilities in [0, 1] "
                             "(global crop 1, global crop 2, local crops).")
        lo, hi = self.blur_sigma
        if not 0.0 < lo <= hi:
            raise ValueError(f"blur_sigma={(lo, hi)} must satisfy 0 < min <= max (pixels), e.g. (0.1, 2.0).")

    @property
    def blur_probabilities(self) -> tuple[float, float, float]:
        if self.blur_p is not None:
            return tuple(float(p) for p in self.blur_p)
        return RELEASED_CODE_BLUR_P if self.released_code_blur else PAPER_BLUR_P

    def _crops(self, views: np.ndarray, first: int, rng: np.random.Generator, n: int, size: int,
               scale) -> np.ndarray:
        """n random-resized, randomly flipped crops as float32 [n, size, size, 3] in [0, 1]; crop j of
        this group is cut from `views[(first + j) % V]` ([V, H, W, 3])."""
        if n == 0:
            return np.zeros((0, size, size, 3), np.float32)
        crops = []
        for j in range(n):
            image = views[(first + j) % len(views)]
            box = T.sample_rrc_box(*image.shape[:2], rng, scale)
            crops.append(T.hflip(T.crop_resize(image, box, size, "bicubic"), rng))
        return np.stack(crops).astype(np.float32) / 255.0

    def _photometric(self, x: np.ndarray, rng: np.random.Generator, blur_p: np.ndarray,
                     solarize_p: np.ndarray) -> np.ndarray:
        x = color_jitter(x, rng, self.jitter, self.jitter_p)
        idx = _random_subset(rng, np.full(len(x), self.grayscale_p))
        x[idx] = np.broadcast_to(grayscale(x[idx]), x[idx].shape)
        idx = _random_subset(rng, blur_p)
        if idx.size:
            x[idx] = gaussian_blur(x[idx], rng.uniform(*self.blur_sigma, idx.size))
        idx = _random_subset(rng, solarize_p)
        x[idx] = np.where(x[idx] >= SOLARIZE_THRESHOLD, 1.0 - x[idx], x[idx])
        mean = np.asarray(self.mean, np.float32)
        std = np.asarray(self.std, np.float32)
        return ((x - mean) / std).astype(np.float32)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """uint8 `[H, W, 3]` -> `global_crops [2, G, G, 3]`, `local_crops [N, L, L, 3]` (float32, normalised).

        `image` may also be a stack of V views of one sample, uint8 `[V, H, W, 3]` (e.g.
        `lvm_jax.data.synthetic.SyntheticViews`): crop k (global 1, global 2, local 1, ..., local N)
        is cut from view k mod V. One view is exactly the single-image case.
        """
        image = np.asarray(image)
        if image.ndim not in (3, 4) or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"MultiCrop expects a decoded uint8 RGB image [H, W, 3] (or views [V, H, W, 3]), got "
                f"{image.dtype} {image.shape}; decode it first (lvm_jax.data.transforms.decode_image).")
        views = image[None] if image.ndim == 3 else image
        blur_global1, blur_global2, blur_local = self.blur_probabilities
        global_crops = self._photometric(
            self._crops(views, 0, rng, 2, self.global_size, self.global_scale), rng,
            blur_p=np.array([blur_global1, blur_global2]), solarize_p=np.array([0.0, self.solarize_p]))
        n = self.num_local_crops
        local_crops = self._photometric(
            self._crops(views, 2, rng, n, self.local_size, self.local_scale), rng,
            blur_p=np.full(n, blur_local), solarize_p=np.zeros(n))
        return dict(global_crops=global_crops, local_crops=local_crops)


class MultiCropTransform(grain.RandomMapTransform):
    """grain adapter: record `{'image': uint8 [H, W, 3], 'label': int, ...}` (or `{'views': uint8
    [V, H, W, 3], ...}`, see `MultiCrop.__call__`) -> `{'global_crops', 'local_crops', 'label'}`
    (label int32, -1 when the record has none)."""

    def __init__(self, multicrop: MultiCrop):
        self.multicrop = multicrop

    def random_map(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        out = self.multicrop(record["views"] if "views" in record else record["image"], rng)
        out["label"] = np.int32(record.get("label", -1))
        return out
