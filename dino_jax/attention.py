"""Self-attention maps of the last block's [CLS] query, their 60%-mass masks, and how well they find
the object (the paper's Figures 1 and 3, and its Jaccard comparison with object masks).

Shapes: B batch, h heads, gh x gw patch grid (N = gh * gw patches), p patch size, H x W image
(H = gh * p, W = gw * p).
"""
from __future__ import annotations

import functools
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib
import matplotlib.image
import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from dino_jax import train as train_lib


def cls_attention(backbone: nn.Module, params: Any, images: jax.Array) -> jax.Array:
  """uint8 or [0, 1] images (B, H, W, 3) -> last block's [CLS] -> patch attention (B, h, gh, gw).

  The [CLS] -> [CLS] entry is left out, so a head's map sums to less than 1.
  """
  p = backbone.patch_size
  attn = backbone.apply({"params": params}, train_lib.normalize(images),
                        method="get_last_selfattention")  # (B, h, T, T)
  b, h = attn.shape[:2]
  return attn[:, :, 0, 1:].reshape(b, h, images.shape[1] // p, images.shape[2] // p)


def mass_masks(maps: jax.Array, threshold: float = 0.6) -> jax.Array:
  """(..., gh, gw) attention -> bool masks keeping the smallest set of patches that holds
  `threshold` of each map's mass: the release's rule,
  cumsum(sorted ascending / sum) > 1 - threshold.

  Equal values are ordered by patch index (a stable sort): the lower-index patch counts as smaller.
  """
  shape = maps.shape
  flat = maps.reshape(shape[:-2] + (-1,))
  order = jnp.argsort(flat, axis=-1, stable=True)
  vals = jnp.take_along_axis(flat, order, axis=-1)
  keep_sorted = jnp.cumsum(vals / jnp.sum(vals, axis=-1, keepdims=True), axis=-1) > 1 - threshold
  keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)  # unsort
  return keep.reshape(shape)


def upsample(maps: jax.Array, patch_size: int) -> jax.Array:
  """(..., gh, gw) -> (..., gh * p, gw * p), nearest: patch (i, j) covers pixels
  [i p, (i + 1) p) x [j p, (j + 1) p), as torch's interpolate(scale_factor=p, mode='nearest')."""
  return jnp.repeat(jnp.repeat(maps, patch_size, axis=-2), patch_size, axis=-1)


def jaccard(a: jax.Array, b: jax.Array) -> jax.Array:
  """Intersection over union of bool masks (..., H, W) -> (...); 1 where both are empty."""
  inter = jnp.sum(a & b, axis=(-2, -1))
  union = jnp.sum(a | b, axis=(-2, -1))
  return jnp.where(union > 0, inter / jnp.maximum(union, 1), 1.0)


def object_scores(maps: jax.Array, object_mask: jax.Array, patch_size: int,
                  threshold: float = 0.6) -> dict[str, jax.Array]:
  """Per-image agreement of the attention with the object, at pixel resolution.

  Args:
    maps: (B, h, gh, gw) [CLS] -> patch attention.
    object_mask: (B, H', W') bool, H' >= gh * p (cropped to the patch grid like the image).
  Returns:
    jaccard (B, h): each head's `threshold`-mass mask vs the object; jaccard_mean_map (B,): the
    same for the head-averaged map; mass_on_object (B, h): each head's share of its patch
    attention on object pixels (a uniform map scores object_area); object_area (B,): the
    object's share of the pixels.
  """
  gh, gw = maps.shape[-2:]
  obj = object_mask[:, :gh * patch_size, :gw * patch_size]
  up = lambda m: upsample(m, patch_size)
  objf = obj.astype(jnp.float32)[:, None]
  mean_map = jnp.mean(maps, axis=1)
  return {
      "jaccard": jaccard(up(mass_masks(maps, threshold)), obj[:, None]),
      "jaccard_mean_map": jaccard(up(mass_masks(mean_map, threshold)), obj),
      "mass_on_object": jnp.sum(up(maps) * objf, axis=(-2, -1)) / jnp.sum(up(maps), axis=(-2, -1)),
      "object_area": jnp.mean(objf[:, 0], axis=(-2, -1)),
  }


def summarize(scores: dict[str, np.ndarray]) -> dict[str, Any]:
  """Per-image object_scores (over a split) -> eval/attention.json's figures.

  The best head is the one with the highest Jaccard averaged over the images (one head for the
  whole split, not a per-image pick); mass_on_object is that head's.
  """
  per_head = np.mean(scores["jaccard"], axis=0)
  best = int(np.argmax(per_head))
  return {
      "jaccard": float(per_head[best]),
      "jaccard_head_mean": float(np.mean(per_head)),
      "per_head": [float(x) for x in per_head],
      "mass_on_object": float(np.mean(scores["mass_on_object"][:, best])),
      "object_area": float(np.mean(scores["object_area"])),
      "jaccard_mean_map": float(np.mean(scores["jaccard_mean_map"])),
  }


