"""The evaluations' pictures: attention maps and masks over their images, and curves of the
evaluations during training. Matplotlib's Figure without pyplot, so any backend (or none) serves.
Files are drawn into memory and written through dino_jax.paths: a path may be a URI (gs://...).

Shapes: B batch, h heads, gh x gw patch grid, p patch size, H x W image.
"""
from __future__ import annotations

import functools
import io
import os
from typing import Any, Sequence

import jax
import matplotlib
import matplotlib.image
import ml_collections as mlc
import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from dino_jax import paths
from dino_jax.data import pipeline
from dino_jax.evaluate.attention_maps import mass_masks, upsample


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 100) -> None:
  """fig -> path, in the format of path's extension (png without one)."""
  buf = io.BytesIO()
  fig.savefig(buf, format=os.path.splitext(str(path))[1][1:] or "png", dpi=dpi)
  paths.write_bytes(path, buf.getvalue())


def _save_png(path: str, image: np.ndarray) -> None:
  """An image (H, W) values (viridis, min to max) or (H, W, 3) uint8 / float in [0, 1] -> PNG."""
  buf = io.BytesIO()
  if image.dtype == np.uint8:
    Image.fromarray(image).save(buf, format="png")
  else:
    matplotlib.image.imsave(buf, image, format="png")
  paths.write_bytes(path, buf.getvalue())


def overlay(image: np.ndarray, mask: np.ndarray, color=(1.0, 0.2, 0.2), alpha: float = 0.5
            ) -> np.ndarray:
  """uint8 image (H, W, 3) with a bool mask (H, W) tinted by color, (3,) or per pixel (H, W, 3):
  float (H, W, 3) in [0, 1]."""
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


def plot_grid(path: str | os.PathLike, images: np.ndarray, maps: np.ndarray, patch_size: int,
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
  save_figure(fig, path)


def save_heads(outdir: str, image: np.ndarray, maps: np.ndarray, patch_size: int,
               threshold: float = 0.6) -> list[str]:
  """The release's files for one image (H, W, 3), maps (h, gh, gw): img.png, attn-head{j}.png
  (upsampled map, viridis) and mask_th{threshold}_head{j}.png (mask overlaid). Returns the paths."""
  up_maps, up_masks = _upsampled(maps, patch_size, threshold)
  files = {"img.png": image}
  for j in range(maps.shape[0]):
    files[f"attn-head{j}.png"] = up_maps[j]
    files[f"mask_th{threshold}_head{j}.png"] = overlay(image, up_masks[j])
  written = []
  for name, picture in files.items():
    written.append(os.path.join(str(outdir), name))
    _save_png(written[-1], picture)
  return written


def plot_progress(rows: Sequence[dict[str, Any]], path: str | os.PathLike,
                  headline_k: int = 20) -> None:
  """eval/progress.jsonl's rows -> a figure: k-NN top-1 (left axis) and the attention's Jaccard,
  best head and head mean (right axis), against the training step."""
  steps = [r["step"] for r in rows]
  fig = Figure(figsize=(6, 3.5))
  ax = fig.add_subplot(1, 1, 1)
  if "knn_top1" in rows[0]:
    ks = list(rows[0]["knn_top1"])
    k = str(headline_k) if str(headline_k) in ks else ks[0]
    ax.plot(steps, [r["knn_top1"][k] for r in rows], "o-", color="C0", label=f"{k}-NN top-1")
    ax.set_ylabel(f"{k}-NN top-1 (%)", color="C0")
  if "jaccard" in rows[0]:
    ax2 = ax.twinx()
    ax2.plot(steps, [r["jaccard"] for r in rows], "s-", color="C1", label="Jaccard, best head")
    ax2.plot(steps, [r["jaccard_head_mean"] for r in rows], "s--", color="C1",
             label="Jaccard, head mean")
    ax2.set_ylabel("Jaccard", color="C1")
    ax2.legend(loc="lower right", fontsize=8)
  ax.set_xlabel("step")
  ax.set_title("the teacher during training", fontsize=10)
  fig.tight_layout()
  save_figure(fig, path)


def plot_examples(config: mlc.ConfigDict, maps: np.ndarray, patch_size: int,
                  path: str | os.PathLike) -> None:
  """The attention grid of the first eval images, maps (B, h, gh, gw) of those images."""
  batch = next(iter(pipeline.eval_batches(config, config.data.eval_split, len(maps))))
  plot_grid(path, batch["image"], maps, patch_size, config.eval.attention_threshold,
            batch.get("object_mask"), titles=[f"label {y}" for y in batch["label"]])
