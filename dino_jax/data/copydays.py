"""Copy detection data: the Copydays folder as the release reads it, and its embedded version made
of `shapes` images and their strong copies.

The Copydays folder (--data_path), in the release's layout (eval_copy_detection.py):

  DATA/original/<id>00.jpg       the 157 originals: the database (with the distractors)
  DATA/strong/<id><nn>.jpg       the 229 strong copies (crops, rotations, blur, JPEG, paint,
                                 print-and-scan, ...): the paper's query block
  DATA/jpegqual/<q>/<id>00.jpg   optional: one JPEG copy per original, q in 3 5 8 10 15 20 30 50 75
  DATA/crops/<pct>/<id>00.jpg    optional: one crop per original, pct in 10 15 20 30 40 ... 80

Only `.jpg` files count in those folders (the release's rule, case-sensitive). A strong copy's
originals are those whose file name shares its first 4 characters (Copydays names are 6 digits: 4
for the image, 2 for the variant, 00 for the original). A jpegqual/ or crops/ block pairs its files
with the originals by position in sorted order, so it must hold as many. Every block present is a
query block, the originals themselves included, as in the release (which requires all 20).
The distractors (--distractors_path; the paper: 10k YFCC100M images) and the images the whitening
is learned on (--whitening_path; the paper: 20k other YFCC100M images) are flat folders: their
files with one of the release's image extensions, no subfolders.

The embedded version (`embedded`): Copydays' 20 blocks, made of the workdir's shapes images: 157
originals, their 229 strong copies (`strong_copy`; copy j is of original j % 157) and one copy per
original in each jpegqual/ and crops/ block (`block_copy`), among 10k distractors, the whitening
learned on 20k other images; originals, distractors and whitening images each a split of their
own, none seen in training.

Shapes: S the evaluation's image side (square), B batch.
"""
from __future__ import annotations

import dataclasses
import io
import math
import os
from typing import Any, Callable

import ml_collections as mlc
import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from dino_jax.data.sources import make_source

# The release's query blocks, in its order.
BLOCKS = (("original", "strong")
          + tuple(f"jpegqual/{q}" for q in (3, 5, 8, 10, 15, 20, 30, 50, 75))
          + tuple(f"crops/{c}" for c in (10, 15, 20, 30, 40, 50, 60, 70, 80)))
# The release's is_image_file: the part after the last dot, case-sensitive.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "ppm", "bmp", "pgm", "tif", "tiff", "webp")
PREFIX = 4  # a strong copy matches the originals whose names share this many first characters

# The embedded version's sizes: Copydays' originals and strong copies, the paper's distractors and
# whitening images.
EMBEDDED_ORIGINALS, EMBEDDED_COPIES = 157, 229
EMBEDDED_DISTRACTORS, EMBEDDED_WHITENING = 10_000, 20_000


@dataclasses.dataclass
class CopySets:
  """What a copy detection run reads.

  Attributes:
    queries: {block name: its images}, in order (each a random-access source of uint8 images).
    database: the originals, then the distractors.
    whitening: the images the whitening is learned on, or None (no whitening, as the release
      without --whitening_path).
    positives: {block name: for each of its queries, the database indices of its originals}.
  """
  queries: dict[str, Any]
  database: Any
  whitening: Any | None
  positives: dict[str, list[np.ndarray]]


class Images:
  """n images made by load(i) -> uint8 (H, W, 3), as the release's transform sees them.

  Records: {'image': uint8 (S, S, 3)} (pipeline.padded_share adds 'valid'): resized to S x S,
  aspect not kept, PIL bicubic (the release's Resize((imsize, imsize), interpolation=3)).
  """

  def __init__(self, n: int, load: Callable[[int], np.ndarray], imsize: int):
    self.n, self.load, self.imsize = n, load, imsize

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    img = Image.fromarray(self.load(int(index)))
    return {"image": np.asarray(img.resize((self.imsize, self.imsize), Image.BICUBIC))}


def read_image(file: str | io.BytesIO) -> np.ndarray:
  """A file (a path or a file object) -> uint8 (H, W, 3): PIL open and convert('RGB'), as the
  release's loader (no EXIF orientation applied, unlike folder.decode_image)."""
  with Image.open(file) as img:
    return np.asarray(img.convert("RGB"))


