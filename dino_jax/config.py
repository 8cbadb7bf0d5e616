"""Training config: every key with the release's default, and validation before anything compiles.

Config files in configs/ start from `base_config()` and change what their recipe changes. Keys are the
paper's / release's names where it has one.
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import inspect
import json
import os
import re
from typing import Any, Sequence

import ml_collections as mlc

from dino_jax.models.resnet import STAGES
from dino_jax.models.vit import ATTENTION_IMPLS, SIZES

OPTIMIZERS = ("adamw", "sgd", "lars")  # optim.dino_optimizer builds each


def base_config() -> mlc.ConfigDict:
  """The release's argument defaults (main_dino.py): ViT-S/16, 100 epochs, K = 65536."""
  c = mlc.ConfigDict()
  c.seed = 0
  c.batch_size = 1024  # global: distinct images per optimizer step (the paper's 16 GPUs x 64)
  c.epochs = 100
  c.total_steps = 0  # > 0 overrides epochs
  c.steps_per_epoch = 0  # 0: training images // batch_size (the release drops the last batch)
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.log_every_steps = 50
  c.init_from = ""  # a workdir whose latest checkpoint's params start this run (not its step)

  # Multi-crop.
  c.local_crops_number = 8
  c.global_crops_size = 224
  c.local_crops_size = 96
  c.global_crops_scale = (0.4, 1.0)
  c.local_crops_scale = (0.05, 0.4)

  # Objective.
  c.out_dim = 65536
  c.student_temp = 0.1
  c.teacher_temp = 0.04
  c.warmup_teacher_temp = 0.04
  c.warmup_teacher_temp_epochs = 0
  c.center_momentum = 0.9
  c.momentum_teacher = 0.996
  c.momentum_teacher_end = 1.0  # the release: 1 (the teacher freezes at the end)

  # Optimisation.
  c.optimizer = "adamw"  # adamw | sgd | lars (the release's convnet optimizers, dino_jax.optim)
  c.lr = 0.0005  # for a global batch of 256, scaled linearly
  c.min_lr = 1e-6
  c.warmup_epochs = 10.0
  c.weight_decay = 0.04
  c.weight_decay_end = 0.4
  c.clip_grad = 3.0
  c.freeze_last_layer = 1.0  # epochs
  c.grad_accum_steps = 1

  c.model = mlc.ConfigDict()
  c.model.arch = "vit_small"  # vit_tiny | vit_small | vit_base | vit_large | vit_custom | resnet50
  c.model.patch_size = 16  # ViTs only
  c.model.embed_dim = 0  # 0: the arch's size; set all three for vit_custom
  c.model.depth = 0
  c.model.num_heads = 0
  # Side of the image the position embedding is laid out for (grid = img_size / patch_size); other
  # sizes interpolate it at run time, as the release does. 0: global_crops_size. Imported weights
  # set it to their own grid, so their crops can differ from it.
  c.model.img_size = 0
  c.model.drop_path_rate = 0.1  # student only
  c.model.norm_last_layer = True
  c.model.use_bn_in_head = False
  c.model.head_nlayers = 3
  c.model.head_hidden_dim = 2048
  c.model.head_bottleneck_dim = 256
  # Compute dtype: "bfloat16" on GPU/TPU (params stay float32); the release's float16 would need
  # loss scaling and is refused.
  c.model.dtype = "float32"
  c.model.attention = "matmul"  # matmul | xla | cudnn (jax.nn.dot_product_attention); see vit.py
  c.model.remat = False  # recompute block activations in the backward pass: memory for FLOPs

  c.mesh = mlc.ConfigDict()
  c.mesh.data = -1  # -1: all devices not used by fsdp
  c.mesh.fsdp = 1

  c.data = mlc.ConfigDict()
  c.data.source = "folder"  # shapes | folder | tfds
  c.data.path = ""  # folder root
  c.data.name = ""  # tfds name
  c.data.train_split = "train"
  c.data.eval_split = "val"
  c.data.image_key = "image"
  c.data.label_key = "label"
  c.data.workers = 8  # grain worker processes; 0 = in this process
  c.data.threads = 1  # prefetch threads per process (per worker with workers > 0)
  c.data.prefetch = 2
  c.data.eval_resize = 256
  c.data.cache_dir = ""
  # Decode large JPEGs at a reduced DCT scale (Image.draft) that still gives every crop its full
  # resolution: about twice as fast on big photos (docs/notes/data.md, "JPEG draft decoding"),
  # but not the pixels the release sees, so off by default.
  c.data.jpeg_draft = False
  c.data.shapes_train_size = 8000
  c.data.shapes_eval_size = 600
  c.data.shapes_image_size = 32
  c.data.shapes_seed = 0  # the embedded data stay the same across training seeds
  c.data.shapes_classes = ("disc", "square", "triangle", "ring", "cross", "star")
  c.data.shapes_area = (0.12, 0.35)  # object area, fraction of the image
  c.data.shapes_polarity = "random"  # random | light (the object is the lighter gray level)
  c.data.shapes_fg_range = (0.0, 1.0)  # object gray level, uniform in this range
  c.data.shapes_bg_range = (0.0, 1.0)  # background gray level

  c.aug = mlc.ConfigDict()
  c.aug.flip_prob = 0.5
  c.aug.color_jitter_prob = 0.8
  c.aug.brightness = 0.4
  c.aug.contrast = 0.4
  c.aug.saturation = 0.2
  c.aug.hue = 0.1
  c.aug.grayscale_prob = 0.2
  c.aug.blur_prob = (1.0, 0.1, 0.5)  # global crop 1, global crop 2, local crops
  c.aug.blur_sigma = (0.1, 2.0)
  c.aug.solarize_prob = (0.0, 0.2, 0.0)
  # Not in the release: x -> 1 - x per crop (docs/notes/main_job.md, "Tried and not kept").
  c.aug.invert_prob = 0.0
  # Where the RandomResizedCrops are resampled: False, on the host (PIL); True, on the device
  # inside the step (the host only draws the boxes), for sources of one image size (shapes).
  c.aug.crops_on_device = False

  c.eval = mlc.ConfigDict()
  c.eval.after_training = False  # run k-NN and attention evaluations at the end of train
  c.eval.batch_size = 256
  c.eval.nb_knn = (10, 20, 100, 200)
  c.eval.knn_temperature = 0.07
  c.eval.attention_threshold = 0.6
  c.eval.attention_images = 8
  c.eval.compare_random_init = False  # also evaluate the same network at random init
  # False: no scores; the closing evaluation draws the teacher's attention maps of the first
  # attention_images images only (eval split, else train split). Set (with every_steps=0) for a
  # folder without labelled train and eval splits, where k-NN cannot run.
  c.eval.knn = True
  # k-NN (and attention, where the data has object masks) of the teacher every N steps during
  # training, into eval/progress.jsonl and TensorBoard; 0: off. Its time is not counted in images/s.
  c.eval.every_steps = 0
  # Linear probe (eval_linear), the release's eval_linear.py defaults.
  c.eval.linear_epochs = 100
  c.eval.linear_lr = 0.001  # for a batch of 256, scaled linearly
  c.eval.linear_batch_size = 1024
  c.eval.linear_n_last_blocks = 4  # ViT-S; ViT-B: 1 with linear_avgpool_patchtokens
  c.eval.linear_avgpool_patchtokens = False
  c.eval.linear_val_freq = 1
  c.eval.linear_crop_scale = (0.08, 1.0)
  return c


