"""Weighted k-NN classification on frozen features, as DINO's release evaluates (eval_knn.py).

Each test feature votes with its k most similar train features (cosine: the features are
L2-normalised, so a dot product), weighted by exp(sim / T); the class with the largest summed
weight wins. Top-1 and top-5 over several k in one pass, on device: the train bank is sharded over
the mesh, the test set goes through in chunks, so memory stays bounded at ImageNet scale. With
several processes each lays its devices' part of the bank out from its own copy (every process
holds the same features, as features.extract returns them) and all get the same rankings.

Ties, which the release leaves to torch.topk and torch.sort, are broken deterministically:
- neighbours of equal similarity: the lower train index first (lax.top_k's rule);
- classes of equal summed weight: the lower class index first (a stable descending sort).
Weights are summed in neighbour rank order, so equal sets of weights give bit-equal scores.

Shapes: N train features, M test features, D width, C classes, Q test features per chunk.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dino_jax import sharding as sharding_lib
from dino_jax.evaluate import features

SIMS_BYTES_PER_DEVICE = 2**28  # bounds a chunk's (Q, N / devices) similarity block


def _neighbours(queries, bank, bank_labels, *, kmax: int, n_valid: int, axes):
  """Per device: top-kmax of its bank shard, then merged over devices. Runs inside shard_map.

  queries (Q, D) replicated; bank (N_local, D), bank_labels (N_local,) this device's shard.
  Returns similarities and labels of the kmax nearest, (Q, kmax) each, by (sim desc, index asc).
  """
  n_local = bank.shape[0]
  offset = jax.lax.axis_index(axes) * n_local
  sims = jnp.matmul(queries, bank.T, precision=jax.lax.Precision.HIGHEST)  # (Q, N_local)
  sims = jnp.where(offset + jnp.arange(n_local) < n_valid, sims, -jnp.inf)  # padding rows
  sims, idx = jax.lax.top_k(sims, min(kmax, n_local))
  labels = bank_labels[idx]
  # Device shards hold consecutive index ranges, so candidates concatenated in device order
  # keep the lower-index-first rule through the merge.
  sims, labels = (jnp.moveaxis(jax.lax.all_gather(x, axes), 0, 1).reshape(x.shape[0], -1)
                  for x in (sims, labels))
  sims, pos = jax.lax.top_k(sims, kmax)
  return sims, jnp.take_along_axis(labels, pos, axis=1)


def _vote(sims, labels, *, ks: Sequence[int], num_classes: int, temperature: float):
  """sims, labels (Q, kmax) by rank -> {k: class ranking (Q, min(5, C))} for each k in ks."""
  weights = jnp.exp(sims / temperature)

  def add(j, scores):  # rank by rank: equal weight sets sum to equal scores
    return scores + jax.nn.one_hot(labels[:, j], num_classes) * weights[:, j, None]

  scores = jnp.zeros((sims.shape[0], num_classes), jnp.float32)
  preds, done = {}, 0
  for k in sorted(ks):
    scores = jax.lax.fori_loop(done, k, add, scores)
    preds[k] = jax.lax.top_k(scores, min(5, num_classes))[1]  # equal scores: lower class first
    done = k
  return preds


@functools.lru_cache(maxsize=8)
def _predict_fn(mesh: Mesh, ks: tuple[int, ...], num_classes: int, temperature: float,
                n_valid: int):
  """jit((queries, bank, bank_labels) -> {k: rankings}); cached: a second model compiles nothing."""
  axes = tuple(mesh.axis_names)
  neighbours = jax.shard_map(
      functools.partial(_neighbours, kmax=ks[-1], n_valid=n_valid, axes=axes), mesh=mesh,
      in_specs=(P(), P(axes), P(axes)), out_specs=(P(), P()), check_vma=False)

  def predict(queries, bank, bank_labels):
    sims, labels = neighbours(queries, bank, bank_labels)
    return _vote(sims, labels, ks=ks, num_classes=num_classes, temperature=temperature)

  return jax.jit(predict, out_shardings=NamedSharding(mesh, P()))  # readable on every process


def knn_predict(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                ks: Sequence[int] = (10, 20, 100, 200), temperature: float = 0.07, *,
                num_classes: int | None = None, mesh: Mesh | None = None,
                chunk_size: int | None = None) -> dict[int, np.ndarray]:
  """Class rankings of the weighted k-NN vote for each k.

  Args:
    train_features: (N, D) L2-normalised; train_labels: (N,) ints in [0, C).
    test_features: (M, D) L2-normalised.
    ks: the k values; the top max(ks) neighbours are found once and the votes of every k read off.
    temperature: T of the weights exp(sim / T).
    num_classes: C (default: max train label + 1).
    mesh: the bank is sharded over all its devices (default: every device); with several
      processes every one calls this with the same features and gets the same rankings.
    chunk_size: test features per step (default: as many as keep the (Q, N / devices) similarity
      block within SIMS_BYTES_PER_DEVICE, at most 1024).
  Returns:
    {k: (M, min(5, C)) int32}: classes by decreasing summed weight (ties: lower class first).
  """
  n = train_features.shape[0]
  ks = sorted(set(int(k) for k in ks))
  if not ks or ks[0] < 1 or ks[-1] > n:
    raise ValueError(f"nb_knn {ks}: each k must be in [1, {n}] (the train features)")
  num_classes = int(train_labels.max()) + 1 if num_classes is None else num_classes
  mesh = sharding_lib.make_mesh() if mesh is None else mesh
  axes = tuple(mesh.axis_names)
  n_dev = mesh.size
  n_local = -(-n // n_dev)
  m = test_features.shape[0]
  chunk = min(m, chunk_size or int(np.clip(SIMS_BYTES_PER_DEVICE // (4 * n_local), 1, 1024)))

  bank_sh = NamedSharding(mesh, P(axes))
  pad = n_local * n_dev - n
  # From host copies: no transfer between processes, no equality check of the whole bank.
  bank = features.host_to_global(
      np.pad(np.asarray(train_features, np.float32), ((0, pad), (0, 0))), bank_sh)
  bank_labels = features.host_to_global(
      np.pad(np.asarray(train_labels, np.int32), (0, pad)), bank_sh)

  predict = _predict_fn(mesh, tuple(ks), num_classes, temperature, n)
  test_features = np.asarray(test_features, np.float32)
  out = {k: [] for k in ks}
  for start in range(0, m, chunk):
    queries = test_features[start:start + chunk]
    q = queries.shape[0]
    queries = np.pad(queries, ((0, chunk - q), (0, 0)))  # one compiled shape for every chunk
    queries = features.host_to_global(queries, NamedSharding(mesh, P()))
    preds = jax.device_get(predict(queries, bank, bank_labels))
    for k in ks:
      out[k].append(preds[k][:q])
  return {k: np.concatenate(v) for k, v in out.items()}


def accuracy(predictions: dict[int, np.ndarray], labels: np.ndarray) -> dict[str, dict[str, float]]:
  """{'top1': {'k': %}, 'top5': {'k': %}}; as the release, top-5 looks at the first min(5, k)."""
  labels = np.asarray(labels)
  top1, top5 = {}, {}
  for k, ranking in sorted(predictions.items()):
    hit = ranking == labels[:, None]
    top1[str(k)] = 100.0 * float(np.mean(hit[:, 0]))
    top5[str(k)] = 100.0 * float(np.mean(hit[:, :min(5, k)].any(axis=1)))
  return {"top1": top1, "top5": top5}


def knn_classify(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                 test_labels: np.ndarray, ks: Sequence[int] = (10, 20, 100, 200),
                 temperature: float = 0.07, *, num_classes: int | None = None,
                 mesh: Mesh | None = None, chunk_size: int | None = None
                 ) -> dict[str, dict[str, float]]:
  """knn_predict then accuracy: {'top1': {'20': %, ...}, 'top5': {...}} (eval/knn.json)."""
  if num_classes is None:
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
  preds = knn_predict(train_features, train_labels, test_features, ks, temperature,
                      num_classes=num_classes, mesh=mesh, chunk_size=chunk_size)
  return accuracy(preds, test_labels)
