"""Random-access data sources: the embedded `shapes` images, image folders and TFDS.

Each source is a grain random-access data source (`len`, `[index]`) of records
{'image': uint8 (H, W, 3), 'label': int32 scalar (-1 without labels)}, plus
'object_mask': bool (H, W) for `shapes`; and tells `num_classes`, `has_labels`, `has_masks`.
`make_source(config, split)` builds the one the config names.
"""
from __future__ import annotations

import functools
import hashlib
import io
import math
import os
import zlib
from typing import Any, Sequence

import ml_collections as mlc
import numpy as np
from absl import logging
from PIL import Image, ImageOps

SOURCES = ("shapes", "folder", "tfds")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


def make_source(config: mlc.ConfigDict, split: str, *, min_side: int = 0
                ) -> ShapesSource | FolderSource | TfdsSource:
  """The source of `split` as config.data says.

  Args:
    config: the training config (data.source and its keys).
    split: a split name (config.data.train_split, config.data.eval_split, ...).
    min_side: folder JPEGs may be decoded at a reduced scale (Image.draft) as long as their
      shorter side stays >= min_side; 0 decodes at full size.
  Raises:
    ValueError / FileNotFoundError naming the source, path, name or split that is wrong.
  """
  d = config.data
  if d.source == "shapes":
    size = d.shapes_train_size if split == d.train_split else d.shapes_eval_size
    return ShapesSource(size, split, seed=d.shapes_seed, image_size=d.shapes_image_size,
                        classes=tuple(d.shapes_classes),
                        area=tuple(d.shapes_area), polarity=d.shapes_polarity,
                        fg_range=tuple(d.shapes_fg_range), bg_range=tuple(d.shapes_bg_range))
  if d.source == "folder":
    return FolderSource(_split_dir(d.path, split, d.train_split), min_side=min_side,
                        cache_dir=d.cache_dir)
  if d.source == "tfds":  # data.path, if set, is the TFDS data_dir
    return TfdsSource(d.name, split, data_dir=d.path, image_key=d.image_key, label_key=d.label_key)
  raise ValueError(f"config.data.source={d.source!r}: unknown source; expected one of {SOURCES}")


# ----------------------------------------------------------------------------------------------
# shapes: one grayscale object on a flat background, generated from (seed, split, index).
# ----------------------------------------------------------------------------------------------
SHAPE_CLASSES = ("disc", "square", "triangle", "ring", "cross", "star")
_RING_INNER = 0.5  # inner radius / outer radius
_STAR_LOBES, _STAR_DEPTH = 5, 0.5  # r(phi) = R (1 + depth cos(lobes phi))


def _shape_templates() -> dict[str, tuple[Any, np.ndarray]]:
  """name -> (inside(u, v) -> bool, boundary points (P, 2)), both for a shape of unit area."""
  phi = np.linspace(0, 2 * np.pi, 256, endpoint=False)
  circle = np.stack([np.cos(phi), np.sin(phi)], -1)
  r_disc = 1 / math.sqrt(math.pi)
  r_ring = 1 / math.sqrt(math.pi * (1 - _RING_INNER**2))
  r_star = 1 / math.sqrt(math.pi * (1 + _STAR_DEPTH**2 / 2))  # area of the polar curve
  side = math.sqrt(4 / math.sqrt(3))  # equilateral triangle of area 1, centred on its centroid
  inradius = side / (2 * math.sqrt(3))
  normals = [(math.cos(a), math.sin(a)) for a in np.pi / 2 + 2 * np.pi * np.arange(3) / 3]
  w = math.sqrt(1 / 5)  # plus-shaped cross: five w x w squares
  cross = np.array([(1.5, .5), (.5, .5), (.5, 1.5), (-.5, 1.5), (-.5, .5), (-1.5, .5),
                    (-1.5, -.5), (-.5, -.5), (-.5, -1.5), (.5, -1.5), (.5, -.5), (1.5, -.5)]) * w

  def star(u, v):
    return np.hypot(u, v) <= r_star * (1 + _STAR_DEPTH * np.cos(_STAR_LOBES * np.arctan2(v, u)))

  return {
      "disc": (lambda u, v: u * u + v * v <= r_disc**2, r_disc * circle),
      "square": (lambda u, v: np.maximum(abs(u), abs(v)) <= 0.5,
                 np.array([(.5, .5), (-.5, .5), (-.5, -.5), (.5, -.5)])),
      "triangle": (lambda u, v: np.all([u * a + v * b <= inradius for a, b in normals], 0),
                   -2 * inradius * np.array(normals)),
      "ring": (lambda u, v: ((u * u + v * v <= r_ring**2)
                             & (u * u + v * v >= (_RING_INNER * r_ring)**2)), r_ring * circle),
      "cross": (lambda u, v: ((np.maximum(abs(u), abs(v)) <= 1.5 * w)
                              & (np.minimum(abs(u), abs(v)) <= 0.5 * w)), cross),
      "star": (star, r_star * (1 + _STAR_DEPTH * np.cos(_STAR_LOBES * phi))[:, None] * circle),
  }


