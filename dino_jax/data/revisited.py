"""The revisited Oxford and Paris retrieval datasets (Radenovic et al., CVPR 2018), read from the
layout the release reads:

  ROOT/<dataset>/jpg/<name>.jpg
  ROOT/<dataset>/gnd_<dataset>.pkl: {'imlist': [database names], 'qimlist': [query names],
      'gnd': [per query: {'bbx': (x1, y1, x2, y2) in the query image's pixels,
                          'easy', 'hard', 'junk': database indices (0-based)}]}

for <dataset> roxford5k or rparis6k. Images are loaded as the release's OxfordParisDataset loads
them (eval_image_retrieval.py): RGB, then PIL's thumbnail to `imsize` (the longer side brought
down to imsize, aspect kept, never enlarged; Lanczos), no crop to a square. Images of one size go
through the network together (`batches`); the release feeds them one at a time.

Departure, on request only (crop_queries): revisitop's protocol crops each query to its box
gnd[i]['bbx'] before anything else; the release does not crop (its queries are whole images),
so neither does the default here.

Shapes: B batch, h x w an image's size after the thumbnail.
"""
from __future__ import annotations

import collections
import math
import os
import pickle
from typing import Any, Iterator

import numpy as np
from PIL import Image, ImageFile

from dino_jax import paths
from dino_jax.data import pipeline

DATASETS = ("roxford5k", "rparis6k")
SPLITS = ("query", "database")


def read_ground_truth(root: str, dataset: str) -> dict[str, Any]:
  """ROOT/<dataset>/gnd_<dataset>.pkl: {'imlist', 'qimlist', 'gnd'} (see the module's doc)."""
  if dataset not in DATASETS:
    raise ValueError(f"dataset {dataset!r}: expected one of {DATASETS}")
  path = os.path.join(root, dataset, f"gnd_{dataset}.pkl")
  if not paths.exists(path):
    raise FileNotFoundError(f"{path}: no ground truth file (the revisitop layout: "
                            f"ROOT/{dataset}/gnd_{dataset}.pkl and ROOT/{dataset}/jpg/)")
  cfg = pickle.loads(paths.read_bytes(path))
  missing = {"imlist", "qimlist", "gnd"} - set(cfg)
  if missing:
    raise ValueError(f"{path}: no {sorted(missing)} in the ground truth")
  if len(cfg["gnd"]) != len(cfg["qimlist"]):
    raise ValueError(f"{path}: {len(cfg['gnd'])} ground truth entries for "
                     f"{len(cfg['qimlist'])} queries")
  return cfg


def thumbnail_size(width: int, height: int, imsize: int) -> tuple[int, int]:
  """(width, height) that PIL's Image.thumbnail((imsize, imsize)) gives an image of this size.

  Pillow's rule (>= 7.1): unchanged if both sides fit; else the longer side becomes imsize and
  the other the floor or the ceiling of its scaled length, whichever keeps the aspect ratio
  closer, at least 1. Known from the file's header, before decoding: images are grouped by
  size into batches, on every process alike.
  """
  if width <= imsize and height <= imsize:
    return width, height
  aspect = width / height

  def closest(number: float, key) -> int:
    return max(min(math.floor(number), math.ceil(number), key=key), 1)

  if aspect <= 1:
    return closest(imsize * aspect, key=lambda n: abs(aspect - n / imsize)), imsize
  return imsize, closest(imsize / aspect, key=lambda n: 0 if n == 0 else abs(aspect - imsize / n))


def crop_size(box: Any) -> tuple[int, int]:
  """(width, height) of PIL's Image.crop(box) (box (x1, y1, x2, y2), rounded to pixels)."""
  x0, y0, x1, y1 = (int(round(v)) for v in box)
  return x1 - x0, y1 - y0


