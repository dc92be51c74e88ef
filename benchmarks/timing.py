"""Wall-clock timing and page-fault counts shared by the benchmark scripts."""

import resource
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


def interleaved_median_seconds(fns, iters: int) -> list[float]:
  """Median wall time of each of `fns` over `iters` rounds that call them in turn, after one
  warm-up call each, so that load from elsewhere on the machine falls on all of them alike."""
  for fn in fns:
    fn()
  times = [[] for _ in fns]
  for _ in range(iters):
    for fn, fn_times in zip(fns, times):
      start = time.perf_counter()
      fn()
      fn_times.append(time.perf_counter() - start)
  return [float(np.median(t)) for t in times]


def minor_page_faults(fn) -> int:
  """Minor page faults of this process during one call of `fn()` (first touches of fresh memory)."""
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  fn()
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