_RENDERED: dict[tuple, dict[int, dict[str, np.ndarray]]] = {}


class ShapesSource:
  """The embedded dataset: one shape per image, with its class and its object mask.

  Index i has class i % num_classes (balanced). Its shape has a random area (a uniform fraction
  `area` of the image's), rotation and position (wholly inside the image); it is rendered with
  `supersample`^2 samples a pixel, and the mask is coverage >= 0.5. Object and background are two
  random gray levels (uniform in fg_range and bg_range) at least `min_contrast` apart, plus
  Gaussian pixel noise of std `noise`; polarity 'light' puts the lighter of the two on the object
  ('random': either). Everything follows from (seed, split, index): any record can be made alone,
  in any process.
  Records are cached once made (a 32 px split of 8,000 is ~30 MB).
  """

  has_labels = True
  has_masks = True

  def __init__(self, size: int, split: str, *, seed: int = 0, image_size: int = 32,
               classes: Sequence[str] = SHAPE_CLASSES, area: tuple[float, float] = (0.12, 0.35),
               min_contrast: float = 0.3, noise: float = 0.06, supersample: int = 2,
               polarity: str = "random", fg_range: tuple[float, float] = (0.0, 1.0),
               bg_range: tuple[float, float] = (0.0, 1.0)):
    unknown = set(classes) - set(SHAPE_CLASSES)
    if unknown:
      raise ValueError(f"unknown shapes {sorted(unknown)}; expected some of {SHAPE_CLASSES}")
    if polarity not in ("random", "light"):
      raise ValueError(f"shapes polarity {polarity!r}: expected 'random' or 'light'")
    for name, (lo, hi) in (("fg_range", fg_range), ("bg_range", bg_range)):
      if not 0 <= lo <= hi <= 1:
        raise ValueError(f"shapes {name}={(lo, hi)}: need 0 <= low <= high <= 1")
    if max(fg_range[1] - bg_range[0], bg_range[1] - fg_range[0]) < min_contrast:
      raise ValueError(f"shapes fg_range={fg_range}, bg_range={bg_range}: no pair of levels is "
                       f"min_contrast={min_contrast} apart")
    if not 0 < area[0] <= area[1]:
      raise ValueError(f"shapes area={tuple(area)}: need 0 < low <= high (fractions of the image)")
    fits = min(max_area(name) for name in classes)
    if area[1] > fits:
      raise ValueError(f"shapes area={tuple(area)}: the largest area, {area[1]}, does not fit "
                       f"{', '.join(c for c in classes if max_area(c) < area[1])} in the image at "
                       f"every rotation; at most {fits:.3f} with these classes")
    self.size, self.split, self.seed, self.image_size = size, split, seed, image_size
    self.classes, self.area = tuple(classes), area
    self.min_contrast, self.noise, self.supersample = min_contrast, noise, supersample
    self.polarity, self.fg_range, self.bg_range = polarity, tuple(fg_range), tuple(bg_range)
    self.num_classes = len(self.classes)
    self._split_id = zlib.crc32(split.encode())
    # Shared by every source of the same parameters in this process (training, then its
    # evaluation, render each image once).
    self._cache = _RENDERED.setdefault(
        (size, split, seed, image_size, self.classes, tuple(area), min_contrast, noise,
         supersample, polarity, self.fg_range, self.bg_range), {})

  def __len__(self) -> int:
    return self.size

  def __getstate__(self):  # workers get the parameters, not the main process's cache
    return {**self.__dict__, "_cache": {}}

  def __repr__(self) -> str:
    return f"ShapesSource({self.size} images of {self.image_size} px, split {self.split!r})"

  def params(self, index: int) -> dict[str, Any]:
    """The random draws of record `index`: label, area (px^2), angle, centre (x, y) in px
    (pixel (0, 0) covers [0, 1)^2), object and background gray levels fg, bg in [0, 1]."""
    return self._draw(index)[0]

  def _draw(self, index: int) -> tuple[dict[str, Any], np.random.Generator]:
    if not 0 <= index < self.size:
      raise IndexError(f"index {index} out of range for {self!r}")
    rng = np.random.default_rng([self.seed, self._split_id, index])
    label = index % self.num_classes
    s = self.image_size
    area = rng.uniform(*self.area) * s * s
    angle = rng.uniform(0, 2 * np.pi)
    c, si = math.cos(angle), math.sin(angle)
    # Boundary points rotated and scaled: the centre keeps all of them inside the image.
    pts = _TEMPLATES[self.classes[label]][1] @ np.array([[c, si], [-si, c]]) * math.sqrt(area)
    centre = [rng.uniform(-pts[:, k].min(), s - pts[:, k].max()) for k in (0, 1)]
    while True:
      u = rng.uniform(size=2)  # (scaled into the ranges: the default (0, 1) leaves u as drawn)
      fg = self.fg_range[0] + (self.fg_range[1] - self.fg_range[0]) * u[0]
      bg = self.bg_range[0] + (self.bg_range[1] - self.bg_range[0]) * u[1]
      if abs(fg - bg) >= self.min_contrast:
        break
    if self.polarity == "light" and fg < bg:  # the same draws, the lighter level on the object
      fg, bg = bg, fg
    return dict(label=label, area=area, angle=angle, centre=centre, fg=fg, bg=bg), rng

  def coverage(self, p: dict[str, Any]) -> np.ndarray:
    """(H, W) float32: the share of each pixel's samples inside the shape of params p."""
    s, n = self.image_size, self.supersample
    grid = (np.arange(s * n, dtype=np.float32) + 0.5) / n
    x, y = grid[None, :] - p["centre"][0], grid[:, None] - p["centre"][1]
    c, si, scale = math.cos(p["angle"]), math.sin(p["angle"]), 1 / math.sqrt(p["area"])
    u, v = (c * x + si * y) * scale, (-si * x + c * y) * scale  # rotate by -angle, unit area
    inside = _TEMPLATES[self.classes[p["label"]]][0](u, v)
    return inside.reshape(s, n, s, n).mean((1, 3), dtype=np.float32)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    if index not in self._cache:
      p, rng = self._draw(index)
      cov = self.coverage(p)
      gray = p["bg"] + (p["fg"] - p["bg"]) * cov + rng.normal(0, self.noise, cov.shape)
      gray = np.round(np.clip(gray, 0, 1) * 255).astype(np.uint8)
      self._cache[index] = {"image": np.repeat(gray[..., None], 3, -1),
                            "label": np.int32(p["label"]), "object_mask": cov >= 0.5}
    return self._cache[index]


