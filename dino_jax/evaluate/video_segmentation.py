"""Video object segmentation by label propagation of frozen patch features: the paper's DAVIS-2017
evaluation (the release's eval_video_segmentation.py).

Each frame's last-block patch tokens (final-LN-normed, [CLS] dropped, L2-normalised per patch)
are the features. Frame t's labels are propagated from the first frame (its annotation, one-hot
on the patch grid) and the n_last_frames previous frames (their propagated soft labels): the
affinity exp(<target patch, source patch> / temperature) of every target patch to every source
patch, kept within a square of side 2 size_mask_neighborhood + 1 patches around the target, then
only each target's topk largest over all source frames, normalised to sum 1, weights the source
labels. The soft labels are upsampled bilinearly by the patch size, each channel min-max scaled
over the frame, and the argmax is the object id, resized (nearest) to the frame's stored size.
J and F (davis_metrics.py) score the ids.

Departures from the release, none of which changes its arithmetic beyond float rounding: frames
go through the network in batches (it feeds one at a time); the previous frames sit in a ring of
n_last_frames slots (its queue), empty slots masked; the temperature is an option; frames are
decoded by PIL and resized in float (cv2, fixed point: a gray level apart at most); the void
label reads as background (data/davis.py); the ids are scored in the same process (it writes the
PNGs for davis2017-evaluation to read); the embedded clips keep their size (its 480-px resize is
for DAVIS's frames).

Shapes: T frames, N = gh x gw patches, D width, C label channels (background + objects), p
patch size, H x W a frame.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh
from matplotlib.figure import Figure

from dino_jax import sharding as sharding_lib
from dino_jax.data import davis, pipeline, resample
from dino_jax.evaluate import davis_metrics, features, plots

# The release's color_normalize for video frames: std 0.228 for red (ImageNet's is 0.229).
MEAN, STD = (0.485, 0.456, 0.406), (0.228, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Propagation:
  """The release's label propagation settings and defaults (its temperature, 0.1, is fixed in
  its code, not an option there)."""
  n_last_frames: int = 7
  size_mask_neighborhood: int = 12
  topk: int = 5
  temperature: float = 0.1


def patch_features(backbone: nn.Module, params: Any, frames: jax.Array) -> jax.Array:
  """uint8 frames (B, H, W, 3) -> the last block's patch tokens, final-LN-normed (B, N, D) float32
  (propagate L2-normalises them); backbone as features.evaluation_backbone builds it (float32)."""
  x = (frames.astype(jnp.float32) / 255.0 - jnp.asarray(MEAN)) / jnp.asarray(STD)
  tokens = backbone.apply({"params": params}, x, 1, method="get_intermediate_layers")[0]
  return tokens[:, 1:].astype(jnp.float32)


@functools.lru_cache(maxsize=16)
def _features_fn(backbone: nn.Module):
  """features.extract's fn for {name: params}: one function object per backbone (compiled once)."""

  def fn(params, batch):
    return {name: patch_features(backbone, params[name], batch["image"]) for name in params}

  return fn