def load_image(path: str, imsize: int | None, box: Any = None) -> np.ndarray:
  """An image file -> uint8 (h, w, 3): RGB, cropped to box (x1, y1, x2, y2) if given, then PIL's
  thumbnail to imsize with Lanczos (the release's Image.ANTIALIAS) unless imsize is None."""
  previous = ImageFile.LOAD_TRUNCATED_IMAGES
  ImageFile.LOAD_TRUNCATED_IMAGES = True  # as the release: a truncated JPEG loads, grey-filled
  try:
    with paths.path(path).open("rb") as f:
      img = Image.open(f).convert("RGB")
  finally:
    ImageFile.LOAD_TRUNCATED_IMAGES = previous
  if box is not None:
    img = img.crop(tuple(box))
  if imsize is not None:
    img.thumbnail((imsize, imsize), Image.LANCZOS)
  return np.asarray(img)


class RevisitedSource:
  """The query or the database images of roxford5k / rparis6k, as the release loads them.

  Records: {'image': uint8 (h, w, 3), 'index': int32 (its position in the split)}. `gnd` is the
  ground truth (one dict per query), `names` the split's image names; `size(i)` is record i's
  (h, w), read from the file's header.
  """

  def __init__(self, root: str, dataset: str, split: str, imsize: int | None = 224, *,
               crop_queries: bool = False):
    if split not in SPLITS:
      raise ValueError(f"split {split!r}: expected one of {SPLITS}")
    cfg = read_ground_truth(root, dataset)
    self.dataset, self.split, self.imsize = dataset, split, imsize
    self.gnd = cfg["gnd"]
    self.names = list(cfg["qimlist"] if split == "query" else cfg["imlist"])
    self.image_dir = os.path.join(root, dataset, "jpg")
    self.boxes = ([np.asarray(g["bbx"], np.float64) for g in self.gnd]
                  if split == "query" and crop_queries else None)
    self._sizes: list[tuple[int, int]] | None = None

  def __len__(self) -> int:
    return len(self.names)

  def __repr__(self) -> str:
    return f"RevisitedSource({self.dataset} {self.split}: {len(self)} images)"

  def path(self, index: int) -> str:
    return os.path.join(self.image_dir, self.names[index] + ".jpg")

  def size(self, index: int) -> tuple[int, int]:
    """(h, w) of record `index` after the crop and the thumbnail, from the file's header."""
    if self._sizes is None:
      self._sizes = [self._size_from_header(i) for i in range(len(self))]
    return self._sizes[index]

  def _size_from_header(self, index: int) -> tuple[int, int]:
    path = self.path(index)
    if not paths.exists(path):
      raise FileNotFoundError(f"{path}: no such image ({self!r})")
    with paths.path(path).open("rb") as f:
      w, h = Image.open(f).size
    if self.boxes is not None:
      w, h = crop_size(self.boxes[index])
    if self.imsize is not None:
      w, h = thumbnail_size(w, h, self.imsize)
    return h, w

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    box = None if self.boxes is None else self.boxes[index]
    return {"image": load_image(self.path(index), self.imsize, box), "index": np.int32(index)}


def batches(source: RevisitedSource, batch_size: int, *, process_index: int = 0,
            process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """This process's batches of every image of `source`, images of one size together.

  Elements: {'image': uint8 (B, h, w, 3), 'index': int32 (B,), 'valid': bool (B,)}. The sizes
  come in ascending order, each size's images in index order, each size read as
  pipeline.padded_share reads a source: every process yields the same sequence of batch shapes.
  """
  groups = collections.defaultdict(list)
  for i in range(len(source)):
    groups[source.size(i)].append(i)
  for size, members in sorted(groups.items()):
    yield from pipeline.padded_share(_OneSize(source, members, size), batch_size,
                                     process_index=process_index, process_count=process_count)


class _OneSize:
  """The images of `source` at `members`, all of one (h, w) size: a random-access source."""

  def __init__(self, source: RevisitedSource, members: list[int], size: tuple[int, int]):
    self.source, self.members, self.size = source, members, size

  def __len__(self) -> int:
    return len(self.members)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    record = self.source[self.members[i]]
    if record["image"].shape[:2] != self.size:
      raise ValueError(f"{self.source.path(self.members[i])}: decoded as "
                       f"{record['image'].shape[:2]}, its header said {self.size} after the "
                       "thumbnail")
    return record