_TEMPLATES = _shape_templates()


@functools.cache
def max_area(name: str) -> float:
  """The largest area (a fraction of the image) at which shape `name` fits inside the image at
  every rotation: 1 / (its widest extent over rotations, at unit area)^2, the extent taken 1e-5
  wider than at the sampled angles so that the angles between them fit too."""
  pts = _TEMPLATES[name][1]
  angles = np.linspace(0, np.pi, 1441)  # extents repeat after half a turn
  rot = np.stack([np.cos(angles), np.sin(angles)])  # (2, A): the x axis of each rotation
  width = pts @ rot  # (P, A) and the y axis is the x axis a quarter turn on
  return float(1 / (np.max(width.max(0) - width.min(0)) * (1 + 1e-5)) ** 2)


# ----------------------------------------------------------------------------------------------
# Image folders.
# ----------------------------------------------------------------------------------------------
def _split_dir(path: str, split: str, train_split: str) -> str:
  """path/split when it exists; else path itself, for the training split only."""
  if not path:
    raise ValueError("config.data.path is empty: set it to the image folder")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"config.data.path={path!r}: no such directory")
  sub = os.path.join(path, split)
  if os.path.isdir(sub):
    return sub
  if split == train_split:
    return path
  raise FileNotFoundError(f"no folder {sub!r} for split {split!r} (config.data.path={path!r})")


