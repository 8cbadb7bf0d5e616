"""ResNet-50 backbone as torchvision's resnet50 (v1.5), the release's convnet (--arch resnet50).

Shapes: B batch, H x W image, C channels. Inputs are NHWC float images (already normalised);
`apply` returns the global average pool of the last stage (B, 2048): torchvision's forward with
fc = Identity, as the release's MultiCropWrapper sets it (the ViT's [CLS] feature's place).

As torchvision: the stride of a downsampling bottleneck sits on its 3x3 conv (v1.5); convs have no
bias and kaiming-normal init (fan_out, ReLU gain); BatchNorm eps 1e-5, momentum 0.1 (torch's
convention, flax's 0.9), scale 1, bias 0. torchvision's zero_init_residual defaults to False and
the release builds resnet50() with the default, so the last BN of each block starts at scale 1
too. Module names follow torchvision's with '.' -> '_' (layer1_0/conv1, layer1_0/downsample_0, ...)
so convert/resnet_keys.py maps them one to one.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from dino_jax.models.batchnorm import BatchNorm

Dtype = Any

# Bottleneck blocks per stage.
STAGES = {"resnet50": (3, 4, 6, 3)}
EXPANSION = 4  # a bottleneck's output channels / its width
# torchvision's init of every conv: kaiming_normal_(mode='fan_out', nonlinearity='relu').
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class Bottleneck(nn.Module):
  """1x1 (width) -> 3x3 (width, stride) -> 1x1 (4 width), BN after each, ReLU; the shortcut is a
  strided 1x1 conv + BN (downsample_0, downsample_1) where the shape changes."""
  width: int
  stride: int = 1
  downsample: bool = False
  dtype: Dtype = jnp.float32
  stats_in_params: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """x: (B, H, W, C) -> (B, H / stride, W / stride, 4 width)."""
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype,
                             kernel_init=conv_kernel_init)
    bn = functools.partial(BatchNorm, dtype=self.dtype, stats_in_params=self.stats_in_params)
    s = (self.stride, self.stride)
    out = nn.relu(bn(name="bn1")(conv(self.width, (1, 1), name="conv1")(x), not train))
    out = conv(self.width, (3, 3), s, padding=((1, 1), (1, 1)), name="conv2")(out)
    out = nn.relu(bn(name="bn2")(out, not train))
    out = bn(name="bn3")(conv(self.width * EXPANSION, (1, 1), name="conv3")(out), not train)
    if self.downsample:
      x = conv(self.width * EXPANSION, (1, 1), s, name="downsample_0")(x)
      x = bn(name="downsample_1")(x, not train)
    return nn.relu(out + x)


class ResNet(nn.Module):
  """torchvision's ResNet with bottleneck blocks, without its fc.

  Attributes:
    arch: a key of STAGES.
    dtype: compute dtype of the convs (BatchNorm statistics and the pool are float32).
    stats_in_params: BatchNorm running statistics read from 'params' (evaluation of a frozen
      network whose params merge_stats built); otherwise from 'batch_stats'.
  """
  arch: str = "resnet50"
  dtype: Dtype = jnp.float32
  stats_in_params: bool = False

  @property
  def embed_dim(self) -> int:
    """Width of the pooled feature (2048 for resnet50)."""
    return 64 * 2 ** (len(STAGES[self.arch]) - 1) * EXPANSION

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    """x: (B, H, W, 3) normalised images -> pooled features (B, embed_dim), float32.

    deterministic: BatchNorm with its running statistics (torch's eval mode); False: with the
    batch's, updating the running ones (train mode; needs mutable=['batch_stats']).
    """
    train = not deterministic
    x = nn.Conv(64, (7, 7), (2, 2), padding=((3, 3), (3, 3)), use_bias=False, dtype=self.dtype,
                kernel_init=conv_kernel_init, name="conv1")(x.astype(self.dtype))
    x = BatchNorm(dtype=self.dtype, stats_in_params=self.stats_in_params, name="bn1")(x, not train)
    x = nn.max_pool(nn.relu(x), (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    in_ch = 64
    for i, blocks in enumerate(STAGES[self.arch]):
      width = 64 * 2 ** i
      for j in range(blocks):
        stride = 2 if i > 0 and j == 0 else 1
        down = j == 0 and (stride != 1 or in_ch != width * EXPANSION)
        x = Bottleneck(width, stride, downsample=down, dtype=self.dtype,
                       stats_in_params=self.stats_in_params, name=f"layer{i + 1}_{j}")(x, train)
        in_ch = width * EXPANSION
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def merge_stats(params: Mapping[str, Any], batch_stats: Mapping[str, Any]) -> dict[str, Any]:
  """A ResNet's params with its BatchNorm running statistics beside scale and bias, each BN's
  {'scale', 'bias', 'mean', 'var'}: the params of its stats_in_params clone."""
  out = dict(params)
  for k, v in batch_stats.items():
    out[k] = merge_stats(params.get(k, {}), v) if isinstance(v, Mapping) else v
  return out


def build_resnet(arch: str, **overrides) -> ResNet:
  """A ResNet of a STAGES arch; overrides: dtype, stats_in_params."""
  if arch not in STAGES:
    raise ValueError(f"unknown ResNet {arch!r}; expected one of {sorted(STAGES)}")
  return ResNet(arch, **overrides)
