"""The procedural shapes data set: determinism, geometry, captions, difficulty."""
import pickle
import re

import ml_collections
import numpy as np
import pytest
from matplotlib.path import Path

from lvm_jax.data import synthetic as S


def test_same_seed_same_bytes_and_order_independent():
  a, la, ca = S.render(np.arange(40), seed=3)
  b, lb, cb = S.render(np.arange(40), seed=3)
  assert a.dtype == np.uint8 and a.shape == (40, 32, 32, 3)
  assert a.tobytes() == b.tobytes() and (la == lb).all() and ca == cb
  # An image depends only on its own index, not on what it was rendered with.
  single, _, cap = S.render(np.array([17]), seed=3)
  shuffled, _, _ = S.render(np.array([39, 17, 2]), seed=3)
  assert single[0].tobytes() == a[17].tobytes() == shuffled[1].tobytes()
  assert cap[0] == ca[17]


def test_different_index_seed_split_give_different_images():
  a, _, _ = S.render(np.arange(50), seed=0)
  flat = a.reshape(50, -1)
  assert len({row.tobytes() for row in flat}) == 50
  b, _, _ = S.render(np.arange(50), seed=1)
  c, _, _ = S.render(np.arange(50), seed=0, split="eval")
  assert all((a[i] != b[i]).any() and (a[i] != c[i]).any() for i in range(50))


def test_source_records_cache_and_pickle():
  src = S.SyntheticShapes(300, seed=5, block_size=64)
  nocache = S.SyntheticShapes(300, seed=5, cache=False)
  for i in (0, 63, 64, 299):
    r, q = src[i], nocache[i]
    assert r["id"] == i and isinstance(r["label"], int) and isinstance(r["caption"], str)
    assert r["image"].tobytes() == q["image"].tobytes() and r["label"] == q["label"]
  clone = pickle.loads(pickle.dumps(src))
  assert clone._blocks == {}  # the render cache stays in the parent process
  assert clone[100]["image"].tobytes() == src[100]["image"].tobytes()
  assert len(src) == 300 and src.num_classes == 10 and src.class_names == S.CLASS_NAMES
  with pytest.raises(IndexError):
    src[300]


def test_difficulty_validation_and_auto_cache():
  with pytest.raises(ValueError, match="max_rotation"):
    S.Difficulty(max_rotation=400)
  with pytest.raises(ValueError, match="size_range"):
    S.Difficulty(size_range=(0.9, 0.5))
  # Each of these was accepted and broke a stated property (colour contrast, centres in the frame)
  # or failed later with a raw TypeError.
  for field, value in [("texture_contrast", (0.0, 3.0)), ("position_spread", 3.0), ("clutter", -1.0),
                       ("noise_range", (5.0, 1.0)), ("size_range", 0.6)]:
    with pytest.raises(ValueError, match=f"synthetic.{field} must be"):
      S.Difficulty(**{field: value})
  from lvm_jax.data import build_source
  cfg = ml_collections.ConfigDict({"source": "synthetic", "image_size": 16,
                                   "synthetic": {"size_range": 0.6, "num_train": 8}})
  with pytest.raises(ValueError, match=r"synthetic.size_range must be a \(lo, hi\) pair"):
    build_source(cfg, "train")
  # Accepted at construction and failed only at the first read, inside a loader thread.
  with pytest.raises(ValueError, match="image_size must be >= 8"):
    S.SyntheticShapes(10, image_size=4)
  with pytest.raises(ValueError, match="block_size must be >= 1"):
    S.SyntheticShapes(10, block_size=0)
  assert S.SyntheticShapes(1000).cache
  assert not S.SyntheticShapes(10_000_000, image_size=64).cache  # 123 GB: render per record


def test_image_size_and_num_classes():
  imgs, labels, _ = S.render(np.arange(200), image_size=64, num_classes=4)
  assert imgs.shape == (200, 64, 64, 3)
  assert set(labels.tolist()) == {0, 1, 2, 3}
  with pytest.raises(ValueError, match="num_classes"):
    S.render(np.arange(2), num_classes=11)