def _scan(root: str) -> list[str]:
  """Image files under root, recursively, relative to root, sorted; hidden entries skipped."""
  found, stack = [], [""]
  while stack:
    rel = stack.pop()
    with os.scandir(os.path.join(root, rel)) as entries:
      for e in entries:
        if e.name.startswith("."):
          continue
        if e.is_dir():
          stack.append(os.path.join(rel, e.name))
        elif e.name.lower().endswith(IMAGE_EXTENSIONS):
          found.append(os.path.join(rel, e.name))
  return sorted(found)


@functools.lru_cache(maxsize=8)
def list_images(root: str, cache_dir: str = "") -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
  """(relative paths as bytes (N,), labels int32 (N,), class names) of the images under root.

  Class = first-level subdirectory (its images found recursively; images directly under root are
  then ignored, as torchvision's ImageFolder does); a folder without subdirectories holding images
  is flat: labels -1, no classes. With cache_dir, the listing is stored there and reused (keyed by
  the absolute root path: delete the file after changing the folder).
  """
  root = os.path.abspath(root)
  cache = ""
  if cache_dir:
    key = hashlib.sha1(root.encode()).hexdigest()[:16]
    cache = os.path.join(cache_dir, f"folder_index_{key}.npz")
    if os.path.exists(cache):
      with np.load(cache) as f:
        logging.info("image list of %s read from %s", root, cache)
        return f["paths"], f["labels"], tuple(str(c) for c in f["classes"])
  paths = _scan(root)
  top = [p.split(os.sep, 1) for p in paths]
  classes = tuple(sorted({t[0] for t in top if len(t) == 2}))
  if classes:
    ignored = sum(len(t) == 1 for t in top)
    if ignored:
      logging.warning("%d images directly under %s ignored: it has class folders", ignored, root)
    index = {c: i for i, c in enumerate(classes)}
    paths = [p for p, t in zip(paths, top) if len(t) == 2]
    labels = np.array([index[t[0]] for t in top if len(t) == 2], np.int32)
  else:
    labels = np.full(len(paths), -1, np.int32)
  paths = np.array([os.fsencode(p) for p in paths], dtype=bytes)
  if cache:
    os.makedirs(cache_dir, exist_ok=True)
    np.savez(cache, paths=paths, labels=labels, classes=np.array(classes, dtype=str))
  return paths, labels, classes


def decode_image(data: bytes, min_side: int = 0) -> np.ndarray:
  """Encoded image -> uint8 (H, W, 3) RGB, upright (EXIF orientation applied), first frame.

  Greyscale, palette, CMYK, alpha (dropped, as torchvision's loader) and 16-bit images all become
  8-bit RGB. A JPEG whose shorter side exceeds 2 * min_side is decoded at a reduced DCT scale
  (Image.draft) that keeps its shorter side >= min_side.
  """
  with Image.open(io.BytesIO(data)) as img:
    if min_side and img.format == "JPEG":
      w, h = img.size
      r = min_side / min(w, h)
      if r <= 0.5:
        img.draft("RGB", (math.ceil(w * r), math.ceil(h * r)))
    img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I"):  # 16-bit (I;16*) or 32-bit integer greyscale: 0..65535
      img = Image.fromarray(np.clip(np.asarray(img) / 257, 0, 255).round().astype(np.uint8))
    elif img.mode == "P":
      img = img.convert("RGBA")  # palette with transparency: no warning, same RGB
    return np.asarray(img.convert("RGB"))


