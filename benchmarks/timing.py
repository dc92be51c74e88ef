"""Wall-clock timing, page-fault counts and the machine's matmul rate, shared by the benchmark scripts."""

import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch


def median_seconds(fn, iters: int) -> float:
  """Median wall time of `fn()` over `iters` calls, after one warm-up call (compilation for JAX)."""
  fn()
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def interleaved_seconds(fns, iters: int) -> list[list[float]]:
  """Wall times of each of `fns` over `iters` rounds that call them in turn, after one warm-up
  call each, so that load from elsewhere on the machine falls on all of them alike."""
  for fn in fns:
    fn()
  times = [[] for _ in fns]
  for _ in range(iters):
    for fn, fn_times in zip(fns, times):
      start = time.perf_counter()
      fn()
      fn_times.append(time.perf_counter() - start)
  return times


def interleaved_median_seconds(fns, iters: int) -> list[float]:
  """Median wall time of each of `fns` over `interleaved_seconds`' rounds."""
  return [float(np.median(t)) for t in interleaved_seconds(fns, iters)]


def minor_page_faults(fn) -> int:
  """Minor page faults of this process during one call of `fn()` (first touches of fresh memory)."""
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  fn()
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def matmul_calls(size: int = 2048, repeats: int = 4) -> tuple[list, float]:
  """([torch.mm call, jitted jnp.dot call], FLOP per call): `repeats` dense float32 [size, size] @
  [size, size] products per call, to time beside a program (`interleaved_seconds`) so that the
  machine's matmul rate is read in the same rounds. As the practical peak that bounds a program's
  speed, take the fastest call of either library (`matmul_peak`), not a median."""
  rng = np.random.default_rng(0)
  a, b = (rng.normal(size=(size, size)).astype(np.float32) for _ in range(2))
  torch_a, torch_b = torch.from_numpy(a), torch.from_numpy(b)
  jax_a, jax_b = jax.device_put(a), jax.device_put(b)
  jax_dot = jax.jit(jnp.dot)

  def torch_mm():
    for _ in range(repeats):
      torch.mm(torch_a, torch_b)

  def jax_dot_call():
    for _ in range(repeats):
      jax.block_until_ready(jax_dot(jax_a, jax_b))
  return [torch_mm, jax_dot_call], 2.0 * size ** 3 * repeats


def matmul_peak(matmul_times: list[list[float]], flops_per_call: float) -> float:
  """FLOP/s of the fastest of `matmul_calls`' timed calls, over both libraries and all rounds."""
  return flops_per_call / min(min(times) for times in matmul_times)
