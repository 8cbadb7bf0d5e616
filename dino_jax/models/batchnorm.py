"""BatchNorm as PyTorch's (BatchNorm1d over (N, C), BatchNorm2d over (N, H, W, C)).

Shapes: N batch, C channels; any axes between them (H, W) are normalised over too.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


class BatchNorm(nn.Module):
  """torch.nn.BatchNorm{1,2}d over every axis but the last: flax's nn.BatchNorm puts the *biased*
  batch variance into its running estimate; torch (and so the release's checkpoints) the
  unbiased one.

  Training: normalise with the batch mean and biased variance, running stats <- (1 - momentum)
  running + momentum batch (variance unbiased). Otherwise: the running stats. Names as flax's
  (params scale, bias; batch_stats mean, var). Under jit with the batch sharded over the mesh the
  batch mean is over the global batch: what the release's SyncBatchNorm computes.

  stats_in_params: the running mean / var are read from the 'params' collection (and always
  used): a frozen network for evaluation, whose weights are one tree (resnet.merge_stats).
  """
  momentum: float = 0.1  # torch's convention: the weight of the new batch (flax's 0.9)
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  stats_in_params: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool) -> jax.Array:
    """x: (N, ..., C) -> (N, ..., C)."""
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
    xf = x.astype(jnp.float32)
    if self.stats_in_params:
      mean = self.param("mean", nn.initializers.zeros, (c,), jnp.float32)
      var = self.param("var", nn.initializers.ones, (c,), jnp.float32)
    else:
      ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
      ra_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
      if use_running_average:
        mean, var = ra_mean.value, ra_var.value
      else:
        axes = tuple(range(x.ndim - 1))
        mean = jnp.mean(xf, axes)
        var = jnp.mean(jnp.square(xf - mean), axes)
        if not self.is_initializing():
          n = xf.size // c
          m = self.momentum
          ra_mean.value = (1 - m) * ra_mean.value + m * mean
          ra_var.value = (1 - m) * ra_var.value + m * var * n / max(n - 1, 1)
    y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
    return y.astype(self.dtype)
