"""torchvision ResNet state_dict names <-> dino_jax.models.resnet's tree, and their shapes.

Keys (torchvision's order, fc left out): conv1.weight (64, 3, 7, 7), bn1.*, then per bottleneck
layer{i}.{j}.conv1 / conv2 / conv3 .weight, bn1 / bn2 / bn3 .{weight, bias, running_mean,
running_var, num_batches_tracked}, and in the first block of a stage downsample.0.weight (conv)
and downsample.1.* (BN). Flax paths: '.' -> '_' at the block level (layer1_0/conv1/kernel).
"""
from __future__ import annotations

import re
from typing import Iterable

from dino_jax.convert.entries import Entry, batchnorm, conv
from dino_jax.models.resnet import EXPANSION, STAGES


def stages_of(names: Iterable[str]) -> tuple[int, ...]:
  """Blocks per stage, from torch keys (layer1.0.conv1.weight) or flax names (layer1_0)."""
  counts: dict[int, int] = {}
  for name in names:
    if m := re.match(r"layer(\d+)[._](\d+)", name):
      i, j = int(m.group(1)), int(m.group(2))
      counts[i] = max(counts.get(i, 0), j + 1)
  return tuple(counts.get(i, 0) for i in range(1, max(counts, default=0) + 1))


def arch_of(stages: tuple[int, ...]) -> str | None:
  """The STAGES arch with these blocks per stage, or None."""
  return next((a for a, s in STAGES.items() if s == stages), None)


def _blocks(stages: tuple[int, ...]):
  """(torch prefix, flax name, width, in channels, has downsample) of each bottleneck."""
  in_ch = 64
  for i, n in enumerate(stages):
    width = 64 * 2 ** i
    for j in range(n):
      yield f"layer{i + 1}.{j}", f"layer{i + 1}_{j}", width, in_ch, j == 0
      in_ch = width * EXPANSION


def resnet_spec(stages: tuple[int, ...]) -> list[Entry]:
  """The key table of a bottleneck ResNet with these blocks per stage, in torchvision's order."""
  spec = conv("conv1", ("conv1",)) + batchnorm("bn1", ("bn1",))
  for key, name, _, _, down in _blocks(stages):
    for k in (1, 2, 3):
      spec += conv(f"{key}.conv{k}", (name, f"conv{k}")) + batchnorm(f"{key}.bn{k}",
                                                                       (name, f"bn{k}"))
    if down:
      spec += conv(f"{key}.downsample.0", (name, "downsample_0")) + batchnorm(
          f"{key}.downsample.1", (name, "downsample_1"))
  return spec


def resnet_torch_shapes(stages: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
  """torch shape of every tensor of resnet_spec(stages) but the num_batches_tracked buffers."""
  out = {"conv1.weight": (64, 3, 7, 7)}
  bn = lambda key, c: out.update({f"{key}.{n}": (c,) for n in ("weight", "bias", "running_mean",
                                                               "running_var")})
  bn("bn1", 64)
  for key, _, width, in_ch, down in _blocks(stages):
    out[f"{key}.conv1.weight"] = (width, in_ch, 1, 1)
    out[f"{key}.conv2.weight"] = (width, width, 3, 3)
    out[f"{key}.conv3.weight"] = (width * EXPANSION, width, 1, 1)
    for k, c in ((1, width), (2, width), (3, width * EXPANSION)):
      bn(f"{key}.bn{k}", c)
    if down:
      out[f"{key}.downsample.0.weight"] = (width * EXPANSION, in_ch, 1, 1)
      bn(f"{key}.downsample.1", width * EXPANSION)
  return out
