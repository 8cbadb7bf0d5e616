"""Copy detection on Copydays with a workdir's teacher (or student), as the release's
eval_copy_detection.py: [CLS] + GeM-pooled patch features, PCA whitening, mAP of the copies.

  python -m dino_jax.eval_copy_detection --workdir DIR [--which teacher|student] \
      [--data_path COPYDAYS --distractors_path DIR --whitening_path DIR] [--imsize 320] \
      [--batch_size_per_gpu 16] [--num_workers 10] [--embedded_originals 157 \
      --embedded_distractors 10000 --embedded_whitening 20000] \
      [--distributed | --coordinator_address ...]

With --data_path: the Copydays folder (layout: dino_jax/data/copydays.py), the originals and the
distractors as the database, every query block present scored; prints the mAP of each block
("strong" is the paper's figure) and writes DIR/eval/copy_detection.json {"mAP": {block: %},
"images": {...}} (copy_detection_student.json for --which student). Without --distractors_path
or --whitening_path, no distractors or no whitening, as the release when its folders are absent.

Without --data_path, on a workdir of the embedded shapes data: Copydays' 20 blocks made of shapes
images, among 10k shapes distractors, the whitening learned on 20k others (data/copydays.py),
scored for the trained network, the same network at its random init, and the raw pixels as the
baseline (thumbnails of one value per patch and channel, through the same whitening and search);
writes {"trained": {"mAP": {block: %}}, "random_init": {..}, "baseline": {..}}. The images are then
evaluated at their own size (the workdir's data.shapes_image_size), not the release's 320, unless
--imsize is given.
On several processes each extracts its share of the features; process 0 prints and writes.
"""
from __future__ import annotations

import math
import os
import sys
import time

import jax
from absl import flags, logging

from dino_jax import cli
from dino_jax import paths
from dino_jax import sharding as sharding_lib
from dino_jax.data import copydays
from dino_jax.evaluate import copy_detection, features, tables


def _define_flags() -> None:
  flags.DEFINE_string("workdir", None, "A dino_jax workdir (train or import_torch wrote it).")
  flags.DEFINE_enum("which", "teacher", ["teacher", "student"], "Network to evaluate.")
  flags.DEFINE_string("data_path", None, "The Copydays folder (original/, strong/, optionally "
                      "jpegqual/<q>/, crops/<pct>/). Default: the embedded version on a workdir "
                      "of shapes data.")
  flags.DEFINE_string("distractors_path", None, "Distractor images, added to the database (the "
                      "paper: 10k random YFCC100M images).")
  flags.DEFINE_string("whitening_path", None, "Images the whitening is learned on (the paper: 20k "
                      "random YFCC100M images).")
  flags.DEFINE_integer("imsize", 320, "Images are resized to imsize x imsize (default for the "
                       "embedded version: the shapes image size).")
  flags.DEFINE_integer("batch_size_per_gpu", 16, "Images per device in a feature batch.")
  flags.DEFINE_integer("num_workers", 10, "Image-loading threads per process.")
  flags.DEFINE_integer("embedded_originals", copydays.EMBEDDED_ORIGINALS, "Embedded version: "
                       "originals (the strong copies in Copydays' proportion, 229 / 157).")
  flags.DEFINE_integer("embedded_distractors", copydays.EMBEDDED_DISTRACTORS,
                       "Embedded version: distractors.")
  flags.DEFINE_integer("embedded_whitening", copydays.EMBEDDED_WHITENING,
                       "Embedded version: images the whitening is learned on.")
  cli.define_step_flag()
  cli.define_distributed_flags()
  flags.mark_flags_as_required(["workdir"])


def _table(results: dict[str, dict[str, float]]) -> str:
  """{model: {block: mAP}} -> a plain text table, one column per model, the paper's block marked."""
  blocks = list(next(iter(results.values())))
  rows = [(f"{b} mAP (%)" + (" <-" if b == "strong" else ""),
           [f"{r[b]:.1f}" for r in results.values()]) for b in blocks]
  # Labels padded to the longest block's "<block> mAP (%) <-" and a space, marked or not.
  return tables.text_table(list(results), rows, label_width=max(len(b) for b in blocks) + 12)


def main(argv) -> None:
  cli.initialize_distributed()
  cli.quiet_library_logs()
  f = flags.FLAGS
  if len(argv) > 1:
    sys.exit(f"eval_copy_detection: unexpected arguments {argv[1:]}")
  try:
    config, backbone, params, step = features.load_backbone(f.workdir, f.which, f.step)
    features.require_vit(backbone, "copy detection (GeM of patch tokens)")
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"eval_copy_detection: {e}")
  embedded = not f.data_path
  if embedded and config.data.source != "shapes":
    sys.exit(f"eval_copy_detection: give --data_path (the Copydays folder); the embedded version "
             f"needs a workdir of shapes data, not data.source={config.data.source!r}")
  # The embedded images are small (32 px): evaluated at their size, not upsampled to 320.
  imsize = config.data.shapes_image_size if embedded and not f["imsize"].present else f.imsize
  if imsize % backbone.patch_size:
    sys.exit(f"eval_copy_detection: --imsize {imsize} is not a multiple of the patch size "
             f"{backbone.patch_size}")
  try:
    if embedded:
      n = f.embedded_originals
      sets = copydays.embedded(
          config, imsize, originals=n, distractors=f.embedded_distractors,
          whitening=f.embedded_whitening,
          copies=math.ceil(n * copydays.EMBEDDED_COPIES / copydays.EMBEDDED_ORIGINALS))
    else:
      sets = copydays.copydays(f.data_path, imsize, f.distractors_path, f.whitening_path)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"eval_copy_detection: {e}")
  if embedded:
    models = {"trained": params, "random_init": features.random_init_backbone(config)}
  else:
    models = {f.which: params}
  mesh = sharding_lib.make_mesh()
  logging.info("copy detection of the %s at step %d: %s queries, %d database images, %s "
               "whitening images, %d px", f.which, step,
               {b: len(s) for b, s in sets.queries.items()}, len(sets.database),
               len(sets.whitening) if sets.whitening is not None else "no", imsize)
  t0 = time.perf_counter()
  results, speed = copy_detection.evaluate(
      backbone, models, sets, batch_size=f.batch_size_per_gpu * mesh.size, mesh=mesh,
      pixel_grid=imsize // backbone.patch_size if embedded else None, threads=f.num_workers)
  if jax.process_index() != 0:
    return
  name = "copy_detection.json" if f.which == "teacher" else "copy_detection_student.json"
  if embedded:
    out = {model: {"mAP": r} for model, r in results.items()}
  else:
    n_whitening = len(sets.whitening) if sets.whitening is not None else 0
    out = {"mAP": results[f.which], "images": {
        "queries": {b: len(s) for b, s in sets.queries.items()},
        "database": len(sets.database), "whitening": n_whitening}}
  paths.write_json(os.path.join(f.workdir, "eval", name), out)
  print(f"copy detection, {f.which} at step {step}, {imsize} px (features: {speed:.0f} "
        f"images/s; {time.perf_counter() - t0:.0f} s)")
  print(_table(results))


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
