"""PyTorch DINO weights -> (config, TrainState): what `python -m dino_jax.import_torch` writes.

load_state reads any file convert.files reads: a backbone state_dict (release, timm or
transformers names), a MultiCropWrapper state_dict ('backbone.*' / 'head.*'), or the release's
full training checkpoint. The TrainState has the structure of state.init_fn(config)'s init and
holds the imported student, teacher and centre. A backbone-only file gives both networks the same
backbone and a fresh head (init's, the same for both). From a full checkpoint the optimizer state
comes too (Adam moments, per-parameter steps, lr and wd) and the state's step is the optimizer's
step, so `train` continues that run; with_optimizer=False starts at step 0 with a fresh optimizer.

The config is the caller's (or the release's defaults, with a full checkpoint's `args` over them)
with the architecture set from the weights: arch / patch_size are checked against them (and
inferred when None), the head's sizes are the file's, and model.img_size is the position
embedding's grid x patch size (a checkpoint trained at another resolution keeps its position
embedding, the crops stay the config's; the model resizes the embedding at run time).
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from absl import logging

from dino_jax import checkpoint
from dino_jax import config as config_lib
from dino_jax import paths
from dino_jax import state as state_lib
from dino_jax.convert import files, optimizer, resnet_keys
from dino_jax.convert.state_dicts import to_numpy, torch_to_flax
from dino_jax.evaluate import features
from dino_jax.models import build_models
from dino_jax.models.resnet import STAGES
from dino_jax.models.vit import SIZES


# ----------------------------------------------------------------------------------------------
# The config.
# ----------------------------------------------------------------------------------------------
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


def _resnet_config(config: mlc.ConfigDict, backbone: dict[str, Any], arch: str | None,
                   weights: str) -> None:
  """Sets model.arch from (and checked against) a ResNet's blocks per stage."""
  stages = resnet_keys.stages_of(backbone)
  found = resnet_keys.arch_of(stages)
  if found is None:
    raise ValueError(f"{weights}: a ResNet with {stages} bottleneck blocks per stage; dino_jax "
                     f"builds {dict(STAGES)}")
  if arch is not None and arch != found:
    raise ValueError(f"{weights} does not fit {arch}: it holds a {found} ({stages} blocks per "
                     "stage)")
  config.model.arch = found


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
  """(abstract TrainState, fresh optimizer state) of state.init_fn(config)'s init. The
  optimizer's init depends on the params' shapes only (zero moments, zero counts), so jit keeps
  none of the params' initialisation."""
  config = config_lib.from_json(config_json)
  init = state_lib.init_fn(config)
  opt_state = jax.jit(lambda rng: init(rng).opt_state)(jax.random.PRNGKey(config.seed))
  return state_lib.abstract_state(config), jax.tree.map(np.asarray, opt_state)


@functools.lru_cache(maxsize=4)
def _fresh_head(config_json: str) -> tuple[Any, Any]:
  """(params, batch_stats) of a freshly initialised head of the config's student."""
  config = config_lib.from_json(config_json)
  student = build_models(config)[0]
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1)
  v = jax.jit(student.head.init)(rng, jnp.zeros((1, student.backbone.embed_dim)))
  return jax.tree.map(np.asarray, (v["params"], v.get("batch_stats", {})))


def _convert(sd: dict[str, Any], target: Any, what: str) -> tuple[Any, Any]:
  """torch_to_flax against the model's shapes: (params, batch_stats) of a backbone or wrapper."""
  try:
    return torch_to_flax(sd, target=target, with_batch_stats=True)
  except ValueError as e:
    raise ValueError(f"{what} does not fit the model: {e}") from e


