"""Short videos of the embedded shapes: one or two objects moving and turning over a flat
background, an object-id mask per frame (the embedded version of DAVIS for the video
segmentation evaluation).

Each object is a shape of data/shapes.py (its label, area, angle and gray levels drawn as the
config's `shapes` source draws a record), rendered by ShapesSource.coverage; from frame to frame
its centre moves by a constant velocity and its angle turns by a constant step, bouncing off the
image border so that the whole object stays inside. Object and background take the config's gray
levels (data.shapes_fg_range / shapes_bg_range / shapes_polarity: what the network trained on),
and the lighting changes from frame to frame: each frame's brightness and contrast are scaled
by factors drawn anew, uniform in [1 - b, 1 + b] and [1 - c, 1 + c], with b and c the training's
colour jitter (config.aug.brightness, aug.contrast; torchvision's adjust_brightness, then
adjust_contrast about the frame's mean), before fresh pixel noise. Real videos change in
appearance as they go (DAVIS: lighting, exposure, blur); a flat-gray clip under constant light
would be propagated by gray level and position alone, which random features keep as well as
trained ones (docs/notes/evaluation.md). `lighting=False` gives those constant-light clips.
In two-object clips both objects share one gray level (only their motion tells them apart), their
areas lie in (low / 2, low), low the lower end of data.shapes_area (two objects of the full range
do not fit side by side in 32 px), they start apart, and object 2 passes in front of object 1.

Shapes: T frames, S = data.shapes_image_size.
"""
from __future__ import annotations

import math
import zlib
from typing import Any

import ml_collections as mlc
import numpy as np

from dino_jax.data.shapes import ShapesSource
from dino_jax.data.sources import make_source

SPLIT = "video_clips"  # the source split the objects are drawn from (apart from train and val)
SPEED = (0.5, 1.25)  # px per frame
TURN = (0.03, 0.12)  # radians per frame, either sense


