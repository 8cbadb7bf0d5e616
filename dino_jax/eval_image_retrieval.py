"""Image retrieval with a workdir's frozen [CLS] features: revisited Oxford and Paris as the
release's eval_image_retrieval.py evaluates them, or an embedded version on the shapes images.

  python -m dino_jax.eval_image_retrieval --workdir DIR --data_path ROOT \
      [--dataset roxford5k|rparis6k] [--imsize 224] [--multiscale] [--crop_queries] \
      [--which teacher|student] [--batch_size N] [--distributed | --coordinator_address ...]
  python -m dino_jax.eval_image_retrieval --workdir DIR [--shapes_queries 60] \
      [--shapes_database 600] [--multiscale]

With --data_path: ROOT/<dataset>/jpg/*.jpg and ROOT/<dataset>/gnd_<dataset>.pkl (revisitop's
files); images thumbnailed to --imsize (the longer side), queries whole (--crop_queries: cut to
their boxes first, revisitop's protocol; the release does not); mAP and mP@1, 5, 10 in the
Medium and Hard settings -> DIR/eval/image_retrieval_<dataset>.json {"medium": {"mAP", "mP@1",
...}, "hard": {...}} (percent). The release's `--multiscale 1` is --multiscale here.

Without --data_path, for a workdir of the embedded shapes data: --shapes_queries query images
against --shapes_database database images of their own splits, a positive being an image of the
query's class; the trained network, the same network at its random init and the raw pixels'
cosine similarity -> DIR/eval/image_retrieval.json {"trained", "random_init", "baseline"}, each
{"mAP", "mP@1", "mP@5", "mP@10"}; the chance level of random rankings is printed.

--which student writes *_student.json. On several processes (the launch flags of train.py)
each extracts its share of the features; process 0 prints and writes.
"""
from __future__ import annotations

import os
import sys

import jax
from absl import flags, logging

from dino_jax import cli
from dino_jax import paths
from dino_jax import sharding as sharding_lib
from dino_jax.data import revisited
from dino_jax.evaluate import features, retrieval


def _define_flags() -> None:
  flags.DEFINE_string("workdir", None, "A dino_jax workdir (train or import_torch wrote it).")
  flags.DEFINE_enum("which", "teacher", ["teacher", "student"], "Network to evaluate.")
  flags.DEFINE_string("data_path", None, "Root of revisitop's datasets (ROOT/roxford5k/, "
                      "ROOT/rparis6k/); without it: the embedded shapes version.")
  flags.DEFINE_enum("dataset", "roxford5k", list(revisited.DATASETS), "Dataset under --data_path.")
  flags.DEFINE_integer("imsize", 224, "With --data_path: images thumbnailed to this longer side "
                       "(never enlarged).")
  flags.DEFINE_bool("multiscale", False, "Mean [CLS] feature of scales 1, 1/sqrt(2), 1/2 (the "
                    "release's --multiscale 1).")
  flags.DEFINE_bool("crop_queries", False, "Crop the queries to their boxes (revisitop's "
                    "protocol; the release uses whole query images).")
  flags.DEFINE_integer("batch_size", None, "Images per feature batch (default: eval.batch_size).")
  flags.DEFINE_integer("shapes_queries", 60, "Embedded version: query images.")
  flags.DEFINE_integer("shapes_database", 600, "Embedded version: database images.")
  cli.define_step_flag()
  cli.define_distributed_flags()
  flags.mark_flags_as_required(["workdir"])


def main(argv) -> None:
  cli.initialize_distributed()
  cli.quiet_library_logs()
  f = flags.FLAGS
  if argv[1:]:
    sys.exit(f"eval_image_retrieval: unexpected arguments {argv[1:]} (the release's "
             f"`--multiscale 1` is --multiscale here)")
  try:
    config, backbone, params, step = features.load_backbone(f.workdir, f.which, f.step)
    features.require_vit(backbone, "image retrieval (patch-aligned multi-scale crops)")
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"eval_image_retrieval: {e}")
  if f.batch_size:
    config.eval.batch_size = f.batch_size
  mesh = sharding_lib.make_mesh()
  suffix = "" if f.which == "teacher" else "_student"
  scales = "multi-scale" if f.multiscale else "single-scale"
  if f.data_path is not None:
    logging.info("retrieval on %s, %s at step %d, imsize %d, %s", f.dataset, f.which, step,
                 f.imsize, scales)
    try:
      results = retrieval.evaluate_revisited(
          backbone, params, f.data_path, f.dataset, imsize=f.imsize, multiscale=f.multiscale,
          crop_queries=f.crop_queries, batch_size=config.eval.batch_size, mesh=mesh)
    except (ValueError, FileNotFoundError, OSError) as e:
      sys.exit(f"eval_image_retrieval: {e}")
    name = f"image_retrieval_{f.dataset}{suffix}.json"
    title = (f"{f.dataset} ({'queries cut to their boxes' if f.crop_queries else 'whole queries'}"
             f", imsize {f.imsize}), {f.which} at step {step}, {scales}")
    table = retrieval.format_table(results)
  else:
    if config.data.source != "shapes":
      sys.exit(f"eval_image_retrieval: {f.workdir} trained on data.source "
               f"{config.data.source!r}: give --data_path (the embedded version needs shapes)")
    models = {"trained": params, "random_init": features.random_init_backbone(config)}
    try:
      res = retrieval.evaluate_shapes(config, backbone, models, num_queries=f.shapes_queries,
                                      database_size=f.shapes_database,
                                      multiscale=f.multiscale, mesh=mesh)
    except ValueError as e:
      sys.exit(f"eval_image_retrieval: {e}")
    # The baseline is the raw pixels, not a random ranking: in these images the pixels find a
    # query's near-duplicates (same class, size and place), far above chance at the top of the
    # ranking, so chance would flatter the features. Chance is printed below the table.
    results = {"trained": res["trained"], "random_init": res["random_init"],
               "baseline": res["pixels"]}
    name = f"image_retrieval{suffix}.json"
    title = (f"shapes ({f.shapes_queries} queries, {f.shapes_database} database images, "
             f"positives of the query's class), {f.which} at step {step}, {scales}; baseline: "
             f"the raw pixels' cosine similarity")
    chance = res["chance"]
    table = retrieval.format_table(results) + (
        "\nchance (mean of 20 random rankings): "
        + ", ".join(f"{k} {v:.2f}" for k, v in chance.items()))
  if jax.process_index() != 0:
    return
  paths.write_json(os.path.join(f.workdir, "eval", name), results)
  print(f"image retrieval, {title}")
  print(table)


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