def test_labels_are_balanced():
  labels = S.sample_scenes(np.arange(5000))["label"]
  counts = np.bincount(labels, minlength=10)
  assert counts.min() > 400 and counts.max() < 600  # ~500 each, binomial noise


def test_captions_name_the_class_and_differ_from_zeroshot_templates():
  _, labels, caps = S.render(np.arange(300))
  for label, cap in zip(labels, caps):
    words = set(re.findall(r"[a-z]+", cap))
    # exactly one class name appears: the caption identifies the shape
    assert words & set(S.CLASS_NAMES) == {S.CLASS_NAMES[label]}, cap
  assert len(set(caps)) > 250  # several phrasings and attributes
  used = {t for t in S.CAPTION_TEMPLATES}
  for z in S.ZEROSHOT_TEMPLATES:
    prefix = z.split("{}")[0].strip()
    assert not any(t.startswith(prefix) for t in used)
  assert not any(" a a" in c or " a o" in c or c.startswith("a a") for c in caps)  # articles


# --- geometry: signed distances against independent references ----------------------
def _regular_polygon(n, r, offset):
  t = offset + 2 * np.pi * np.arange(n) / n
  return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _point_segment_distance(p, a, b):
  ab = b - a
  t = np.clip(((p - a) @ ab) / (ab @ ab), 0, 1)
  return np.linalg.norm(p - (a + t[:, None] * ab), axis=1)


def _polygon_reference(points, verts):
  inside = Path(verts).contains_points(points)
  dist = np.min([_point_segment_distance(points, verts[i], verts[(i + 1) % len(verts)])
                 for i in range(len(verts))], axis=0)
  return np.where(inside, -dist, dist)


@pytest.mark.parametrize("n", [3, 5, 6])
def test_polygon_sdf_matches_brute_force(n):
  rng = np.random.default_rng(n)
  pts = rng.uniform(-1.5, 1.5, (4000, 2)).astype(np.float32)
  # Vertices sit at pi/n, 3pi/n, ... so that an edge faces +x.
  verts = _regular_polygon(n, 1.0, np.pi / n)
  ref = _polygon_reference(pts, verts)
  got = S._sd_polygon(pts[:, 0], pts[:, 1], n, 1.0)
  np.testing.assert_allclose(got, ref, atol=1e-4)


def test_star_sdf_sign_matches_point_in_polygon():
  rng = np.random.default_rng(0)
  pts = rng.uniform(-1.3, 1.3, (6000, 2)).astype(np.float32)
  outer = _regular_polygon(5, 1.1, 0.0)
  inner = _regular_polygon(5, 0.45, np.pi / 5)
  verts = np.stack([outer, inner], 1).reshape(10, 2)
  ref = _polygon_reference(pts, verts)
  got = S._sd_star(pts[:, 0], pts[:, 1], 5, 1.1, 0.45)
  far = np.abs(ref) > 1e-3
  assert (np.sign(got[far]) == np.sign(ref[far])).all()
  # Exact distance wherever the nearest edge is the one in the point's own sector.
  assert np.mean(np.abs(got - ref) < 1e-4) > 0.9


def test_rendered_circle_area_matches_analytic():
  """A clean scene (no texture/clutter/noise): shape pixel count = pi r^2 within AA error."""
  clean = S.Difficulty(texture_contrast=(0.0, 0.0), clutter=0.0, noise_range=(0.0, 0.0),
                       position_spread=0.0)
  scene = S.sample_scenes(np.arange(400), seed=0, num_classes=1, difficulty=clean)
  imgs = S.render_scenes(scene, size=64).astype(np.float32)
  for i in range(0, 400, 40):
    bg = scene["bg1_rgb"][i]
    fg = scene["rgb"][i]
    # fraction of the way from background to (approximately shaded) fill, per pixel
    d = np.linalg.norm(imgs[i] - bg, axis=-1) / np.linalg.norm(fg - bg)
    area_px = (d > 0.5).sum()
    radius_px = 0.9 * scene["size"][i] * 32
    assert abs(area_px - np.pi * radius_px ** 2) < 2 * np.pi * radius_px + 4


