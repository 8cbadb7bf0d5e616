"""Data sources: the embedded shapes, image folders with bad files, TFDS (mock), config errors."""
import io
import math
import os

import numpy as np
import pytest
from PIL import Image
from skimage import draw

from dino_jax import config as config_lib
from dino_jax.data import pipeline, sources
from dino_jax.data.folder import FolderSource, decode_image, list_images
from dino_jax.data.shapes import ShapesSource, max_area


def _config(**data):
  c = config_lib.base_config()
  c.batch_size = 8
  c.data.update(data)
  return c


# ----------------------------------------------------------------------------------------------
# shapes
# ----------------------------------------------------------------------------------------------
def _reference_coverage(name, p, size, n=8):
  """Coverage of the shape of params p at n x n samples a pixel, drawn independently of the
  source: polygons with skimage.draw, discs and rings from their radii."""
  c, s = math.cos(p["angle"]), math.sin(p["angle"])
  a = p["area"]
  grid = (np.arange(size * n) + 0.5) / n
  x, y = grid[None, :] - p["centre"][0], grid[:, None] - p["centre"][1]
  if name in ("disc", "ring"):
    r2 = x * x + y * y
    if name == "disc":
      inside = r2 <= a / math.pi
    else:  # outer radius R, inner R / 2: area 3/4 pi R^2
      outer2 = a / (0.75 * math.pi)
      inside = (r2 <= outer2) & (r2 >= outer2 / 4)
  else:
    if name == "square":
      h = math.sqrt(a) / 2
      verts = [(h, h), (-h, h), (-h, -h), (h, -h)]
    elif name == "triangle":  # side t, centroid at 0, a vertex along -y before rotation
      t = math.sqrt(4 * a / math.sqrt(3))
      rc = t / math.sqrt(3)
      verts = [(rc * math.cos(q), rc * math.sin(q)) for q in (-math.pi / 2, math.pi / 6,
                                                             5 * math.pi / 6)]
    else:  # cross of five w x w squares
      w = math.sqrt(a / 5)
      verts = [(1.5 * w, .5 * w), (.5 * w, .5 * w), (.5 * w, 1.5 * w), (-.5 * w, 1.5 * w),
               (-.5 * w, .5 * w), (-1.5 * w, .5 * w), (-1.5 * w, -.5 * w), (-.5 * w, -.5 * w),
               (-.5 * w, -1.5 * w), (.5 * w, -1.5 * w), (.5 * w, -.5 * w), (1.5 * w, -.5 * w)]
    # The shape is rotated by `angle` (counter-clockwise in x right, y down coordinates).
    xy = np.array([(p["centre"][0] + c * u - s * v, p["centre"][1] + s * u + c * v)
                   for u, v in verts]) * n - 0.5
    inside = np.zeros((size * n, size * n), bool)
    rr, cc = draw.polygon(xy[:, 1], xy[:, 0], inside.shape)
    inside[rr, cc] = True
  return inside.reshape(size, n, size, n).mean((1, 3))


def test_shapes_records_labels_balanced_and_deterministic():
  src = ShapesSource(600, "train", seed=3)
  assert (len(src), src.num_classes, src.has_labels, src.has_masks) == (600, 6, True, True)
  labels = np.array([src[i]["label"] for i in range(600)])
  assert np.bincount(labels).tolist() == [100] * 6
  r = src[17]
  assert r["image"].shape == (32, 32, 3) and r["image"].dtype == np.uint8
  assert r["object_mask"].shape == (32, 32) and r["object_mask"].dtype == bool
  assert (r["image"][..., 0] == r["image"][..., 2]).all()  # gray, stored as RGB
  fresh = ShapesSource(600, "train", seed=3)  # other instance, other access order
  np.testing.assert_array_equal(fresh[17]["image"], r["image"])
  assert not np.array_equal(ShapesSource(600, "val", seed=3)[17]["image"], r["image"])
  assert not np.array_equal(ShapesSource(600, "train", seed=4)[17]["image"], r["image"])


def test_shapes_geometry_matches_an_independent_drawing():
  src = ShapesSource(240, "train", noise=0.0)
  ious = {name: [] for name in ("disc", "square", "triangle", "ring", "cross")}
  for i in range(240):
    p, name = src.params(i), src.classes[i % 6]
    if name in ious:
      ref = _reference_coverage(name, p, 32) >= 0.5
      mask = src[i]["object_mask"]
      ious[name].append((mask & ref).sum() / (mask | ref).sum())
  for name, v in ious.items():
    assert np.mean(v) > 0.94 and np.min(v) > 0.85, (name, np.mean(v), np.min(v))


