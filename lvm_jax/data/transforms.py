"""Per-record image transforms (host side, run inside grain workers).

Two layers:
- plain functions on ``np.uint8 [H, W, 3]`` arrays (``decode_image``,
  ``random_resized_crop``, ``resize_center_crop``, ``hflip``, ``color_jitter``,
  ``rand_augment``, ``normalize`` ...) taking an explicit ``np.random.Generator``
  so other pipelines (DINOv2 multi-crop) can reuse them;
- grain transforms wrapping them on record dicts, assembled by
  ``supervised_transforms``.

Randomness comes only from the generator grain attaches to each record
(seeded from ``(seed, position in the sample stream)``), so augmentation is
reproducible and a restored data iterator continues bit-exactly.
"""
from __future__ import annotations

import io
import logging
import math
from typing import Any, Sequence

import grain.python as grain
import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from lvm_jax.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}

# ----------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------
_decode_failures = 0


def decode_failures() -> int:
  """Number of records dropped as undecodable in this process (policy 'skip')."""
  return _decode_failures


_WIDE_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # PIL's modes of 16-bit grayscale images


def decode_image(data: bytes | np.ndarray) -> np.ndarray:
  """Encoded bytes (JPEG/PNG/...) or an array -> RGB uint8 [H, W, 3]."""
  if isinstance(data, np.ndarray):
    if data.ndim == 2:
      data = np.repeat(data[..., None], 3, axis=-1)
    elif data.shape[-1] == 1:
      data = np.repeat(data, 3, axis=-1)
    elif data.shape[-1] == 4:
      data = data[..., :3]
    return np.asarray(data, np.uint8)
  with Image.open(io.BytesIO(data)) as im:
    im.draft("RGB", im.size)  # lets JPEG skip work it does not need
    if im.mode in _WIDE_GRAY_MODES:
      # 16-bit grayscale (TIFF, PNG, PGM; PIL opens a PGM of any depth scaled to 0..65535): convert("RGB")
      # clips it at 255, a nearly white image; keep the high byte instead, as an 8-bit export would.
      gray = (np.clip(np.asarray(im, np.int64), 0, 65535) >> 8).astype(np.uint8)
      return np.repeat(gray[..., None], 3, axis=-1)
    return np.asarray(im.convert("RGB"))


class DecodeImage(grain.MapTransform):
  """record['image'] bytes -> uint8 [H, W, 3].

  errors='skip': an undecodable image becomes a sentinel record (removed by
  ``DropFailed``) and a counted warning, so a grain worker never crashes on one
  bad file.  errors='raise': ValueError naming the record.
  """

  def __init__(self, errors: str = "skip"):
    if errors not in ("skip", "raise"):
      raise ValueError(f"data.decode_errors must be 'skip' or 'raise', got {errors!r}.")
    self.errors = errors

  def map(self, record: dict[str, Any]) -> dict[str, Any]:
    global _decode_failures
    try:
      image = decode_image(record["image"])
    except Exception as e:  # PIL raises many exception types for bad data
      name = record.get("path", record.get("id"))
      if self.errors == "raise":
        raise ValueError(
            f"cannot decode image of record {name!r} ({type(e).__name__}: {e}); remove or "
            "fix the file, or set data.decode_errors='skip' to drop undecodable images.") from e
      _decode_failures += 1
      logging.warning("skipping undecodable image %r (%s: %s); %d skipped so far in this process",
                      name, type(e).__name__, e, _decode_failures)
      return {"_decode_failed": True}
    return {**record, "image": image}


class DropFailed(grain.FilterTransform):
  """Removes the sentinel records left by ``DecodeImage(errors='skip')``."""

  def filter(self, record: dict[str, Any]) -> bool:
    return "_decode_failed" not in record


# ----------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------
def to_pil(image: np.ndarray | Image.Image) -> Image.Image:
  return image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))


