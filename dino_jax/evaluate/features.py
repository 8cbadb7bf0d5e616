"""Frozen-backbone features over the mesh, on any number of processes: batches sharded, params
replicated, padding dropped, every process's rows gathered.

Shapes: B batch, H x W image, D backbone width, n last blocks.
"""
from __future__ import annotations

import functools
import math
import time
from typing import Any, Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from dino_jax import checkpoint
from dino_jax import sharding as sharding_lib
from dino_jax import state as state_lib
from dino_jax.data import pipeline
from dino_jax.data.augment import normalize
from dino_jax.models import ResNet, VisionTransformer, build_models, crop_shapes, init_variables
from dino_jax.models import merge_stats


def l2_normalize(x: jax.Array) -> jax.Array:
  """(..., D) -> unit rows (torch's F.normalize: norms clamped at 1e-12)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def cls_features(backbone: nn.Module, params: Any, images: jax.Array) -> jax.Array:
  """uint8 or [0, 1] images (B, H, W, 3) -> L2-normalised final-LN [CLS] features (B, D) (a
  ResNet's: its global average pool)."""
  return l2_normalize(backbone.apply({"params": params}, normalize(images)))


def linear_features(backbone: nn.Module, params: Any, images: jax.Array, n_last_blocks: int = 4,
                    avgpool_patchtokens: bool = False) -> jax.Array:
  """The linear probe's input: the [CLS] of the last n blocks (each final-LN-normed), concatenated;
  a ResNet's global average pool (B, 2048).

  With avgpool_patchtokens (the release's ViT-B setting, n_last_blocks 1) the mean of the last
  block's patch tokens joins the [CLS] feature, interleaved as the release's
  cat((cls[..., None], mean[..., None]), -1).reshape(B, -1) orders them: (B, n * D) or (B, 2 * D).
  """
  if isinstance(backbone, ResNet):  # the release's eval_linear: the pooled feature (fc removed)
    return backbone.apply({"params": params}, normalize(images))
  if avgpool_patchtokens and n_last_blocks != 1:
    raise ValueError("avgpool_patchtokens needs n_last_blocks=1 (as in the release)")
  tokens = backbone.apply({"params": params}, normalize(images), n_last_blocks,
                          method="get_intermediate_layers")  # n x (B, T, D)
  out = jnp.concatenate([t[:, 0] for t in tokens], axis=-1)
  if avgpool_patchtokens:
    out = jnp.stack([out, jnp.mean(tokens[-1][:, 1:], axis=1)], -1).reshape(out.shape[0], -1)
  return out


def local_batch_size(batch_size: int, mesh: Mesh) -> int:
  """This process's share of a global batch, rounded up to split evenly over its devices."""
  local_devices = mesh.size // jax.process_count()
  return math.ceil(math.ceil(batch_size / jax.process_count()) / local_devices) * local_devices


def host_to_global(value: Any, sharding: jax.sharding.Sharding) -> jax.Array:
  """A host value that every process holds alike -> a global array laid out with `sharding`.

  Each process fills only its own devices from its copy (make_array_from_callback): no transfer
  between processes, and none of the equality check device_put makes of host values on a
  sharding spanning several processes (a collective over the whole array).
  """
  host = np.asarray(value)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Any pytree of arrays -> the same values replicated on every device of mesh.

  Arrays already spread over the mesh's processes (training's state) are resharded on the
  devices; numpy arrays and arrays of this process's devices (checkpoint.restore_host puts them
  on its first device) are laid out from host copies, which every process must hold alike.
  """
  repl = sharding_lib.replicated(mesh)

  def put(x):
    if jax.process_count() == 1 or (isinstance(x, jax.Array) and not x.is_fully_addressable):
      return jax.device_put(x, repl)
    return host_to_global(x, repl)

  return jax.tree.map(put, tree)


def local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of an array split on its leading axis: its local data, as given to
  make_array_from_process_local_data (its devices' blocks in global order), (B_local, ...)."""
  blocks = {s.index[0].start or 0: s for s in x.addressable_shards}
  return np.concatenate([np.asarray(blocks[start].data) for start in sorted(blocks)])


def gather_processes(tree: Any) -> Any:
  """Each process's host arrays (N_local, ...), of one shape on every process -> every process's
  rows in process order (P x N_local, ...), the same on each; one gather for the whole tree."""
  if jax.process_count() == 1:
    return tree
  gathered = multihost_utils.process_allgather(tree, tiled=False)  # (P, N_local, ...)
  return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), gathered)


@functools.lru_cache(maxsize=32)
def _jitted_step(fn, mesh: Mesh):
  """jit of fn plus the rows' valid flags and labels; cached, so repeated extractions with the
  same fn (an epoch's evaluation, a second model) compile once."""
  batch_sh, repl = sharding_lib.batch_sharding(mesh), sharding_lib.replicated(mesh)

  def step(p, batch):
    out = {"fn": fn(p, batch), "valid": batch["valid"]}
    if "label" in batch:
      out["label"] = batch["label"]
    return out

  return jax.jit(step, in_shardings=(repl, batch_sh), out_shardings=batch_sh)


