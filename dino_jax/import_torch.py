"""Imports PyTorch DINO weights into a new dino_jax workdir.

  python -m dino_jax.import_torch --weights FILE --arch vit_small --patch_size 16 --output DIR \\
      [--config configs/vit_small_imagenet.py] [--nowith_optimizer]

--weights: a backbone state_dict (release or timm names; the release's "pretrain" files), a
MultiCropWrapper state_dict ('backbone.*' / 'head.*'), the release's full training checkpoint
('student', 'teacher', 'optimizer', 'dino_loss', 'args', ...), a .safetensors file, or a
directory holding a transformers.ViTModel (config.json + model.safetensors or
pytorch_model.bin). Files are read without executing code (torch.load(weights_only=True),
safetensors).

DIR gets config.json and checkpoints/<step>/: eval_knn, eval_linear, visualize_attention and
export_torch read it; `train --workdir DIR` resumes it; `train --config.init_from=DIR` starts a
new run from its student and teacher. The checkpoint is a TrainState with the structure of
make_training(config)'s init holding the imported student, teacher and centre. A backbone-only
file gives both networks the same backbone and a fresh head (init's, the same for both). From a
full checkpoint the optimizer state comes too (Adam moments, per-parameter steps, lr and wd) and
the checkpoint's step is the optimizer's step, so `train` continues that run;
--nowith_optimizer starts at step 0 with a fresh optimizer instead.

The config is --config (or the release's defaults) with the architecture set from the weights:
--arch / --patch_size are checked against them (and inferred when left out), the head's sizes are
the file's, and model.img_size is the position embedding's grid x patch size (a checkpoint
trained at another resolution keeps its position embedding, the crops stay the config's; the
model resizes the embedding at run time).
Without --config, a full checkpoint's `args` fill the training keys (all of them when dino_jax
wrote it: 'dino_jax_config').
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from dino_jax import checkpoint
from dino_jax import config as config_lib
from dino_jax import convert
from dino_jax import state as state_lib
from dino_jax import train as train_lib
from dino_jax.export_torch import RELEASE_ARGS
from dino_jax.models.vit import SIZES


# ----------------------------------------------------------------------------------------------
# Reading files.
# ----------------------------------------------------------------------------------------------
def _unreadable(path: str, e: Exception) -> ValueError:
  first_line = (str(e).splitlines() or [""])[0]
  return ValueError(f"cannot read {path}: {type(e).__name__}: {first_line} (truncated or corrupt, "
                    "or not a PyTorch / safetensors file?)")


def load_file(path: str) -> tuple[Any, dict[str, Any]]:
  """(the stored object, info): a .pth/.pt file's dict, a safetensors file's or an hf directory's
  state_dict. info: what the file says of the architecture (hf config, safetensors metadata)."""
  torch = convert.torch_extra("torch")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist")
  if os.path.isdir(path):
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
      raise FileNotFoundError(f"{path} is a directory without config.json: not a transformers "
                              "model")
    with open(cfg_path) as f:
      cfg = json.load(f)
    for name in ("model.safetensors", "pytorch_model.bin"):
      if os.path.exists(os.path.join(path, name)):
        obj, _ = load_file(os.path.join(path, name))
        break
    else:
      raise FileNotFoundError(f"{path} holds neither model.safetensors nor pytorch_model.bin")
    # The pooler (ViTModel's default add_pooling_layer) has no DINO counterpart.
    obj = {k: v for k, v in obj.items() if not k.startswith(("pooler.", "vit.pooler."))}
    info = {"num_heads": cfg.get("num_attention_heads")}
    if cfg.get("hidden_act", "gelu") != "gelu" or cfg.get("layer_norm_eps", 1e-6) != 1e-6:
      raise ValueError(f"{cfg_path}: hidden_act {cfg.get('hidden_act')!r} and layer_norm_eps "
                       f"{cfg.get('layer_norm_eps')} differ from DINO's ViT (exact GELU, 1e-6)")
    return obj, info
  if path.endswith(".safetensors"):
    safe_open = convert.torch_extra("safetensors").safe_open
    try:
      with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
        obj = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # pylint: disable=broad-except
      raise _unreadable(path, e) from e
    info = {"num_heads": int(meta["num_heads"])} if "num_heads" in meta else {}
    return obj, info
  try:
    with torch.serialization.safe_globals([argparse.Namespace]):  # the release's `args`
      obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise _unreadable(path, e) from e
  if not isinstance(obj, dict):
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a state_dict or checkpoint dict")
  return obj, {}


def _is_full(obj: dict[str, Any]) -> bool:
  return any(isinstance(obj.get(k), dict) for k in ("teacher", "student"))


def _state_dict(obj: dict[str, Any], path: str) -> dict[str, Any]:
  """The state_dict inside a non-full checkpoint ('state_dict' / 'model' wrappers unwrapped)."""
  if all(hasattr(v, "shape") for v in obj.values()):
    return obj
  for key in ("state_dict", "model"):
    if isinstance(obj.get(key), dict):
      return obj[key]
  raise ValueError(f"{path}: top-level keys {sorted(obj)[:10]} are neither a state_dict nor the "
                   "release's checkpoint ('student' / 'teacher')")


# ----------------------------------------------------------------------------------------------
# The config.
# ----------------------------------------------------------------------------------------------
def _args_dict(args: Any) -> dict[str, Any]:
  return dict(vars(args)) if isinstance(args, argparse.Namespace) else dict(args or {})


def _apply_release_args(config: mlc.ConfigDict, args: dict[str, Any]) -> mlc.ConfigDict:
  """The release's main_dino.py arguments that config shares, written over it."""
  if "dino_jax_config" in args:
    return config_lib.from_json(args["dino_jax_config"])
  for key in RELEASE_ARGS + ("drop_path_rate", "norm_last_layer", "use_bn_in_head"):
    if key in args:
      where = config.model if key in config.model else config
      old = where[key]
      value = args[key]
      where[key] = tuple(value) if isinstance(old, tuple) else type(old)(value)
  if "batch_size_per_gpu" in args and "world_size" in args:
    config.batch_size = int(args["batch_size_per_gpu"]) * int(args["world_size"])
  return config


