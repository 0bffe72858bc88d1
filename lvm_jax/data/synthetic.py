"""Procedural shapes: the embedded default data set (no files, no downloads).

Every image is a pure function of ``(seed, split, index)``: one large class
shape (circle, square, star, ...) with random colour, size, position and a
moderate rotation, drawn over a textured background (stripes, checkerboard,
mottled noise or a gradient) with small clutter (lines, dots, blobs)
underneath, plus pixel noise.  The nuisance factors (``Difficulty``) are chosen
so raw-pixel nearest neighbours stay weak (~25-35% for 10 classes; chance 10%) while
the shapes stay obvious to a person: they are large, anti-aliased and always
contrast with every background colour.  Full rotation is available
(``max_rotation=180``) but costs a small ViT several times more samples.

Each image also gets a caption built from its attributes with one of several
phrasings (``CAPTION_TEMPLATES``); CLIP zero-shot evaluation should use the
*different* ``ZEROSHOT_TEMPLATES``.

Rendering is vectorised NumPy over a block of images (signed-distance
functions on the pixel grid), so whole splits render at thousands of images/s.
"""
from __future__ import annotations

import dataclasses
import re
import threading
from typing import Any

import numpy as np

CLASS_NAMES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "cross",
    "ring", "hexagon", "heart", "arrow", "crescent",
)

# Named colours: captions use the names, rendering jitters the RGB values.
PALETTE: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red", (215, 40, 40)),
    ("orange", (240, 140, 30)),
    ("yellow", (235, 215, 45)),
    ("green", (45, 165, 65)),
    ("cyan", (50, 195, 205)),
    ("blue", (40, 75, 210)),
    ("purple", (130, 60, 180)),
    ("pink", (235, 125, 185)),
    ("white", (240, 240, 240)),
    ("gray", (128, 128, 128)),
    ("black", (25, 25, 25)),
    ("brown", (125, 80, 40)),
)
COLOR_NAMES: tuple[str, ...] = tuple(name for name, _ in PALETTE)
BACKGROUND_NAMES: tuple[str, ...] = ("striped", "checkered", "mottled", "gradient")
SIZE_NAMES: tuple[str, ...] = ("small", "medium", "large")
POSITION_NAMES: tuple[str, ...] = (
    "upper left", "top", "upper right",
    "left side", "center", "right side",
    "lower left", "bottom", "lower right",
)

# Training captions.  Fields: size, color, shape, pattern, bg_color, bg2_color, position.
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a {size} {color} {shape} on a {pattern} {bg_color} background",
    "{size} {color} {shape}, {position}, {pattern} backdrop",
    "a {color} {shape} in the {position} of the picture",
    "{pattern} {bg_color} background with a {size} {color} {shape}",
    "there is a {color} {shape} near the {position}, surrounded by clutter",
    "{color} {shape} over a {bg_color} and {bg2_color} {pattern} pattern",
    "an illustration of a {size} {shape} colored {color}",
    "{shape}: {color}, {size}, {position}, on {pattern} {bg_color}",
)
# Zero-shot prompts deliberately share no phrasing with CAPTION_TEMPLATES.
ZEROSHOT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.", "a rendering of a {}.")

_RGB = np.array([rgb for _, rgb in PALETTE], np.float32)
_NUM_COLORS = len(PALETTE)
# A background colour pair (c1, c2) is allowed for shape colour s only if every
# blend of c1 and c2 (the texture interpolates between them) stays this far
# from s in RGB space: the shape must always stand out. This holds for the flat colours; the
# shape's shading (x0.7-1.3 across it) can bring a shaded edge closer (~60 RGB units at worst,
# white shaded to x0.73 on a pale cyan/orange blend), still clearly visible.
_MIN_CONTRAST = 140.0
_COLOR_JITTER = 12.0


