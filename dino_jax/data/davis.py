"""The DAVIS-2017 folder layout and the release's reading of it (eval_video_segmentation.py).

  ROOT/ImageSets/2017/val.txt                  video names, one a line
  ROOT/JPEGImages/480p/<video>/00000.jpg ...   frames
  ROOT/Annotations/480p/<video>/00000.png ...  palette PNGs: object ids (0 background)

Frames are resized as the release's read_frame does: the shorter side to `scale_size` (480), the
longer side to scale_size x its aspect ratio, rounded down to a multiple of 64; then cut to a
multiple of the patch size (the release's patch conv drops that remainder). The first
annotation goes straight to the patch grid by PIL nearest (the release's read_seg). Local
folders only, as data/folder.py.

Shapes: T frames, H x W a frame as stored, th x tw resized, gh x gw the patch grid (p patch size).
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import io
import os

import numpy as np
from PIL import Image

from dino_jax import paths
from dino_jax.data import resample

RESOLUTION = "480p"
VOID_LABEL = 255


@dataclasses.dataclass(frozen=True)
class Video:
  """One video: its name, frame files (sorted) and annotation files (sorted, maybe fewer)."""
  name: str
  frames: tuple[str, ...]
  annotations: tuple[str, ...]


def read_split(root: str, split: str = "val", year: str = "2017") -> list[str]:
  """The video names of ROOT/ImageSets/<year>/<split>.txt, in file order."""
  path = os.path.join(root, "ImageSets", year, f"{split}.txt")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file (expected the DAVIS-{year} layout under {root})")
  with open(path, encoding="utf-8") as f:
    return [line.strip() for line in f if line.strip()]


def video(root: str, name: str) -> Video:
  """A video's frame and annotation files; raises FileNotFoundError when frames or the first
  annotation are missing."""
  frames = sorted(glob.glob(os.path.join(root, "JPEGImages", RESOLUTION, name, "*.jpg")))
  annotations = sorted(glob.glob(os.path.join(root, "Annotations", RESOLUTION, name, "*.png")))
  if not frames:
    raise FileNotFoundError(f"{root}: no frames JPEGImages/{RESOLUTION}/{name}/*.jpg")
  first = os.path.join(root, "Annotations", RESOLUTION, name,
                       os.path.basename(frames[0])[:-len(".jpg")] + ".png")
  if first not in annotations:
    raise FileNotFoundError(f"{first}: the first frame's annotation is missing")
  return Video(name, tuple(frames), tuple(annotations))


def frame_size(height: int, width: int, scale_size: int = 480) -> tuple[int, int]:
  """(th, tw): the release's read_frame sizes for a (height, width) frame. Its read_seg computes
  the same sizes for the first annotation, but swaps them for a square frame (480 x 448 vs
  448 x 480); here one rule serves both (no DAVIS video is square)."""
  if height > width:
    return int((scale_size * height / width) // 64 * 64), scale_size
  return scale_size, int((scale_size * width / height) // 64 * 64)


def resize_frame(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """uint8 (H, W, 3) -> uint8 (th, tw, 3) by cv2.resize's default INTER_LINEAR, as the release.

  Float weights rounded once at the end, where cv2 uses 11-bit fixed point: a level apart at
  most.
  """
  rows, cols = (resample.bilinear_matrix(n, m) for n, m in zip(image.shape[:2], size))
  out = np.einsum("ah,hwc,bw->abc", rows, image.astype(np.float64), cols)
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def read_frame(path: str, patch_size: int, scale_size: int | None = 480
               ) -> tuple[np.ndarray, tuple[int, int]]:
  """A frame file -> (uint8 (th, tw, 3) RGB, resized and cut to a multiple of the patch size,
  its stored (H, W)). scale_size None keeps the stored size (cut only)."""
  with Image.open(path) as img:
    image = np.asarray(img.convert("RGB"))
  hw = image.shape[:2]
  if scale_size is not None:
    image = resize_frame(image, frame_size(*hw, scale_size))
  h, w = image.shape[:2]
  return image[:h - h % patch_size, :w - w % patch_size], hw


def read_annotation(path: str) -> np.ndarray:
  """An annotation PNG -> uint8 (H, W) object ids. The void label 255 reads as background, as
  davis2017-evaluation reads its ground truth. (The release would propagate 255 as an object of
  its own, with 256 label channels; its evaluation then rejects the 255 in the results.)"""
  with Image.open(path) as img:
    ids = np.array(img)
  if ids.ndim != 2:
    raise ValueError(f"{path}: an annotation is a one-channel (palette) PNG, not {ids.shape}")
  ids[ids == VOID_LABEL] = 0
  return ids.astype(np.uint8)


def mask_on_grid(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
  """uint8 (H, W) ids -> (gh, gw) ids by PIL nearest, straight from the stored size: the
  release's read_seg (seg.resize((tw // p, th // p), 0))."""
  return np.asarray(Image.fromarray(mask).resize((grid[1], grid[0]), Image.NEAREST))


def resize_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """uint8 (h, w) ids -> (H, W) by PIL nearest: the release's way back to the stored size."""
  if labels.shape == tuple(size):
    return labels
  return np.asarray(Image.fromarray(labels).resize((size[1], size[0]), Image.NEAREST))


@functools.lru_cache(maxsize=1)
def palette() -> np.ndarray:
  """(256, 3) uint8: the PASCAL VOC colour map, DAVIS's annotation palette (the release reads
  the same colours from UVC's palette.txt over the network; here they are computed once). Read
  only: every caller shares the array."""
  out = np.zeros((256, 3), np.uint8)
  for i in range(256):
    c, r, g, b = i, 0, 0, 0
    for j in range(8):
      r |= ((c >> 0) & 1) << (7 - j)
      g |= ((c >> 1) & 1) << (7 - j)
      b |= ((c >> 2) & 1) << (7 - j)
      c >>= 3
    out[i] = (r, g, b)
  return out


def write_indexed(path: str, labels: np.ndarray) -> None:
  """uint8 (H, W) ids -> a palette PNG (the release's imwrite_indexed); path may be a URI."""
  img = Image.fromarray(labels.astype(np.uint8))
  img.putpalette(palette().ravel().tolist())
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  paths.write_bytes(path, buf.getvalue())
