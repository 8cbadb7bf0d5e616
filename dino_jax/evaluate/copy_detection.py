"""Copy detection, as DINO's release evaluates it on Copydays (eval_copy_detection.py).

Each image's feature is the last block's final-LN-normed [CLS] token concatenated with its patch
tokens GeM-pooled (p = 4, tokens clamped at 1e-6). A PCA whitening is learned on a set of other
images (the release's utils.PCA with dim = the full width and whit = 0.5): queries and database
are centred on that set's mean and projected, then L2-normalised; each query's 20 most similar
database images (dot product) are ranked, and the average precision of its copies among them
(the Holidays package's trapezoid rule; a copy below rank 20 adds nothing) is averaged over the
queries of each block.

Ties, which the release leaves to torch.topk: equal similarities rank the lower database index
first (lax.top_k's rule).

Shapes: B batch, T = 1 + N tokens (N patches), D backbone width, F feature width (2 D), Q queries,
M database images, K retrieved per query.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh

from dino_jax.data import copydays, pipeline
from dino_jax.data.augment import normalize
from dino_jax.evaluate import features

GEM_P = 4.0  # the release's fixed exponent (pow(4) ... pow(1. / 4)), no option of its command
TOP_K = 20  # the release's similarity.topk(20), fixed too
PIXELS = "baseline"  # the name of the raw-pixel features among a run's models


def gem(tokens: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Generalised mean of (B, N, D) tokens over N -> (B, D): mean(max(x, eps)^p)^(1/p), p = GEM_P,
  as the release's clamp(min=1e-6), avg_pool2d over the whole patch grid of x^4, then ^(1/4)."""
  return jnp.mean(jnp.maximum(tokens, eps) ** GEM_P, axis=1) ** (1.0 / GEM_P)


def copy_features(backbone: nn.Module, params: Any, images: jax.Array) -> jax.Array:
  """uint8 or [0, 1] images (B, S, S, 3) -> [CLS] and GeM-pooled patch tokens of the last block,
  each final-LN-normed, concatenated: (B, 2 D) float32."""
  tokens = backbone.apply({"params": params}, normalize(images), 1,
                          method="get_intermediate_layers")[0].astype(jnp.float32)  # (B, T, D)
  return jnp.concatenate([tokens[:, 0], gem(tokens[:, 1:])], axis=-1)


def pixel_features(images: jax.Array, grid: int) -> jax.Array:
  """The raw-pixel baseline: uint8 images (B, S, S, 3) -> (B, grid * grid * 3) in [0, 1], each
  value the mean of one cell of a grid x grid partition (S a multiple of grid): a thumbnail."""
  b, s = images.shape[:2]
  cell = s // grid
  x = images.astype(jnp.float32).reshape(b, grid, cell, grid, cell, 3) / 255.0
  return jnp.mean(x, axis=(2, 4)).reshape(b, -1)


@functools.lru_cache(maxsize=16)
def _feature_fn(backbone: nn.Module, pixel_grid: int | None):
  """fn(params, batch) -> {name: (B, F)} for features.extract: one per options, so that a second
  set of images reuses the compiled step."""

  def fn(params, batch):
    out = {name: copy_features(backbone, params[name], batch["image"]) for name in params}
    if pixel_grid:
      out[PIXELS] = pixel_features(batch["image"], pixel_grid)
    return out

  return fn


@dataclasses.dataclass(frozen=True)
class Whitening:
  """x -> (x - mean) @ dvt.T: PCA whitening. mean (F,), dvt (F', F); energy: the share of the
  eigenvalues' sum kept (1 when F' = F)."""
  mean: np.ndarray
  dvt: np.ndarray
  energy: float

  def __call__(self, x: np.ndarray) -> np.ndarray:
    return (np.asarray(x, np.float64) - self.mean) @ self.dvt.T


def learn_whitening(x: np.ndarray, dim: int | None = None, whit: float = 0.5) -> Whitening:
  """PCA whitening learned on features (n, F), the release's utils.PCA.train_pca.

  As the release, the covariance is the second-moment matrix x^T x / n of the uncentred features,
  while the whitened features are centred on their mean. Eigenvalues below 1e-5 of the largest
  are raised to it; the `dim` leading eigenvectors (default all) are scaled by eigenvalue^-whit.
  Computed in float64 (the release: float32 covariance, float32 eigh input).
  """
  x = np.asarray(x, np.float64)
  d, v = np.linalg.eigh(x.T @ x / x.shape[0])
  d = np.maximum(d, d.max() * 1e-5)
  order = np.argsort(d)[::-1][:dim or x.shape[1]]
  kept = d[order]
  return Whitening(x.mean(0), v[:, order].T / kept[:, None] ** whit,
                   float(kept.sum() / d.sum()))