def imagenet(arg: str | None = None) -> mlc.ConfigDict:
  """base_config() reading ImageNet-1k from a folder (default: data.path with train/ and val/
  class folders) or from TFDS (arg 'tfds': imagenet2012), bf16 compute, one checkpoint an epoch."""
  c = base_config()
  if arg == "tfds":
    c.data.source = "tfds"
    c.data.name = "imagenet2012"
    c.data.eval_split = "validation"
  elif arg:
    raise ValueError(f"config arg {arg!r}: expected nothing (folder) or 'tfds'")
  c.data.workers = 16
  # The release trains in fp16 autocast with a loss scaler; bf16 keeps fp32's range and needs none.
  c.model.dtype = "bfloat16"
  c.checkpoint_every_steps = 1251  # 1,281,167 images // 1024
  return c


def steps(config: mlc.ConfigDict, num_train_images: int) -> tuple[int, int]:
  """(steps_per_epoch, total_steps) of a training run on num_train_images images."""
  per_epoch = config.steps_per_epoch or num_train_images // config.batch_size
  total = (config.total_steps if config.total_steps > 0 else
           epochs_to_steps(config.epochs, per_epoch))
  return per_epoch, total


def epochs_to_steps(epochs: float, steps_per_epoch: int) -> int:
  """The steps of `epochs` (fractions allowed), to the nearest step: every epoch-valued key
  (epochs, warmup_epochs, freeze_last_layer, ...) becomes steps here."""
  return int(round(epochs * steps_per_epoch))