def test_shapes_contrast_with_every_background_blend():
  scene = S.sample_scenes(np.arange(3000))
  t = np.linspace(0, 1, 11)[None, :, None]
  blends = scene["bg1_rgb"][:, None] * (1 - t) + scene["bg2_rgb"][:, None] * t
  dist = np.linalg.norm(blends - scene["rgb"][:, None], axis=-1).min(axis=1)
  # palette colours are >= 140 apart along the blend; jitter moves each colour by <= 12*sqrt(3)
  assert dist.min() > S._MIN_CONTRAST - 2 * 12 * np.sqrt(3)


# --- difficulty ----------------------------------------------------------------------
def _knn_accuracies(train_x, train_y, test_x, test_y, ks):
  out = {}
  for metric in ("l2", "cosine"):
    a = train_x.reshape(len(train_x), -1).astype(np.float32)
    b = test_x.reshape(len(test_x), -1).astype(np.float32)
    if metric == "cosine":
      a = a - a.mean(1, keepdims=True)
      b = b - b.mean(1, keepdims=True)
      a /= np.linalg.norm(a, axis=1, keepdims=True)
      b /= np.linalg.norm(b, axis=1, keepdims=True)
      dist = -b @ a.T
    else:
      dist = (b ** 2).sum(1)[:, None] - 2 * b @ a.T + (a ** 2).sum(1)[None]
    neighbours = train_y[np.argsort(dist, axis=1)[:, :max(ks)]]
    for k in ks:
      votes = np.stack([(neighbours[:, :k] == c).sum(1) for c in range(10)], 1)
      out[(metric, k)] = float((votes.argmax(1) == test_y).mean())
  return out


def test_raw_pixel_knn_is_near_chance():
  train_x, train_y, _ = S.render(np.arange(5000))
  test_x, test_y, _ = S.render(np.arange(1000), split="eval")
  accs = _knn_accuracies(train_x, train_y, test_x, test_y, ks=range(1, 21))
  assert max(accs.values()) <= 0.40, max(accs.items(), key=lambda kv: kv[1])
  # ... but the labels are not noise: a clean, centred, upright version is easy for kNN,
  # which shows that the shapes themselves carry the label.
  easy = S.Difficulty(texture_contrast=(0.0, 0.0), clutter=0.0, noise_range=(0.0, 0.0),
                      position_spread=0.0, max_rotation=0.0, size_range=(0.7, 0.7))
  scene = S.sample_scenes(np.arange(1200), difficulty=easy)
  imgs = S.render_scenes(scene)
  # Colours still vary, so compare binarised shape masks (distance from the background).
  mask = (np.linalg.norm(imgs.astype(np.float32) - scene["bg1_rgb"][:, None, None], axis=-1) > 60)
  accs = _knn_accuracies(mask[:1000, ..., None], scene["label"][:1000],
                         mask[1000:, ..., None], scene["label"][1000:], ks=[1])
  assert accs[("l2", 1)] > 0.95


# ---------------------------------------------------------------------------- multi-view samples


