"""Self-attention maps of the last block's [CLS] query on any image, one per head, with their masks.

  python -m dino_jax.visualize_attention --workdir DIR [--which teacher|student] \
      --image IMG --output OUTDIR [--threshold 0.6] [--image_size 480,480]
  python -m dino_jax.visualize_attention --weights FILE.pth --arch vit_small --patch_size 8 \
      --image IMG --output OUTDIR
  python -m dino_jax.visualize_attention --workdir DIR --output OUTDIR [--threshold 0.6]

--weights: a backbone state_dict (the release's published files), a MultiCropWrapper state_dict or
the release's full checkpoint (its --which network), read by convert.importing.load_backbone
in memory (no workdir is written). As the release: --image_size 480
(one value) resizes the shorter side, two values give height and width; the image is then cut to
a multiple of the patch size. The default is the release's 480 x 480 for patches of 8 px and
more; for smaller patches MAX_GRID patches a side (the release's grid at patch 8): 240 x 240 at
patch 4, where 480 would hold 14,400 tokens and a 6.6 GB attention matrix per block. OUTDIR gets
img.png, attn-head{j}.png, mask_th{threshold}_head{j}.png and attention.png (the grid: image,
each head's map, each mask).

Without --image (a workdir whose data has object masks, as the embedded `shapes`): the eval split's
Jaccard of each head's mask, the best head's and the head-mean map's with the object masks, and the
attention on the object, as the main job reports them -> DIR/eval/attention.json (or
attention_student.json) and OUTDIR/attention.png (the first eval.attention_images images). It
runs on several processes too (the launch flags of train.py: each feeds its share of the split);
process 0 prints and writes. One --image is the work of one process: the others exit.
"""
from __future__ import annotations

import os
import sys
from typing import Any

import jax
import numpy as np
from absl import flags

from dino_jax import cli
from dino_jax import paths
from dino_jax.convert import importing
from dino_jax.evaluate import attention_maps, features, plots, scores
from dino_jax.models import VisionTransformer


def _define_flags() -> None:
  flags.DEFINE_string("workdir", None, "A dino_jax workdir; or give --weights.")
  flags.DEFINE_enum("which", "teacher", ["teacher", "student"], "Network of --workdir (or of a "
                    "full checkpoint given as --weights).")
  flags.DEFINE_string("weights", None, "PyTorch weights (.pth, .safetensors, ...), as "
                      "import_torch reads them.")
  flags.DEFINE_string("arch", "vit_small", "With --weights: vit_tiny | vit_small | vit_base | "
                      "vit_large (checked against the weights).")
  flags.DEFINE_integer("patch_size", None, "With --weights: checked against the weights (read "
                       "from them when left out).")
  flags.DEFINE_string("image", None, "Image file (without it: the eval split's object masks).")
  flags.DEFINE_string("output", None, "Directory for the PNG files.")
  flags.DEFINE_float("threshold", 0.6, "Share of each head's attention mass its mask keeps.")
  flags.DEFINE_list("image_size", None, "One value: the shorter side; two: height,width "
                    "(default 480,480; MAX_GRID patches a side for patches under 8 px).")
  cli.define_step_flag()
  cli.define_distributed_flags()
  flags.mark_flags_as_required(["output"])


MAX_GRID = 60  # the release's default: 480 px at patch 8


def default_image_size(patch_size: int) -> list[int]:
  """[height, width] when --image_size is not given: the release's 480 x 480, at most MAX_GRID
  patches a side."""
  side = min(480, MAX_GRID * patch_size)
  return [side, side]


def maps_for_image(backbone: VisionTransformer, params: Any, image: np.ndarray) -> np.ndarray:
  """uint8 (H, W, 3) -> the [CLS] attention maps (heads, H / p, W / p)."""
  fn = jax.jit(attention_maps.cls_attention, static_argnums=0)
  return np.asarray(fn(backbone, params, image[None]))[0]


def split_scores(workdir: str, which: str, output: str, threshold: float,
                 step: int | None = None) -> None:
  """The eval split's attention figures -> workdir/eval/attention[_student].json, a grid PNG."""
  try:
    config, backbone, params, step = features.load_backbone(workdir, which, step)
    features.require_vit(backbone, "visualize_attention")
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"visualize_attention: {e}")
  config.eval.attention_threshold = threshold
  results, _ = scores.evaluate(config, backbone, {which: params}, ks=None)
  if "attention" not in results[which]:
    sys.exit(f"visualize_attention: the eval split of {workdir} has no object masks; give --image")
  if jax.process_index() != 0:
    return
  name = "attention.json" if which == "teacher" else "attention_student.json"
  paths.write_json(os.path.join(workdir, "eval", name), results[which]["attention"])
  plots.plot_examples(config, results[which]["maps"], backbone.patch_size,
                       os.path.join(output, "attention.png"))
  print(f"attention of the {which} at step {step} on the eval split (threshold {threshold})")
  print(scores.format_table(results))


def main(argv) -> None:
  del argv
  cli.initialize_distributed()
  cli.quiet_library_logs()
  f = flags.FLAGS
  if (f.workdir is None) == (f.weights is None):
    sys.exit("visualize_attention: give exactly one of --workdir and --weights")
  try:
    paths.check(f.output)
  except ValueError as e:
    sys.exit(f"visualize_attention: {e}")
  if f.image is None:
    if f.workdir is None:
      sys.exit("visualize_attention: --weights needs --image")
    split_scores(f.workdir, f.which, f.output, f.threshold, f.step)
    return
  if jax.process_index() != 0:
    return
  try:
    size = None if f.image_size is None else [int(s) for s in f.image_size]
    if size is not None and len(size) not in (1, 2):
      raise ValueError(f"--image_size {f.image_size}: one or two values")
    if f.weights is not None:
      _, backbone, params = importing.load_backbone(f.weights, f.which, arch=f.arch,
                                                    patch_size=f.patch_size)
      source = f.weights
    else:
      _, backbone, params, step = features.load_backbone(f.workdir, f.which, f.step)
      source = f"{f.which} at step {step}"
    features.require_vit(backbone, "visualize_attention")
    size = size or default_image_size(backbone.patch_size)
    image = attention_maps.load_image(f.image, size, backbone.patch_size)
  except (ValueError, FileNotFoundError, OSError) as e:
    sys.exit(f"visualize_attention: {e}")
  maps = maps_for_image(backbone, params, image)
  written = plots.save_heads(f.output, image, maps, backbone.patch_size, f.threshold)
  grid = os.path.join(f.output, "attention.png")
  plots.plot_grid(grid, image[None], maps[None], backbone.patch_size, f.threshold)
  masks = np.asarray(attention_maps.mass_masks(maps, f.threshold))
  print(f"{f.image}: {image.shape[0]}x{image.shape[1]} px, {maps.shape[0]} heads on a "
        f"{maps.shape[1]}x{maps.shape[2]} patch grid ({source})")
  print(f"{'head':>4}  {'mask patches':>12}  {'peak share':>10}")
  for j in range(maps.shape[0]):
    print(f"{j:>4}  {masks[j].mean():12.1%}  {maps[j].max() / maps[j].sum():10.1%}")
  print(f"wrote {len(written) + 1} files to {f.output}: {grid}, ...")


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
