"""Training state: the student, its optimizer state, the EMA teacher and the centre.

Shapes: K head outputs. Params are {'backbone': ..., 'head': ...} (dino_jax.models.MultiCropWrapper).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


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

  crop_shapes: one (n_i, H_i, W_i, 3) per crop resolution; a single image of each is traced.
  Jit this with out_shardings to build the state directly sharded.
  """
  crops = [jnp.zeros((1,) + tuple(s), jnp.float32) for s in crop_shapes]
  variables = student.init({"params": rng, "drop_path": rng}, crops)
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


def update_teacher(teacher_params: Any, student_params: Any, momentum: jax.Array) -> Any:
  """theta_t <- m theta_t + (1 - m) theta_s, on every parameter of backbone and head."""
  return optax.incremental_update(new_tensors=student_params, old_tensors=teacher_params,
                                  step_size=1.0 - momentum)