def test_views_share_the_shape_instance_and_redraw_the_nuisances():
  idx = np.arange(60)
  base = S.sample_scenes(idx, seed=2)
  images, labels = S.render_views(idx, 3, seed=2)
  assert images.shape == (60, 3, 32, 32, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(images[:, 0], S.render(idx, seed=2)[0])  # view 0: the data set's image
  np.testing.assert_array_equal(labels, base["label"])
  for v in (1, 2):
    view = S.sample_view_scenes(idx, v, seed=2)
    for kept in ("label", "size", "angle", "template"):
      np.testing.assert_array_equal(view[kept], base[kept])
    # Re-drawn: continuous fields differ everywhere, categorical ones mostly (12 colours, 4 textures).
    for redrawn in ("cx", "cy", "bg_phase", "noise_amp", "shade_amp", "dis_x"):
      assert (view[redrawn] != base[redrawn]).all(), redrawn
    assert (view["color"] != base["color"]).mean() > 0.7 and (view["bg_type"] != base["bg_type"]).mean() > 0.5
    assert all((images[i, v] != images[i, 0]).mean() > 0.5 for i in range(60))
  # Shape colour always contrasts with the (re-drawn) background, as in the data set itself.
  view = S.sample_view_scenes(idx, 1, seed=2)
  assert S._ALLOWED_BG2[view["color"], view["bg1"], view["bg2"]].all()
  # Size and rotation are re-drawn only on request; position is kept when not listed.
  both = S.sample_view_scenes(idx, 1, seed=2, nuisances=("size", "rotation"))
  assert (both["size"] != base["size"]).all() and (both["angle"] != base["angle"]).all()
  np.testing.assert_array_equal(both["color"], base["color"])
  np.testing.assert_array_equal(both["bg_phase"], base["bg_phase"])
  with pytest.raises(ValueError, match="unknown synthetic view nuisance"):
    S.sample_view_scenes(idx, 1, nuisances=("colour",))


def test_views_are_a_pure_function_of_seed_and_index():
  a, la = S.render_views(np.arange(30), 4, seed=1)
  b, _ = S.render_views(np.arange(30), 4, seed=1)
  assert a.tobytes() == b.tobytes()
  single, ls = S.render_views(np.array([17]), 4, seed=1)
  np.testing.assert_array_equal(single[0], a[17])
  assert ls[0] == la[17]
  other, _ = S.render_views(np.arange(30), 4, seed=3)
  assert all((other[i, 1] != a[i, 1]).any() for i in range(30))
  # View v is the same whatever the number of views rendered with it.
  np.testing.assert_array_equal(S.render_views(np.arange(30), 2, seed=1)[0], a[:, :2])


def test_views_source_records_and_errors():
  base = S.SyntheticShapes(50, seed=4, image_size=16)
  src = S.SyntheticViews(base, 3)
  r = src[7]
  assert set(r) == {"views", "label", "id"} and r["id"] == 7 and r["label"] == base[7]["label"]
  assert r["views"].shape == (3, 16, 16, 3)
  np.testing.assert_array_equal(r["views"][0], base[7]["image"])
  assert len(src) == 50 and src.num_classes == 10
  assert pickle.loads(pickle.dumps(src))[7]["views"].tobytes() == r["views"].tobytes()
  with pytest.raises(IndexError):
    src[50]
  with pytest.raises(ValueError, match="num_views >= 2"):
    S.SyntheticViews(base, 1)
  with pytest.raises(ValueError, match="unknown synthetic view nuisance"):
    S.SyntheticViews(base, 2, nuisances=("shape",))


def test_views_redraw_each_group_with_probability_p():
  idx = np.arange(2000)
  base = S.sample_scenes(idx)
  np.testing.assert_array_equal(S.sample_view_scenes(idx, 1, redraw_p=0.0)["cx"], base["cx"])
  view = S.sample_view_scenes(idx, 1, redraw_p=0.3)
  moved = view["cx"] != base["cx"]  # position group
  textured = view["bg_phase"] != base["bg_phase"]  # background group
  assert abs(moved.mean() - 0.3) < 0.04 and abs(textured.mean() - 0.3) < 0.04
  assert abs((moved & textured).mean() - 0.09) < 0.025  # groups are chosen independently
  np.testing.assert_array_equal(view["cy"] != base["cy"], moved)  # a group moves as a whole
  with pytest.raises(ValueError, match="redraw_p"):
    S.sample_view_scenes(idx, 1, redraw_p=1.5)