def file_images(files: list[str], imsize: int) -> Images:
  return Images(len(files), lambda i: read_image(files[i]), imsize)


def _jpgs(root: str, block: str) -> list[str]:
  """The sorted .jpg names of root/block (the release's get_block_filenames)."""
  return sorted(f for f in os.listdir(os.path.join(root, block)) if f.endswith(".jpg"))


def list_flat_images(root: str) -> list[str]:
  """The image files directly under root (the distractor and whitening folders), sorted (the
  release takes os.listdir's order, which changes nothing but the order of equal scores)."""
  if not os.path.isdir(root):
    raise FileNotFoundError(f"{root!r}: no such directory")
  files = sorted(os.path.join(root, f) for f in os.listdir(root)
                 if f.split(".")[-1] in IMAGE_EXTENSIONS)
  if not files:
    raise ValueError(f"no images directly under {root!r} (extensions {IMAGE_EXTENSIONS})")
  return files


def copydays(data_path: str, imsize: int, distractors_path: str | None = None,
             whitening_path: str | None = None) -> CopySets:
  """The Copydays folder (the layout in this module's docstring) as CopySets of imsize images.

  Raises:
    FileNotFoundError / ValueError naming the missing folder, or the copy without an original.
  """
  for block in ("original", "strong"):
    if not os.path.isdir(os.path.join(data_path, block)):
      raise FileNotFoundError(f"{os.path.join(data_path, block)!r}: no such directory (Copydays "
                              "layout: original/, strong/, optionally jpegqual/<q>/, crops/<pct>/)")
  originals = _jpgs(data_path, "original")
  if not originals:
    raise ValueError(f"no .jpg files in {os.path.join(data_path, 'original')!r}")
  queries, positives = {}, {}
  for block in BLOCKS:
    if not os.path.isdir(os.path.join(data_path, block)):
      continue
    names = _jpgs(data_path, block)
    if block == "strong":
      pos = [np.array([j for j, o in enumerate(originals) if o[:PREFIX] == q[:PREFIX]])
             for q in names]
      lost = [q for q, p in zip(names, pos) if not len(p)]
      if lost:
        raise ValueError(f"strong copies without an original (the first {PREFIX} characters of "
                         f"their names match none in original/): {lost[:5]}")
    elif len(names) != len(originals):  # paired by position with the originals
      raise ValueError(f"{os.path.join(data_path, block)!r} holds {len(names)} .jpg files, "
                       f"original/ {len(originals)}: they are paired by position")
    else:
      pos = [np.array([i]) for i in range(len(names))]
    queries[block] = file_images([os.path.join(data_path, block, n) for n in names], imsize)
    positives[block] = pos
  database = [os.path.join(data_path, "original", n) for n in originals]
  if distractors_path:
    database += list_flat_images(distractors_path)
  whitening = file_images(list_flat_images(whitening_path), imsize) if whitening_path else None
  return CopySets(queries, file_images(database, imsize), whitening, positives)


def _jpeg(img: Image.Image, quality: int) -> np.ndarray:
  buf = io.BytesIO()
  img.save(buf, "JPEG", quality=quality)
  return read_image(buf)


