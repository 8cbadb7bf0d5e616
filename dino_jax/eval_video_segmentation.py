"""Video object segmentation by label propagation of a workdir's teacher (or student) patch
features: the paper's DAVIS-2017 evaluation (the release's eval_video_segmentation.py).

  python -m dino_jax.eval_video_segmentation --workdir DIR [--which teacher|student] \
      [--data_path DAVIS_ROOT] [--output OUTDIR] [--n_last_frames 7] \
      [--size_mask_neighborhood 12] [--topk 5] [--temperature 0.1] [--bs 6] [--scale_size 480] \
      [--distributed | --coordinator_address HOST:PORT ...]

--data_path: a DAVIS-2017 folder (ROOT/JPEGImages/480p/<video>/*.jpg, ROOT/Annotations/480p/
<video>/*.png, ROOT/ImageSets/2017/val.txt). Each video is segmented from its first annotation;
the ids are written as palette PNGs OUTDIR/<video>/<frame>.png (default DIR/eval/
video_segmentation/), and J, F and J&F (davis2017-evaluation's definitions; first and last
frames left out) go to DIR/eval/video_segmentation.json (video_segmentation_student.json for
--which student): the DAVIS table's figures, 'per_object' and 'per_video'.

Without --data_path, on a workdir whose data.source is 'shapes': the embedded version. Clips of
moving, turning shapes under changing light (data/shapes_clips.py; --num_clips of --num_frames
frames at the workdir's image size; --nolighting: constant light) are segmented by the trained
network, by the same network at its random init, and by the trivial baseline (the first mask
copied to every frame); DIR/eval/video_segmentation.json gets {"trained": .., "random_init": ..,
"baseline": ..} and DIR/eval/video_segmentation.png the masks over one clip. With --output, the
trained network's ids are written as PNGs too.

On several processes (the launch flags of train.py) each extracts its share of the features;
process 0 prints and writes.
"""
from __future__ import annotations

import os
import sys

import jax
import numpy as np
from absl import flags

from dino_jax import cli
from dino_jax import paths
from dino_jax.data import shapes_clips
from dino_jax.evaluate import davis_metrics, features
from dino_jax.evaluate import video_segmentation as vs


def _define_flags() -> None:
  flags.DEFINE_string("workdir", None, "A dino_jax workdir (train or import_torch wrote it).")
  flags.DEFINE_enum("which", "teacher", ["teacher", "student"], "Network to evaluate.")
  flags.DEFINE_string("data_path", None, "DAVIS-2017 root (without it: the embedded clips of a "
                      "'shapes' workdir).")
  flags.DEFINE_string("output", None, "Directory for the predicted masks, <video>/<frame>.png "
                      "(default with --data_path: DIR/eval/video_segmentation).")
  flags.DEFINE_integer("n_last_frames", 7, "Previous frames propagated from, besides the first.")
  flags.DEFINE_integer("size_mask_neighborhood", 12, "Source patches within this many rows and "
                       "columns of the target (0: all).")
  flags.DEFINE_integer("topk", 5, "Source patches each target patch takes its label from.")
  flags.DEFINE_float("temperature", 0.1, "T of the affinity exp(sim / T) (fixed at 0.1 in the "
                     "release's code).")
  flags.DEFINE_integer("bs", None, "Frames per feature batch (default: 6, the release's --bs, "
                       "with --data_path; the config's eval.batch_size for the clips).")
  flags.DEFINE_integer("scale_size", 480, "With --data_path: frames resized to this shorter side "
                       "(the longer one to a multiple of 64), as the release's read_frame.")
  flags.DEFINE_integer("num_clips", 24, "Embedded version: clips.")
  flags.DEFINE_integer("num_frames", 12, "Embedded version: frames per clip.")
  flags.DEFINE_bool("lighting", True, "Embedded version: each frame's brightness and contrast "
                    "change by the training's colour jitter (--nolighting: constant light).")
  cli.define_step_flag()
  cli.define_distributed_flags()
  flags.mark_flags_as_required(["workdir"])


