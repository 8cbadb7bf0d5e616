"""Bilinear resampling as a matrix per axis: torch's interpolate(mode='bilinear',
align_corners=False) and cv2's INTER_LINEAR, for the DAVIS frames (data/davis.py), the label maps
of video segmentation and the multi-scale retrieval features.
"""
from __future__ import annotations

import numpy as np


def bilinear_matrix(n_in: int, n_out: int, scale: float | None = None,
                    dtype: type = np.float64) -> np.ndarray:
  """(n_out, n_in) matrix of 1-D linear resampling with half-pixel centres, no antialiasing.

  Output pixel i reads the source coordinate (i + 0.5) r - 0.5, clamped at 0, with weights 1 - t
  and t on its two neighbours (t its fraction), the upper one clamped to the last pixel. r is
  n_in / n_out, or 1 / scale where a scale factor is given: torch's interpolate with
  scale_factor=scale (output size floor(n_in scale)) maps coordinates by the scale it was given,
  not by the ratio of the sizes (unless recompute_scale_factor). Computed in `dtype`, as ATen
  computes in float32 for float32 inputs; cv2's INTER_LINEAR is r = n_in / n_out.
  """
  ratio = dtype(n_in / n_out if scale is None else 1.0 / scale)
  src = np.maximum(ratio * (np.arange(n_out, dtype=dtype) + dtype(0.5)) - dtype(0.5), dtype(0))
  lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  t = np.clip(src - lo.astype(dtype), 0, 1)
  mat = np.zeros((n_out, n_in), dtype)
  np.add.at(mat, (np.arange(n_out), lo), 1 - t)
  np.add.at(mat, (np.arange(n_out), np.minimum(lo + 1, n_in - 1)), t)
  return mat
