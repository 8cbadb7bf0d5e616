"""Region similarity J and boundary accuracy F of video object segmentation, as the DAVIS-2017
semi-supervised evaluation (davis2017-evaluation) computes them, and their summaries.

- J: intersection over union of an object's predicted and true masks (1 where both are empty);
- F: the F-measure of boundary precision and recall: boundaries by seg2bmap (1 px wide, offset
  half a pixel towards the origin), a boundary pixel matching when the other boundary lies within
  ceil(0.008 x the image diagonal) px (the disk dilation of davis2017-evaluation's f_measure);
- per object: the mean over the frames but the first and the last (the first is given, the
  evaluation drops the last too), with recall (share of frames > 0.5) and decay (first quarter
  minus last quarter, db_statistics); overall: means over all objects of all videos, and
  J&F-Mean = (J-Mean + F-Mean) / 2.

Object k of a video is id k of its annotations, k = 1 .. the largest id of the first frame's
annotation; an id the prediction lacks is an empty mask (davis2017-evaluation pads the missing
objects of a result with empty masks too). The void label (255) is background, as that
evaluation reads it.

Shapes: T frames, H x W a frame, K objects.
"""
from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
from scipy import ndimage

from dino_jax.evaluate import tables

BOUND_TH = 0.008  # the boundary tolerance, a fraction of the image diagonal (davis2017-evaluation)
MEASURES = ("J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay")


def jaccard(gt: np.ndarray, pred: np.ndarray) -> float:
  """Bool masks (H, W) -> intersection over union; 1 when both are empty (db_eval_iou)."""
  union = np.sum(gt | pred)
  return 1.0 if union == 0 else float(np.sum(gt & pred) / union)


def seg2bmap(seg: np.ndarray) -> np.ndarray:
  """Bool mask (H, W) -> its 1-px boundary (H, W): pixels that differ from their east, south or
  south-east neighbour; the last row compares east only, the last column south only, and the
  bottom-right pixel is never boundary (davis2017-evaluation's _seg2bmap at full size)."""
  seg = seg.astype(bool)
  e, s, se = (np.zeros_like(seg) for _ in range(3))
  e[:, :-1], s[:-1, :], se[:-1, :-1] = seg[:, 1:], seg[1:, :], seg[1:, 1:]
  b = (seg ^ e) | (seg ^ s) | (seg ^ se)
  b[-1, :] = seg[-1, :] ^ e[-1, :]
  b[:, -1] = seg[:, -1] ^ s[:, -1]
  b[-1, -1] = False
  return b


def _near(src: np.ndarray, dst: np.ndarray, radius: float) -> int:
  """How many pixels of dst lie within `radius` of a pixel of src (both non-empty, (H, W)).

  That is the count of dst inside src dilated by disk(radius) (offsets y^2 + x^2 <= r^2, as
  skimage's disk and cv2.dilate), computed by a distance transform over the bounding box of both
  maps (every src pixel lies inside it, so the distances there are exact).
  """
  ys, xs = np.nonzero(src | dst)
  box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
  dist = ndimage.distance_transform_edt(~src[box])
  return int(np.sum(dst[box] & (dist <= radius)))


def boundary_f(gt: np.ndarray, pred: np.ndarray) -> float:
  """Bool masks (H, W) -> the boundary F-measure (davis2017-evaluation's f_measure at the
  benchmark's bound_th, BOUND_TH: a tolerance of ceil(BOUND_TH x the diagonal) px)."""
  radius = math.ceil(BOUND_TH * math.hypot(*gt.shape))
  fg, gb = seg2bmap(pred), seg2bmap(gt)
  n_fg, n_gt = int(fg.sum()), int(gb.sum())
  if n_fg == 0 or n_gt == 0:  # precision, recall: 1, 0 / 0, 1 (F 0); both empty: F 1
    return 1.0 if n_fg == n_gt else 0.0
  precision = _near(gb, fg, radius) / n_fg
  recall = _near(fg, gb, radius) / n_gt
  return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def statistics(values: np.ndarray) -> tuple[float, float, float]:
  """Per-frame values (T,) -> (mean, recall (share > 0.5), decay): db_statistics, NaN ignored."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", category=RuntimeWarning)
    mean, recall = np.nanmean(values), np.nanmean(values > 0.5)
    ids = (np.round(np.linspace(1, len(values), 5) + 1e-10) - 1).astype(int)
    bins = [values[ids[i]:ids[i + 1] + 1] for i in range(4)]
    decay = np.nanmean(bins[0]) - np.nanmean(bins[3])
  return float(mean), float(recall), float(decay)


def video_scores(gt: np.ndarray, pred: np.ndarray) -> dict[str, np.ndarray]:
  """Object-id maps (T, H, W) of a video, true and predicted -> {'J': (K, T - 2), 'F': (K, T - 2)}:
  each object's scores on every frame but the first and the last."""
  if gt.shape != pred.shape:
    raise ValueError(f"predicted masks {pred.shape} and annotations {gt.shape} differ in shape")
  gt = np.where(gt == 255, 0, gt)
  k = int(gt[0].max())
  out = {"J": np.zeros((k, max(len(gt) - 2, 0))), "F": np.zeros((k, max(len(gt) - 2, 0)))}
  for t in range(1, len(gt) - 1):
    for obj in range(1, k + 1):
      g, p = gt[t] == obj, pred[t] == obj
      out["J"][obj - 1, t - 1] = jaccard(g, p)
      out["F"][obj - 1, t - 1] = boundary_f(g, p)
  return out


def summarize(scores: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
  """{video: video_scores(...)} -> the DAVIS table's figures (MEASURES, over all objects), with
  'per_object' {'<video>_<k>': {'J-Mean', 'F-Mean'}} (davis2017-evaluation's per-sequence table)
  and 'per_video' {video: {'J&F-Mean', 'J-Mean', 'F-Mean'}} (the means over its objects)."""
  stats: dict[str, list[tuple[float, float, float]]] = {"J": [], "F": []}
  per_object, per_video = {}, {}
  for video, s in scores.items():
    means = {"J": [], "F": []}
    for k in range(len(s["J"])):
      row = {}
      for m in ("J", "F"):
        stats[m].append(statistics(s[m][k]))
        means[m].append(stats[m][-1][0])
        row[f"{m}-Mean"] = stats[m][-1][0]
      per_object[f"{video}_{k + 1}"] = row
    if means["J"]:
      j, f = float(np.mean(means["J"])), float(np.mean(means["F"]))
      per_video[video] = {"J&F-Mean": (j + f) / 2, "J-Mean": j, "F-Mean": f}
  if not stats["J"]:
    raise ValueError("no object to score: every first annotation is empty")
  out = {}
  for m in ("J", "F"):
    arr = np.array(stats[m])
    out.update({f"{m}-Mean": float(arr[:, 0].mean()), f"{m}-Recall": float(arr[:, 1].mean()),
                f"{m}-Decay": float(arr[:, 2].mean())})
  out = {"J&F-Mean": (out["J-Mean"] + out["F-Mean"]) / 2, **out}
  return {**out, "objects": len(per_object), "per_object": per_object, "per_video": per_video}


def format_table(results: dict[str, dict[str, Any]]) -> str:
  """{column name: summarize(...)} -> a plain text table of MEASURES, one column per name."""
  return tables.text_table(list(results), [(m, [f"{r[m]:.3f}" for r in results.values()])
                                           for m in MEASURES])