def load_image(image: str | os.PathLike | Image.Image | np.ndarray,
               image_size: Sequence[int] = (480, 480), patch_size: int = 8) -> np.ndarray:
  """An image (a file's path, a PIL image or a uint8 (H, W, 3) / (H, W) array) -> uint8 (H, W, 3),
  resized and cut to a multiple of the patch size.

  As the release: one size resizes the shorter side to it (aspect kept), two give (H, W); PIL
  bilinear; then the bottom and right rows beyond a multiple of the patch size are dropped.
  """
  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
      raise ValueError(f"load_image: a uint8 (H, W, 3) or (H, W) array, not {image.dtype} "
                       f"{image.shape}")
    image = Image.fromarray(image)
  img = (image if isinstance(image, Image.Image) else Image.open(image)).convert("RGB")
  if len(image_size) == 1:
    s = image_size[0]
    w, h = img.size
    size = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)  # torchvision's rounding
  else:
    size = (image_size[1], image_size[0])
  img = np.asarray(img.resize(size, Image.BILINEAR))
  h, w = img.shape[0] - img.shape[0] % patch_size, img.shape[1] - img.shape[1] % patch_size
  return img[:h, :w]


def overlay(image: np.ndarray, mask: np.ndarray, color=(1.0, 0.2, 0.2), alpha: float = 0.5
            ) -> np.ndarray:
  """uint8 image (H, W, 3) with a bool mask (H, W) tinted: float (H, W, 3) in [0, 1]."""
  img = image.astype(np.float32) / 255.0
  return np.where(mask[..., None], (1 - alpha) * img + alpha * np.asarray(color), img)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _upsampled_jit(maps, patch_size, threshold):
  return upsample(maps, patch_size), upsample(mass_masks(maps, threshold), patch_size)


def _upsampled(maps: np.ndarray, patch_size: int, threshold: float
               ) -> tuple[np.ndarray, np.ndarray]:
  """Host maps (..., gh, gw) -> host upsampled maps and masks (explicit transfers only)."""
  return jax.device_get(_upsampled_jit(jax.device_put(np.asarray(maps)), patch_size, threshold))


def colorize(m: np.ndarray, cmap: str = "viridis") -> np.ndarray:
  """(H, W) values -> float RGB (H, W, 3), min to max over the colormap (as imshow scales)."""
  lo, hi = float(m.min()), float(m.max())
  return matplotlib.colormaps[cmap]((m - lo) / (hi - lo) if hi > lo else np.zeros_like(m))[..., :3]


def plot_grid(path: str, images: np.ndarray, maps: np.ndarray, patch_size: int,
              threshold: float = 0.6, object_masks: np.ndarray | None = None,
              titles: Sequence[str] | None = None) -> None:
  """One row per image: the image, [the object mask], each head's map, each head's mask overlaid.

  images (B, H, W, 3) uint8; maps (B, h, gh, gw); object_masks (B, H, W) bool or None. The tiles
  are laid out in one array and drawn once (a grid of axes takes seconds to lay out).
  """
  b, h = maps.shape[:2]
  up_maps, up_masks = _upsampled(maps, patch_size, threshold)
  ih, iw = up_maps.shape[-2:]
  names = ["image"] + ["object"] * (object_masks is not None) + [f"head {j}" for j in range(h)] + [
      f"{threshold:.0%} mask {j}" for j in range(h)]
  gap = max(1, ih // 16)
  grid = np.ones((b * (ih + gap), len(names) * (iw + gap), 3), np.float32)
  for i in range(b):
    img = images[i, :ih, :iw]
    tiles = [img.astype(np.float32) / 255.0]
    if object_masks is not None:
      tiles.append(np.repeat(object_masks[i, :ih, :iw, None], 3, -1).astype(np.float32))
    tiles += [colorize(up_maps[i, j]) for j in range(h)]
    tiles += [overlay(img, up_masks[i, j]) for j in range(h)]
    for c, tile in enumerate(tiles):
      grid[i * (ih + gap):i * (ih + gap) + ih, c * (iw + gap):c * (iw + gap) + iw] = tile
  scale = 1.2 / max(ih, iw)  # inches per pixel: a tile is 1.2 inches
  top, left = 0.3, 0.5 if titles is not None else 0.05
  width, height = grid.shape[1] * scale, grid.shape[0] * scale
  fig = Figure(figsize=(width + left + 0.05, height + top + 0.05))  # no pyplot: any backend
  fw, fh = fig.get_figwidth(), fig.get_figheight()
  ax = fig.add_axes((left / fw, 0.05 / fh, width / fw, height / fh))
  ax.imshow(grid, interpolation="nearest")
  ax.set_axis_off()
  for c, name in enumerate(names):
    fig.text((left + (c * (iw + gap) + iw / 2) * scale) / fw, 1 - 0.5 * top / fh, name,
             ha="center", va="center", fontsize=7)
  for i, title in enumerate(titles or []):
    fig.text(0.5 * left / fw, 1 - (top + (i * (ih + gap) + ih / 2) * scale) / fh, title,
             ha="center", va="center", fontsize=7, rotation=90)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)


def save_heads(outdir: str, image: np.ndarray, maps: np.ndarray, patch_size: int,
               threshold: float = 0.6) -> list[str]:
  """The release's files for one image (H, W, 3), maps (h, gh, gw): img.png, attn-head{j}.png
  (upsampled map, viridis) and mask_th{threshold}_head{j}.png (mask overlaid). Returns the paths."""
  os.makedirs(outdir, exist_ok=True)
  up_maps, up_masks = _upsampled(maps, patch_size, threshold)
  paths = [os.path.join(outdir, "img.png")]
  Image.fromarray(image).save(paths[0])
  for j in range(maps.shape[0]):
    paths.append(os.path.join(outdir, f"attn-head{j}.png"))
    matplotlib.image.imsave(paths[-1], up_maps[j], format="png")
    paths.append(os.path.join(outdir, f"mask_th{threshold}_head{j}.png"))
    matplotlib.image.imsave(paths[-1], overlay(image, up_masks[j]), format="png")
  return paths
