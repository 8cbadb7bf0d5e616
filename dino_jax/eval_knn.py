"""Weighted k-NN evaluation of a workdir's teacher (or student) [CLS] features.

  python -m dino_jax.eval_knn --workdir DIR [--data_path FOLDER] [--nb_knn 10 20 100 200] \
      [--temperature 0.07] [--which teacher|student] [--step N] \
      [--distributed | --coordinator_address ...]

Train split as the bank, eval split as the queries (config.data.*_split of the workdir's config):
of the workdir's data, or with --data_path of another image folder, as the release's --data_path
(FOLDER/train/<class>/* and FOLDER/val/<class>/*, with the same classes: the data.source 'folder'
with data.path FOLDER, the workdir's evaluation transform; config.json is left as it is). Prints
a table and writes DIR/eval/knn.json ({"top1": {"20": ..}, "top5": {..}}, percent), or
DIR/eval/knn_student.json for --which student. On several processes (the launch flags of
train.py) each extracts its share of the features; process 0 prints and writes.
"""
from __future__ import annotations

import os
import sys

import jax
from absl import flags, logging

from dino_jax import cli
from dino_jax import paths
from dino_jax.evaluate import features, scores


def _define_flags() -> None:
  flags.DEFINE_string("workdir", None, "A dino_jax workdir (train or import_torch wrote it).")
  cli.define_data_path_flag()
  flags.DEFINE_multi_integer("nb_knn", None, "k values, e.g. --nb_knn 10 20 100 200 (default: the "
                             "config's eval.nb_knn).")
  flags.DEFINE_float("temperature", None, "T of the weights exp(sim / T) (default: the config's "
                     "eval.knn_temperature, 0.07).")
  flags.DEFINE_enum("which", "teacher", ["teacher", "student"], "Network to evaluate.")
  flags.DEFINE_integer("batch_size", None, "Images per feature batch (default: eval.batch_size).")
  cli.define_step_flag()
  cli.define_distributed_flags()
  flags.mark_flags_as_required(["workdir"])


def _nb_knn_values(argv: list[str]) -> list[int]:
  """The release's `--nb_knn 10 20 100 200` form: extra integers after --nb_knn reach argv."""
  return [int(a) for a in argv[1:] if a.isdigit()]


def main(argv) -> None:
  cli.initialize_distributed()
  cli.quiet_library_logs()
  f = flags.FLAGS
  extra = [a for a in argv[1:] if not a.isdigit()]
  if extra:
    sys.exit(f"eval_knn: unexpected arguments {extra}")
  try:
    config, backbone, params, step = features.load_backbone(f.workdir, f.which, f.step)
    cli.use_data_path(config, f.data_path)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"eval_knn: {e}")
  ks = (f.nb_knn or []) + _nb_knn_values(argv) or list(config.eval.nb_knn)
  temperature = f.temperature if f.temperature is not None else config.eval.knn_temperature
  if f.batch_size:
    config.eval.batch_size = f.batch_size
  logging.info("k-NN of the %s at step %d: k %s, T %g", f.which, step, ks, temperature)
  try:
    results, speed = scores.evaluate(config, backbone, {f.which: params}, ks=ks,
                                     temperature=temperature, with_attention=False)
  except (ValueError, FileNotFoundError) as e:  # e.g. a folder without the eval split
    sys.exit(f"eval_knn: {e}")
  if "knn" not in results[f.which]:
    sys.exit(f"eval_knn: the data of {f.data_path or f.workdir} has no labels")
  if jax.process_index() != 0:
    return
  name = "knn.json" if f.which == "teacher" else "knn_student.json"
  paths.write_json(os.path.join(f.workdir, "eval", name), results[f.which]["knn"])
  print(f"k-NN, {f.which} at step {step}, T {temperature} (features: "
        f"{speed['train_features_per_sec']:.0f} images/s)")
  print(scores.format_table(results))


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
