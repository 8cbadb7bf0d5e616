"""The evaluations of a trained network, and the main job's closing report: trained vs random init.

`run(config, workdir)` (the trainer calls it when config.eval.after_training) evaluates the teacher
of the workdir's latest checkpoint and, with config.eval.compare_random_init, the same architecture
at its random init (the student's init from config.seed):
- k-NN (knn.py): train split as the bank, eval split as queries -> eval/knn.json
  {"top1": {"20": ..}, "top5": {..}, "random_init": {"top1": .., "top5": ..}} (percent);
- attention (attention.py), where the data has object masks -> eval/attention.json
  {"jaccard" (best head), "jaccard_head_mean", "per_head", "mass_on_object" (best head),
  "object_area", "jaccard_mean_map" (the head-averaged map's mask), "random_init": {..}} and
  eval/attention.png (the first config.eval.attention_images eval images);
and logs a table. Every model's features come from one pass over each split.
"""
from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, Sequence

import flax.linen as nn
import jax
import ml_collections as mlc
import numpy as np
from absl import logging
from jax.sharding import Mesh

from dino_jax import attention
from dino_jax import sharding as sharding_lib
from dino_jax.data import pipeline
from dino_jax.evaluate import features, knn


def evaluate(config: mlc.ConfigDict, backbone: nn.Module, models: dict[str, Any], *,
             ks: Sequence[int] | None, temperature: float = 0.07, with_attention: bool = True,
             mesh: Mesh | None = None) -> tuple[dict[str, dict[str, Any]], dict[str, float]]:
  """k-NN and (where the eval split has object masks) attention figures of each model.

  Args:
    backbone: the ViT module; models: {name: its backbone params}.
    ks, temperature: the k-NN's k values and T; ks None: no k-NN (the train split is not read).
    with_attention: also score the attention on the eval split's object masks, if it has them.
  Returns:
    ({name: {'knn': knn.accuracy's dict, 'attention': attention.summarize's dict and 'maps' of
     the first config.eval.attention_images eval images (B, h, gh, gw) (if scored)}},
     {'eval_features_per_sec', 'train_features_per_sec' (with k-NN)}: images a second, all
     models together).
  """
  mesh = sharding_lib.make_mesh() if mesh is None else mesh
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
      res["attention"] = attention.summarize(queries[name])
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
        maps = attention.cls_attention(backbone, params[name], batch["image"])
        out[name].update(attention.object_scores(maps, batch["object_mask"],
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
  width = max(len(r[0]) for r in rows)
  lines = [" " * width + "".join(f"  {n.replace('_', ' '):>12}" for n in names)]
  lines += [label.ljust(width) + "".join(f"  {v:>12}" for v in values) for label, values in rows]
  return "\n".join(lines)


def write_json(path: str, data: dict[str, Any]) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(data, f, indent=2)


def run(config: mlc.ConfigDict, workdir: str, random_init: Any = None
        ) -> dict[str, dict[str, Any]]:
  """The main job's closing evaluations; writes eval/knn.json, eval/attention.json and
  eval/attention.png in workdir and logs the trained vs random init table.

  random_init: the run's initial backbone params, if the caller kept them (else recomputed by
  features.random_init_backbone: a compile of the whole init, seconds on a CPU).
  """
  t0 = time.perf_counter()
  e = config.eval
  mesh = sharding_lib.make_mesh()
  _, backbone, params, step = features.load_backbone(workdir, "teacher")
  models = {"trained": params}
  if e.compare_random_init:
    models["random_init"] = (features.random_init_backbone(config) if random_init is None
                             else random_init)
  results, speed = evaluate(config, backbone, models, ks=e.nb_knn, temperature=e.knn_temperature,
                            mesh=mesh)
  trained = results["trained"]
  out_dir = os.path.join(workdir, "eval")
  if jax.process_index() == 0:
    if "knn" in trained:
      knn_json = dict(trained["knn"])
      if "random_init" in results:
        knn_json["random_init"] = results["random_init"]["knn"]
      write_json(os.path.join(out_dir, "knn.json"), knn_json)
    if "attention" in trained:
      att_json = dict(trained["attention"])
      if "random_init" in results:
        rnd = dict(results["random_init"]["attention"])
        del rnd["object_area"]  # a property of the data, not of the network
        att_json["random_init"] = rnd
      write_json(os.path.join(out_dir, "attention.json"), att_json)
      plot_examples(config, trained["maps"], backbone.patch_size,
                    os.path.join(out_dir, "attention.png"))
  logging.info("evaluation of the teacher at step %d (features: %.0f train, %.0f eval images/s; "
               "%.1f s in all):\n%s", step, speed["train_features_per_sec"],
               speed["eval_features_per_sec"], time.perf_counter() - t0, format_table(results))
  return results


def plot_progress(rows: Sequence[dict[str, Any]], path: str, headline_k: int = 20) -> None:
  """eval/progress.jsonl's rows -> a figure: k-NN top-1 (left axis) and the attention's Jaccard,
  best head and head mean (right axis), against the training step."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
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
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)


def plot_examples(config: mlc.ConfigDict, maps: np.ndarray, patch_size: int, path: str) -> None:
  """The attention grid of the first eval images, maps (B, h, gh, gw) of those images."""
  batch = next(iter(pipeline.eval_batches(config, config.data.eval_split, len(maps))))
  attention.plot_grid(path, batch["image"], maps, patch_size, config.eval.attention_threshold,
                      batch.get("object_mask"), titles=[f"label {y}" for y in batch["label"]])
