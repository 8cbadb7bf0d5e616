"""Per-step schedules of DINO (optax-style callables of the global step).

The release precomputes one value per iteration; these callables give the same values at steps
0 .. total_steps - 1 and hold the last value beyond.
"""
from __future__ import annotations

from typing import Callable

import jax.numpy as jnp

from dino_jax import config as config_lib

Schedule = Callable[[int], "jnp.ndarray"]


def warmup_cosine(base: float, final: float, total_steps: int, warmup_steps: int = 0,
                  warmup_start: float = 0.0) -> Schedule:
  """The release's cosine_scheduler, per iteration.

  Steps 0 .. warmup_steps - 1: evenly spaced from warmup_start to base, both ends included
  (np.linspace). Then with n = total_steps - warmup_steps and i = 0 .. n - 1:
  final + 0.5 (base - final) (1 + cos(pi i / n)).
  """
  if total_steps <= 0 or not 0 <= warmup_steps <= total_steps:
    raise ValueError(f"need 0 <= warmup_steps ({warmup_steps}) <= total_steps ({total_steps}), "
                     "total_steps > 0")
  n = total_steps - warmup_steps

  def schedule(step):
    step = jnp.minimum(jnp.asarray(step), total_steps - 1)
    ramp = warmup_start + (base - warmup_start) * step / max(warmup_steps - 1, 1)
    i = jnp.maximum(step - warmup_steps, 0)
    # final + 0.5 (base - final) (1 + cos(pi i / n)), written as a positive term added to the
    # smaller end (1 + cos(pi i / n) = 2 sin^2 a, 1 - cos(pi i / n) = 2 cos^2 a): the plain form
    # cancels in float32 near the smaller end; this stays within a few ulps
    # (docs/notes/training.md, "Cosine schedules in float32").
    a = jnp.pi * (n - i) / (2 * max(n, 1))
    if base >= final:
      cos = final + (base - final) * jnp.sin(a) ** 2
    else:
      cos = base + (final - base) * jnp.cos(a) ** 2
    return jnp.where(step < warmup_steps, ramp, cos)

  return schedule


def teacher_temp_schedule(warmup_temp: float, temp: float, warmup_epochs: int,
                          steps_per_epoch: int) -> Schedule:
  """Teacher temperature by *epoch*: linspace(warmup_temp, temp, warmup_epochs), then temp."""

  def schedule(step):
    epoch = jnp.asarray(step) // steps_per_epoch
    ramp = warmup_temp + (temp - warmup_temp) * epoch / max(warmup_epochs - 1, 1)
    return jnp.where(epoch < warmup_epochs, ramp, temp)

  return schedule


def dino_schedules(config, steps_per_epoch: int, total_steps: int) -> dict[str, Schedule]:
  """lr, wd, momentum and teacher_temp schedules from a training config.

  lr = config.lr * global batch / 256 (linear scaling), warm-up over warmup_epochs, cosine to
  min_lr; wd cosine weight_decay -> weight_decay_end; teacher momentum cosine momentum_teacher ->
  momentum_teacher_end (1 in the release);
  teacher temperature warmed over warmup_teacher_temp_epochs (whole epochs, as the release).
  warmup_epochs may be fractional (the short CPU demo warms up over part of an epoch).
  """
  warmup = config_lib.epochs_to_steps(config.warmup_epochs, steps_per_epoch)
  return {
      "lr": warmup_cosine(config.lr * config.batch_size / 256.0, config.min_lr, total_steps,
                          min(warmup, total_steps)),
      "wd": warmup_cosine(config.weight_decay, config.weight_decay_end, total_steps),
      "momentum": warmup_cosine(config.momentum_teacher, config.momentum_teacher_end, total_steps),
      "teacher_temp": teacher_temp_schedule(config.warmup_teacher_temp, config.teacher_temp,
                                            config.warmup_teacher_temp_epochs, steps_per_epoch),
  }
