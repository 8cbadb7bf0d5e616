"""Training state: the student, its optimizer state, the EMA teacher and the centre.

Shapes: K head outputs. Params are {'backbone': ..., 'head': ...} (dino_jax.models.MultiCropWrapper).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc
import optax

from dino_jax import optim
from dino_jax import schedules as schedules_lib
from dino_jax.models import build_models, crop_shapes, init_variables


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # optimizer steps taken (int32 scalar)
  params: Any  # student {'backbone', 'head'}
  opt_state: optax.OptState
  teacher_params: Any  # same tree as params; EMA of the student, never differentiated
  center: jax.Array  # (1, K) running mean of the teacher's logits
  batch_stats: Any  # student BatchNorm statistics (the head's, with use_bn); {} otherwise
  teacher_batch_stats: Any  # the teacher's own, updated by its forward passes as in the release


def create_train_state(rng: jax.Array, student: nn.Module, tx: optax.GradientTransformation,
                       crop_shapes: Sequence[Sequence[int]], out_dim: int) -> TrainState:
  """Initialises the student; the teacher starts as an exact copy, the centre at zero.

  crop_shapes: one (n_i, H_i, W_i, 3) per crop resolution (models.crop_shapes).
  Jit this with out_shardings to build the state directly sharded.
  """
  variables = init_variables(student, rng, crop_shapes)
  params = variables["params"]
  batch_stats = variables.get("batch_stats", {})
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      teacher_params=jax.tree.map(jnp.copy, params),
      center=jnp.zeros((1, out_dim), jnp.float32),
      batch_stats=batch_stats,
      teacher_batch_stats=jax.tree.map(jnp.copy, batch_stats),
  )


def seed_rngs(seed: int) -> tuple[jax.Array, jax.Array]:
  """(init_rng, step_rng) of a run: the student's init, and the base key of every step."""
  init_rng, step_rng = jax.random.split(jax.random.PRNGKey(seed))
  return init_rng, step_rng


def init_fn(config: mlc.ConfigDict, tx: optax.GradientTransformation | None = None
            ) -> Callable[[jax.Array], TrainState]:
  """init(rng) -> the fresh TrainState of config's student with tx's optimizer state.

  tx None: the optimizer of a one-step run. Its state has the structure, shapes and dtypes of
  any run's (they do not depend on the schedules), which is all that restoring a checkpoint,
  importing weights or reading the initial params needs.
  """
  if tx is None:
    tx = optim.make_optimizer(config, schedules_lib.dino_schedules(config, 1, 1), 1)
  student, _ = build_models(config)
  return functools.partial(create_train_state, student=student, tx=tx,
                           crop_shapes=crop_shapes(config), out_dim=config.out_dim)


def abstract_state(config: mlc.ConfigDict) -> TrainState:
  """Structure, shapes and dtypes (jax.ShapeDtypeStruct leaves) of config's TrainState: what
  its checkpoints hold."""
  return jax.eval_shape(init_fn(config), jax.random.PRNGKey(0))


def update_teacher(teacher_params: Any, student_params: Any, momentum: jax.Array) -> Any:
  """theta_t <- m theta_t + (1 - m) theta_s, on every parameter of backbone and head."""
  return optax.incremental_update(new_tensors=student_params, old_tensors=teacher_params,
                                  step_size=1.0 - momentum)