def strong_copy(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """A strong copy of uint8 (H, W, 3): the kinds of attack of Copydays' strong block, scaled to
  small images, uint8 (h, w, 3) (h, w <= H, W: the crop is not resized back).

  In order: a rotation of +-20 degrees (p 0.5; bicubic, corners filled black); a crop keeping 70-95%
  of each side at a random place (always); brightness and contrast factors in [0.6, 1.4] and a
  colour tint, each channel scaled by a factor in [0.7, 1.3] (p 0.5); a painted rectangle of 10-25%
  of each side in a random colour (p 0.5); a Gaussian blur of radius 0.3-1 px (p 0.5); JPEG at
  quality 10-50 (always).
  """
  img = Image.fromarray(image)
  u = rng.random(16)
  if u[0] < 0.5:
    img = img.rotate(40 * u[1] - 20, Image.BICUBIC, fillcolor=(0, 0, 0))
  w, h = img.size
  cw, ch = round(w * (0.7 + 0.25 * u[2])), round(h * (0.7 + 0.25 * u[3]))
  left, top = int(u[4] * (w - cw + 1)), int(u[5] * (h - ch + 1))
  img = img.crop((left, top, left + cw, top + ch))
  if u[6] < 0.5:
    img = ImageEnhance.Brightness(img).enhance(0.6 + 0.8 * u[7])
    img = ImageEnhance.Contrast(img).enhance(0.6 + 0.8 * u[8])
    tint = 0.7 + 0.6 * rng.random(3)
    img = Image.fromarray(np.clip(np.asarray(img) * tint, 0, 255).round().astype(np.uint8))
  if u[9] < 0.5:
    rw, rh = max(1, round(cw * (0.1 + 0.15 * u[10]))), max(1, round(ch * (0.1 + 0.15 * u[11])))
    x, y = int(u[12] * (cw - rw + 1)), int(u[13] * (ch - rh + 1))
    ImageDraw.Draw(img).rectangle((x, y, x + rw - 1, y + rh - 1),
                                  fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
  if u[14] < 0.5:
    img = img.filter(ImageFilter.GaussianBlur(float(0.3 + 0.7 * u[15])))
  return _jpeg(img, int(rng.integers(10, 51)))


def block_copy(image: np.ndarray, block: str) -> np.ndarray:
  """The copy of uint8 (H, W, 3) in one of the fixed blocks: 'original' (itself), 'jpegqual/<q>'
  (JPEG at quality q) or 'crops/<pct>' (the centred crop of the same aspect that removes pct% of
  the surface, not resized back)."""
  kind, _, value = block.partition("/")
  if kind == "original":
    return image
  if kind == "jpegqual":
    return _jpeg(Image.fromarray(image), int(value))
  h, w = image.shape[:2]
  keep = math.sqrt(1 - int(value) / 100)
  ch, cw = round(h * keep), round(w * keep)
  top, left = (h - ch) // 2, (w - cw) // 2
  return image[top:top + ch, left:left + cw]


def generated(images: Callable[[str, int], Callable[[int], np.ndarray]], imsize: int, *,
              originals: int, copies: int, distractors: int, whitening: int, seed: int,
              blocks: tuple[str, ...] = BLOCKS) -> CopySets:
  """Copydays' blocks (those in `blocks`, in their order) made of generated images.

  images(split, n) -> load(i) -> uint8 (H, W, 3): the n images of a split; the originals, the
  distractors and the whitening images are the splits 'copydays_original', 'copydays_distractors'
  and 'copydays_whitening'. 'strong' copy j is strong_copy of original j % originals, drawn from
  (seed, j); the other blocks, block_copy of each original. The database: the originals, then the
  distractors.
  """
  orig = images("copydays_original", originals)
  dist = images("copydays_distractors", distractors)

  def strong(j):
    return strong_copy(orig(j % originals), np.random.default_rng([seed, j]))

  queries = {b: Images(copies, strong, imsize) if b == "strong" else
                Images(originals, lambda i, b=b: block_copy(orig(i), b), imsize) for b in blocks}
  positives = {b: [np.array([j % originals]) for j in range(copies)] if b == "strong" else
                  [np.array([i]) for i in range(originals)] for b in blocks}
  database = Images(originals + distractors,
                    lambda i: orig(i) if i < originals else dist(i - originals), imsize)
  return CopySets(queries, database, Images(whitening, images("copydays_whitening", whitening),
                                            imsize), positives)


def embedded(config: mlc.ConfigDict, imsize: int, *, originals: int = EMBEDDED_ORIGINALS,
             copies: int = EMBEDDED_COPIES, distractors: int = EMBEDDED_DISTRACTORS,
             whitening: int = EMBEDDED_WHITENING, blocks: tuple[str, ...] = BLOCKS) -> CopySets:
  """Copydays made of the workdir's shapes images (config.data with data.source 'shapes'), by
  `generated`: originals, distractors and whitening images are three splits of their own, never
  seen in training; the strong copies drawn from data.shapes_seed."""
  def shapes(split, n):
    c = config.copy_and_resolve_references()
    c.data.shapes_eval_size = n  # make_source's size of any split but the training one
    source = make_source(c, split)
    return lambda i: source[i]["image"]

  return generated(shapes, imsize, originals=originals, copies=copies, distractors=distractors,
                   whitening=whitening, seed=config.data.shapes_seed, blocks=blocks)
