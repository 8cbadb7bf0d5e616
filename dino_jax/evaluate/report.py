"""What the trainer's evaluations write into a workdir: the closing report, trained vs random init,
and the rows of the evaluations during training.

`run(config, workdir)` (config.eval.after_training) scores the teacher of the workdir's latest
checkpoint and, with config.eval.compare_random_init, the same architecture at its random init
(the student's init from config.seed), as scores.evaluate does:
- eval/knn.json {"top1": {"20": ..}, "top5": {..}, "random_init": {"top1": .., "top5": ..}}
  (percent);
- where the data has object masks, eval/attention.json {"jaccard" (best head),
  "jaccard_head_mean", "per_head", "mass_on_object" (best head), "object_area",
  "jaccard_mean_map" (the head-averaged map's mask), "random_init": {..}} and eval/attention.png
  (the first config.eval.attention_images eval images);
and logs the table. With config.eval.knn False (a folder without labels): eval/attention.png of
the first images only, no scores (`attention_picture`). `during_training(...)`
(config.eval.every_steps) appends a row to eval/progress.jsonl, redraws eval/progress.png and
writes TensorBoard scalars eval/....
"""
from __future__ import annotations

import time
from typing import Any

import jax
import ml_collections as mlc
import numpy as np
from absl import logging
from jax.sharding import Mesh

from dino_jax import metrics
from dino_jax import paths
from dino_jax import sharding as sharding_lib
from dino_jax.data import pipeline, sources
from dino_jax.evaluate import attention_maps, features, plots, scores


def run(config: mlc.ConfigDict, workdir: str, random_init: Any = None
        ) -> dict[str, dict[str, Any]]:
  """The main job's closing evaluations; writes eval/knn.json, eval/attention.json and
  eval/attention.png in workdir and logs the trained vs random init table.

  random_init: the run's initial backbone params, if the caller kept them (else recomputed by
  features.random_init_backbone).
  """
  t0 = time.perf_counter()
  e = config.eval
  _, backbone, params, step = features.load_backbone(workdir, "teacher")
  if not e.knn:
    attention_picture(config, backbone, params, step, paths.path(workdir) / "eval")
    return {}
  mesh = sharding_lib.make_mesh()
  models = {"trained": params}
  if e.compare_random_init:
    models["random_init"] = (features.random_init_backbone(config) if random_init is None
                             else random_init)
  results, speed = scores.evaluate(config, backbone, models, ks=e.nb_knn,
                                   temperature=e.knn_temperature, mesh=mesh)
  trained = results["trained"]
  out_dir = paths.path(workdir) / "eval"
  if jax.process_index() == 0:
    if "knn" in trained:
      knn_json = dict(trained["knn"])
      if "random_init" in results:
        knn_json["random_init"] = results["random_init"]["knn"]
      paths.write_json(out_dir / "knn.json", knn_json)
    if "attention" in trained:
      att_json = dict(trained["attention"])
      if "random_init" in results:
        rnd = dict(results["random_init"]["attention"])
        del rnd["object_area"]  # a property of the data, not of the network
        att_json["random_init"] = rnd
      paths.write_json(out_dir / "attention.json", att_json)
      plots.plot_examples(config, trained["maps"], backbone.patch_size,
                          out_dir / "attention.png")
  logging.info("evaluation of the teacher at step %d (features: %.0f train, %.0f eval images/s; "
               "%.1f s in all):\n%s", step, speed["train_features_per_sec"],
               speed["eval_features_per_sec"], time.perf_counter() - t0,
               scores.format_table(results))
  return results


def attention_picture(config: mlc.ConfigDict, backbone: Any, params: Any, step: int,
                      out_dir: Any) -> None:
  """out_dir/attention.png: the [CLS] attention maps of each head and their masks over the first
  config.eval.attention_images images of the eval split (the training split where there is
  none), as the evaluation transform gives them; nothing for a network without attention."""
  if not features.has_attention(backbone):
    logging.info("no attention maps to draw for a %s", backbone.arch)
    return
  split = config.data.eval_split
  try:
    sources.make_source(config, split)
  except FileNotFoundError:
    split = config.data.train_split
  batch = next(iter(pipeline.eval_batches(config, split, config.eval.attention_images)))
  images = batch["image"][batch["valid"]]
  maps = np.asarray(jax.jit(attention_maps.cls_attention, static_argnums=0)(
      backbone, params, images))
  if jax.process_index() == 0:
    plots.plot_grid(out_dir / "attention.png", images, maps, backbone.patch_size,
                    config.eval.attention_threshold)
  logging.info("attention maps of the teacher at step %d over the first %d images of %r: %s",
               step, len(images), split, out_dir / "attention.png")


def during_training(config: mlc.ConfigDict, teacher_backbone: Any, step: int, mesh: Mesh,
                    writer: metrics.Writer) -> None:
  """The teacher's k-NN top-1 (and attention scores, where the data has object masks) at this
  step: one row of eval/progress.jsonl {"step", "knn_top1": {k: %}, "jaccard",
  "jaccard_head_mean", "mass_on_object"}, its plot eval/progress.png, TensorBoard scalars
  eval/..., and a log line."""
  e = config.eval
  results, _ = scores.evaluate(config, features.evaluation_backbone(config),
                               {"teacher": teacher_backbone},
                               ks=e.nb_knn if e.knn else None,
                               temperature=e.knn_temperature, mesh=mesh)
  res = results["teacher"]
  row = {"step": step}
  if "knn" in res:
    row["knn_top1"] = res["knn"]["top1"]
  if "attention" in res:
    row.update({k: res["attention"][k] for k in ("jaccard", "jaccard_head_mean",
                                                  "mass_on_object")})
  if not writer.enabled:
    return
  writer.append(metrics.EVAL_LOG, row)
  plots.plot_progress(writer.read(metrics.EVAL_LOG),
                      paths.path(writer.workdir) / "eval" / "progress.png")
  scalars = {f"knn{k}_top1": v for k, v in row.get("knn_top1", {}).items()}
  scalars.update({k: v for k, v in row.items() if k not in ("step", "knn_top1")})
  writer.scalars("eval", scalars, step)
  logging.info("evaluation at step %d: %s", step, ", ".join(
      f"{k} {v:.1f}" if k.startswith("knn") else f"{k} {v:.3f}" for k, v in scalars.items()))
