"""Image retrieval with frozen [CLS] features, as the release's eval_image_retrieval.py evaluates
on revisited Oxford and Paris, and its embedded version on the shapes images.

- Features: the backbone's final-LN [CLS] feature, L2-normalised; with multi-scale (the release's
  utils.multi_scale) the mean of the [CLS] features of the image resized by 1, 1/sqrt(2) and 1/2
  (torch's bilinear interpolate with a scale factor), then L2-normalised.
- Ranking: the database by decreasing dot product with each query.
- Scores: revisitop's compute_map (Radenovic et al., CVPR 2018): average precision with junk
  images taken out of the ranking, and mean precision at k, for the Medium setting (positives
  easy + hard, junk junk) and the Hard one (positives hard, junk junk + easy).
- Embedded (`evaluate_shapes`): queries and database of the shapes renderer, each under a split
  name of its own (images unlike the training and evaluation splits'); a positive is an image of
  the query's class, there is no junk.

Shapes: Q queries, N database images, D width, K precision cut-offs, B batch, H x W image.
"""
from __future__ import annotations

import copy
import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from jax.sharding import Mesh

from dino_jax.data import pipeline, resample, revisited
from dino_jax.data.augment import normalize
from dino_jax.evaluate import features, tables

MULTISCALE = (1.0, 1 / 2**(1 / 2), 1 / 2)  # the release's utils.multi_scale
KAPPAS = (1, 5, 10)  # the k of mP@k, as the release reports
SETTINGS = {"medium": (("easy", "hard"), ("junk",)), "hard": (("hard",), ("junk", "easy"))}
SHAPES_SPLITS = ("retrieval_query", "retrieval_database")


def resize_bilinear(images: jax.Array, scale: float) -> jax.Array:
  """(B, H, W, C) float -> (B, floor(H scale), floor(W scale), C): torch's interpolate(
  scale_factor=scale, mode='bilinear', align_corners=False), as ATen computes it (float32
  weights of resample.bilinear_matrix given the scale)."""
  rows, cols = (resample.bilinear_matrix(n, math.floor(n * scale), scale, np.float32)
                for n in images.shape[1:3])
  return jnp.einsum("ih,bhwc,jw->bijc", rows, images, cols, precision=jax.lax.Precision.HIGHEST)


def multiscale_features(backbone: nn.Module, params: Any, images: jax.Array,
                        scales: Sequence[float] = (1.0,)) -> jax.Array:
  """uint8 or [0, 1] images (B, H, W, 3) -> (B, D): the mean over `scales` of the final-LN [CLS]
  feature of the normalised image resized by each scale, L2-normalised.

  scales (1,) is the release's single-scale feature, MULTISCALE its multi-scale one. Each resized
  image loses its bottom and right rows beyond a multiple of the patch size, the pixels the
  release's strided patch convolution never reads.
  """
  x = normalize(images)
  p = backbone.patch_size
  total = 0.0
  for s in scales:
    xs = x if s == 1 else resize_bilinear(x, s)
    h, w = xs.shape[1] - xs.shape[1] % p, xs.shape[2] - xs.shape[2] % p
    if not h or not w:
      raise ValueError(f"image {x.shape[1]}x{x.shape[2]} at scale {s:.3f} is smaller than a "
                       f"patch ({p} px)")
    total = total + backbone.apply({"params": params}, xs[:, :h, :w])
  return features.l2_normalize(total / len(scales))


def pixel_features(images: jax.Array) -> jax.Array:
  """uint8 images (B, H, W, 3) -> (B, H W 3): the network's input (ImageNet-normalised pixels),
  flattened and L2-normalised: the baseline of no features at all."""
  return features.l2_normalize(normalize(images).reshape(images.shape[0], -1))


@functools.lru_cache(maxsize=16)
def feature_fn(backbone: nn.Module, scales: tuple[float, ...], with_pixels: bool = False):
  """fn(params, batch) for features.extract: {name: multiscale_features} for each model of the
  dict params, plus 'pixels' (pixel_features) and the batch's 'index' where asked / present.
  Cached: the same function object each call, so its compiled steps are reused."""

  def fn(params, batch):
    out = {name: multiscale_features(backbone, params[name], batch["image"], scales)
           for name in params}
    if with_pixels:
      out["pixels"] = pixel_features(batch["image"])
    if "index" in batch:
      out["index"] = batch["index"]
    return out

  return fn