def test_shapes_masks_cover_the_drawn_objects_exactly_and_areas_are_equal():
  src = ShapesSource(600, "train", noise=0.0)
  ratio = {c: [] for c in src.classes}
  for i in range(600):
    r, p = src[i], src.params(i)
    assert abs(p["fg"] - p["bg"]) >= 0.3
    assert 0.12 * 1024 <= p["area"] <= 0.35 * 1024
    # Noise-free pixels are bg + (fg - bg) * coverage, coverage in {0, 1/4, ..., 1}: the mask
    # must be exactly the pixels that are at least half object.
    cov = (r["image"][..., 0] / 255 - p["bg"]) / (p["fg"] - p["bg"])
    np.testing.assert_array_equal(r["object_mask"], cov > 0.375)
    ratio[src.classes[i % 6]].append(cov.sum() / p["area"])
    assert 0.9 < ratio[src.classes[i % 6]][-1] < 1.1  # wholly inside the image: none cut off
  means = {c: np.mean(v) for c, v in ratio.items()}
  assert all(abs(m - 1) < 0.02 for m in means.values()), means  # equal areas, as drawn


def test_shapes_noise_level():
  src = ShapesSource(60, "train")
  clean = ShapesSource(60, "train", noise=0.0)
  noisy = np.concatenate([src[i]["image"][..., 0].ravel() / 255 for i in range(60)])
  gray = np.concatenate([clean[i]["image"][..., 0].ravel() / 255 for i in range(60)])
  inner = (gray > 0.3) & (gray < 0.7)  # far from the clipping at 0 and 1
  assert abs((noisy - gray)[inner].std() - 0.06) < 0.004


def test_shapes_light_polarity_puts_the_lighter_level_on_the_object_only():
  """polarity 'light': the object's pixels are the lighter ones in every image; the geometry,
  labels and the pair of gray levels are the random images' (same draws, levels swapped where the
  object was the darker), and 'random' has both polarities."""
  rand, light = ShapesSource(60, "train"), ShapesSource(60, "train", polarity="light")
  lighter = []
  for i in range(60):
    r, l = rand[i], light[i]
    np.testing.assert_array_equal(r["object_mask"], l["object_mask"])
    assert r["label"] == l["label"]
    pr, pl = rand.params(i), light.params(i)
    assert {pr["fg"], pr["bg"]} == {pl["fg"], pl["bg"]} and pl["fg"] > pl["bg"]
    img, m = l["image"][..., 0].astype(float), l["object_mask"]
    assert img[m].mean() > img[~m].mean()
    img, m = r["image"][..., 0].astype(float), r["object_mask"]
    lighter.append(img[m].mean() > img[~m].mean())
  assert 15 < sum(lighter) < 45
  with pytest.raises(ValueError, match="polarity 'dark'"):
    ShapesSource(10, "train", polarity="dark")


def test_shapes_level_ranges():
  """fg_range / bg_range bound the two gray levels (noise-free pixels at full coverage read the
  level back); the default (0, 1) ranges span both levels over the whole range; levels that can
  never be min_contrast apart are refused."""
  src = ShapesSource(40, "train", fg_range=(0.7, 0.8), bg_range=(0.2, 0.3), noise=0.0)
  for i in range(40):
    p, r = src.params(i), src[i]
    assert 0.7 <= p["fg"] <= 0.8 and 0.2 <= p["bg"] <= 0.3
    cov = src.coverage(p)
    img = r["image"][..., 0] / 255
    np.testing.assert_allclose(img[cov == 1], p["fg"], atol=0.5 / 255)
    np.testing.assert_allclose(img[cov == 0], p["bg"], atol=0.5 / 255)
  default = ShapesSource(60, "train")
  for key in ("fg", "bg"):
    levels = [default.params(i)[key] for i in range(60)]
    assert min(levels) < 0.15 and max(levels) > 0.85
  with pytest.raises(ValueError, match="min_contrast"):
    ShapesSource(10, "train", fg_range=(0.4, 0.5), bg_range=(0.4, 0.5))


def test_shapes_area_limit_by_hand_and_refused_beyond():
  """max_area: a unit-area square is widest along its diagonal (sqrt 2), so it fits at every
  rotation up to half the image; a disc (diameter 2 / sqrt(pi)) up to pi / 4. At the limit every
  draw fits (boundary inside the image); past it the source refuses, naming the shapes."""
  assert max_area("square") == pytest.approx(0.5, rel=1e-4)
  assert max_area("disc") == pytest.approx(math.pi / 4, rel=1e-3)
  limit = max_area("square")
  src = ShapesSource(60, "train", classes=("square",), area=(limit, limit), noise=0.0)
  for i in range(60):  # drawn (the centre's range was not empty), and none of it cut off
    p = src.params(i)
    assert src.coverage(p).sum() == pytest.approx(p["area"], rel=0.01)
  with pytest.raises(ValueError, match=r"area=\(0.15, 0.45\).*triangle, star.*at most 0.429"):
    ShapesSource(10, "train", area=(0.15, 0.45))
  with pytest.raises(ValueError, match="0 < low <= high"):
    ShapesSource(10, "train", area=(0.3, 0.2))


