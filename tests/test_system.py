"""The host allocator setting of `system.retain_freed_host_memory`, measured in page faults."""

import ctypes
import platform
import resource

import pytest

from detr_jax import system

BLOCK_BYTES = 256 << 20   # far above glibc's largest mmap threshold (32 MiB), like XLA:CPU's temporaries


def _faults_touching_a_fresh_block(libc) -> int:
  block = libc.malloc(BLOCK_BYTES)
  assert block, "malloc failed"
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  ctypes.memset(block, 1, BLOCK_BYTES)
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
  libc.free(block)
  return faults


def test_freed_blocks_stay_mapped_and_are_reused_without_page_faults():
  if platform.libc_ver()[0] != "glibc":
    pytest.skip("the setting exists for glibc's malloc only")
  libc = ctypes.CDLL(None)
  libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
  libc.free.argtypes = [ctypes.c_void_p]
  assert system.retain_freed_host_memory()
  _faults_touching_a_fresh_block(libc)
  # Unmapped and mapped again, the block would fault once per 4 KiB page (65536 times).
  assert _faults_touching_a_fresh_block(libc) < BLOCK_BYTES // 4096 // 100