def make_clips(config: mlc.ConfigDict, num_clips: int = 24, num_frames: int = 12,
               lighting: bool = True) -> list[dict[str, Any]]:
  """The clips of a config whose data.source is 'shapes', from data.shapes_seed.

  Clips come in runs of num_classes: one object, then two, then one, ...; the objects' records
  are taken in order, so a run of one-object clips shows every class once. Returns
  [{'name': 'clip00', 'frames': uint8 (T, S, S, 3), 'masks': uint8 (T, S, S) (0 background, 1, 2
  the objects)}]. lighting: whether the frames' brightness and contrast change (above).
  """
  cfg = config.copy_and_resolve_references()
  cfg.data.shapes_eval_size = num_clips * 2  # every object its own record's draws
  source = make_source(cfg, SPLIT)
  s = source.image_size
  margin = s // 2  # a canvas with this margin shows any part of an object outside the image
  canvas = ShapesSource(1, SPLIT, image_size=s + 2 * margin, classes=source.classes,
                        supersample=source.supersample)
  clips, index = [], 0
  for c in range(num_clips):
    rng = np.random.default_rng([cfg.data.shapes_seed, zlib.crc32(SPLIT.encode()), c])
    count = 1 + (c // source.num_classes) % 2
    objects = [source.params(index + k) for k in range(count)]
    index += len(objects)
    if len(objects) == 2:
      lo, hi = source.area
      for p in objects:  # the record's uniform draw in (lo, hi), mapped onto (lo / 2, lo)
        p["area"] = lo / 2 * (1 + (p["area"] / (s * s) - lo) / (hi - lo)) * s * s
      _place_apart(objects, rng, canvas, margin, s)
    covs = _track(objects, rng, canvas, margin, s, num_frames)  # (K, T, S, S)
    fg, bg = objects[0]["fg"], objects[0]["bg"]
    union = 1 - np.prod(1 - covs, axis=0)
    gray = bg + (fg - bg) * union  # (T, S, S)
    if lighting:
      gray = _light(gray, rng, cfg.aug.brightness, cfg.aug.contrast)
    gray = gray + rng.normal(0, source.noise, union.shape)
    gray = np.round(np.clip(gray, 0, 1) * 255).astype(np.uint8)
    masks = np.zeros((num_frames, s, s), np.uint8)
    for k, cov in enumerate(covs):  # later objects in front
      masks[cov >= 0.5] = k + 1
    clips.append({"name": f"clip{c:02d}", "frames": np.repeat(gray[..., None], 3, -1),
                  "masks": masks})
  return clips


def _light(frames: np.ndarray, rng: np.random.Generator, brightness: float, contrast: float
           ) -> np.ndarray:
  """Frames (T, S, S) in [0, 1], each under its own light: x * b clipped to [0, 1] (b uniform in
  [1 - brightness, 1 + brightness]), then (x - mean(x)) * c + mean(x) clipped (c likewise)."""
  t = len(frames)
  b = rng.uniform(1 - brightness, 1 + brightness, t)[:, None, None]
  c = rng.uniform(1 - contrast, 1 + contrast, t)[:, None, None]
  x = np.clip(frames * b, 0, 1)
  mean = x.mean(axis=(1, 2), keepdims=True)
  return np.clip((x - mean) * c + mean, 0, 1)


def _coverage(p: dict[str, Any], canvas: ShapesSource, margin: int, s: int
              ) -> tuple[np.ndarray, bool]:
  """(the object's coverage of the image (S, S), whether it lies wholly inside the image)."""
  cov = canvas.coverage({**p, "centre": [p["centre"][0] + margin, p["centre"][1] + margin]})
  inner = cov[margin:margin + s, margin:margin + s]
  return inner, bool(np.isclose(inner.sum(), cov.sum()))


def _place_apart(objects: list[dict[str, Any]], rng: np.random.Generator, canvas: ShapesSource,
                 margin: int, s: int, tries: int = 200) -> None:
  """New centres for two objects: each wholly inside, not touching each other (else, after
  `tries`, the centres their records drew)."""
  for _ in range(tries):
    centres = [[rng.uniform(0, s), rng.uniform(0, s)] for _ in objects]
    covs = [_coverage({**p, "centre": c}, canvas, margin, s) for p, c in zip(objects, centres)]
    if all(inside for _, inside in covs) and not np.any((covs[0][0] > 0) & (covs[1][0] > 0)):
      for p, c in zip(objects, centres):
        p["centre"] = c
      return


def _track(objects: list[dict[str, Any]], rng: np.random.Generator, canvas: ShapesSource,
           margin: int, s: int, num_frames: int) -> np.ndarray:
  """Each object's coverage (K, T, S, S) along its path: a velocity of SPEED px a frame and a turn
  of TURN radians a frame; a step that would leave the image reflects the velocity (x, y or
  both), or else the object holds still and turns the other way."""
  out = np.zeros((len(objects), num_frames, s, s), np.float32)
  for k, p in enumerate(objects):
    heading, speed = rng.uniform(0, 2 * math.pi), rng.uniform(*SPEED)
    v = np.array([math.cos(heading), math.sin(heading)]) * speed
    turn = rng.uniform(*TURN) * rng.choice([-1, 1])
    state = {**p, "centre": list(p["centre"])}
    out[k, 0] = _coverage(state, canvas, margin, s)[0]
    for t in range(1, num_frames):
      for flip in ((1, 1), (-1, 1), (1, -1), (-1, -1)):
        step = v * flip
        nxt = {**state, "centre": [state["centre"][0] + step[0], state["centre"][1] + step[1]],
               "angle": state["angle"] + turn}
        cov, inside = _coverage(nxt, canvas, margin, s)
        if inside:
          state, v = nxt, step
          break
      else:
        turn = -turn
        cov = _coverage(state, canvas, margin, s)[0]
      out[k, t] = cov
  return out