def rank_database(queries: np.ndarray, database: np.ndarray) -> np.ndarray:
  """L2-normalised features (Q, D), (N, D) -> (Q, N) database indices by decreasing dot product.

  Equal similarities rank the lower database index first (a stable sort); the release's
  torch.argsort leaves their order unspecified. (revisitop's `ranks` is this, transposed.)
  """
  sims = np.asarray(queries, np.float32) @ np.asarray(database, np.float32).T
  return np.argsort(-sims, axis=1, kind="stable")


def compute_map(ranking: np.ndarray, positives: Sequence[np.ndarray],
                junk: Sequence[np.ndarray] | None = None, kappas: Sequence[int] = KAPPAS
                ) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
  """revisitop's compute_map, for all queries at once.

  A query's positives are ranked with its junk images taken out (each positive moves up by the
  number of junk images ranked above it); its AP is the trapezoidal area under its
  precision-recall steps, sum over its j-th positive (0-based) at rank r of
  (P0 + (j + 1) / (r + 1)) / 2 / len(positives), P0 = j / r (1 at r = 0). Its precision at k
  counts the positives within the first min(k, rank of its last positive) (1-based) and divides
  by that number, as revisitop does.

  Args:
    ranking: (Q, N) database indices, best first.
    positives: per query, the database indices of its positives ('ok').
    junk: per query, the database indices to ignore; None: none.
    kappas: the k of the precisions.
  Returns:
    (mAP, AP per query (Q,), mean precision at each k (K,), precisions (Q, K)); a query without
    positives has NaN and is left out of the means.
  """
  q, n = ranking.shape

  def ranked_member(sets):  # (Q, N): is the item at each rank in the query's set
    mask = np.zeros((q, n), bool)
    for i, s in enumerate(sets):
      mask[i, np.asarray(s, np.int64)] = True
    return np.take_along_axis(mask, ranking, axis=1)

  pos = ranked_member(positives)
  junk_mask = ranked_member(junk) if junk is not None else np.zeros_like(pos)
  rank = np.arange(n) - (np.cumsum(junk_mask, axis=1) - junk_mask)  # junk above taken out
  nth = np.cumsum(pos, axis=1) - 1  # j: positives ranked above this one
  p0 = np.where(rank == 0, 1.0, nth / np.maximum(rank, 1))
  p1 = (nth + 1) / (rank + 1)
  n_pos = np.array([len(s) for s in positives])
  empty = n_pos == 0
  aps = np.where(pos, (p0 + p1) / 2, 0.0).sum(axis=1) / np.maximum(n_pos, 1)
  last = np.max(np.where(pos, rank + 1, 0), axis=1)  # 1-based rank of the last positive
  prs = np.empty((q, len(kappas)))
  for j, k in enumerate(kappas):
    kq = np.maximum(np.minimum(last, k), 1)
    prs[:, j] = np.sum(pos & (rank + 1 <= kq[:, None]), axis=1) / kq
  aps[empty], prs[empty] = np.nan, np.nan
  if empty.all():
    return float("nan"), aps, np.full(len(kappas), np.nan), prs
  return float(np.nanmean(aps)), aps, np.nanmean(prs, axis=0), prs


def _percent(m_ap: float, mpr: np.ndarray, kappas: Sequence[int]) -> dict[str, float]:
  return {"mAP": 100 * m_ap, **{f"mP@{k}": 100 * float(v) for k, v in zip(kappas, mpr)}}


def revisited_scores(ranking: np.ndarray, gnd: Sequence[dict[str, Any]],
                     kappas: Sequence[int] = KAPPAS) -> dict[str, dict[str, float]]:
  """(Q, N) ranking and revisitop's ground truth -> {'medium': {'mAP', 'mP@1', ...}, 'hard':
  {...}} in percent, the release's two settings."""
  out = {}
  for setting, (ok_keys, junk_keys) in SETTINGS.items():
    ok = [np.concatenate([np.asarray(g[key], np.int64) for key in ok_keys]) for g in gnd]
    junk = [np.concatenate([np.asarray(g[key], np.int64) for key in junk_keys]) for g in gnd]
    m_ap, _, mpr, _ = compute_map(ranking, ok, junk, kappas)
    out[setting] = _percent(m_ap, mpr, kappas)
  return out


