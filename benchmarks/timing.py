"""Timing shared by the benchmarks: calls timed in turn, so that a machine whose speed drifts over
minutes drifts alike for all of them."""
import time
from typing import Any, Callable

import jax


def time_interleaved(calls: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
  """Seconds of each call, `repeats` rounds with one call of each per round (the order reversed
  every other round); each call's result is waited for with jax.block_until_ready."""
  times = {name: [] for name in calls}
  names = list(calls)
  for r in range(repeats):
    for name in names if r % 2 == 0 else names[::-1]:
      t = time.perf_counter()
      jax.block_until_ready(calls[name]())
      times[name].append(time.perf_counter() - t)
  return times