class FolderSource:
  """The images under a folder (`list_images`), decoded with PIL.

  A file that cannot be decoded (corrupt, truncated, empty, not an image) is skipped: the record
  of the next readable index is returned in its place, and the process logs the first few such
  paths and its running count at each power of two (`skipped` holds them, with the errors).
  """

  has_masks = False
  _LOGGED = 5  # paths logged in full by each process

  def __init__(self, root: str, *, min_side: int = 0, cache_dir: str = ""):
    self.root, self.min_side = root, min_side
    self.paths, self.labels, self.classes = list_images(root, cache_dir)
    if not len(self.paths):
      raise ValueError(f"no images in {root!r} (extensions {', '.join(IMAGE_EXTENSIONS)}, "
                       "case-insensitive; hidden files ignored)")
    self.num_classes = len(self.classes)
    self.has_labels = bool(self.classes)
    self.skipped: dict[str, str] = {}  # path -> error, in the order met

  def __len__(self) -> int:
    return len(self.paths)

  def __repr__(self) -> str:
    return f"FolderSource({self.root!r}: {len(self)} images, {self.num_classes} classes)"

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    for i in range(index, index + len(self)):
      i %= len(self)
      path = os.path.join(self.root, os.fsdecode(self.paths[i]))
      if path in self.skipped:
        continue
      try:
        with open(path, "rb") as f:
          image = decode_image(f.read(), self.min_side)
        return {"image": image, "label": self.labels[i]}
      except Exception as e:  # pylint: disable=broad-except  # any undecodable file is skipped
        self.skipped[path] = f"{type(e).__name__}: {e}"
        n = len(self.skipped)
        if n <= self._LOGGED:
          logging.warning("skipped undecodable image %s (%s); %d skipped in this process", path,
                          self.skipped[path], n)
        elif n & (n - 1) == 0:
          logging.warning("%d undecodable images skipped in this process (first: %s)", n,
                          ", ".join(list(self.skipped)[:self._LOGGED]))
    raise ValueError(f"none of the {len(self)} images in {self.root!r} can be decoded")


# ----------------------------------------------------------------------------------------------
# TFDS.
# ----------------------------------------------------------------------------------------------
class TfdsSource:
  """A prepared TFDS dataset's split through tfds.data_source (ArrayRecord random access)."""

  has_masks = False

  def __init__(self, name: str, split: str, *, data_dir: str = "", image_key: str = "image",
               label_key: str = "label"):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  # slow; tfds only

    if not name:
      raise ValueError("config.data.name is empty: set it to a TFDS dataset name")
    try:
      self._ds = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
    except Exception as e:  # pylint: disable=broad-except  # tfds raises many kinds here
      where = data_dir or "the default TFDS data_dir"
      raise ValueError(
          f"TFDS dataset {name!r} split {split!r} is not prepared in {where} in a random-access "
          f"format ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Prepare it "
          f"with `tfds build {name} --file_format=array_record`.") from e
    features = self._ds.dataset_info.features
    if image_key not in features:
      raise ValueError(f"TFDS {name!r} has no feature {image_key!r} (config.data.image_key); "
                       f"features: {sorted(features.keys())}")
    self.name, self.split, self.image_key, self.label_key = name, split, image_key, label_key
    self.has_labels = label_key in features
    self.num_classes = getattr(features[label_key], "num_classes", 0) if self.has_labels else 0

  def __len__(self) -> int:
    return len(self._ds)

  def __repr__(self) -> str:
    return f"TfdsSource({self.name!r}, split {self.split!r}: {len(self)} images)"

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    record = self._ds[index]
    image = np.asarray(record[self.image_key])
    if image.ndim == 2:
      image = image[..., None]
    image = np.repeat(image, 3, -1) if image.shape[-1] == 1 else image[..., :3]
    label = record[self.label_key] if self.has_labels else -1
    return {"image": image, "label": np.int32(label)}
