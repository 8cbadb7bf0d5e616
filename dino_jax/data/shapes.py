"""The embedded `shapes` dataset: one grayscale object on a flat background, generated from
(seed, split, index).

Records: {'image': uint8 (S, S, 3) (three equal channels), 'label': int32 scalar (the shape's index
in `classes`), 'object_mask': bool (S, S)}, S = image_size. `SHAPE_CLASSES` names the shapes;
`max_area(name)` is the largest area at which one fits the image at every rotation.
"""
from __future__ import annotations

import functools
import math
import zlib
from typing import Any, Sequence

import numpy as np

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
  Records are cached once made, 4 image_size^2 bytes each (image and mask).
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