def _segment_distance(point: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
  ab = b - a
  t = np.clip(np.dot(point - a, ab) / max(np.dot(ab, ab), 1e-6), 0.0, 1.0)
  return float(np.linalg.norm(point - (a + t * ab)))


def _allowed_backgrounds() -> tuple[np.ndarray, np.ndarray]:
  """Tables [P, P] (first bg colour) and [P, P, P] (second bg colour)."""
  second = np.zeros((_NUM_COLORS,) * 3, bool)
  for s in range(_NUM_COLORS):
    for c1 in range(_NUM_COLORS):
      for c2 in range(_NUM_COLORS):
        if c1 != c2:
          second[s, c1, c2] = _segment_distance(_RGB[s], _RGB[c1], _RGB[c2]) >= _MIN_CONTRAST
  first = second.any(axis=2)
  assert first.any(axis=1).all(), "palette leaves a shape colour without backgrounds"
  return first, second


_ALLOWED_BG1, _ALLOWED_BG2 = _allowed_backgrounds()

# ----------------------------------------------------------------------------
# Counter-based randomness: uniform numbers as a hash of (seed, split, index,
# field).  Vectorised over indices and independent of rendering order, which
# is what makes any image reproducible from its index alone.
# ----------------------------------------------------------------------------
_NUM_FIELDS = 64
_SPLIT_IDS = {"train": 0, "eval": 1}


def _mix64(x: np.ndarray) -> np.ndarray:
  """splitmix64 finaliser on uint64 (wrapping arithmetic)."""
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def _uniforms(indices: np.ndarray, seed: int, split: str, stream: int = 0) -> np.ndarray:
  """[N, _NUM_FIELDS] float64 uniforms in [0, 1), a pure function of the inputs.

  `stream` > 0 gives independent tables for the same indices (the re-drawn
  nuisances of multi-view samples); stream 0 is the data set itself.
  """
  split_id = _SPLIT_IDS[split]
  key = _mix64(np.array([(seed & 0xFFFFFFFF) | (split_id << 32) | (stream << 40)], np.uint64)
               + np.uint64(0x9E3779B97F4A7C15))
  counters = (indices.astype(np.uint64)[:, None] * np.uint64(_NUM_FIELDS)
              + np.arange(_NUM_FIELDS, dtype=np.uint64)[None, :])
  with np.errstate(over="ignore"):
    bits = _mix64(_mix64(counters * np.uint64(0x9E3779B97F4A7C15) + key))
  return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _pick(u: np.ndarray, allowed: np.ndarray) -> np.ndarray:
  """For each row, the floor(u * count)-th True column of `allowed` [N, P]."""
  counts = allowed.sum(axis=1)
  k = np.minimum((u * counts).astype(np.int64), counts - 1)
  return np.argmax(np.cumsum(allowed, axis=1) > k[:, None], axis=1)


# Field layout of the uniforms table (names keep the sampling readable).
_F = dict(
    label=0, size=1, cx=2, cy=3, angle=4, color=5, jitter=6,  # 6..8 jitter rgb
    bg_type=9, bg1=10, bg2=11, bg_freq=12, bg_angle=13, bg_phase=14, bg_sharp=15,
    bg_freq2=16, bg_jitter=17,  # 17..22 jitter rgb x2
    shade_angle=23, shade_amp=24, noise_bank=25, noise_dy=26, noise_dx=27,
    noise_amp=28, template=29, bg_contrast=30, distractors=32,  # 4 slots x 7 fields = 32..59
)
_NUM_DISTRACTORS = 4
_DISTRACTOR_FIELDS = 7
_NOISE_BANK = 16

# Nuisance groups a multi-view sample can re-draw per view, as columns of the uniforms table.
# The class (`label`) is never re-drawn; `size` and `rotation` together with it are the shape's
# identity (this data set has no other within-class shape variation).
VIEW_NUISANCES: dict[str, tuple[int, ...]] = {
    "color": (_F["color"], *range(_F["jitter"], _F["jitter"] + 3), _F["shade_angle"], _F["shade_amp"]),
    "background": (*range(_F["bg_type"], _F["bg_jitter"] + 6), _F["bg_contrast"]),
    "position": (_F["cx"], _F["cy"]),
    "clutter": tuple(range(_F["distractors"], _F["distractors"] + _NUM_DISTRACTORS * _DISTRACTOR_FIELDS)),
    "noise": tuple(range(_F["noise_bank"], _F["noise_amp"] + 1)),
    "size": (_F["size"],),
    "rotation": (_F["angle"],),
}
_REDRAW_CHOICE_STREAM = 1 << 23  # uniforms stream (| view) deciding which groups a view re-draws
# Default: a new scene around the same shape instance (class, size, rotation).
DEFAULT_VIEW_NUISANCES: tuple[str, ...] = ("color", "background", "position", "clutter", "noise")


@dataclasses.dataclass(frozen=True)
class Difficulty:
  """Nuisance ranges.  Defaults were tuned so raw-pixel kNN stays weak (~30%)
  while a tiny ViT can still learn the shapes: rotation is what slows a ViT
  most (it must learn rotation invariance from data), colours, position,
  texture and clutter are what defeat raw-pixel neighbours."""
  size_range: tuple[float, float] = (0.5, 0.8)  # shape radius, in image half-widths
  max_rotation: float = 17.0  # degrees; rotation uniform in [-max, max] around a canonical pose
  position_spread: float = 1.0  # 1: anywhere the shape fits; 0: always centred
  texture_contrast: tuple[float, float] = (0.3, 1.0)  # texture blend from bg1 towards bg2
  clutter: float = 0.6  # probability of each of the 4 clutter items
  noise_range: tuple[float, float] = (2.0, 10.0)  # pixel noise std on the 0..255 scale

  def __post_init__(self):
    def pair(name: str, low: float, high: float | None) -> None:
      value = getattr(self, name)
      ok = isinstance(value, (tuple, list)) and len(value) == 2 and all(
          isinstance(v, (int, float)) for v in value)
      if not ok or not low <= value[0] <= value[1] <= (high if high is not None else float("inf")):
        bound = f"{low} <= lo <= hi" + (f" <= {high}" if high is not None else "")
        raise ValueError(f"synthetic.{name} must be a (lo, hi) pair with {bound}, got {value!r}.")

    def scalar(name: str, low: float, high: float, unit: str = "") -> None:
      value = getattr(self, name)
      if not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"synthetic.{name} must be a number in [{low}, {high}]{unit}, got {value!r}.")

    pair("size_range", 0.2, 1.0)
    scalar("max_rotation", 0, 180, " degrees")
    scalar("position_spread", 0.0, 1.0)  # beyond 1, centres leave the frame
    pair("texture_contrast", 0.0, 1.0)  # beyond 1 the blend overshoots bg2 and breaks the colour contrast
    scalar("clutter", 0.0, 1.0, " (a probability)")
    pair("noise_range", 0.0, None)