def sample_rrc_box(height: int, width: int, rng: np.random.Generator,
                   scale: Sequence[float] = (0.08, 1.0),
                   ratio: Sequence[float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """Inception-style random crop box (top, left, h, w): area fraction in `scale`,
  aspect ratio log-uniform in `ratio`; falls back to a centre crop after 10 tries."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  # Fallback: the whole image clipped to the ratio range.
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    h, w = height, int(round(height * ratio[1]))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def crop_resize(image: np.ndarray | Image.Image, box: tuple[int, int, int, int], size: int,
                interpolation: str = "bicubic") -> np.ndarray:
  """Crop (top, left, h, w) and resize to [size, size, 3] uint8 in one resampling."""
  top, left, h, w = box
  im = to_pil(image).resize((size, size), _RESAMPLE[interpolation],
                            box=(left, top, left + w, top + h))
  return np.asarray(im)


def random_resized_crop(image: np.ndarray, size: int, rng: np.random.Generator,
                        scale: Sequence[float] = (0.08, 1.0),
                        ratio: Sequence[float] = (3 / 4, 4 / 3),
                        interpolation: str = "bicubic") -> np.ndarray:
  """[H, W, 3] uint8 -> [size, size, 3] uint8 random-resized crop."""
  box = sample_rrc_box(image.shape[0], image.shape[1], rng, scale, ratio)
  return crop_resize(image, box, size, interpolation)


def resize_center_crop(image: np.ndarray, size: int, crop_pct: float = 0.875,
                       interpolation: str = "bicubic") -> np.ndarray:
  """Eval geometry: resize the shorter side to size / crop_pct, centre-crop size."""
  h, w = image.shape[:2]
  if (h, w) == (size, size) and crop_pct >= 1.0:
    return image
  # Crop the region that maps to the centre size x size window after resizing.
  short = min(h, w)
  crop = short * min(crop_pct, 1.0)
  top, left = (h - crop) / 2, (w - crop) / 2
  im = to_pil(image).resize((size, size), _RESAMPLE[interpolation],
                            box=(left, top, left + crop, top + crop))
  return np.asarray(im)


def resize(image: np.ndarray, size: int, interpolation: str = "bicubic") -> np.ndarray:
  """Resize to [size, size, 3] (no-op when already that size)."""
  if image.shape[:2] == (size, size):
    return image
  return np.asarray(to_pil(image).resize((size, size), _RESAMPLE[interpolation]))


def hflip(image: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
  """Horizontal flip with probability p."""
  return image[:, ::-1] if rng.random() < p else image


# ----------------------------------------------------------------------------
# Colour (also the building blocks of DINOv2's photometric augmentation)
# ----------------------------------------------------------------------------
def _adjust_hue(image: np.ndarray, shift: float) -> np.ndarray:
  """Rotate hue by `shift` in [-0.5, 0.5] turns."""
  hsv = np.asarray(to_pil(image).convert("HSV")).copy()
  hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(round(shift * 255))) % 256
  return np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))


def color_jitter(image: np.ndarray, rng: np.random.Generator, brightness: float = 0.4,
                 contrast: float = 0.4, saturation: float = 0.2, hue: float = 0.1,
                 p: float = 0.8) -> np.ndarray:
  """torchvision-style ColorJitter in random order, applied with probability p."""
  if rng.random() >= p:
    return image
  im = to_pil(image)
  for op in rng.permutation(4):
    if op == 0 and brightness:
      im = ImageEnhance.Brightness(im).enhance(rng.uniform(1 - brightness, 1 + brightness))
    elif op == 1 and contrast:
      im = ImageEnhance.Contrast(im).enhance(rng.uniform(1 - contrast, 1 + contrast))
    elif op == 2 and saturation:
      im = ImageEnhance.Color(im).enhance(rng.uniform(1 - saturation, 1 + saturation))
    elif op == 3 and hue:
      im = to_pil(_adjust_hue(np.asarray(im), rng.uniform(-hue, hue)))
  return np.asarray(im)


def random_grayscale(image: np.ndarray, rng: np.random.Generator, p: float = 0.2) -> np.ndarray:
  if rng.random() >= p:
    return image
  gray = np.asarray(to_pil(image).convert("L"))
  return np.repeat(gray[..., None], 3, axis=-1)


def gaussian_blur(image: np.ndarray, rng: np.random.Generator, p: float = 0.5,
                  sigma: Sequence[float] = (0.1, 2.0)) -> np.ndarray:
  if rng.random() >= p:
    return image
  radius = rng.uniform(sigma[0], sigma[1])
  return np.asarray(to_pil(image).filter(ImageFilter.GaussianBlur(radius)))


def solarize(image: np.ndarray, rng: np.random.Generator, p: float = 0.2,
             threshold: int = 128) -> np.ndarray:
  if rng.random() >= p:
    return image
  return np.where(image >= threshold, 255 - image, image).astype(np.uint8)


# ----------------------------------------------------------------------------
# RandAugment (Cubuk et al. 2020), compact PIL version
# ----------------------------------------------------------------------------
_FILL = (128, 128, 128)


def _affine(im: Image.Image, matrix: tuple) -> Image.Image:
  return im.transform(im.size, Image.AFFINE, matrix, resample=Image.BILINEAR, fillcolor=_FILL)


# name -> fn(image, level, rng): level in [0, 1] is magnitude / 10, signed ops
# flip their sign with probability 1/2 (timm's convention).
def _signed(level: float, rng: np.random.Generator) -> float:
  return level if rng.random() < 0.5 else -level


RANDAUGMENT_OPS = {
    "Identity": lambda im, lv, rng: im,
    "AutoContrast": lambda im, lv, rng: ImageOps.autocontrast(im),
    "Equalize": lambda im, lv, rng: ImageOps.equalize(im),
    "Rotate": lambda im, lv, rng: im.rotate(_signed(30 * lv, rng), resample=Image.BILINEAR,
                                            fillcolor=_FILL),
    "Solarize": lambda im, lv, rng: ImageOps.solarize(im, int(256 - 256 * lv)),
    "Color": lambda im, lv, rng: ImageEnhance.Color(im).enhance(1 + _signed(0.9 * lv, rng)),
    "Posterize": lambda im, lv, rng: ImageOps.posterize(im, max(1, int(8 - 4 * lv))),
    "Contrast": lambda im, lv, rng: ImageEnhance.Contrast(im).enhance(1 + _signed(0.9 * lv, rng)),
    "Brightness": lambda im, lv, rng: ImageEnhance.Brightness(im).enhance(
        1 + _signed(0.9 * lv, rng)),
    "Sharpness": lambda im, lv, rng: ImageEnhance.Sharpness(im).enhance(
        1 + _signed(0.9 * lv, rng)),
    "ShearX": lambda im, lv, rng: _affine(im, (1, _signed(0.3 * lv, rng), 0, 0, 1, 0)),
    "ShearY": lambda im, lv, rng: _affine(im, (1, 0, 0, _signed(0.3 * lv, rng), 1, 0)),
    "TranslateX": lambda im, lv, rng: _affine(
        im, (1, 0, _signed(0.45 * lv, rng) * im.size[0], 0, 1, 0)),
    "TranslateY": lambda im, lv, rng: _affine(
        im, (1, 0, 0, 0, 1, _signed(0.45 * lv, rng) * im.size[1])),
}


def rand_augment(image: np.ndarray, rng: np.random.Generator, num_ops: int = 2,
                 magnitude: float = 9.0) -> np.ndarray:
  """Apply `num_ops` ops drawn uniformly (with replacement) at `magnitude` in [0, 10]."""
  names = list(RANDAUGMENT_OPS)
  level = float(np.clip(magnitude, 0, 10)) / 10
  im = to_pil(image)
  for k in rng.integers(0, len(names), size=num_ops):
    im = RANDAUGMENT_OPS[names[k]](im, level, rng)
  return np.asarray(im)


def normalize(image: np.ndarray, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
  """uint8 [H, W, 3] -> float32 (x / 255 - mean) / std."""
  mean = np.asarray(mean, np.float32) * 255
  inv_std = 1 / (np.asarray(std, np.float32) * 255)
  return (image.astype(np.float32) - mean) * inv_std


# ----------------------------------------------------------------------------
# grain transforms on record dicts
# ----------------------------------------------------------------------------
class RandomResizedCrop(grain.RandomMapTransform):
  def __init__(self, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
               interpolation: str = "bicubic"):
    self.size, self.scale, self.ratio, self.interpolation = size, tuple(scale), tuple(ratio), interpolation

  def random_map(self, record, rng):
    image = random_resized_crop(record["image"], self.size, rng, self.scale, self.ratio,
                                self.interpolation)
    return {**record, "image": image}


class ResizeCenterCrop(grain.MapTransform):
  def __init__(self, size: int, crop_pct: float = 0.875, interpolation: str = "bicubic"):
    self.size, self.crop_pct, self.interpolation = size, crop_pct, interpolation

  def map(self, record):
    return {**record, "image": resize_center_crop(record["image"], self.size, self.crop_pct,
                                                  self.interpolation)}


class Resize(grain.MapTransform):
  def __init__(self, size: int, interpolation: str = "bicubic"):
    self.size, self.interpolation = size, interpolation

  def map(self, record):
    return {**record, "image": resize(record["image"], self.size, self.interpolation)}


class RandomHorizontalFlip(grain.RandomMapTransform):
  def __init__(self, p: float = 0.5):
    self.p = p

  def random_map(self, record, rng):
    return {**record, "image": hflip(record["image"], rng, self.p)}


class RandAugment(grain.RandomMapTransform):
  """`num_ops` ops at `magnitude` in [0, 10] (timm/torchvision's op set and scale)."""

  def __init__(self, num_ops: int = 2, magnitude: float = 9.0):
    # Refused, not clipped: big_vision's randaug(2, 15) means more than level 10, and
    # clipping would silently train with (2, 10).
    if not 0 <= float(magnitude) <= 10 or int(num_ops) < 0:
      raise UserError(f"config.data.randaugment=({num_ops}, {magnitude}): the magnitude must be in [0, 10] "
                      "(10 = the strongest op setting on this scale) and num_ops >= 0.")
    self.num_ops, self.magnitude = int(num_ops), float(magnitude)

  def random_map(self, record, rng):
    return {**record, "image": rand_augment(record["image"], rng, self.num_ops, self.magnitude)}


class Normalize(grain.MapTransform):
  """Final step: keeps only the model inputs, image float32 and label int32."""

  def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD, keys: Sequence[str] = ("image", "label")):
    self.mean, self.std, self.keys = tuple(mean), tuple(std), tuple(keys)

  def map(self, record):
    out = {k: record[k] for k in self.keys if k in record}
    out["image"] = normalize(np.ascontiguousarray(record["image"]), self.mean, self.std)
    if "label" in out:
      out["label"] = np.int32(out["label"])
    return out


def supervised_transforms(data_cfg, train: bool = True) -> list[grain.Transformation]:
  """decode -> (random-resized crop | resize + centre crop) -> flip -> [RandAugment] -> normalise.

  Output records: image float32 [S, S, 3] normalised, label int32.
  For the synthetic source (already decoded at the target size, and already
  randomised in position/scale) the default train geometry is only a flip;
  set data.rrc_scale to crop anyway.
  """
  get = data_cfg.get
  size = int(get("image_size", 32) or 32)
  synthetic = get("source", "synthetic") == "synthetic"
  interpolation = get("interpolation", "bicubic")
  ops: list[grain.Transformation] = []
  if not synthetic:
    ops += [DecodeImage(get("decode_errors", "skip") or "skip"), DropFailed()]
  if train:
    rrc_scale = get("rrc_scale", None if synthetic else (0.08, 1.0))
    if rrc_scale is not None:
      ops.append(RandomResizedCrop(size, rrc_scale, get("rrc_ratio", None) or (3 / 4, 4 / 3),
                                   interpolation))
    else:
      ops.append(Resize(size, interpolation))
    if get("hflip", True):
      ops.append(RandomHorizontalFlip())
    randaugment = get("randaugment", None)
    if randaugment:
      num_ops, magnitude = randaugment
      ops.append(RandAugment(num_ops, magnitude))
  elif synthetic:
    ops.append(Resize(size, interpolation))
  else:
    ops.append(ResizeCenterCrop(size, get("eval_resize_ratio", 0.875) or 0.875, interpolation))
  ops.append(Normalize(get("mean", None) or IMAGENET_MEAN, get("std", None) or IMAGENET_STD))
  return ops