def class_scores(ranking: np.ndarray, query_labels: np.ndarray, database_labels: np.ndarray,
                 kappas: Sequence[int] = KAPPAS) -> dict[str, float]:
  """(Q, N) ranking, labels (Q,), (N,) -> {'mAP', 'mP@1', ...} in percent, a positive being an
  image of the query's class (no junk)."""
  positives = [np.flatnonzero(database_labels == label) for label in query_labels]
  m_ap, _, mpr, _ = compute_map(ranking, positives, None, kappas)
  return _percent(m_ap, mpr, kappas)


def chance_scores(query_labels: np.ndarray, database_labels: np.ndarray,
                  kappas: Sequence[int] = KAPPAS, seeds: int = 20) -> dict[str, float]:
  """class_scores of rankings that ignore the images: the mean over `seeds` uniformly random
  rankings (numpy seeds 0 .. seeds - 1)."""
  q, n = len(query_labels), len(database_labels)
  runs = [class_scores(np.argsort(np.random.default_rng(s).random((q, n)), axis=1), query_labels,
                       database_labels, kappas) for s in range(seeds)]
  return {key: float(np.mean([r[key] for r in runs])) for key in runs[0]}


def extract_source(fn, models: dict[str, Any], source: revisited.RevisitedSource, batch_size: int,
                   mesh: Mesh) -> dict[str, np.ndarray]:
  """features.extract of fn over every image of a RevisitedSource, batched by image size on all
  processes -> fn's outputs (N, ...) in the source's order."""
  local = features.local_batch_size(batch_size, mesh)
  batches = revisited.batches(source, local, process_index=jax.process_index(),
                              process_count=jax.process_count())
  out, _ = features.extract(fn, models, batches, mesh)
  order = np.argsort(out.pop("index"))
  return jax.tree.map(lambda x: x[order], out)


def evaluate_revisited(backbone: nn.Module, params: Any, root: str, dataset: str, *,
                       imsize: int = 224, multiscale: bool = False, crop_queries: bool = False,
                       batch_size: int = 64, mesh: Mesh
                       ) -> dict[str, dict[str, float]]:
  """The release's evaluation of one backbone on roxford5k / rparis6k under ROOT:
  {'medium': {'mAP', 'mP@1', 'mP@5', 'mP@10'}, 'hard': {...}} in percent."""
  database = revisited.RevisitedSource(root, dataset, "database", imsize)
  queries = revisited.RevisitedSource(root, dataset, "query", imsize, crop_queries=crop_queries)
  fn = feature_fn(backbone, MULTISCALE if multiscale else (1.0,))
  db = extract_source(fn, {"model": params}, database, batch_size, mesh)["model"]
  qf = extract_source(fn, {"model": params}, queries, batch_size, mesh)["model"]
  return revisited_scores(rank_database(qf, db), database.gnd)


def evaluate_shapes(config: mlc.ConfigDict, backbone: nn.Module, models: dict[str, Any], *,
                    num_queries: int = 60, database_size: int = 600, multiscale: bool = False,
                    mesh: Mesh) -> dict[str, dict[str, float]]:
  """The embedded retrieval: num_queries query images against database_size database images of
  config's shapes data (SHAPES_SPLITS), positives of the query's class. config.data.source is
  'shapes' (the caller's check: eval_image_retrieval names the workdir and the way out).

  Returns {name: class_scores} for each of models ({name: backbone params}), plus 'pixels' (the
  cosine similarity of the raw normalised pixels) and 'chance' (random rankings, chance_scores).
  """
  local = features.local_batch_size(config.eval.batch_size, mesh)
  fn = feature_fn(backbone, MULTISCALE if multiscale else (1.0,), with_pixels=True)
  feats = []
  for split, size in zip(SHAPES_SPLITS, (num_queries, database_size)):
    c = copy.deepcopy(config)
    c.data.shapes_eval_size = size  # make_source's size of any split but the training one
    batches = pipeline.eval_batches(c, split, local, process_index=jax.process_index(),
                                    process_count=jax.process_count())
    feats.append(features.extract(fn, models, batches, mesh)[0])
  queries, database = feats
  results = {name: class_scores(rank_database(queries[name], database[name]), queries["label"],
                                database["label"]) for name in [*models, "pixels"]}
  results["chance"] = chance_scores(queries["label"], database["label"])
  return results


def format_table(results: dict[str, dict[str, float]]) -> str:
  """{column: {'mAP': %, 'mP@1': %, ...}} -> a plain text table, one column per entry."""
  first = next(iter(results.values()))
  return tables.text_table(list(results), [(f"{k} (%)", [f"{r[k]:.2f}" for r in results.values()])
                                           for k in first])