def sample_scenes(indices: np.ndarray, seed: int = 0, split: str = "train",
                  num_classes: int = len(CLASS_NAMES),
                  difficulty: Difficulty = Difficulty()) -> dict[str, np.ndarray]:
  """Scene parameters for each index: a dict of [N] / [N, k] arrays.

  Coordinates are in [-1, 1] image units (x right, y down); `size` is the
  shape's radius in the same units.
  """
  if split not in _SPLIT_IDS:
    raise ValueError(f"synthetic split must be one of {sorted(_SPLIT_IDS)}, got {split!r}.")
  if not 1 <= num_classes <= len(CLASS_NAMES):
    raise ValueError(f"synthetic.num_classes must be in [1, {len(CLASS_NAMES)}], got {num_classes}.")
  indices = np.asarray(indices, np.int64).reshape(-1)
  return _scenes_from_uniforms(indices, _uniforms(indices, seed, split), num_classes, difficulty)


def sample_view_scenes(indices, view: int, seed: int = 0, split: str = "train",
                       num_classes: int = len(CLASS_NAMES), difficulty: Difficulty = Difficulty(),
                       nuisances: tuple[str, ...] = DEFAULT_VIEW_NUISANCES,
                       redraw_p: float = 1.0) -> dict[str, np.ndarray]:
  """Scene parameters of view `view` of each index (as `sample_scenes`).

  View 0 is the data set's own scene; view v > 0 keeps its class and every
  field outside `nuisances` (groups of `VIEW_NUISANCES`) and re-draws those from
  an independent stream of (seed, split, index, v): the same shape placed in a
  new scene. With `redraw_p` < 1 each listed group of each view is re-drawn
  only with that probability (else it keeps view 0's values).

  Groups are coupled through the scene's constraints, so re-drawing one can
  change fields of another: a new shape colour re-picks background and
  clutter colours that no longer contrast with it (measured: the background
  changes in 67-85% of views when only "color" is re-drawn), and a new size
  moves the shape (its position range depends on the size). The default
  groups re-draw colour and background together, so they are unaffected.
  """
  unknown = sorted(set(nuisances) - set(VIEW_NUISANCES))
  if unknown:
    raise ValueError(f"unknown synthetic view nuisance(s) {unknown}; choose from {sorted(VIEW_NUISANCES)}.")
  if view < 0:
    raise ValueError(f"synthetic view index must be >= 0, got {view}.")
  if not 0.0 <= redraw_p <= 1.0:
    raise ValueError(f"synthetic view redraw_p must be a probability in [0, 1], got {redraw_p}.")
  scene = sample_scenes(indices, seed, split, num_classes, difficulty)  # validates the arguments
  if view == 0 or not nuisances:
    return scene
  index = scene["index"]
  u = _uniforms(index, seed, split)
  fresh = _uniforms(index, seed, split, stream=view)
  # Which groups this view re-draws: one more independent uniform per (index, view, group).
  chosen = _uniforms(index, seed, split, stream=view | _REDRAW_CHOICE_STREAM) < redraw_p
  for g, group in enumerate(VIEW_NUISANCES):
    if group in nuisances:
      columns = list(VIEW_NUISANCES[group])
      u[:, columns] = np.where(chosen[:, g:g + 1], fresh[:, columns], u[:, columns])
  return _scenes_from_uniforms(index, u, num_classes, difficulty)


