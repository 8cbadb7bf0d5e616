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

  The heap is never trimmed (threshold -1). With the largest threshold mallopt takes (2 GiB),
  temporaries above that were still given back and faulted in again every step: vit_tiny/16 at
  batch 16 (3.9 GB of temporaries) took 1.0M page faults and 5.1-7.6 s a step, against none and
  4.0-4.2 s never trimming. The price: a process keeps its high-water mark. Dispatched four
  at a time, as the trainer runs them, that step peaked at 13.3 GB either way (5.5 GB waiting
  for each), so keeping the mark costs no more peak memory there. benchmarks/RESULTS.md.
  """
  if not sys.platform.startswith("linux") or os.environ.get("DINO_JAX_MALLOC") == "default":
    return False
  try:
    libc = ctypes.CDLL("libc.so.6")
  except OSError:  # not glibc (e.g. musl)
    return False
  m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8
  return all(libc.mallopt(option, value) == 1 for option, value in (
      (m_arena_max, 1), (m_mmap_max, 0), (m_trim_threshold, -1)))


MALLOC_TUNED = _keep_freed_memory()