def load_state(weights: str, *, arch: str | None = None, patch_size: int | None = None,
               config: mlc.ConfigDict | None = None, with_optimizer: bool = True
               ) -> tuple[mlc.ConfigDict, state_lib.TrainState]:
  """(config, TrainState of host arrays) from `weights`: what import_weights writes (see the module
  docstring). Raises ValueError naming the tensor and both shapes when the weights do not fit."""
  obj, info = files.load_file(weights)
  full = files.is_full_checkpoint(obj)
  args = files.args_dict(obj.get("args")) if full else {}
  if config is None:
    config = files.apply_release_args(config_lib.base_config(), args)
  else:
    config = mlc.ConfigDict(config.to_dict())  # a copy (unlocked)
  for key, given in (("arch", arch), ("patch_size", patch_size)):
    if given is not None and key in args and args[key] != given:
      raise ValueError(f"--{key} {given} but {weights} was trained with {key} {args[key]!r}")
  if arch is None and (args.get("arch") in SIZES or args.get("arch") in STAGES):
    arch = args["arch"]

  # First pass, shapes from the file itself: the architecture.
  if full:
    nets = {k: obj[k] for k in ("student", "teacher") if isinstance(obj.get(k), dict)}
    first = {k: torch_to_flax(v, with_batch_stats=True) for k, v in nets.items()}
  else:
    nets = {"teacher": files.state_dict_in(obj, weights)}
    first = {"teacher": torch_to_flax(nets["teacher"], with_batch_stats=True)}
  some = next(iter(first.values()))[0]
  backbone = some.get("backbone", some)
  if "layer1_0" in backbone:
    _resnet_config(config, backbone, arch, weights)
  elif "cls_token" in backbone:
    _backbone_config(config, backbone, arch, patch_size, info.get("num_heads"), weights)
  else:
    raise ValueError(f"{weights} holds no ViT backbone (cls_token, pos_embed, blocks.*) nor "
                     "torchvision ResNet (conv1.weight, layer1.*)")
  if "head" in some:
    _head_config(config, some["head"])
    if "norm_last_layer" not in args:  # g frozen at 1 <=> norm_last_layer (the release's default)
      config.model.norm_last_layer = bool(np.all(some["head"]["last_layer"]["kernel_g"] == 1))
  config_lib.validate(config)

  # The state: init's structure (state.init_fn(config)) filled with the imported networks; a
  # second pass checks every tensor against the model's shapes.
  abstract, opt_state0 = _fresh_state(config_lib.to_json(config))
  nets_flax = {}
  for name, sd in nets.items():
    wrapper = "head" in first[name][0]
    target = abstract.params if wrapper else abstract.params["backbone"]
    params, stats = _convert(sd, target, f"{weights} ({name})" if full else weights)
    if not wrapper:  # a fresh head, the same for both networks
      head, head_stats = _fresh_head(config_lib.to_json(config))
      params, stats = {"backbone": params, "head": head}, {"backbone": stats, "head": head_stats}
    nets_flax[name] = (params, {k: v for k, v in stats.items() if v})  # only where there is BN
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
    center = to_numpy(obj["dino_loss"]["center"])
    if center.shape != fresh.center.shape:
      raise ValueError(f"{weights}: dino_loss.center has shape {center.shape}, the head's out_dim "
                       f"needs {fresh.center.shape}")
    state = state.replace(center=center.astype(fresh.center.dtype))
  has_optimizer = (full and with_optimizer and isinstance(obj.get("optimizer"), dict)
                   and "student" in nets)
  if has_optimizer and config.optimizer != "adamw":
    logging.info("%s: its %s optimizer state is not imported (AdamW's only): a fresh one",
                 weights, config.optimizer)
  elif has_optimizer:
    try:
      opt_state, step = optimizer.optimizer_from_torch(
          obj["optimizer"], fresh.opt_state, state.params,
          norm_last_layer=config.model.norm_last_layer)
    except (KeyError, TypeError) as e:
      raise ValueError(f"{weights}: 'optimizer' is not a torch AdamW state_dict ({e})") from e
    state = state.replace(opt_state=cast(opt_state, fresh.opt_state),
                          step=np.asarray(step, fresh.step.dtype))

  if jax.tree.structure(state) != jax.tree.structure(abstract) or jax.tree.leaves(jax.tree.map(
      lambda a, b: None if (a.shape, a.dtype) == (b.shape, b.dtype) else 1, state, abstract)):
    raise AssertionError("the imported TrainState does not match init's (a dino_jax bug)")
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
  params, stats = ((state.teacher_params, state.teacher_batch_stats) if which == "teacher" else
                   (state.params, state.batch_stats))
  return (config, features.evaluation_backbone(config, which),
          jax.tree.map(jnp.asarray, features.evaluation_params(params, stats)))


def import_weights(weights: str, output: str, *, arch: str | None = None,
                   patch_size: int | None = None, config: mlc.ConfigDict | None = None,
                   with_optimizer: bool = True) -> state_lib.TrainState:
  """Writes the workdir `output` (config.json, checkpoints/<step>) from `weights`; returns the
  TrainState it saved. Both may be URIs (gs://bucket/...)."""
  paths.check(output)
  ckpt_dir = paths.path(output) / "checkpoints"
  if ckpt_dir.is_dir() and any(ckpt_dir.iterdir()):
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
