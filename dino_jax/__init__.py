"""dino_jax: DINO (self-distillation with no labels) in JAX / Flax."""
import ctypes
import os
import sys

__version__ = "0.1.0"


def _keep_freed_memory() -> bool:
  """Asks glibc's malloc to keep freed memory instead of returning it to the kernel.

  XLA:CPU mallocs each execution's temporaries as one block from its own threads. glibc serves a
  block that size from a fresh mmap (a thread's arena cannot hold it) and unmaps it on free, so
  every step would page-fault and zero it again. With one arena, no mmap and no trimming, the
  block stays in the heap and is reused. Never trimming (threshold -1), not the largest threshold
  mallopt takes (2 GiB): temporaries above that would still be given back every step. The price:
  a process keeps its high-water mark. Process-wide, so it is done once, at import, before jax
  starts its threads; DINO_JAX_MALLOC=default skips it. Returns whether it was applied.
  Measurements: docs/notes/training.md, "Keeping freed memory".
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
