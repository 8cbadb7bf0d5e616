"""Self-attention maps of the last block's [CLS] query, their 60%-mass masks, and how well they find
the object (the paper's Figures 1 and 3, and its Jaccard comparison with object masks).

Their pictures are drawn by plots.py.

Shapes: B batch, h heads, gh x gw patch grid (N = gh * gw patches), p patch size, H x W image
(H = gh * p, W = gw * p).
"""
from __future__ import annotations

import io
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from dino_jax import paths
from dino_jax.data.augment import normalize


def cls_attention(backbone: nn.Module, params: Any, images: jax.Array) -> jax.Array:
  """uint8 or [0, 1] images (B, H, W, 3) -> last block's [CLS] -> patch attention (B, h, gh, gw).

  The [CLS] -> [CLS] entry is left out, so a head's map sums to less than 1.
  """
  p = backbone.patch_size
  attn = backbone.apply({"params": params}, normalize(images),
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
  if not isinstance(image, Image.Image):
    image = Image.open(io.BytesIO(paths.read_bytes(image)) if paths.is_uri(image) else image)
  img = image.convert("RGB")
  if len(image_size) == 1:
    s = image_size[0]
    w, h = img.size
    size = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)  # torchvision's rounding
  else:
    size = (image_size[1], image_size[0])
  img = np.asarray(img.resize(size, Image.BILINEAR))
  h, w = img.shape[0] - img.shape[0] % patch_size, img.shape[1] - img.shape[1] % patch_size
  return img[:h, :w]