def validate(config: mlc.ConfigDict, num_devices: int | None = None) -> None:
  """Raises ValueError naming the key and value of anything impossible, before compiling."""

  def fail(key, msg):
    raise ValueError(f"config.{key}={config_value(config, key)!r}: {msg}")

  for key in ("batch_size", "log_every_steps", "checkpoint_every_steps", "grad_accum_steps",
              "out_dim", "model.patch_size", "global_crops_size", "local_crops_size"):
    if config_value(config, key) <= 0:
      fail(key, "must be positive")
  for key in ("epochs", "total_steps", "local_crops_number", "steps_per_epoch", "warmup_epochs",
              "warmup_teacher_temp_epochs", "freeze_last_layer", "model.drop_path_rate",
              "eval.every_steps", "model.img_size"):
    if config_value(config, key) < 0:
      fail(key, "must not be negative")
  if config.epochs == 0 and config.total_steps == 0:
    fail("total_steps", "set epochs or total_steps")
  arch = config.model.arch
  archs = sorted(SIZES) + ["vit_custom"] + sorted(STAGES)
  if arch not in archs:
    close = difflib.get_close_matches(arch, archs, 1)
    fail("model.arch", f"unknown architecture; expected one of {archs}"
         + (f" (did you mean {close[0]!r}?)" if close else ""))
  if arch == "vit_custom" and not all(config.model[k] > 0 for k in ("embed_dim", "depth",
                                                                     "num_heads")):
    fail("model.arch", "vit_custom needs model.embed_dim, model.depth and model.num_heads")
  p = 1 if arch in STAGES else config.model.patch_size  # a ResNet takes any size
  for key in ("global_crops_size", "local_crops_size", "model.img_size"):
    if config_value(config, key) % p:
      fail(key, f"not a multiple of model.patch_size={p}")
  for key in ("global_crops_scale", "local_crops_scale"):
    lo, hi = config[key]
    if not 0 < lo <= hi <= 1:
      fail(key, "need 0 < min <= max <= 1")
  for key in ("momentum_teacher", "momentum_teacher_end", "center_momentum"):
    if not 0 <= config_value(config, key) <= 1:
      fail(key, "an EMA momentum must lie in [0, 1]")
  if config.batch_size % config.grad_accum_steps:
    fail("grad_accum_steps", f"does not divide batch_size={config.batch_size}")
  if config.model.dtype == "float16":
    fail("model.dtype", "float16 training needs loss scaling, which dino_jax does not do (the "
         "release's fp16 runs are known to turn NaN); use bfloat16: float32's range, no scaling")
  if config.model.dtype not in ("float32", "bfloat16"):
    fail("model.dtype", "expected float32 or bfloat16")
  if config.model.attention not in ATTENTION_IMPLS:
    fail("model.attention", f"expected one of {ATTENTION_IMPLS}")
  if config.model.attention == "cudnn" and config.model.dtype == "float32":
    fail("model.attention", "cudnn flash attention needs model.dtype bfloat16")
  if num_devices is not None:
    fsdp = config.mesh.fsdp
    if fsdp <= 0 or num_devices % fsdp:
      fail("mesh.fsdp", f"must divide the {num_devices} devices")
    data = config.mesh.data if config.mesh.data > 0 else num_devices // fsdp
    if data * fsdp != num_devices:
      fail("mesh.data", f"mesh.data x mesh.fsdp must equal the {num_devices} devices")
    shards = data * fsdp * config.grad_accum_steps
    if config.batch_size % shards:
      fail("batch_size", f"not divisible by the {data * fsdp} batch shards"
           + (f" x {config.grad_accum_steps} micro-batches" if config.grad_accum_steps > 1 else ""))
  if config.optimizer not in OPTIMIZERS:
    fail("optimizer", "expected adamw (the ViT recipe), sgd or lars (the release's convnet recipe)")
  if config.data.source not in ("shapes", "folder", "tfds"):
    close = difflib.get_close_matches(config.data.source, ["shapes", "folder", "tfds"], 1)
    fail("data.source", "expected shapes, folder or tfds"
         + (f" (did you mean {close[0]!r}?)" if close else ""))