def _backbone_config(config: mlc.ConfigDict, backbone: dict[str, np.ndarray], arch: str | None,
                     patch_size: int | None, num_heads: int | None, weights: str) -> None:
  """Sets model.arch / patch_size / sizes and model.img_size from (and checked against) the
  weights' shapes. Raises naming the tensor and both shapes on a mismatch."""
  d = backbone["cls_token"].shape[-1]
  depth = sum(1 for k in backbone if k.startswith("blocks_"))
  p = backbone["patch_embed"]["kernel"].shape[0]
  n = backbone["pos_embed"].shape[1] - 1
  grid = math.isqrt(n)
  if patch_size is not None and patch_size != p:
    raise ValueError(f"{weights} does not fit patch_size {patch_size}: patch_embed.proj.weight has "
                     f"shape {(d, 3, p, p)} in the file, patch {patch_size} needs "
                     f"{(d, 3, patch_size, patch_size)}")
  if arch is None:
    arch = next((a for a, s in SIZES.items() if (s["embed_dim"], s["depth"]) == (d, depth)),
                "vit_custom")
  m = config.model
  if arch in SIZES:
    s = SIZES[arch]
    if s["embed_dim"] != d:
      raise ValueError(f"{weights} does not fit {arch}: cls_token has shape {(1, 1, d)} in the "
                       f"file, {arch} needs {(1, 1, s['embed_dim'])}")
    if s["depth"] != depth:
      raise ValueError(f"{weights} does not fit {arch}: the file holds {depth} blocks "
                       f"(blocks.0 .. blocks.{depth - 1}), {arch} has {s['depth']}")
    if num_heads and num_heads != s["num_heads"]:
      raise ValueError(f"{weights} says num_heads={num_heads}; {arch} has {s['num_heads']}")
    m.embed_dim = m.depth = m.num_heads = 0  # the table's sizes
  elif arch == "vit_custom":
    heads = num_heads or m.num_heads
    if not heads:
      raise ValueError(f"{weights}: the number of heads of a vit_custom cannot be read from "
                       "the weights; give it with --config (model.num_heads)")
    m.embed_dim, m.depth, m.num_heads = d, depth, heads
  else:
    raise ValueError(f"unknown --arch {arch!r}; expected one of {sorted(SIZES)} or vit_custom")
  m.arch, m.patch_size = arch, p
  m.img_size = 0 if grid * p == config.global_crops_size else grid * p
  if m.img_size:
    logging.info("position embedding of a %dx%d grid (model.img_size %d; global crops of %d px)",
                 grid, grid, grid * p, config.global_crops_size)


def _head_config(config: mlc.ConfigDict, head: dict[str, Any]) -> None:
  """Head sizes from its params: out_dim, hidden / bottleneck dims, layers, BN."""
  linears = sorted((int(k[4:]) for k in head if k.startswith("mlp_") and "kernel" in head[k]))
  m = config.model
  config.out_dim = head["last_layer"]["kernel_v"].shape[1]
  m.head_bottleneck_dim = head["last_layer"]["kernel_v"].shape[0]
  m.head_nlayers = len(linears)
  if len(linears) > 1:
    m.head_hidden_dim = head[f"mlp_{linears[0]}"]["kernel"].shape[1]
  m.use_bn_in_head = any("scale" in v for k, v in head.items() if k.startswith("mlp_"))