@functools.partial(jax.jit, static_argnums=2)
def _top_k(queries, database, k):
  sims = jnp.matmul(queries, database.T, precision=jax.lax.Precision.HIGHEST)
  return jax.lax.top_k(sims, k)


def search(queries: np.ndarray, database: np.ndarray, chunk: int = 1024) -> np.ndarray:
  """Database indices of each query's k = TOP_K most similar (dot product) images,
  (Q, min(k, M)), by similarity descending (ties: lower index first); queries (Q, F), database
  (M, F)."""
  k = min(TOP_K, len(database))
  db = jnp.asarray(database, jnp.float32)
  chunks = [jnp.asarray(queries[i:i + chunk], jnp.float32) for i in range(0, len(queries), chunk)]
  return np.concatenate([np.asarray(_top_k(q, db, k)[1]) for q in chunks])


def average_precision(ranks: Sequence[int], n_positives: int) -> float:
  """AP of one search from the 0-based ranks (ascending) at which its positives were retrieved,
  n_positives in all: the Holidays package's score_ap_from_ranks_1 (the area under the
  precision-recall curve by trapezoids; precision 1 before the first retrieval)."""
  ap = 0.0
  for ntp, rank in enumerate(ranks):
    precision_0 = 1.0 if rank == 0 else ntp / rank
    ap += (precision_0 + (ntp + 1) / (rank + 1)) / (2.0 * n_positives)
  return ap


def mean_average_precision(ids: np.ndarray, positives: Sequence[np.ndarray]) -> float:
  """Mean over queries of average_precision: ids (Q, K) retrieved database indices by rank,
  positives[q] the database indices that are copies of query q."""
  aps = [average_precision(np.flatnonzero(np.isin(row, pos)).tolist(), len(pos))
         for row, pos in zip(ids, positives)]
  return float(np.mean(aps))


def detect(queries: dict[str, np.ndarray], database: np.ndarray, whitening: np.ndarray | None,
           positives: dict[str, Sequence[np.ndarray]]) -> dict[str, float]:
  """mAP (percent) of each query block: whitening learned on `whitening` (n, F) (none if None)
  applied to queries {block: (Q_b, F)} and database (M, F), L2 normalisation, top-TOP_K search."""
  names = list(queries)
  q = np.concatenate([queries[b] for b in names])
  db = np.asarray(database)
  if whitening is not None:
    w = learn_whitening(whitening)
    logging.info("whitening from %d images keeps %.2f%% of the energy", len(whitening),
                 100 * w.energy)
    q, db = w(q), w(db)
  ids = search(np.asarray(features.l2_normalize(q)), np.asarray(features.l2_normalize(db)))
  out, start = {}, 0
  for b in names:
    n = len(queries[b])
    out[b] = 100.0 * mean_average_precision(ids[start:start + n], positives[b])
    start += n
  return out


def evaluate(backbone: nn.Module, models: dict[str, Any], sets: copydays.CopySets, *,
             batch_size: int, mesh: Mesh, pixel_grid: int | None = None, threads: int = 1
             ) -> tuple[dict[str, dict[str, float]], float]:
  """Copy detection mAP of each model, all models from one pass over each set of images.

  Args:
    backbone: the ViT module; models: {name: its backbone params}.
    sets: the queries, database, whitening images and positives (data/copydays.py).
    batch_size: images per global batch (split over the mesh and the processes).
    pixel_grid: also score the raw-pixel thumbnails of this grid, as the model PIXELS.
    threads: image-loading threads per process.
  Returns:
    ({model: {query block: mAP, percent}}, images a second through the feature pass).
  """
  fn = _feature_fn(backbone, pixel_grid)
  local = features.local_batch_size(batch_size, mesh)

  def extract(source):
    out, stats = features.extract(fn, models, pipeline.padded_share(
        source, local, process_index=jax.process_index(), process_count=jax.process_count(),
        threads=threads), mesh)
    timing.append((stats["examples"], stats["seconds"]))
    return out

  timing = []
  queries = {b: extract(s) for b, s in sets.queries.items()}
  database = extract(sets.database)
  whitening = extract(sets.whitening) if sets.whitening is not None else None
  names = list(models) + ([PIXELS] if pixel_grid else [])
  results = {name: detect({b: queries[b][name] for b in queries}, database[name],
                          None if whitening is None else whitening[name], sets.positives)
             for name in names}
  n, seconds = np.sum(timing, axis=0)
  return results, float(n / max(seconds, 1e-9))