def _scenes_from_uniforms(indices: np.ndarray, u: np.ndarray, num_classes: int,
                          difficulty: Difficulty) -> dict[str, np.ndarray]:
  f = _F
  n = len(indices)
  scene: dict[str, np.ndarray] = {"index": indices}
  scene["label"] = np.minimum((u[:, f["label"]] * num_classes).astype(np.int64), num_classes - 1)
  dif = difficulty
  size = dif.size_range[0] + (dif.size_range[1] - dif.size_range[0]) * u[:, f["size"]]
  scene["size"] = size
  scene["size_frac"] = u[:, f["size"]]  # position within the size range, for captions
  # Keep the shape (mostly) inside the frame.
  margin = 1.0 - 0.85 * size
  scene["cx"] = (2 * u[:, f["cx"]] - 1) * margin * dif.position_spread
  scene["cy"] = (2 * u[:, f["cy"]] - 1) * margin * dif.position_spread
  scene["angle"] = (2 * u[:, f["angle"]] - 1) * np.deg2rad(dif.max_rotation)
  color = np.minimum((u[:, f["color"]] * _NUM_COLORS).astype(np.int64), _NUM_COLORS - 1)
  scene["color"] = color
  jit = lambda k, width=3: (2 * u[:, k:k + width] - 1) * _COLOR_JITTER
  scene["rgb"] = _RGB[color] + jit(f["jitter"])
  scene["bg_type"] = np.minimum((u[:, f["bg_type"]] * len(BACKGROUND_NAMES)).astype(np.int64),
                                len(BACKGROUND_NAMES) - 1)
  bg1 = _pick(u[:, f["bg1"]], _ALLOWED_BG1[color])
  bg2 = _pick(u[:, f["bg2"]], _ALLOWED_BG2[color, bg1])
  scene["bg1"], scene["bg2"] = bg1, bg2
  scene["bg1_rgb"] = _RGB[bg1] + jit(f["bg_jitter"])
  scene["bg2_rgb"] = _RGB[bg2] + jit(f["bg_jitter"] + 3)
  scene["bg_freq"] = u[:, f["bg_freq"]]
  scene["bg_freq2"] = u[:, f["bg_freq2"]]
  scene["bg_angle"] = np.pi * u[:, f["bg_angle"]]
  scene["bg_phase"] = 2 * np.pi * u[:, f["bg_phase"]]
  scene["bg_sharp"] = u[:, f["bg_sharp"]]
  lo, hi = dif.texture_contrast
  scene["bg_contrast"] = lo + (hi - lo) * u[:, f["bg_contrast"]]
  scene["shade_angle"] = 2 * np.pi * u[:, f["shade_angle"]]
  scene["shade_amp"] = 0.25 * u[:, f["shade_amp"]]
  scene["noise_bank"] = (u[:, f["noise_bank"]] * _NOISE_BANK).astype(np.int64)
  scene["noise_dy"] = u[:, f["noise_dy"]]
  scene["noise_dx"] = u[:, f["noise_dx"]]
  scene["noise_amp"] = dif.noise_range[0] + (dif.noise_range[1] - dif.noise_range[0]) * u[:, f["noise_amp"]]
  scene["template"] = (u[:, f["template"]] * len(CAPTION_TEMPLATES)).astype(np.int64)
  d = u[:, f["distractors"]:f["distractors"] + _NUM_DISTRACTORS * _DISTRACTOR_FIELDS]
  d = d.reshape(n, _NUM_DISTRACTORS, _DISTRACTOR_FIELDS)
  scene["dis_present"] = d[..., 0] < dif.clutter
  scene["dis_x"] = 2 * d[..., 1] - 1
  scene["dis_y"] = 2 * d[..., 2] - 1
  scene["dis_len"] = d[..., 3]
  scene["dis_angle"] = np.pi * d[..., 4]
  # Clutter never takes the shape's colour, so it cannot extend its silhouette.
  k = np.minimum((d[..., 5] * (_NUM_COLORS - 1)).astype(np.int64), _NUM_COLORS - 2)
  dis_color = k + (k >= color[:, None])
  scene["dis_rgb"] = _RGB[dis_color]
  scene["dis_size"] = d[..., 6]
  return scene


# ----------------------------------------------------------------------------
# Signed distance functions in shape-local units (the shape radius is ~1).
# Negative inside.  Inputs u, v: [n, H, W] float32.
# ----------------------------------------------------------------------------
def _sd_circle(u, v, r):
  return np.sqrt(u * u + v * v) - r


