"""DINO training: the jitted step and the loop. `python -m dino_jax.train --config ... --workdir DIR`.

Shapes: B global batch, G = 2 global crops, L local crops, K head outputs.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from dino_jax import losses
from dino_jax import state as state_lib
from dino_jax.models import DINOHead, MultiCropWrapper, build_vit

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------
# Models.
# ----------------------------------------------------------------------------------------------
def build_models(config) -> tuple[MultiCropWrapper, MultiCropWrapper]:
  """(student, teacher): same architecture; only the student has drop path."""
  m = config.model
  dtype = jnp.dtype(m.dtype)
  vit_kw = dict(img_size=config.global_crops_size, dtype=dtype, **m.get("vit", {}))

  def wrapper(drop_path_rate):
    backbone = build_vit(m.arch, m.patch_size, drop_path_rate=drop_path_rate, **vit_kw)
    head = DINOHead(config.out_dim, use_bn=m.use_bn_in_head, norm_last_layer=m.norm_last_layer,
                    nlayers=m.head_nlayers, hidden_dim=m.head_hidden_dim,
                    bottleneck_dim=m.head_bottleneck_dim, dtype=dtype)
    return MultiCropWrapper(backbone, head)

  return wrapper(m.drop_path_rate), wrapper(0.0)


def normalize(images: jax.Array) -> jax.Array:
  """uint8 or [0, 1] float (..., 3) -> ImageNet-normalised float32."""
  if images.dtype == jnp.uint8:
    images = images.astype(jnp.float32) / 255.0
  return (images - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


# ----------------------------------------------------------------------------------------------
# The step.
# ----------------------------------------------------------------------------------------------
def _micro_step(params, state: state_lib.TrainState, batch: dict[str, jax.Array], rng: jax.Array,
                *, student: nn.Module, teacher: nn.Module, teacher_temp: jax.Array,
                student_temp: float, augment: Callable | None):
  """Loss and gradient on one (micro-)batch. Returns (loss, grads, aux)."""
  aug_rng, drop_rng = jax.random.split(rng)
  if augment is not None:
    batch = augment(aug_rng, batch)
  crops = [normalize(batch["global"])]  # (B, G, H, W, 3)
  if "local" in batch:
    crops.append(normalize(batch["local"]))  # (B, L, h, w, 3)
  n_global = crops[0].shape[1]

  t_logits, t_vars = teacher.apply(
      {"params": state.teacher_params, "batch_stats": state.teacher_batch_stats}, crops[:1],
      train=True, mutable=["batch_stats"])
  t_logits = jax.lax.stop_gradient(jnp.swapaxes(t_logits, 0, 1))  # (G, B, K), crop-major

  def loss_fn(p):
    s_logits, s_vars = student.apply(
        {"params": p, "batch_stats": state.batch_stats}, crops, train=True,
        rngs={"drop_path": drop_rng}, mutable=["batch_stats"])
    s_logits = jnp.swapaxes(s_logits, 0, 1)  # (G + L, B, K)
    loss = losses.dino_loss(s_logits, t_logits, state.center, teacher_temp,
                            student_temp=student_temp, n_global=n_global)
    return loss, s_vars

  (loss, s_vars), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  probs = losses.teacher_probs(t_logits, state.center, teacher_temp, n_global)
  aux = {
      "teacher_mean": jnp.mean(t_logits.reshape(-1, t_logits.shape[-1]), 0, keepdims=True),
      "teacher_probs_mean": jnp.mean(probs, axis=(0, 1)),
      "entropy": jnp.mean(losses.entropy(probs)),
      "batch_stats": s_vars.get("batch_stats", {}),
      "teacher_batch_stats": t_vars.get("batch_stats", {}),
  }
  return loss, grads, aux


def train_step(state: state_lib.TrainState, batch: dict[str, jax.Array], rng: jax.Array, *,
               student: nn.Module, teacher: nn.Module, tx: optax.GradientTransformation,
               schedules: dict[str, Callable], student_temp: float = 0.1,
               center_momentum: float = 0.9, grad_accum_steps: int = 1,
               augment: Callable | None = None) -> tuple[state_lib.TrainState, dict[str, jax.Array]]:
  """One DINO iteration: student on all crops, teacher on the global ones, loss, AdamW, EMA, centre.

  Args:
    state: the TrainState (donated by the caller's jit).
    batch: {'global': (B, G, H, W, 3), 'local': (B, L, h, w, 3)} crops, uint8 or [0, 1] float;
      normalised here, on device. Sharded along B.
    rng: base key; this step's key is fold_in(rng, state.step), so a resumed run repeats it.
    augment: optional on-device augmentation (rng, batch) -> batch, applied before normalising.
    grad_accum_steps: split B into this many micro-batches (rows j, j + A, ...: each device keeps
      its rows) and accumulate; loss, gradient and centre equal the whole batch's (BatchNorm
      statistics, if any, are per micro-batch).
  Returns:
    (new state, metrics): loss, lr, wd, momentum, teacher_temp, grad_norm, entropy, batch_entropy,
    kl (the collapse diagnostics, see losses.entropy).
  """
  step = state.step
  rng = jax.random.fold_in(rng, step)
  teacher_temp = schedules["teacher_temp"](step)
  micro = functools.partial(_micro_step, student=student, teacher=teacher,
                            teacher_temp=teacher_temp, student_temp=student_temp, augment=augment)
  if grad_accum_steps == 1:
    loss, grads, aux = micro(state.params, state, batch, rng)
  else:
    a = grad_accum_steps
    # (B, ...) -> (A, B / A, ...) taking rows j, j + A, ...: a transpose of the unsharded axis.
    split = lambda x: jnp.swapaxes(x.reshape((x.shape[0] // a, a) + x.shape[1:]), 0, 1)
    micro_batches = jax.tree.map(split, batch)

    def body(carry, xs):
      st, acc = carry
      mb, i = xs
      loss, grads, aux = micro(st.params, st, mb, jax.random.fold_in(rng, i))
      st = st.replace(batch_stats=aux.pop("batch_stats"),
                      teacher_batch_stats=aux.pop("teacher_batch_stats"))
      acc = jax.tree.map(lambda s, x: s + x / a, acc, (loss, grads, aux))
      return (st, acc), None

    zero_aux = {"teacher_mean": jnp.zeros_like(state.center),
                "teacher_probs_mean": jnp.zeros(state.center.shape[-1]),
                "entropy": jnp.zeros(())}
    zeros = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, state.params), zero_aux)
    (st, (loss, grads, aux)), _ = jax.lax.scan(body, (state, zeros),
                                               (micro_batches, jnp.arange(a)))
    aux.update(batch_stats=st.batch_stats, teacher_batch_stats=st.teacher_batch_stats)

  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  momentum = schedules["momentum"](step)
  metrics = {
      "loss": loss,
      "lr": schedules["lr"](step),
      "wd": schedules["wd"](step),
      "momentum": momentum,
      "teacher_temp": teacher_temp,
      "grad_norm": optax.global_norm(grads),
      "param_norm": optax.global_norm(params),
      "entropy": aux["entropy"],
      "batch_entropy": losses.entropy(aux["teacher_probs_mean"]),
      "kl": loss - aux["entropy"],  # KL(teacher || student), mean over the loss's pairs
  }
  new_state = state.replace(
      step=step + 1,
      params=params,
      opt_state=opt_state,
      teacher_params=state_lib.update_teacher(state.teacher_params, params, momentum),
      center=losses.update_center(state.center, aux["teacher_mean"], center_momentum),
      batch_stats=aux["batch_stats"],
      teacher_batch_stats=aux["teacher_batch_stats"],
  )
  return new_state, metrics
