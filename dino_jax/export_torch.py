"""Exports a workdir's weights to the formats PyTorch users exchange.

  python -m dino_jax.export_torch --workdir DIR --output FILE [--which teacher|student] \\
      [--with_head] [--format pth|safetensors|hf|full] [--step N]

Formats:
  pth          the backbone state_dict with the release's key names (its "pretrain" files); loads
               with strict=True into the release's vision_transformer and timm's
               VisionTransformer (num_classes=0). With --with_head: the release's MultiCropWrapper
               layout, keys 'backbone.*' and 'head.*' (last_layer.weight_g / weight_v).
  safetensors  the same tensors in a .safetensors file (metadata: arch, patch size, heads, step).
  hf           a directory (config.json + model.safetensors) that transformers.ViTModel loads:
               ViTModel.from_pretrained(DIR, add_pooling_layer=False); backbone only. Key names
               of transformers 4.x and the Hub (transformers 5 renames them as it loads).
  full         the release's full training checkpoint: 'student' ('module.backbone.*',
               'module.head.*'), 'teacher', 'optimizer' (torch AdamW state, the release's two
               param groups), 'epoch', 'args', 'dino_loss' {'center'}. main_dino.py resumes from
               it; eval_knn.py / eval_linear.py read its 'teacher'. 'args' is a plain dict of the
               release's argument names (plus this run's config as 'dino_jax_config'), not an
               argparse.Namespace, so torch.load(weights_only=True) reads the file. --which and
               --with_head do not apply (both networks and heads are in it).
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any

import jax
import numpy as np
from absl import app, flags, logging

from dino_jax import checkpoint
from dino_jax import config as config_lib
from dino_jax import convert
from dino_jax import train as train_lib

FORMATS = ("pth", "safetensors", "hf", "full")

# Config keys with the same name and meaning as the release's main_dino.py arguments.
RELEASE_ARGS = ("out_dim", "momentum_teacher", "teacher_temp", "warmup_teacher_temp",
                "warmup_teacher_temp_epochs", "weight_decay", "weight_decay_end", "clip_grad",
                "epochs", "freeze_last_layer", "lr", "warmup_epochs", "min_lr", "optimizer",
                "local_crops_number", "global_crops_scale", "local_crops_scale", "seed")
RELEASE_MODEL_ARGS = ("arch", "patch_size", "norm_last_layer", "use_bn_in_head", "drop_path_rate")


def load_state(workdir: str, step: int | None = None) -> tuple[Any, Any, int]:
  """(config, TrainState of host numpy arrays, step) of a workdir's latest (or given) checkpoint."""
  config = checkpoint.load_config(workdir)
  *_, init = train_lib.make_training(config, 1, 1)
  abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
  dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), abstract)
  mngr = checkpoint.manager(workdir, read_only=True)
  try:
    restored = checkpoint.restore(mngr, target, step=step)
  finally:
    mngr.close()
  if restored is None:
    raise FileNotFoundError(f"no readable checkpoint in {workdir}/checkpoints")
  step, state = restored
  return config, jax.tree.map(np.asarray, state), step


def backbone_shape(config) -> dict[str, int]:
  """embed_dim, depth, num_heads, mlp_dim, patch_size, img_size of the config's ViT."""
  vit = train_lib.build_models(config)[0].backbone
  return dict(embed_dim=vit.embed_dim, depth=vit.depth, num_heads=vit.num_heads,
              mlp_dim=int(vit.embed_dim * vit.mlp_ratio), patch_size=vit.patch_size,
              img_size=vit.img_size)


def release_args(config) -> dict[str, Any]:
  """The release's `args`, as a plain dict (loads with torch.load(weights_only=True))."""
  args = {k: config[k] for k in RELEASE_ARGS}
  args.update({k: config.model[k] for k in RELEASE_MODEL_ARGS})
  args = {k: list(v) if isinstance(v, tuple) else v for k, v in args.items()}
  args["use_fp16"] = False
  args["dino_jax_config"] = config_lib.to_json(config)
  return args


def _completed_epochs(workdir: str, config, step: int) -> int:
  per_epoch = config.steps_per_epoch
  path = os.path.join(workdir, "metrics.jsonl")
  if not per_epoch and os.path.exists(path):  # the trainer logs epoch = step / steps_per_epoch
    with open(path) as f:
      rows = [json.loads(r) for r in f if r.strip()]
    rows = [r for r in rows if r.get("epoch")]
    if rows:
      per_epoch = round(rows[-1]["step"] / rows[-1]["epoch"])
  return step // per_epoch if per_epoch else 0