def extract(fn: Callable[[Any, dict[str, jax.Array]], dict[str, Any]], params: Any,
            batches: Iterable[dict[str, np.ndarray]], mesh: Mesh
            ) -> tuple[dict[str, Any], dict[str, float]]:
  """Runs jit(fn)(params, batch) over every batch and returns its outputs for the valid rows.

  Any number of processes: each feeds its own batches (its contiguous share of the data, as
  pipeline.eval_batches cuts it, and as many batches as the others), keeps its rows of the
  outputs, and the rows of all processes are gathered once at the end, in process order; every
  process returns the same outputs, in the order of the data.

  Args:
    fn: (params, batch) -> a dict (nesting allowed) of per-example arrays (B, ...); batch holds
      the sharded arrays of the input batch ('image', 'label', 'valid', ...).
    params: any pytree of arrays, replicated on the mesh (see replicate: numpy or this process's
      arrays must be the same on every process).
    batches: this process's batches, {'image': (B, H, W, 3), 'valid': (B,), ...}; rows with
      valid False (the padded last batches) are dropped, so each example counts once.
    mesh: the batch axis is split over all of its devices.
  Returns:
    (outputs, stats): fn's dict of numpy arrays (N, ...) over all processes, in data order,
    with 'label' added when the batches have labels; stats {'examples', 'seconds',
    'examples_per_sec'}, timed from the end of the first (compiling) batch.
  """
  batch_sh = sharding_lib.batch_sharding(mesh)
  step = _jitted_step(fn, mesh)
  params = replicate(params, mesh)
  host, pending, t0, n_first = [], None, None, 0
  t_start = time.perf_counter()
  for batch in batches:
    out = step(params, pipeline.global_batch(batch, batch_sh))
    if pending is not None:  # this process's rows of the previous batch, while this one runs
      host.append(jax.tree.map(local_rows, pending))
    pending = out
    if t0 is None:
      jax.block_until_ready(out)
      t0, n_first = time.perf_counter(), int(np.sum(local_rows(out["valid"])))
  if pending is None:
    raise ValueError("no batches to extract features from")
  host.append(jax.tree.map(local_rows, pending))
  mine = jax.tree.map(lambda *xs: np.concatenate(xs), *host)
  mine["n_first"] = np.array([n_first])
  everyone = gather_processes(mine)
  t_end = time.perf_counter()
  valid = everyone["valid"].astype(bool)
  outputs = jax.tree.map(lambda x: x[valid], everyone["fn"])
  if "label" in everyone:
    outputs = {**outputs, "label": everyone["label"][valid]}
  n, n_first = int(valid.sum()), int(everyone["n_first"].sum())
  # The first batch compiles: the rate counts the others, unless there is only one.
  timed_n, timed_s = (n - n_first, t_end - t0) if n > n_first else (n, t_end - t_start)
  return outputs, {"examples": n, "seconds": t_end - t_start,
                   "examples_per_sec": timed_n / max(timed_s, 1e-9)}


def has_attention(backbone: nn.Module) -> bool:
  """Whether the backbone has self-attention (a ViT): attention maps, patch tokens."""
  return isinstance(backbone, VisionTransformer)


def require_vit(backbone: nn.Module, what: str) -> None:
  """Raises ValueError naming `what` when the backbone is not a ViT."""
  if not has_attention(backbone):
    raise ValueError(f"{what} needs a ViT's attention or patch tokens; a {backbone.arch} has "
                     "none (its evaluations: k-NN and the linear probe)")


def evaluation_backbone(config: mlc.ConfigDict, which: str = "teacher") -> nn.Module:
  """The config's teacher (or student) backbone as every evaluation runs it: in float32, as the
  release evaluates, whatever precision it trained in; XLA's attention where training used
  cuDNN's, which takes 16-bit inputs only; a ResNet in eval mode with its BatchNorm statistics
  among its params (evaluation_params). Same params otherwise."""
  student, teacher = build_models(config)
  backbone = (teacher if which == "teacher" else student).backbone
  if isinstance(backbone, ResNet):
    return backbone.clone(dtype=jnp.float32, stats_in_params=True)
  attention = "xla" if backbone.attention == "cudnn" else backbone.attention
  return backbone.clone(dtype=jnp.float32, attention=attention)


def evaluation_params(params: Any, batch_stats: Any) -> Any:
  """A network's backbone weights as evaluation_backbone takes them, from its params
  {'backbone', 'head'} and BatchNorm statistics: a ViT's backbone params; a ResNet's with its
  running statistics merged in (models.merge_stats)."""
  stats = (batch_stats or {}).get("backbone")
  return merge_stats(params["backbone"], stats) if stats else params["backbone"]


def load_backbone(workdir: str, which: str = "teacher", step: int | None = None
                  ) -> tuple[mlc.ConfigDict, nn.Module, Any, int]:
  """(config, evaluation_backbone, its params (evaluation_params), step) from a workdir's latest
  (or given) checkpoint: the teacher by default, or the student."""
  config, params, batch_stats, step = checkpoint.restore_network(workdir, which, step)
  return (config, evaluation_backbone(config, which), evaluation_params(params, batch_stats),
          step)


def random_init_backbone(config: mlc.ConfigDict) -> Any:
  """The backbone params a run of this config starts from (the student's init from config.seed,
  which the teacher copies): the baseline that shows what training added."""
  student, _ = build_models(config)

  def backbone_init():
    init_rng, _ = state_lib.seed_rngs(config.seed)
    v = init_variables(student, init_rng, crop_shapes(config))
    return evaluation_params(v["params"], v.get("batch_stats"))

  return jax.jit(backbone_init)()
