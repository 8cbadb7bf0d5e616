"""glibc's malloc policy for XLA:CPU training: freed memory kept for the next step.

XLA:CPU mallocs each execution's temporaries as one block from its own threads. glibc serves a
block that size from a fresh mmap (a thread's arena cannot hold it) and unmaps it on free, so every
step would page-fault and zero it again. With one arena, no mmap and no trimming, the block stays
in the heap and is reused. Never trimming (threshold -1), not the largest threshold mallopt takes
(2 GiB): temporaries above that would still be given back every step. The price: the process keeps
its high-water mark. Measurements: docs/notes/training.md, "Keeping freed memory".

Process-wide, so only the training command sets it (`python -m dino_jax.train`), first thing,
before jax starts its threads; importing dino_jax leaves malloc alone. DINO_JAX_MALLOC=default
keeps glibc's policy; scripts and notebooks that train call keep_freed_memory() themselves.
"""
from __future__ import annotations

import ctypes
import os
import sys


def keep_freed_memory() -> bool:
  """Sets the policy (one arena, no mmap, no trim); returns whether it was applied (not on other
  platforms or libcs, nor with DINO_JAX_MALLOC=default)."""
  if not sys.platform.startswith("linux") or os.environ.get("DINO_JAX_MALLOC") == "default":
    return False
  try:
    libc = ctypes.CDLL("libc.so.6")
  except OSError:  # not glibc (e.g. musl)
    return False
  m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8
  return all(libc.mallopt(option, value) == 1 for option, value in (
      (m_arena_max, 1), (m_mmap_max, 0), (m_trim_threshold, -1)))