def _tensors(tree: Any) -> Any:
  torch = convert.torch_extra("torch")
  return jax.tree.map(lambda x: torch.from_numpy(np.array(x)), tree)


def export(workdir: str, output: str, *, which: str = "teacher", with_head: bool = False,
           fmt: str = "pth", step: int | None = None) -> dict[str, Any]:
  """Writes `output` in format `fmt`; returns {'path', 'format', 'step', 'keys'}."""
  if fmt not in FORMATS:
    raise ValueError(f"format {fmt!r}: expected one of {FORMATS}")
  if which not in ("teacher", "student"):
    raise ValueError(f"which={which!r}: expected 'teacher' or 'student'")
  if fmt == "hf" and with_head:
    raise ValueError("--format hf holds the backbone only (transformers.ViTModel has no DINO "
                     "head); export the head with --format pth or safetensors --with_head")
  config, state, step = load_state(workdir, step)
  shape = backbone_shape(config)
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  if fmt == "full":
    torch = convert.torch_extra("torch")
    bn = config.model.use_bn_in_head
    obj = {
        "student": _tensors(convert.flax_to_torch(state.params, state.batch_stats, prefix="module.",
                                                  num_batches_tracked=step)),
        # The release wraps the teacher in DDP only when the head has BatchNorm.
        "teacher": _tensors(convert.flax_to_torch(state.teacher_params, state.teacher_batch_stats,
                                                  prefix="module." if bn else "",
                                                  num_batches_tracked=step)),
        "optimizer": convert.optimizer_to_torch(state.opt_state, state.params,
                                                norm_last_layer=config.model.norm_last_layer),
        "epoch": _completed_epochs(workdir, config, step),
        "args": release_args(config),
        "dino_loss": {"center": torch.from_numpy(np.array(state.center))},
    }
    torch.save(obj, output)
    keys = list(obj)
  else:
    params = state.teacher_params if which == "teacher" else state.params
    stats = state.teacher_batch_stats if which == "teacher" else state.batch_stats
    if with_head:
      sd = convert.flax_to_torch(params, stats, num_batches_tracked=step)
    else:
      sd = convert.flax_to_torch(params["backbone"])
    if fmt == "pth":
      convert.torch_extra("torch").save(_tensors(sd), output)
    elif fmt == "safetensors":
      save_file = convert.torch_extra("safetensors.numpy").save_file
      meta = {"format": "pt", "arch": config.model.arch, "patch_size": str(shape["patch_size"]),
              "num_heads": str(shape["num_heads"]), "which": which, "step": str(step)}
      save_file(sd, output, metadata=meta)
    else:  # hf
      save_file = convert.torch_extra("safetensors.numpy").save_file
      os.makedirs(output, exist_ok=True)
      with open(os.path.join(output, "config.json"), "w") as f:
        json.dump(convert.hf_config(**shape), f, indent=2)
      sd = convert.release_to_hf(sd)
      save_file(sd, os.path.join(output, "model.safetensors"), metadata={"format": "pt"})
    keys = list(sd)
  logging.info("wrote %s (%s, %s, step %d)", output, fmt, "full" if fmt == "full" else which, step)
  return {"path": output, "format": fmt, "step": step, "keys": keys}


def _define_flags() -> None:
  flags.DEFINE_string("workdir", None, "A dino_jax workdir (train or import_torch wrote it).")
  flags.DEFINE_string("output", None, "File to write (a directory for --format hf).")
  flags.DEFINE_enum("which", "teacher", ["teacher", "student"], "Network to export (the release "
                    "publishes the teacher).")
  flags.DEFINE_bool("with_head", False, "Also export the DINO head (keys 'backbone.*', 'head.*').")
  flags.DEFINE_enum("format", None, list(FORMATS), "pth | safetensors | hf | full. Default: "
                    "safetensors for an --output ending in .safetensors, else pth.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.mark_flags_as_required(["workdir", "output"])


def main(argv) -> None:
  del argv
  train_lib.quiet_library_logs()  # orbax logs every step it restores or saves
  f = flags.FLAGS
  fmt = f.format or ("safetensors" if f.output.endswith(".safetensors") else "pth")
  try:
    out = export(f.workdir, f.output, which=f.which, with_head=f.with_head, fmt=fmt, step=f.step)
  except (ValueError, FileNotFoundError, ImportError) as e:  # one clear line, no traceback
    sys.exit(f"export_torch: {e}")
  print(json.dumps({k: v for k, v in out.items() if k != "keys"}))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