def _sd_box(u, v, bx, by):
  dx = np.abs(u) - bx
  dy = np.abs(v) - by
  outside = np.sqrt(np.maximum(dx, 0) ** 2 + np.maximum(dy, 0) ** 2)
  return outside + np.minimum(np.maximum(dx, dy), 0)


def _fold(u, v, n):
  """Polar fold into the half-sector [0, pi/n] of an n-fold symmetric shape."""
  seg = 2 * np.pi / n
  phi = np.mod(np.arctan2(v, u) + seg / 2, seg) - seg / 2
  rho = np.sqrt(u * u + v * v)
  return rho * np.cos(phi), np.abs(rho * np.sin(phi))


def _sd_polygon(u, v, n, r):
  """Regular n-gon with circumradius r; an edge (not a vertex) faces +u."""
  qx, qy = _fold(u, v, n)
  dx = qx - r * np.cos(np.pi / n)
  dy = np.maximum(qy - r * np.sin(np.pi / n), 0)
  return np.where(dx > 0, np.sqrt(dx * dx + dy * dy), dx)


def _sd_star(u, v, n, r_outer, r_inner):
  qx, qy = _fold(u, v, n)
  ex = r_inner * np.cos(np.pi / n) - r_outer
  ey = r_inner * np.sin(np.pi / n)
  wx, wy = qx - r_outer, qy
  t = np.clip((wx * ex + wy * ey) / (ex * ex + ey * ey), 0, 1)
  dist = np.sqrt((wx - ex * t) ** 2 + (wy - ey * t) ** 2)
  return np.where(ex * wy - ey * wx > 0, -dist, dist)


def _sd_heart(u, v):
  s = 0.6
  v = v + 0.146 * s  # centre the bounding box
  c = np.float32(np.sqrt(0.5))
  diamond = _sd_box((u + v) * c, (v - u) * c, s, s)
  lobe_l = _sd_circle(u + s * c, v - s * c, s)
  lobe_r = _sd_circle(u - s * c, v - s * c, s)
  return np.minimum(diamond, np.minimum(lobe_l, lobe_r))


def _sd_arrow(u, v):
  shaft = _sd_box(u + 0.35, v, 0.55, 0.18)
  head = _sd_polygon(0.4 - u, v, 3, 0.6)  # flip u so a vertex points along +u
  return np.minimum(shaft, head)


_SHAPE_SDFS = (
    lambda u, v: _sd_circle(u, v, 0.9),
    lambda u, v: _sd_box(u, v, 0.78, 0.78),
    lambda u, v: _sd_polygon(u, v, 3, 1.1),
    lambda u, v: _sd_star(u, v, 5, 1.1, 0.45),
    lambda u, v: np.minimum(_sd_box(u, v, 1.0, 0.3), _sd_box(u, v, 0.3, 1.0)),
    lambda u, v: np.abs(np.sqrt(u * u + v * v) - 0.7) - 0.25,
    lambda u, v: _sd_polygon(u, v, 6, 0.95),
    _sd_heart,
    _sd_arrow,
    lambda u, v: np.maximum(_sd_circle(u, v, 0.95), -_sd_circle(u - 0.45, v, 0.75)),
)
assert len(_SHAPE_SDFS) == len(CLASS_NAMES)


def _coverage(sdf: np.ndarray, pixels_per_unit: float) -> np.ndarray:
  """Anti-aliased coverage in [0, 1] from a signed distance in image units."""
  return np.clip(0.5 - sdf * pixels_per_unit, 0.0, 1.0)