def config_value(config: mlc.ConfigDict, dotted: str):
  for part in dotted.split("."):
    config = config[part]
  return config


def from_file(path: str, overrides: Sequence[str] = ()) -> mlc.ConfigDict:
  """get_config() of a config file (configs/default.py, ...) with "KEY.SUB=VALUE" overrides (see
  apply_overrides): what the trainer gets from `--config PATH --config.KEY.SUB=VALUE`, for
  notebooks and scripts."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path} not found")
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  apply_overrides(config, overrides, where=path)
  return config


def apply_overrides(config: mlc.ConfigDict, overrides: Sequence[str], where: str = "config"
                    ) -> mlc.ConfigDict:
  """Sets "KEY.SUB=VALUE" items in place (a leading "--config." is allowed; values are Python
  literals, true / false as absl writes them, else strings) and returns config. An unknown key
  raises KeyError naming `where`, the key and the closest existing key; a value of the wrong type
  raises ml_collections' TypeError."""
  for item in overrides:
    key, sep, text = item.removeprefix("--config.").partition("=")
    if not sep:
      raise ValueError(f"override {item!r}: expected KEY=VALUE")
    names = key.split(".")
    node = config
    for i, name in enumerate(names):
      if name not in node:
        close = difflib.get_close_matches(name, list(node.keys()), 1)
        raise KeyError(f"{where}: no key {'.'.join(names[:i + 1])!r}"
                       + (f" (did you mean {close[0]!r}?)" if close else ""))
      if i < len(names) - 1:
        node = node[name]
    node[names[-1]] = parse_value(text)
  return config


def parse_value(text: str) -> Any:
  """A command-line value: a Python literal, true / false as absl writes them, else the string."""
  text = {"true": "True", "false": "False"}.get(text, text)  # as ml_collections' parser
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def to_json(config: mlc.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def from_json(text: str) -> mlc.ConfigDict:
  """A config written by to_json, merged over base_config so old workdirs gain new keys."""
  config = base_config()
  _merge(config, json.loads(text))
  return config


def _merge(config: mlc.ConfigDict, values: dict) -> None:
  for key, value in values.items():
    if isinstance(value, dict) and key in config and isinstance(config[key], mlc.ConfigDict):
      _merge(config[key], value)
    elif key in config and isinstance(config[key], tuple) and isinstance(value, list):
      config[key] = tuple(value)
    else:
      with config.unlocked():
        config[key] = value


def describe(config: mlc.ConfigDict) -> str:
  """Every key of config as `key = value  # what it does`, the comments being base_config()'s
  (the lines above a key and the one beside it): `train --print_config`."""
  comments, pending = {}, []
  for line in inspect.getsource(base_config).splitlines():
    text = line.strip()
    if text.startswith("#"):
      pending.append(text.lstrip("# "))
      continue
    m = re.match(r"c\.([\w.]+) = .*?(?:  # (.*))?$", text)
    if m:
      comments[m.group(1)] = " ".join(pending + ([m.group(2)] if m.group(2) else []))
    pending = []
  out = []

  def walk(node, prefix):
    for key in sorted(node.keys()):
      value = node[key]
      if isinstance(value, mlc.ConfigDict):
        walk(value, f"{prefix}{key}.")
      else:
        comment = comments.get(prefix + key)
        out.append(f"{prefix}{key} = {value!r}" + (f"  # {comment}" if comment else ""))

  walk(config, "")
  return "\n".join(out)
