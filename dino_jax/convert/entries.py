"""One tensor of a PyTorch state_dict and its place in a flax tree (Entry), and the entries of
torch's common layers: Linear, LayerNorm, BatchNorm, Conv2d without bias."""
from __future__ import annotations

from typing import NamedTuple


class Entry(NamedTuple):
  """One tensor of a state_dict: its torch key, flax path, layout and collection."""
  key: str  # torch key (without prefix)
  path: tuple[str, ...] | None  # flax path (None: a torch-only buffer, num_batches_tracked)
  layout: str  # 'same' | 'T' (2-D transpose) | 'conv' (OIHW <-> HWIO)
  collection: str  # 'params' | 'batch_stats' | 'buffer'


def linear(key: str, path: tuple[str, ...]) -> list[Entry]:
  return [Entry(f"{key}.weight", path + ("kernel",), "T", "params"),
          Entry(f"{key}.bias", path + ("bias",), "same", "params")]


def layernorm(key: str, path: tuple[str, ...]) -> list[Entry]:
  return [Entry(f"{key}.weight", path + ("scale",), "same", "params"),
          Entry(f"{key}.bias", path + ("bias",), "same", "params")]


def batchnorm(key: str, path: tuple[str, ...]) -> list[Entry]:
  """torch's BatchNorm{1,2}d: weight, bias, running_mean, running_var, num_batches_tracked."""
  return layernorm(key, path) + [
      Entry(f"{key}.running_mean", path + ("mean",), "same", "batch_stats"),
      Entry(f"{key}.running_var", path + ("var",), "same", "batch_stats"),
      Entry(f"{key}.num_batches_tracked", None, "same", "buffer")]


def conv(key: str, path: tuple[str, ...]) -> list[Entry]:
  """A Conv2d without bias: weight (O, I, kh, kw) <-> kernel (kh, kw, I, O)."""
  return [Entry(f"{key}.weight", path + ("kernel",), "conv", "params")]