_GRIDS: dict[int, tuple[np.ndarray, np.ndarray]] = {}
_NOISE: dict[tuple[int, int], np.ndarray] = {}
_CACHE_LOCK = threading.Lock()


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
  """Pixel-centre coordinates in [-1, 1]: ys [1, H, 1], xs [1, 1, W]."""
  with _CACHE_LOCK:
    if size not in _GRIDS:
      c = ((np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1)
      _GRIDS[size] = c.reshape(1, size, 1), c.reshape(1, 1, size)
    return _GRIDS[size]


def _noise_bank(seed: int, size: int) -> np.ndarray:
  """[_NOISE_BANK, 2H, 2W, 3] unit Gaussian noise; images take random windows."""
  with _CACHE_LOCK:
    key = (seed, size)
    if key not in _NOISE:
      rng = np.random.default_rng([seed & 0xFFFFFFFF, 0x5EED])
      _NOISE[key] = rng.standard_normal((_NOISE_BANK, 2 * size, 2 * size, 3), np.float32)
    return _NOISE[key]


def _background(scene: dict[str, np.ndarray], size: int) -> np.ndarray:
  """Texture weights in [0, 1], [N, H, W]: 0 -> bg1 colour, 1 -> bg2 colour."""
  ys, xs = _grid(size)
  n = len(scene["index"])
  col = lambda k: scene[k].astype(np.float32)[:, None, None]
  angle, phase, sharp = col("bg_angle"), col("bg_phase"), col("bg_sharp")
  along = xs * np.cos(angle) + ys * np.sin(angle)
  across = -xs * np.sin(angle) + ys * np.cos(angle)
  out = np.empty((n, size, size), np.float32)
  kind = scene["bg_type"]
  for t in range(len(BACKGROUND_NAMES)):
    m = kind == t
    if not m.any():
      continue
    a, b, ph, sh = along[m], across[m], phase[m], sharp[m]
    f1, f2 = col("bg_freq")[m], col("bg_freq2")[m]
    if t == 0:  # stripes: 3-8 periods across the image, soft to hard edges
      w = np.sin(np.pi * (3 + 5 * f1) * a + ph)
    elif t == 1:  # checkerboard: small cells, so no cell looks like a square shape
      w = np.sin(np.pi * (4 + 4 * f1) * a + ph) * np.sin(np.pi * (4 + 4 * f2) * b + ph)
      w = w * 2
    elif t == 2:  # mottled: a few random plane waves
      w = (np.sin(np.pi * (1 + 3 * f1) * a + ph) + np.sin(np.pi * (1 + 3 * f2) * b - 2 * ph)
           + np.sin(np.pi * (2 + 2 * sh) * (a + b) + 3 * ph)) / 1.5
    else:  # linear gradient
      w = a * (0.8 + 0.6 * f1) + (f2 - 0.5)
    out[m] = np.clip(0.5 + 0.5 * w * (1 + 3 * sh), 0.0, 1.0)
  return out * col("bg_contrast")


def render_scenes(scene: dict[str, np.ndarray], size: int = 32, seed: int = 0) -> np.ndarray:
  """Render sampled scenes to uint8 images [N, size, size, 3]."""
  if size < 8:
    raise ValueError(f"synthetic.image_size must be >= 8 pixels, got {size}.")
  ys, xs = _grid(size)
  ppu = size / 2.0  # pixels per image unit
  n = len(scene["index"])
  f32 = lambda a: np.asarray(a, np.float32)

  w = _background(scene, size)[..., None]
  img = f32(scene["bg1_rgb"])[:, None, None, :] * (1 - w) + f32(scene["bg2_rgb"])[:, None, None, :] * w

  # Clutter: slots 0-1 thin lines, 2 dots, 3 blobs, all well below shape size.
  for slot in range(_NUM_DISTRACTORS):
    present = scene["dis_present"][:, slot]
    if not present.any():
      continue
    x0 = f32(scene["dis_x"][present, slot])[:, None, None]
    y0 = f32(scene["dis_y"][present, slot])[:, None, None]
    dsize = f32(scene["dis_size"][present, slot])[:, None, None]
    if slot < 2:
      half = (0.15 + 0.25 * f32(scene["dis_len"][present, slot]))[:, None, None]
      ang = f32(scene["dis_angle"][present, slot])[:, None, None]
      ex, ey = np.cos(ang), np.sin(ang)
      px, py = xs - x0, ys - y0
      t = np.clip(px * ex + py * ey, -half, half)
      sdf = np.sqrt((px - t * ex) ** 2 + (py - t * ey) ** 2) - (0.03 + 0.03 * dsize)
    elif slot == 2:
      sdf = _sd_circle(xs - x0, ys - y0, 0.06 + 0.05 * dsize)
    else:
      ang = f32(scene["dis_angle"][present, slot])[:, None, None]
      px, py = xs - x0, ys - y0
      u = (px * np.cos(ang) + py * np.sin(ang)) / (1.6 + dsize)
      v = -px * np.sin(ang) + py * np.cos(ang)
      sdf = _sd_circle(u, v, 0.08)
    a = _coverage(sdf, ppu)[..., None]
    img[present] = img[present] * (1 - a) + f32(scene["dis_rgb"][present, slot])[:, None, None, :] * a

  # The class shape, with a mild lighting gradient across it.
  size_ = f32(scene["size"])[:, None, None]
  ang = f32(scene["angle"])[:, None, None]
  px, py = xs - f32(scene["cx"])[:, None, None], ys - f32(scene["cy"])[:, None, None]
  cos, sin = np.cos(ang), np.sin(ang)
  u = (px * cos + py * sin) / size_
  v = (-px * sin + py * cos) / size_
  sdf = np.empty((n, size, size), np.float32)
  for c in np.unique(scene["label"]):
    m = scene["label"] == c
    sdf[m] = _SHAPE_SDFS[c](u[m], v[m])
  alpha = _coverage(sdf * size_, ppu)[..., None]
  shade_ang = f32(scene["shade_angle"])[:, None, None]
  shade = 1 + f32(scene["shade_amp"])[:, None, None] * (u * np.cos(shade_ang) + v * np.sin(shade_ang))
  fill = f32(scene["rgb"])[:, None, None, :] * np.clip(shade, 0.7, 1.3)[..., None]
  img = img * (1 - alpha) + fill * alpha

  # Pixel noise from a fixed bank (cheap, and still a pure function of the index).
  bank = _noise_bank(seed, size)
  oy = (scene["noise_dy"] * size).astype(np.int64)[:, None, None] + np.arange(size)[None, :, None]
  ox = (scene["noise_dx"] * size).astype(np.int64)[:, None, None] + np.arange(size)[None, None, :]
  img += bank[scene["noise_bank"][:, None, None], oy, ox] * f32(scene["noise_amp"])[:, None, None, None]
  return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def _position_name(cx: float, cy: float) -> str:
  col = 0 if cx < -0.2 else (2 if cx > 0.2 else 1)
  row = 0 if cy < -0.2 else (2 if cy > 0.2 else 1)
  return POSITION_NAMES[3 * row + col]


def caption(scene: dict[str, np.ndarray], i: int) -> str:
  """Caption of the i-th scene in `scene`, from its attributes."""
  fields = dict(
      size=SIZE_NAMES[min(int(scene["size_frac"][i] * 3), 2)],
      color=COLOR_NAMES[scene["color"][i]],
      shape=CLASS_NAMES[scene["label"][i]],
      pattern=BACKGROUND_NAMES[scene["bg_type"][i]],
      bg_color=COLOR_NAMES[scene["bg1"][i]],
      bg2_color=COLOR_NAMES[scene["bg2"][i]],
      position=_position_name(scene["cx"][i], scene["cy"][i]),
  )
  text = CAPTION_TEMPLATES[scene["template"][i]].format(**fields)
  return re.sub(r"\ba (?=[aeiou])", "an ", text)


def render(indices, seed: int = 0, split: str = "train", image_size: int = 32,
           num_classes: int = len(CLASS_NAMES), difficulty: Difficulty = Difficulty()
           ) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """Images [N, S, S, 3] uint8, labels [N] int64 and captions for `indices`."""
  scene = sample_scenes(indices, seed, split, num_classes, difficulty)
  images = render_scenes(scene, image_size, seed)
  captions = [caption(scene, i) for i in range(len(scene["index"]))]
  return images, scene["label"], captions


_AUTO_CACHE_BYTES = 2 << 30


class SyntheticShapes:
  """grain RandomAccessDataSource over the procedural shapes.

  Records: ``dict(image=uint8 [S, S, 3], label=int, caption=str, id=int)``.
  Images render in blocks of `block_size` consecutive indices (vectorised) and
  are kept in memory when `cache` is true (None: when the whole split takes at
  most `_AUTO_CACHE_BYTES`); otherwise each record renders on its own.  The
  cache is per process and is not pickled into grain workers.
  """

  def __init__(self, num_records: int, seed: int = 0, split: str = "train",
               image_size: int = 32, num_classes: int = len(CLASS_NAMES),
               difficulty: Difficulty = Difficulty(), cache: bool | None = None,
               block_size: int = 256):
    if num_records <= 0:
      raise ValueError(f"synthetic data set needs num_records > 0, got {num_records}.")
    # Checked here, not at the first read inside a loader thread.
    if int(image_size) < 8:
      raise ValueError(f"synthetic.image_size must be >= 8 pixels, got {image_size}.")
    if int(block_size) < 1:
      raise ValueError(f"synthetic block_size must be >= 1 record, got {block_size}.")
    sample_scenes(np.zeros(1, np.int64), seed, split, num_classes)  # validates arguments
    self.difficulty = difficulty
    self.num_records = int(num_records)
    self.seed = int(seed)
    self.split = split
    self.image_size = int(image_size)
    self.num_classes = int(num_classes)
    self.class_names = CLASS_NAMES[:num_classes]
    self.caption_templates = CAPTION_TEMPLATES
    self.zeroshot_templates = ZEROSHOT_TEMPLATES
    if cache is None:
      cache = num_records * image_size * image_size * 3 <= _AUTO_CACHE_BYTES
    self.cache = bool(cache)
    self.block_size = block_size
    self._blocks: dict[int, tuple[np.ndarray, np.ndarray, list[str]]] = {}
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return self.num_records

  def __repr__(self) -> str:
    return (f"SyntheticShapes(num_records={self.num_records}, seed={self.seed}, "
            f"split={self.split!r}, image_size={self.image_size}, num_classes={self.num_classes})")

  def __getstate__(self) -> dict[str, Any]:
    state = self.__dict__.copy()
    state["_blocks"] = {}
    del state["_lock"]
    return state

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def _render(self, indices: np.ndarray):
    return render(indices, self.seed, self.split, self.image_size, self.num_classes,
                  self.difficulty)

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < self.num_records:
      raise IndexError(f"index {index} out of range for {self.num_records} synthetic records")
    if self.cache:
      block, offset = divmod(index, self.block_size)
      with self._lock:
        if block not in self._blocks:
          start = block * self.block_size
          stop = min(start + self.block_size, self.num_records)
          self._blocks[block] = self._render(np.arange(start, stop))
        images, labels, captions = self._blocks[block]
    else:
      (images, labels, captions), offset = self._render(np.array([index])), 0
    return dict(image=images[offset], label=int(labels[offset]),
                caption=captions[offset], id=index)


def render_views(indices, num_views: int, seed: int = 0, split: str = "train", image_size: int = 32,
                 num_classes: int = len(CLASS_NAMES), difficulty: Difficulty = Difficulty(),
                 nuisances: tuple[str, ...] = DEFAULT_VIEW_NUISANCES, redraw_p: float = 1.0
                 ) -> tuple[np.ndarray, np.ndarray]:
  """`num_views` renderings of each index (see `sample_view_scenes`): images [N, V, S, S, 3] uint8, labels [N].

  View 0 is the index's ordinary image (`render`).
  """
  if num_views < 1:
    raise ValueError(f"synthetic views need num_views >= 1, got {num_views}.")
  scenes = [sample_view_scenes(indices, v, seed, split, num_classes, difficulty, nuisances, redraw_p)
            for v in range(num_views)]
  n = len(scenes[0]["index"])
  # View-major concatenation renders all N * V scenes in one vectorised call.
  stacked = {k: np.concatenate([s[k] for s in scenes]) for k in scenes[0]}
  images = render_scenes(stacked, image_size, seed).reshape(num_views, n, image_size, image_size, 3)
  return images.transpose(1, 0, 2, 3, 4), scenes[0]["label"]


class SyntheticViews:
  """grain RandomAccessDataSource: several renderings of each record of a `SyntheticShapes` source.

  Records: ``dict(views=uint8 [V, S, S, 3], label=int, id=int)``; view 0 is the
  base record's image, views 1.. show the same shape (class, and size/rotation
  unless listed in `nuisances`) in a new scene (re-drawn `nuisances`).  This is
  the self-supervised multi-crop input (`MultiCrop` cuts crop k from view
  k mod V): on this tiny data set it plays the part that colour jitter and
  random crops of large photographs play in the recipe.  Views render per
  record (V scenes in one vectorised call; at 32 px about 2 ms per view on a
  busy 2-core host, the per-call overhead dominating, vs ~0.4 ms per image
  for `render` in blocks); nothing is cached.
  """

  def __init__(self, base: SyntheticShapes, num_views: int,
               nuisances: tuple[str, ...] = DEFAULT_VIEW_NUISANCES, redraw_p: float = 1.0):
    if int(num_views) < 2:
      raise ValueError(f"synthetic views need num_views >= 2 (1 is the plain data set), got {num_views}.")
    sample_view_scenes(np.zeros(1, np.int64), 1, base.seed, base.split, base.num_classes,
                       base.difficulty, tuple(nuisances), float(redraw_p))  # validates the groups and p
    self.base = base
    self.num_views = int(num_views)
    self.nuisances = tuple(nuisances)
    self.redraw_p = float(redraw_p)
    self.num_classes = base.num_classes
    self.class_names = base.class_names

  def __len__(self) -> int:
    return len(self.base)

  def __repr__(self) -> str:
    return (f"SyntheticViews({self.base!r}, num_views={self.num_views}, nuisances={self.nuisances}, "
            f"redraw_p={self.redraw_p})")

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < len(self.base):
      raise IndexError(f"index {index} out of range for {len(self.base)} synthetic records")
    b = self.base
    views, labels = render_views(np.array([index]), self.num_views, b.seed, b.split, b.image_size,
                                 b.num_classes, b.difficulty, self.nuisances, self.redraw_p)
    return dict(views=views[0], label=int(labels[0]), id=index)
