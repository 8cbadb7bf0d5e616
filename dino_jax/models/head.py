"""DINO projection head and the multi-crop wrapper (backbone on each resolution, head once).

Shapes: B batch, D backbone width, K = out_dim head outputs.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dino_jax.models.batchnorm import BatchNorm
from dino_jax.models.vit import gelu, torch_default_kernel_init, trunc_normal

Dtype = Any


class WeightNormDense(nn.Module):
  """Linear map without bias, W = g * V / ||V|| per output unit (torch's weight_norm, dim=0).

  `kernel_v` (in, K) and `kernel_g` (1, K) map 1:1 to the release's last_layer.weight_v (K, in)
  and weight_g (K, 1). Like the release, V keeps PyTorch's default Linear init (the release builds
  this layer after applying its trunc-normal init to the MLP) and g starts at 1. The matmul runs
  in `dtype`; the column scale in `param_dtype`, so with float32 params the logits are float32
  in bf16 compute too.
  """
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    v = self.param("kernel_v", torch_default_kernel_init, (x.shape[-1], self.features),
                   self.param_dtype)
    g = self.param("kernel_g", nn.initializers.ones, (1, self.features), self.param_dtype)
    # x W = (x V) * g / ||V||: the same map with the column scale applied to the (B, K) output.
    # Computed inside the matmul's operand, as W, XLA:CPU fuses the norm into the matmul and runs
    # it many times slower than a plain matmul at a few rows. The squared norms as a ones-row
    # matmul: XLA:CPU's reduction over the leading axis is slower; HIGHEST keeps it float32 on TPU
    # and GPU (docs/notes/models.md, "The weight-normalised last layer").
    sq_norm = jnp.dot(jnp.ones((1, v.shape[0]), v.dtype), jnp.square(v),
                      precision=jax.lax.Precision.HIGHEST)  # (1, K)
    return jnp.dot(x.astype(self.dtype), v.astype(self.dtype)) * (g * jax.lax.rsqrt(sq_norm))


class DINOHead(nn.Module):
  """MLP (nlayers linears, GELU, optional BN) -> L2 normalisation -> weight-normalised linear.

  Submodule names mirror the release's nn.Sequential indices (mlp_0, mlp_1 (BN), mlp_2, ...) and
  `last_layer`. With norm_last_layer the optimizer keeps g frozen at 1 (dino_jax.optim).
  BatchNorm (use_bn) normalises with the statistics of the whole global batch: a plain mean over a
  sharded batch inside jit, which is what the release's SyncBatchNorm computes.
  """
  out_dim: int
  use_bn: bool = False
  norm_last_layer: bool = True
  nlayers: int = 3
  hidden_dim: int = 2048
  bottleneck_dim: int = 256
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """x: (B, D) -> logits (B, K)."""
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype,
                              kernel_init=trunc_normal(), bias_init=nn.initializers.zeros)
    dims = [self.hidden_dim] * (max(self.nlayers, 1) - 1) + [self.bottleneck_dim]
    idx = 0
    for i, dim in enumerate(dims):
      x = dense(dim, name=f"mlp_{idx}")(x)
      idx += 1
      if i == len(dims) - 1:
        break
      if self.use_bn:
        x = BatchNorm(dtype=self.dtype, param_dtype=self.param_dtype, name=f"mlp_{idx}")(
            x, use_running_average=not train)
        idx += 1
      x = gelu(x)
      idx += 1
    x = x.astype(jnp.float32)
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)  # F.normalize
    return WeightNormDense(self.out_dim, self.dtype, self.param_dtype, name="last_layer")(x)


class MultiCropWrapper(nn.Module):
  """Runs the backbone once per crop resolution and the head once on all features.

  Params are {'backbone': ..., 'head': ...}, the release's prefixes.
  """
  backbone: nn.Module
  head: nn.Module

  def __call__(self, crops: Sequence[jax.Array], train: bool = False) -> jax.Array:
    """crops: groups of same-resolution crops, each (B, n_i, H_i, W_i, 3), image-major.

    Returns logits (B, sum n_i, K), crops in the order given. Keeping the batch axis first (rather
    than the release's crop-major concatenation) keeps each device's rows on that device under
    sharding; callers move crops to the front with a transpose, which costs no communication.
    """
    b = crops[0].shape[0]
    feats = jnp.concatenate([
        self.backbone(c.reshape((-1,) + c.shape[2:]), deterministic=not train).reshape(
            b, c.shape[1], -1) for c in crops
    ], axis=1)  # (B, n, D)
    n = feats.shape[1]
    return self.head(feats.reshape(b * n, -1), train=train).reshape(b, n, -1)
