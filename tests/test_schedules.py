"""Schedules against float64 NumPy of the release's cosine_scheduler and teacher-temperature
table."""
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dino_jax import schedules


def cosine_scheduler(base_value, final_value, total, warmup_iters=0, start_warmup_value=0.0):
  """The release's utils.cosine_scheduler, per iteration (epochs x niter_per_ep = total)."""
  warmup_schedule = np.array([])
  if warmup_iters > 0:
    warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)
  iters = np.arange(total - warmup_iters)
  schedule = final_value + 0.5 * (base_value - final_value) * (
      1 + np.cos(np.pi * iters / len(iters)))
  schedule = np.concatenate((warmup_schedule, schedule))
  assert len(schedule) == total
  return schedule


def _values(fn, total):
  return np.asarray(fn(jnp.arange(total)), np.float64)


@pytest.mark.parametrize("base,final,total,warmup,start", [
    (5e-4 * 1024 / 256, 1e-6, 125100, 12510, 0.0),  # ViT-S/16, 100 epochs of 1251 steps
    (0.04, 0.4, 125100, 0, 0.0),  # weight decay: increasing
    (0.996, 1.0, 125100, 0, 0.0),  # teacher momentum
    (1e-3, 1e-6, 100, 1, 0.0),
    (1e-3, 1e-6, 100, 0, 0.0),
    (0.3, 0.1, 7, 3, 0.05),
    (0.3, 0.1, 5, 5, 0.0),  # warm-up over every step
    (2.0, 2.0, 4, 2, 0.0),
])
def test_warmup_cosine_equals_the_release_at_every_step(base, final, total, warmup, start):
  want = cosine_scheduler(base, final, total, warmup, start)
  got = _values(schedules.warmup_cosine(base, final, total, warmup, start), total)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
  # Scalar calls (as optax evaluates a schedule) agree; past the end the last value holds.
  for step in {0, warmup, total - 1}:
    np.testing.assert_allclose(float(schedules.warmup_cosine(base, final, total, warmup, start)(
        step)), want[min(step, total - 1)], rtol=1e-6)
  np.testing.assert_allclose(
      float(schedules.warmup_cosine(base, final, total, warmup, start)(total + 10)), want[-1],
      rtol=1e-6)


def test_warmup_cosine_rejects_impossible_lengths():
  with pytest.raises(ValueError):
    schedules.warmup_cosine(1.0, 0.0, 10, 11)
  with pytest.raises(ValueError):
    schedules.warmup_cosine(1.0, 0.0, 0)


@pytest.mark.parametrize("warmup_temp,temp,warmup_epochs", [(0.04, 0.07, 30), (0.04, 0.04, 0),
                                                            (0.02, 0.05, 1), (0.04, 0.07, 3)])
def test_teacher_temp_by_epoch(warmup_temp, temp, warmup_epochs):
  epochs, per_epoch = 40, 3
  table = np.concatenate((np.linspace(warmup_temp, temp, warmup_epochs),
                          np.ones(epochs - warmup_epochs) * temp))  # the release's DINOLoss
  want = np.repeat(table, per_epoch)  # constant within an epoch
  got = _values(schedules.teacher_temp_schedule(warmup_temp, temp, warmup_epochs, per_epoch),
                epochs * per_epoch)
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_dino_schedules_scale_lr_linearly_with_the_global_batch():
  c = ml_collections.ConfigDict(dict(
      lr=5e-4, batch_size=1024, min_lr=1e-6, warmup_epochs=2, weight_decay=0.04,
      weight_decay_end=0.4, momentum_teacher=0.996, momentum_teacher_end=1.0,
      warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=3))
  per_epoch, epochs = 7, 10
  total = per_epoch * epochs
  fns = schedules.dino_schedules(c, per_epoch, total)
  want = {
      "lr": cosine_scheduler(5e-4 * 1024 / 256, 1e-6, total, 2 * per_epoch),
      "wd": cosine_scheduler(0.04, 0.4, total),
      "momentum": cosine_scheduler(0.996, 1.0, total),
      "teacher_temp": np.repeat(np.concatenate((np.linspace(0.04, 0.07, 3), np.full(7, 0.07))),
                                per_epoch),
  }
  assert set(fns) == set(want)
  for name, values in want.items():
    np.testing.assert_allclose(_values(fns[name], total), values, rtol=1e-6, err_msg=name)
  assert abs(float(fns["lr"](2 * per_epoch - 1)) - 2e-3) < 1e-9  # peak lr 5e-4 x 1024 / 256
  c.batch_size = 64
  np.testing.assert_allclose(_values(schedules.dino_schedules(c, per_epoch, total)["lr"], total),
                             cosine_scheduler(5e-4 * 64 / 256, 1e-6, total, 2 * per_epoch),
                             rtol=1e-6)
  c.momentum_teacher, c.momentum_teacher_end = 0.99, 0.998  # a short run's teacher keeps moving
  np.testing.assert_allclose(
      _values(schedules.dino_schedules(c, per_epoch, total)["momentum"], total),
      cosine_scheduler(0.99, 0.998, total), rtol=1e-6)