def frame_batches(frames: np.ndarray, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  """This process's share of frames (T, H, W, 3) as pipeline.padded_share reads a source."""
  return pipeline.padded_share([{"image": f} for f in frames], batch_size,
                               process_index=jax.process_index(),
                               process_count=jax.process_count())


def extract(backbone: nn.Module, models: dict[str, Any], frames: np.ndarray, batch_size: int,
            mesh: Mesh) -> dict[str, np.ndarray]:
  """Every model's patch features of frames (T, H, W, 3): {name: (T, N, D)}, on every process."""
  local = features.local_batch_size(batch_size, mesh)
  out, _ = features.extract(_features_fn(backbone), models, frame_batches(frames, local), mesh)
  return out


def neighborhood(grid: tuple[int, int], size: int) -> jax.Array:
  """(N, N) bool: patches (i, j) and (i', j') lie within `size` rows and `size` columns of each
  other (the release's restrict_neighborhood); built from indices, not stored in the program."""
  index = jnp.arange(grid[0] * grid[1])
  i, j = index // grid[1], index % grid[1]
  return ((jnp.abs(i[:, None] - i[None]) <= size) & (jnp.abs(j[:, None] - j[None]) <= size))


@functools.partial(jax.jit, static_argnames=("grid", "n_last_frames", "size_mask_neighborhood",
                                             "topk"))
def propagate(feats: jax.Array, first: jax.Array, grid: tuple[int, int], n_last_frames: int = 7,
              size_mask_neighborhood: int = 12, topk: int = 5, temperature: float = 0.1
              ) -> jax.Array:
  """Soft labels of frames 1 .. T-1 from the first frame's labels (the release's
  label_propagation, and its queue of previous frames).

  Args:
    feats: (T, N, D) patch features of the frames, in order (L2-normalised here).
    first: (N, C) the first frame's labels on the patch grid, one-hot.
    grid: (gh, gw), N = gh gw, rows first.
  Returns:
    (T - 1, N, C) float32: frame t's labels at row t - 1.
  """
  t, n, d = feats.shape
  c, k = first.shape[-1], n_last_frames
  feats = features.l2_normalize(feats.astype(jnp.float32))
  first = first.astype(jnp.float32)
  near = neighborhood(grid, size_mask_neighborhood) if size_mask_neighborhood > 0 else None
  hi = jax.lax.Precision.HIGHEST

  def step(queue, inputs):
    # The queue holds the last k frames' features and soft labels in a ring; empty slots, in the
    # first k frames, get zero affinity, as if absent (every affinity kept is positive).
    q_feats, q_segs, q_valid = queue
    target, slot = inputs
    src_feats = jnp.concatenate([feats[:1], q_feats])  # (1 + k, N, D): the first frame always
    src_segs = jnp.concatenate([first[None], q_segs])  # (1 + k, N, C)
    valid = jnp.concatenate([jnp.ones(1, bool), q_valid])
    aff = jnp.exp(jnp.einsum("qd,fsd->fsq", target, src_feats, precision=hi) / temperature)
    if near is not None:
      aff = aff * near  # near[source, target]: symmetric
    aff = jnp.where(valid[:, None, None], aff, 0.0).reshape(-1, n)  # ((1 + k) N sources, N)
    kth = jax.lax.top_k(aff.T, topk)[0][:, -1]  # each target's topk-th largest affinity
    aff = jnp.where(aff < kth[None], 0.0, aff)  # ties with it stay, as the release's mask does
    aff = aff / jnp.sum(aff, axis=0, keepdims=True)
    seg = jnp.einsum("sc,sq->qc", src_segs.reshape(-1, c), aff, precision=hi)  # (N, C)
    queue = (q_feats.at[slot].set(target), q_segs.at[slot].set(seg), q_valid.at[slot].set(True))
    return queue, seg

  init = (jnp.zeros((k, n, d)), jnp.zeros((k, n, c)), jnp.zeros(k, bool))
  _, segs = jax.lax.scan(step, init, (feats[1:], jnp.arange(t - 1) % k))
  return segs


@functools.partial(jax.jit, static_argnames=("grid", "patch_size"))
def soft_to_labels(segs: jax.Array, grid: tuple[int, int], patch_size: int) -> jax.Array:
  """Soft labels (T, N, C) -> object ids (T, gh p, gw p) int32: torch's bilinear upsampling by p
  (align_corners False), the release's norm_mask (a channel with a positive maximum is min-max
  scaled, so a constant positive channel turns NaN and, as torch.max, wins), argmax."""
  gh, gw = grid
  rows = jnp.asarray(resample.bilinear_matrix(gh, gh * patch_size), jnp.float32)
  cols = jnp.asarray(resample.bilinear_matrix(gw, gw * patch_size), jnp.float32)

  def one(seg):
    up = jnp.einsum("ah,hwc,bw->cab", rows, seg.reshape(gh, gw, -1), cols,
                    precision=jax.lax.Precision.HIGHEST)
    lo, top = up.min((1, 2), keepdims=True), up.max((1, 2), keepdims=True)
    up = jnp.where(top > 0, (up - lo) / (top - lo), up)
    return jnp.argmax(up, axis=0)

  return jax.lax.map(one, segs)


def segment(feats: np.ndarray, first_mask: np.ndarray, grid: tuple[int, int], patch_size: int,
            options: Propagation = Propagation()) -> np.ndarray:
  """A video's object ids from its features and first annotation.

  Args:
    feats: (T, N, D) patch features; first_mask: uint8 (H, W) the first frame's object ids.
    grid: (gh, gw) the patch grid of the features.
  Returns:
    uint8 (T, H, W): the first annotation, then the propagated ids at the annotation's size.
  """
  small = davis.mask_on_grid(first_mask, grid)
  # One channel per id up to the largest left on the grid (the release's to_one_hot).
  first = np.eye(int(small.max()) + 1, dtype=np.float32)[small.reshape(-1)]
  segs = propagate(jnp.asarray(feats), jnp.asarray(first), tuple(grid), options.n_last_frames,
                   options.size_mask_neighborhood, options.topk, options.temperature)
  ids = np.asarray(soft_to_labels(segs, tuple(grid), patch_size)).astype(np.uint8)
  return np.stack([first_mask] + [davis.resize_labels(x, first_mask.shape) for x in ids])


def evaluate_clips(backbone: nn.Module, models: dict[str, Any], clips: Sequence[dict[str, Any]],
                   options: Propagation = Propagation(), batch_size: int = 64,
                   mesh: Mesh | None = None
                   ) -> tuple[dict[str, dict[str, Any]], dict[str, list[np.ndarray]]]:
  """The embedded evaluation: each model's propagation over the clips, and the baseline (the
  first mask copied to every frame), scored by J and F.

  Args:
    backbone: the ViT module; models: {name: its backbone params}.
    clips: [{'name', 'frames': uint8 (T, H, W, 3), 'masks': uint8 (T, H, W)}], one frame size
      (data/shapes_clips.py); frames are cut to a multiple of the patch size for the network.
  Returns:
    ({name: davis_metrics.summarize(...)} for each model and 'baseline', {name: [ids (T, H, W)
    of each clip]}).
  """
  mesh = sharding_lib.make_mesh() if mesh is None else mesh
  p = backbone.patch_size
  h, w = clips[0]["frames"].shape[1:3]
  grid = (h // p, w // p)
  frames = np.concatenate([c["frames"][:, :grid[0] * p, :grid[1] * p] for c in clips])
  feats = extract(backbone, models, frames, batch_size, mesh)
  starts = np.cumsum([0] + [len(c["frames"]) for c in clips])
  preds = {name: [segment(feats[name][a:b], c["masks"][0], grid, p, options)
                  for c, a, b in zip(clips, starts[:-1], starts[1:])] for name in models}
  preds["baseline"] = [np.repeat(c["masks"][:1], len(c["masks"]), 0) for c in clips]
  results = {name: davis_metrics.summarize({c["name"]: davis_metrics.video_scores(c["masks"], x)
                                            for c, x in zip(clips, ids)})
             for name, ids in preds.items()}
  return results, preds


def evaluate_davis(backbone: nn.Module, params: Any, root: str, *, split: str = "val",
                   options: Propagation = Propagation(), scale_size: int | None = 480,
                   batch_size: int = 6, output: str | None = None, mesh: Mesh | None = None
                   ) -> dict[str, Any]:
  """The release's evaluation on a DAVIS-2017 folder (data/davis.py's layout): every video of
  ImageSets/2017/<split>.txt segmented from its first annotation; with `output`, the ids written
  as output/<video>/<frame>.png (process 0). Returns davis_metrics.summarize's figures over the
  videos annotated on every frame (those with fewer annotations are segmented, not scored)."""
  mesh = sharding_lib.make_mesh() if mesh is None else mesh
  p = backbone.patch_size
  names = davis.read_split(root, split)
  scores = {}
  for i, name in enumerate(names):
    video = davis.video(root, name)
    frames, sizes = zip(*[davis.read_frame(f, p, scale_size) for f in video.frames])
    first = davis.read_annotation(video.annotations[0])
    if first.shape != sizes[0]:
      raise ValueError(f"{video.annotations[0]}: {first.shape} px, its frame {sizes[0]}")
    frames = np.stack(frames)
    grid = (frames.shape[1] // p, frames.shape[2] // p)
    feats = extract(backbone, {"model": params}, frames, batch_size, mesh)["model"]
    ids = segment(feats, first, grid, p, options)
    frame_names = [os.path.basename(f)[:-len(".jpg")] for f in video.frames]
    if output is not None and jax.process_index() == 0:
      write_masks(output, name, frame_names, ids)
    annotated = [os.path.basename(a)[:-len(".png")] for a in video.annotations]
    if annotated == frame_names:
      scores[name] = davis_metrics.video_scores(
          np.stack([davis.read_annotation(a) for a in video.annotations]), ids)
    logging.info("[%d/%d] %s: %d frames at %dx%d px (%dx%d patches)%s", i + 1, len(names), name,
                 len(frames), frames.shape[1], frames.shape[2], *grid,
                 "" if name in scores else ", not every frame annotated: not scored")
  return davis_metrics.summarize(scores)


def write_masks(outdir: str, video: str, frame_names: Sequence[str], ids: np.ndarray) -> None:
  """ids (T, H, W) -> outdir/<video>/<frame name>.png, palette PNGs as DAVIS's."""
  for name, x in zip(frame_names, ids):
    davis.write_indexed(os.path.join(str(outdir), video, f"{name}.png"), x)


def plot_clip(path: str | os.PathLike, frames: np.ndarray, rows: dict[str, np.ndarray]) -> None:
  """One clip's frames (T, H, W, 3) in a row per entry of rows {title: ids (T, H, W)}, each
  object overlaid in its DAVIS colour; written as a PNG (path may be a URI)."""
  t, h, w = frames.shape[:3]
  colors = davis.palette() / 255.0
  gap = max(1, h // 16)
  grid = np.ones((len(rows) * (h + gap), t * (w + gap), 3), np.float32)
  for r, ids in enumerate(rows.values()):
    for i in range(t):
      tile = plots.overlay(frames[i], ids[i] > 0, colors[ids[i]])  # each object its colour
      grid[r * (h + gap):r * (h + gap) + h, i * (w + gap):i * (w + gap) + w] = tile
  scale, left = 0.8 / max(h, w), 1.4  # inches per pixel (a tile is 0.8 inch), title margin
  fig = Figure(figsize=(grid.shape[1] * scale + left + 0.1, grid.shape[0] * scale + 0.4))
  fw, fh = fig.get_figwidth(), fig.get_figheight()
  ax = fig.add_axes((left / fw, 0.1 / fh, grid.shape[1] * scale / fw, grid.shape[0] * scale / fh))
  ax.imshow(grid, interpolation="nearest")
  ax.set_axis_off()
  for r, title in enumerate(rows):
    fig.text(0.5 * left / fw, (0.1 + (len(rows) - r - 0.5) * (h + gap) * scale) / fh, title,
             ha="center", va="center", fontsize=8)
  fig.text(0.5, 1 - 0.2 / fh, "frames 0 .. %d (frame 0: the given annotation)" % (t - 1),
           ha="center", va="center", fontsize=8)
  plots.save_figure(fig, path)