# ----------------------------------------------------------------------------------------------
# Image folders.
# ----------------------------------------------------------------------------------------------
def _jpeg(img, **kw):
  buf = io.BytesIO()
  img.save(buf, "JPEG", quality=95, **kw)
  return buf.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """root/{a,b}/...: the bad and unusual files the issue lists; returns (root, expected)."""
  root = tmp_path_factory.mktemp("images")
  (root / "a" / "nested" / "deeper").mkdir(parents=True)
  (root / "b").mkdir()
  red = Image.new("RGB", (40, 30), (200, 30, 40))
  expect = {}  # relative path -> approximate mean RGB, or None for files that must be skipped

  def put(rel, data, rgb):
    (root / rel).write_bytes(data)
    expect[rel] = rgb

  put("a/plain.jpg", _jpeg(red), (200, 30, 40))
  put("a/nested/deeper/UPPER.JPG", _jpeg(red), (200, 30, 40))
  put("a/cmyk.jpg", _jpeg(red.convert("CMYK")), (200, 30, 40))
  buf = io.BytesIO()
  Image.fromarray(np.full((20, 20), 32768, np.uint16)).save(buf, "PNG")  # 16-bit gray, half
  put("a/gray16.png", buf.getvalue(), (128, 128, 128))
  buf = io.BytesIO()
  Image.new("RGBA", (20, 20), (10, 200, 30, 60)).save(buf, "PNG")
  put("b/rgba.png", buf.getvalue(), (10, 200, 30))
  buf = io.BytesIO()
  frames = [Image.new("RGB", (20, 20), c).convert("P") for c in ((0, 0, 250), (250, 250, 0))]
  frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], transparency=0)
  put("b/palette.gif", buf.getvalue(), (0, 0, 250))
  for ext, fmt in (("webp", "WEBP"), ("bmp", "BMP"), ("tif", "TIFF")):
    buf = io.BytesIO()
    red.save(buf, fmt)
    put(f"b/x.{ext}", buf.getvalue(), (200, 30, 40))
  # EXIF orientation 6 (rotate 90 clockwise to display): stored 40 x 20 with a white left half.
  stored = np.zeros((20, 40, 3), np.uint8)
  stored[:, :20] = 255
  exif = Image.Exif()
  exif[0x0112] = 6
  put("b/exif.jpg", _jpeg(Image.fromarray(stored), exif=exif), None)
  gradient = np.broadcast_to(np.linspace(0, 255, 6000).astype(np.uint8)[None, :, None],
                             (3000, 6000, 3))
  put("b/big.jpg", _jpeg(Image.fromarray(np.ascontiguousarray(gradient))), None)
  good = _jpeg(red)
  put("b/truncated.jpg", good[:len(good) // 2], "skip")
  put("b/empty.jpg", b"", "skip")
  put("b/text.jpg", b"this is not an image\n", "skip")
  (root / "b" / ".hidden.jpg").write_bytes(good)
  (root / "b" / "notes.txt").write_text("not listed")
  (root / ".git").mkdir()
  (root / ".git" / "x.jpg").write_bytes(good)
  return root, expect


def test_folder_lists_recursively_sorted_and_ignores_hidden_and_non_images(folder):
  root, expect = folder
  paths, labels, classes = list_images(str(root))
  assert classes == ("a", "b")
  rel = [os.fsdecode(p) for p in paths]
  assert rel == sorted(expect)
  assert labels.tolist() == [0 if r.startswith("a/") else 1 for r in rel]


def test_folder_decodes_every_kind_to_rgb_and_skips_bad_files(folder):
  root, expect = folder
  src = FolderSource(str(root))
  assert (src.num_classes, src.has_labels, src.has_masks) == (2, True, False)
  rel = [os.fsdecode(p) for p in src.paths]
  for i, r in enumerate(rel):
    record = src[i]
    image = record["image"]
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, r
    if expect[r] == "skip":  # replaced by the next readable image
      j = i
      while expect[rel[j]] == "skip":
        j += 1
      np.testing.assert_array_equal(image, src[j]["image"])
      assert record["label"] == src.labels[j]
    elif expect[r] is not None:
      np.testing.assert_allclose(image.reshape(-1, 3).mean(0), expect[r], atol=6, err_msg=r)
  bad = sorted(os.path.basename(p) for p in src.skipped)
  assert bad == ["empty.jpg", "text.jpg", "truncated.jpg"]
  exif = src[rel.index("b/exif.jpg")]["image"]
  assert exif.shape == (40, 20, 3)  # displayed upright: 20 wide, 40 high, white half on top
  assert exif[:18].mean() > 240 and exif[22:].mean() < 15


def test_folder_big_jpeg_decoded_at_reduced_scale_only_when_allowed(folder):
  root, _ = folder
  data = (root / "b" / "big.jpg").read_bytes()
  assert decode_image(data).shape == (3000, 6000, 3)
  small = decode_image(data, min_side=700)
  assert small.shape == (750, 1500, 3)  # scale 1/4 keeps the shorter side >= 700
  # Same picture: the gradient along x, sampled at the same relative positions.
  np.testing.assert_allclose(small[375, ::150, 0], np.linspace(0, 255, 6000)[::600], atol=4)
  assert decode_image(data, min_side=2000).shape == (3000, 6000, 3)  # 1/2 would undershoot


def test_folder_flat_layout_and_index_cache(tmp_path):
  img = _jpeg(Image.new("RGB", (8, 8), (1, 2, 3)))
  for name in ("z.jpg", "a.png", "m.jpeg"):
    (tmp_path / "flat" / name).parent.mkdir(exist_ok=True)
    (tmp_path / "flat" / name).write_bytes(img)
  cache = tmp_path / "cache"
  src = FolderSource(str(tmp_path / "flat"), cache_dir=str(cache))
  assert (src.has_labels, src.num_classes) == (False, 0)
  assert [os.fsdecode(p) for p in src.paths] == ["a.png", "m.jpeg", "z.jpg"]
  assert src[0]["label"] == -1
  list_images.cache_clear()
  assert len(os.listdir(cache)) == 1
  (tmp_path / "flat" / "new.jpg").write_bytes(img)  # not seen: the cached index is reused
  assert len(FolderSource(str(tmp_path / "flat"), cache_dir=str(cache))) == 3
  assert len(FolderSource(str(tmp_path / "flat"))) == 4


def test_folder_errors_name_the_path(tmp_path):
  missing = str(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match="nope"):
    pipeline.validate(_config(source="folder", path=missing))
  (tmp_path / "empty" / "sub").mkdir(parents=True)
  with pytest.raises(ValueError, match="no images in .*empty"):
    pipeline.validate(_config(source="folder", path=str(tmp_path / "empty")))
  for i in range(5):
    (tmp_path / "few" / f"{i}.jpg").parent.mkdir(exist_ok=True)
    (tmp_path / "few" / f"{i}.jpg").write_bytes(_jpeg(Image.new("RGB", (8, 8))))
  with pytest.raises(ValueError, match=r"5 training images, fewer than one global batch"):
    pipeline.validate(_config(source="folder", path=str(tmp_path / "few")))
  c = _config(source="folder", path=str(tmp_path / "few"))
  c.batch_size = 4
  pipeline.validate(c)  # the flat folder serves as the training split
  with pytest.raises(FileNotFoundError, match="split 'val'"):
    sources.make_source(c, "val")
  with pytest.raises(ValueError, match="'folders'"):
    sources.make_source(_config(source="folders"), "train")
  with pytest.raises(ValueError, match="data.path is empty"):
    sources.make_source(_config(source="folder", path=""), "train")


def test_shapes_smaller_than_a_batch_is_an_error():
  c = _config(source="shapes", shapes_train_size=6)
  with pytest.raises(ValueError, match="6 training images"):
    pipeline.validate(c)


# ----------------------------------------------------------------------------------------------
# TFDS.
# ----------------------------------------------------------------------------------------------
def test_tfds_source_through_mock_data():
  tfds = pytest.importorskip("tensorflow_datasets")
  c = _config(source="tfds", name="mnist", eval_split="test")
  with tfds.testing.mock_data(num_examples=12):
    pipeline.validate(c)
    src = sources.make_source(c, "train")
    assert (len(src), src.num_classes, src.has_labels) == (12, 10, True)
    r = src[3]
    assert r["image"].shape == (28, 28, 3) and r["image"].dtype == np.uint8
    assert (r["image"][..., 0] == r["image"][..., 1]).all() and 0 <= r["label"] < 10
    assert pipeline.num_examples(c, "test") == 12


def test_tfds_unprepared_or_unknown_name_is_an_error(tmp_path):
  c = _config(source="tfds", name="mnist", path=str(tmp_path))
  with pytest.raises(ValueError, match="'mnist'.*not prepared"):
    pipeline.validate(c)
  with pytest.raises(ValueError, match="'no_such_dataset_xyz'"):
    pipeline.validate(_config(source="tfds", name="no_such_dataset_xyz", path=str(tmp_path)))
