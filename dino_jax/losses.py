"""DINO objective: cross-entropy between the centred, sharpened teacher and the student.

Shapes: n crops per image (2 global first), B batch, K head outputs. Logits are crop-major: all
images' crop 0, then crop 1, ...; as (n * B, K) arrays or, equivalently, (n, B, K).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _crops(x: jax.Array, n: int) -> jax.Array:
  """(n * B, K) or (n, B, K) -> (n, B, K) in float32."""
  x = x.astype(jnp.float32)
  return x if x.ndim == 3 else x.reshape(n, -1, x.shape[-1])


def teacher_probs(teacher_out: jax.Array, center: jax.Array, teacher_temp: float | jax.Array,
                  n_global: int = 2) -> jax.Array:
  """softmax((t - C) / tau_t), no gradient: (n_global, B, K)."""
  t = _crops(teacher_out, n_global)
  return jax.lax.stop_gradient(jax.nn.softmax((t - center) / teacher_temp, axis=-1))


def dino_loss(student_out: jax.Array, teacher_out: jax.Array, center: jax.Array,
              teacher_temp: float | jax.Array, *, student_temp: float = 0.1,
              n_global: int = 2) -> jax.Array:
  """Mean over pairs (teacher global view i, student view v != i) of the batch-mean cross-entropy.

  Args:
    student_out: (n_crops * B, K) or (n_crops, B, K) student logits, crop-major.
    teacher_out: (n_global * B, K) or (n_global, B, K) teacher logits of the global crops.
    center: (1, K) centre C.
    teacher_temp: tau_t.
  Returns:
    Scalar loss, averaged over the 2 * (n_crops - 1) pairs.
  """
  t = teacher_probs(teacher_out, center, teacher_temp, n_global)  # (G, B, K)
  b = t.shape[1]
  s = student_out.astype(jnp.float32).reshape(-1, b, t.shape[2])  # (n_crops, B, K)
  log_s = jax.nn.log_softmax(s / student_temp, -1)
  n = log_s.shape[0]
  # ce[i, v] = mean_b sum_k -P_t[i] log P_s[v]
  ce = -jnp.einsum("ibk,vbk->iv", t, log_s, precision=jax.lax.Precision.HIGHEST) / b
  pairs = 1.0 - jnp.eye(n_global, n, dtype=ce.dtype)  # drop v == i
  return jnp.sum(ce * pairs) / jnp.sum(pairs)


def update_center(center: jax.Array, teacher_out: jax.Array, momentum: float = 0.9) -> jax.Array:
  """C <- m C + (1 - m) mean(teacher logits) over every row (the whole global batch, both views).

  Inside jit a mean over a sharded array is already the mean over all devices and processes.
  teacher_out: (n_global * B, K) or (n_global, B, K); center: (1, K).
  """
  t = teacher_out.astype(jnp.float32).reshape(-1, teacher_out.shape[-1])
  return center * momentum + jnp.mean(t, axis=0, keepdims=True) * (1 - momentum)


def entropy(probs: jax.Array) -> jax.Array:
  """Entropy in nats over the last axis: (..., K) -> (...).

  The collapse diagnostics: the mean per-sample teacher entropy near ln K is the uniform collapse;
  the entropy of the batch-mean teacher distribution near 0 is the one-hot collapse.
  """
  return -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1)
