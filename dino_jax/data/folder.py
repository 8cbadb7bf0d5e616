"""Image folders: the images under a directory, classes from its first-level subdirectories.

Records: {'image': uint8 (H, W, 3), 'label': int32 scalar (-1 for a flat folder)}, H and W each
image's own. `list_images` lists a folder (optionally cached on disk), `decode_image` decodes one
file, `FolderSource` serves them.

Local folders only (a mounted bucket, e.g. gcsfuse, counts as local): a gs:// data.path is out of
scope (an object store serves millions of small files poorly; TFDS or ArrayRecord files serve
ImageNet from a bucket), and split_dir reports it as no such directory. A workdir may be a URI.
"""
from __future__ import annotations

import functools
import hashlib
import io
import math
import os

import numpy as np
from absl import logging
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


def split_dir(path: str, split: str, train_split: str) -> str:
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
