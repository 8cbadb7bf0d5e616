"""k-NN and attention scores of frozen backbones, several models from one pass over each split, and
their table.

- k-NN (knn.py): the train split's [CLS] features as the bank, the eval split's as queries;
- attention (attention_maps.py), where the eval split has object masks: each head's mask against
  the objects.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import ml_collections as mlc
from absl import logging
from jax.sharding import Mesh

from dino_jax import sharding as sharding_lib
from dino_jax.data import pipeline
from dino_jax.evaluate import attention_maps, features, knn, tables


def evaluate(config: mlc.ConfigDict, backbone: nn.Module, models: dict[str, Any], *,
             ks: Sequence[int] | None, temperature: float = 0.07, with_attention: bool = True,
             mesh: Mesh | None = None) -> tuple[dict[str, dict[str, Any]], dict[str, float]]:
  """k-NN and (where the eval split has object masks) attention figures of each model.

  Args:
    backbone: the ViT or ResNet module; models: {name: its backbone params}.
    ks, temperature: the k-NN's k values and T; ks None: no k-NN (the train split is not read).
    with_attention: also score the attention on the eval split's object masks, if it has them
      (a ViT's; a ResNet has none, said in the log).
  Returns:
    ({name: {'knn': knn.accuracy's dict, 'attention': attention_maps.summarize's dict and 'maps' of
     the first config.eval.attention_images eval images (B, h, gh, gw) (if scored)}},
     {'eval_features_per_sec', 'train_features_per_sec' (with k-NN)}: images a second, all
     models together).
  """
  mesh = sharding_lib.make_mesh() if mesh is None else mesh
  if with_attention and not features.has_attention(backbone):
    logging.info("attention maps do not apply to a %s (no self-attention): not scored",
                 backbone.arch)
    with_attention = False
  d, e = config.data, config.eval
  local = features.local_batch_size(e.batch_size, mesh)
  batches = lambda split: pipeline.eval_batches(config, split, local,
                                                process_index=jax.process_index(),
                                                process_count=jax.process_count())
  train_fn, eval_fn = _feature_fns(backbone, with_attention, e.attention_threshold)

  queries, eval_stats = features.extract(eval_fn, models, batches(d.eval_split), mesh)
  speed = {"eval_features_per_sec": eval_stats["examples_per_sec"] * len(models)}
  labelled = ks is not None
  if labelled:
    bank, train_stats = features.extract(train_fn, models, batches(d.train_split), mesh)
    speed["train_features_per_sec"] = train_stats["examples_per_sec"] * len(models)
    labelled = bank["label"].min() >= 0 and queries["label"].min() >= 0
    if not labelled:
      logging.warning("the data has no labels: no k-NN evaluation")
  results = {}
  for name in models:
    res = results[name] = {}
    if labelled:
      res["knn"] = knn.knn_classify(bank[name], bank["label"], queries[name]["cls"],
                                    queries["label"], ks, temperature, mesh=mesh)
    if "jaccard" in queries[name]:
      res["attention"] = attention_maps.summarize(queries[name])
      res["maps"] = queries[name]["maps"][:e.attention_images]
  return results, speed


@functools.lru_cache(maxsize=16)
def _feature_fns(backbone: nn.Module, with_attention: bool, threshold: float):
  """(train_fn, eval_fn) for features.extract, one pair per (backbone, options): the same function
  objects each call, so the evaluations during training reuse their compiled steps."""

  def train_fn(params, batch):
    return {name: features.cls_features(backbone, params[name], batch["image"])
            for name in params}

  def eval_fn(params, batch):
    out = {}
    for name in params:
      out[name] = {"cls": features.cls_features(backbone, params[name], batch["image"])}
      if with_attention and "object_mask" in batch:
        maps = attention_maps.cls_attention(backbone, params[name], batch["image"])
        out[name].update(attention_maps.object_scores(maps, batch["object_mask"],
                                                 backbone.patch_size, threshold), maps=maps)
    return out

  return train_fn, eval_fn


def format_table(results: dict[str, dict[str, Any]], headline_k: int = 20) -> str:
  """A plain text table, one column per model."""
  names = list(results)
  rows = []
  first = results[names[0]]
  if "knn" in first:
    ks = list(first["knn"]["top1"])
    k = str(headline_k) if str(headline_k) in ks else ks[0]
    for kk in ks:
      rows.append((f"{kk}-NN top-1 (%)" + (" <-" if kk == k else ""),
                   [f"{results[n]['knn']['top1'][kk]:.1f}" for n in names]))
    rows.append((f"{k}-NN top-5 (%)", [f"{results[n]['knn']['top5'][k]:.1f}" for n in names]))
  if "attention" in first:
    for key, label in (("jaccard", "Jaccard, best head"), ("jaccard_head_mean",
                       "Jaccard, mean over heads"), ("jaccard_mean_map", "Jaccard, head-mean map"),
                       ("mass_on_object", "attention on object, best head"),
                       ("object_area", "object area (uniform attention)")):
      rows.append((label, [f"{results[n]['attention'][key]:.3f}" for n in names]))
  return tables.text_table(names, rows)