# ----------------------------------------------------------------------------------------------
# Import.
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _fresh_state(config_json: str) -> tuple[Any, Any]:
  """(abstract TrainState, fresh optimizer state) of make_training(config, 1, 1)'s init. The
  optimizer's init depends on the params' shapes only (zero moments, zero counts)."""
  config = config_lib.from_json(config_json)
  *_, tx, _, init = train_lib.make_training(config, 1, 1)
  abstract = jax.eval_shape(init, jax.random.PRNGKey(config.seed))
  zeros = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract.params)
  return abstract, jax.tree.map(np.asarray, jax.jit(tx.init)(zeros))


@functools.lru_cache(maxsize=4)
def _fresh_head(config_json: str) -> tuple[Any, Any]:
  """(params, batch_stats) of a freshly initialised head of the config's student."""
  config = config_lib.from_json(config_json)
  student = train_lib.build_models(config)[0]
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1)
  v = jax.jit(student.head.init)(rng, jnp.zeros((1, student.backbone.embed_dim)))
  return jax.tree.map(np.asarray, (v["params"], v.get("batch_stats", {})))


def _convert(sd: dict[str, Any], target: Any, what: str) -> tuple[Any, Any]:
  """torch_to_flax against the model's shapes: (params, batch_stats) of a backbone or wrapper."""
  try:
    return convert.torch_to_flax(sd, target=target, with_batch_stats=True)
  except ValueError as e:
    raise ValueError(f"{what} does not fit the model: {e}") from e


def load_state(weights: str, *, arch: str | None = None, patch_size: int | None = None,
               config: mlc.ConfigDict | None = None, with_optimizer: bool = True
               ) -> tuple[mlc.ConfigDict, state_lib.TrainState]:
  """(config, TrainState of host arrays) from `weights`: what import_weights writes (see the module
  docstring). Raises ValueError naming the tensor and both shapes when the weights do not fit."""
  obj, info = load_file(weights)
  full = _is_full(obj)
  args = _args_dict(obj.get("args")) if full else {}
  if config is None:
    config = _apply_release_args(config_lib.base_config(), args)
  else:
    config = mlc.ConfigDict(config.to_dict())  # a copy (unlocked)
  for key, given in (("arch", arch), ("patch_size", patch_size)):
    if given is not None and key in args and args[key] != given:
      raise ValueError(f"--{key} {given} but {weights} was trained with {key} {args[key]!r}")
  if arch is None and args.get("arch") in SIZES:
    arch = args["arch"]

  # First pass, shapes from the file itself: the architecture.
  if full:
    nets = {k: obj[k] for k in ("student", "teacher") if isinstance(obj.get(k), dict)}
    first = {k: convert.torch_to_flax(v, with_batch_stats=True) for k, v in nets.items()}
  else:
    nets = {"teacher": _state_dict(obj, weights)}
    first = {"teacher": convert.torch_to_flax(nets["teacher"], with_batch_stats=True)}
  some = next(iter(first.values()))[0]
  backbone = some.get("backbone", some)
  if "cls_token" not in backbone:
    raise ValueError(f"{weights} holds no ViT backbone (cls_token, pos_embed, blocks.*)")
  _backbone_config(config, backbone, arch, patch_size, info.get("num_heads"), weights)
  if "head" in some:
    _head_config(config, some["head"])
    if "norm_last_layer" not in args:  # g frozen at 1 <=> norm_last_layer (the release's default)
      config.model.norm_last_layer = bool(np.all(some["head"]["last_layer"]["kernel_g"] == 1))
  config_lib.validate(config)

  # The state: init's structure (make_training(config, 1, 1)) filled with the imported networks;
  # a second pass checks every tensor against the model's shapes.
  abstract, opt_state0 = _fresh_state(config_lib.to_json(config))
  nets_flax = {}
  for name, sd in nets.items():
    wrapper = "head" in first[name][0]
    target = abstract.params if wrapper else abstract.params["backbone"]
    params, stats = _convert(sd, target, f"{weights} ({name})" if full else weights)
    if not wrapper:  # a fresh head, the same for both networks
      head, head_stats = _fresh_head(config_lib.to_json(config))
      params, stats = {"backbone": params, "head": head}, {"head": head_stats}
    nets_flax[name] = (params, stats if stats.get("head") else {})
  student = nets_flax.get("student", nets_flax.get("teacher"))
  teacher = nets_flax.get("teacher", student)
  cast = lambda new, old: jax.tree.map(lambda a, b: np.asarray(a, b.dtype), new, old)
  params = cast(student[0], abstract.params)
  state = state_lib.TrainState(
      step=np.zeros((), abstract.step.dtype), params=params, opt_state=opt_state0,
      teacher_params=cast(teacher[0], abstract.teacher_params),
      center=np.zeros(abstract.center.shape, abstract.center.dtype),
      batch_stats=cast(student[1], abstract.batch_stats),
      teacher_batch_stats=cast(teacher[1], abstract.teacher_batch_stats))
  state = fresh = jax.tree.map(np.asarray, state)
  step = 0
  if full and isinstance(obj.get("dino_loss"), dict) and "center" in obj["dino_loss"]:
    center = convert.to_numpy(obj["dino_loss"]["center"])
    if center.shape != fresh.center.shape:
      raise ValueError(f"{weights}: dino_loss.center has shape {center.shape}, the head's out_dim "
                       f"needs {fresh.center.shape}")
    state = state.replace(center=center.astype(fresh.center.dtype))
  if full and with_optimizer and isinstance(obj.get("optimizer"), dict) and "student" in nets:
    try:
      opt_state, step = convert.optimizer_from_torch(
          obj["optimizer"], fresh.opt_state, state.params,
          norm_last_layer=config.model.norm_last_layer)
    except (KeyError, TypeError) as e:
      raise ValueError(f"{weights}: 'optimizer' is not a torch AdamW state_dict ({e})") from e
    state = state.replace(opt_state=cast(opt_state, fresh.opt_state),
                          step=np.asarray(step, fresh.step.dtype))

  if jax.tree.structure(state) != jax.tree.structure(abstract) or jax.tree.leaves(jax.tree.map(
      lambda a, b: None if (a.shape, a.dtype) == (b.shape, b.dtype) else 1, state, abstract)):
    raise AssertionError("the imported TrainState does not match make_training's (a dino_jax bug)")
  return config, jax.tree.map(np.array, state)  # copies: nothing shared with the caches