def _print_davis(results: dict, title: str) -> None:
  print(title)
  print(davis_metrics.format_table({"": results}))
  print(f"{'video':<24} {'J&F-Mean':>9} {'J-Mean':>9} {'F-Mean':>9}")
  for video, r in results["per_video"].items():
    print(f"{video:<24} {r['J&F-Mean']:9.3f} {r['J-Mean']:9.3f} {r['F-Mean']:9.3f}")


def main(argv) -> None:
  cli.initialize_distributed()
  cli.quiet_library_logs()
  f = flags.FLAGS
  if argv[1:]:
    sys.exit(f"eval_video_segmentation: unexpected arguments {argv[1:]}")
  if f.n_last_frames < 1 or f.topk < 1 or f.size_mask_neighborhood < 0 or f.temperature <= 0:
    sys.exit("eval_video_segmentation: need --n_last_frames >= 1, --topk >= 1, "
             "--size_mask_neighborhood >= 0 and --temperature > 0")
  if f.num_clips < 1 or f.num_frames < 3:
    sys.exit("eval_video_segmentation: need --num_clips >= 1 and --num_frames >= 3 (the first "
             "and last frames are not scored)")
  options = vs.Propagation(f.n_last_frames, f.size_mask_neighborhood, f.topk, f.temperature)
  name = "video_segmentation" + ("" if f.which == "teacher" else "_student")
  try:
    config, backbone, params, step = features.load_backbone(f.workdir, f.which, f.step)
    features.require_vit(backbone, "video segmentation (patch-token propagation)")
    if f.output is not None:
      paths.check(f.output)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"eval_video_segmentation: {e}")
  settings = (f"n_last_frames {options.n_last_frames}, size_mask_neighborhood "
              f"{options.size_mask_neighborhood}, topk {options.topk}, temperature "
              f"{options.temperature:g}")

  if f.data_path is not None:
    output = f.output or os.path.join(f.workdir, "eval", name)
    try:
      results = vs.evaluate_davis(backbone, params, f.data_path, options=options,
                                  scale_size=f.scale_size, batch_size=f.bs or 6, output=output)
    except (ValueError, FileNotFoundError) as e:
      sys.exit(f"eval_video_segmentation: {e}")
    if jax.process_index() == 0:
      paths.write_json(os.path.join(f.workdir, "eval", f"{name}.json"), results)
      _print_davis(results, f"DAVIS-2017 val, {f.which} at step {step} ({settings}); "
                   f"{results['objects']} objects; masks in {output}")
    return

  if config.data.source != "shapes":
    sys.exit(f"eval_video_segmentation: give --data_path (the data of {f.workdir} is "
             f"{config.data.source!r}; the embedded clips need 'shapes')")
  clips = shapes_clips.make_clips(config, f.num_clips, f.num_frames, f.lighting)
  models = {"trained": params, "random_init": features.random_init_backbone(config)}
  results, preds = vs.evaluate_clips(backbone, models, clips, options,
                                     batch_size=f.bs or config.eval.batch_size)
  if jax.process_index() != 0:
    return
  paths.write_json(os.path.join(f.workdir, "eval", f"{name}.json"), results)
  # The picture: the first clip with the most objects.
  c = int(np.argmax([int(clip["masks"][0].max()) for clip in clips]))
  vs.plot_clip(os.path.join(f.workdir, "eval", f"{name}.png"), clips[c]["frames"],
               {"annotation": clips[c]["masks"], f"{f.which} (step {step})": preds["trained"][c],
                "random init": preds["random_init"][c], "baseline": preds["baseline"][c]})
  if f.output is not None:
    for clip, ids in zip(clips, preds["trained"]):
      vs.write_masks(f.output, clip["name"], [f"{t:05d}" for t in range(len(ids))], ids)
  print(f"video segmentation, embedded: {len(clips)} clips of {f.num_frames} frames, "
        f"{sum(int(clip['masks'][0].max()) for clip in clips)} objects, "
        f"{'lighting changing each frame' if f.lighting else 'constant lighting'} ({settings})")
  print(davis_metrics.format_table(results))


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
