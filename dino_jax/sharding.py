"""Device mesh and shardings: batches over ('data', 'fsdp'), params replicated or fsdp-sharded.

One Mesh spans every device of every process. With mesh.fsdp > 1 each parameter (and its optimizer
state and teacher copy) is sharded over the 'fsdp' axis on its largest dimension divisible by it,
big_vision's simple rule; XLA inserts the all-gathers and reduce-scatters.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
  """Mesh of shape (data, fsdp) over all devices (data = -1: whatever fsdp leaves)."""
  n = len(jax.devices() if devices is None else devices)
  if data <= 0:
    data = n // fsdp
  if data * fsdp != n:
    raise ValueError(f"mesh data={data} x fsdp={fsdp} does not match the {n} devices")
  if devices is None:  # topology-aware order on TPU / multi-host
    grid = mesh_utils.create_device_mesh((data, fsdp))
  else:
    grid = np.asarray(devices).reshape(data, fsdp)
  return Mesh(grid, BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], fsdp: int, min_size: int = 2**12) -> P:
  """Shards the largest dimension divisible by fsdp; small or indivisible arrays replicate."""
  if fsdp == 1 or np.prod(shape, dtype=np.int64) < min_size:
    return P()
  for axis in np.argsort(shape)[::-1]:
    if shape[axis] % fsdp == 0:
      spec = [None] * len(shape)
      spec[axis] = "fsdp"
      return P(*spec)
  return P()


def state_shardings(mesh: Mesh, abstract_tree: Any) -> Any:
  """NamedSharding per leaf of an (abstract) pytree, by fsdp_spec."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), fsdp)),
                      abstract_tree)
