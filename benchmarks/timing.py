"""Wall-clock timing shared by the benchmark scripts."""

import time

import numpy as np


def median_seconds(fn, iters: int) -> float:
  """Median wall time of `fn()` over `iters` calls, after one warm-up call (compilation for JAX)."""
  fn()
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))