def load_backbone(weights: str, which: str = "teacher", *, arch: str | None = None,
                  patch_size: int | None = None) -> tuple[mlc.ConfigDict, Any, Any]:
  """(config, backbone module, backbone params) of `weights`, in memory (no workdir): what
  features.load_backbone gives for a workdir, for any file import_weights reads. `which` picks a
  full checkpoint's network (a backbone file has one, used for both). The model is `arch` (checked
  against the file, inferred when None) with the file's patch size and position-embedding grid;
  every tensor is checked against it, as load_state does."""
  if which not in ("teacher", "student"):
    raise ValueError(f"which={which!r}: expected 'teacher' or 'student'")
  config, state = load_state(weights, arch=arch, patch_size=patch_size, with_optimizer=False)
  student, teacher = train_lib.build_models(config)
  net, params = (teacher, state.teacher_params) if which == "teacher" else (student, state.params)
  return config, net.backbone, jax.tree.map(jnp.asarray, params["backbone"])


def import_weights(weights: str, output: str, *, arch: str | None = None,
                   patch_size: int | None = None, config: mlc.ConfigDict | None = None,
                   with_optimizer: bool = True) -> state_lib.TrainState:
  """Writes the workdir `output` (config.json, checkpoints/<step>) from `weights`; returns the
  TrainState it saved."""
  ckpt_dir = os.path.join(output, "checkpoints")
  if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
    raise FileExistsError(f"{output} already holds checkpoints; import into a new directory")
  config, state = load_state(weights, arch=arch, patch_size=patch_size, config=config,
                             with_optimizer=with_optimizer)
  checkpoint.save_config(output, config)
  mngr = checkpoint.manager(output)
  checkpoint.save(mngr, int(state.step), jax.tree.map(jnp.asarray, state))
  mngr.wait_until_finished()
  mngr.close()
  logging.info("imported %s into %s (%s/%d, step %d)", weights, output, config.model.arch,
               config.model.patch_size, int(state.step))
  return state


def _define_flags() -> None:
  flags.DEFINE_string("weights", None, "A .pth / .safetensors file or a transformers directory.")
  flags.DEFINE_string("output", None, "The workdir to write (must hold no checkpoints yet).")
  flags.DEFINE_string("arch", None, "vit_tiny | vit_small | vit_base | vit_large | vit_custom; "
                      "checked against the weights (inferred when left out).")
  flags.DEFINE_integer("patch_size", None, "Checked against the weights (inferred when left out).")
  flags.DEFINE_bool("with_optimizer", True, "From a full checkpoint, also import the optimizer "
                    "state and step (to continue that run).")
  config_flags.DEFINE_config_file("config", None, "Optional config file to start from (e.g. the "
                                  "one you will train with); the model keys come from the weights.")
  flags.mark_flags_as_required(["weights", "output"])


def main(argv) -> None:
  del argv
  train_lib.quiet_library_logs()  # orbax logs every step it restores or saves
  f = flags.FLAGS
  try:
    state = import_weights(f.weights, f.output, arch=f.arch, patch_size=f.patch_size,
                           config=f.config, with_optimizer=f.with_optimizer)
  except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:  # one line
    sys.exit(f"import_torch: {e}")
  print(json.dumps({"output": f.output, "step": int(state.step)}))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
