"""dino_jax: DINO (self-distillation with no labels) in JAX / Flax."""
import ctypes
import os
import sys

__version__ = "0.1.0"


def _keep_freed_memory() -> bool:
  """Asks glibc's malloc to keep freed memory instead of returning it to the kernel.

  XLA:CPU mallocs each execution's temporaries as one block (532 MB for a step of
  configs/default.py) from its own threads. glibc serves a block that size from a fresh mmap
  (a thread's arena cannot hold it) and unmaps it on free, so every step page-faults and zeroes
  it again: 130k page faults a step, measured, and the step 2-3x slower on this 2-core CPU. With
  one arena, no mmap and no trimming, the block stays in the heap and is reused. Process-wide,
  so it is done once, at import, before jax starts its threads; DINO_JAX_MALLOC=default skips it.
  Returns whether it was applied.

  The trim threshold is an int (at most 2 GiB), so temporaries above that are still given back
  and faulted in again every step: vit_tiny/16 at batch 16 (3.9 GB of temporaries) takes 1.05M
  page faults a step. In a script running that step alone, never trimming (threshold -1) took
  that to 0 and the step from 6.9 s to 5.9 s, but the heap then grew by a block of temporaries at
  a time (peak RSS 9-17 GB instead of 5.4); why glibc did not reuse the freed blocks was not
  checked. Not taken; benchmarks/RESULTS.md.
  """
  if not sys.platform.startswith("linux") or os.environ.get("DINO_JAX_MALLOC") == "default":
    return False
  try:
    libc = ctypes.CDLL("libc.so.6")
  except OSError:  # not glibc (e.g. musl)
    return False
  m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8
  return all(libc.mallopt(option, value) == 1 for option, value in (
      (m_arena_max, 1), (m_mmap_max, 0), (m_trim_threshold, 2**31 - 1)))


MALLOC_TUNED = _keep_freed_memory()
