"""The host allocator setting of `system.retain_freed_host_memory`, measured in page faults, and
the rule that decides where the commands apply it (`system.jax_backend_will_be_cpu`)."""

import ctypes
import importlib.metadata
import importlib.util
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


@pytest.mark.parametrize("platforms, cpu", [("cpu", True), ("CPU", True), ("cpu,cuda", True), ("cuda", False),
                                            ("tpu,cpu", False)])
def test_jax_platforms_decides_whether_jax_computes_on_the_cpu(platforms, cpu, monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", platforms)
  assert system.jax_backend_will_be_cpu() == cpu


def test_without_jax_platforms_an_installed_accelerator_plugin_decides(monkeypatch, tmp_path):
  for name in ("JAX_PLATFORMS", "JAX_PLATFORM_NAME", "TPU_LIBRARY_PATH"):
    monkeypatch.delenv(name, raising=False)
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name: None if name in ("jax_plugins", "libtpu") else find_spec(name))
  monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [])
  assert system.jax_backend_will_be_cpu()
  monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: ["xla_cuda12 = jax_cuda12_plugin"])
  assert not system.jax_backend_will_be_cpu()
  monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [])
  monkeypatch.setattr(importlib.util, "find_spec", find_spec)
  plugin = tmp_path / "jax_plugins" / "fake_accelerator"   # a plugin package in the namespace package
  plugin.mkdir(parents=True)
  (plugin / "__init__.py").write_text("")
  monkeypatch.syspath_prepend(str(tmp_path))
  assert not system.jax_backend_will_be_cpu()
