"""Facts about the host machine, the host allocator setting XLA:CPU needs, and quiet library loading."""

import ctypes
import importlib.metadata
import importlib.util
import logging
import os
import pkgutil
import platform
import sys

# Parameter numbers of glibc's mallopt (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def available_cores() -> int:
  """CPU cores this process may run on (its affinity mask, where the OS has one)."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def jax_backend_will_be_cpu() -> bool:
  """Whether JAX will compute on the CPU, decided without starting JAX (which starts its threads).

  The rule: when JAX_PLATFORMS (or the older JAX_PLATFORM_NAME) is set, whether the first platform
  it names is "cpu"; otherwise, whether no accelerator backend is installed: no PJRT plugin (a
  module of the `jax_plugins` namespace package or a "jax_plugins" entry point, as
  jax_cuda12_plugin and the ROCm plugins register) and no TPU runtime (the libtpu package, or
  TPU_LIBRARY_PATH). An installed plugin on a host without its accelerator counts as not CPU,
  although JAX then falls back to the CPU.
  """
  platforms = os.environ.get("JAX_PLATFORMS") or os.environ.get("JAX_PLATFORM_NAME")
  if platforms:
    return platforms.split(",")[0].strip().lower() == "cpu"
  namespace = importlib.util.find_spec("jax_plugins")
  path_plugins = namespace is not None and any(pkgutil.iter_modules(namespace.submodule_search_locations))
  return not (path_plugins or importlib.metadata.entry_points(group="jax_plugins")
              or importlib.util.find_spec("libtpu") or os.environ.get("TPU_LIBRARY_PATH"))


def retain_freed_host_memory() -> bool:
  """With glibc, makes malloc keep freed memory mapped for reuse instead of returning it.

  XLA:CPU allocates the temporaries of each execution as one block (about 1 GB for a DETR-R50
  training step at batch 2, 512x512; 300 MB for a forward pass at 800x1066). glibc serves blocks
  over 32 MiB with a fresh mmap and unmaps them when freed, so every step touches new pages
  again: 240k page faults per training step, 1.45 s a step instead of 1.2 s on the development
  VM. This sets, process-wide:
    - M_MMAP_MAX = 0 and M_TRIM_THRESHOLD = -1: large blocks come from the heap, which is never
      trimmed, so the process keeps its peak memory;
    - M_ARENA_MAX = 1: XLA's worker threads allocate too, and glibc's per-thread arenas fall back
      to mmap for blocks over 64 MiB whatever M_MMAP_MAX says.
  A thread keeps the arena of its first allocation and JAX starts its threads when it first
  looks for devices, so call this in a program's main before any JAX computation or
  `jax.devices()`. It helps only the CPU backend; on GPU and TPU hosts it costs the memory the
  process peaked at, which stays mapped, and one malloc arena shared by all threads, so the
  commands call it only when `jax_backend_will_be_cpu()`.

  Returns:
    True if glibc took the settings; False (nothing changed) with another C library.
  """
  if platform.libc_ver()[0] != "glibc":
    return False
  libc = ctypes.CDLL(None)
  applied = all(libc.mallopt(parameter, value)
                for parameter, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
  if not applied:
    logging.warning("glibc refused M_ARENA_MAX / M_MMAP_MAX / M_TRIM_THRESHOLD; XLA:CPU steps will page-fault.")
  return applied


class _LibraryInfoFilter(logging.Filter):
  def __init__(self, quiet_dirs):
    super().__init__()
    self._quiet_dirs = quiet_dirs

  def filter(self, record):
    return record.levelno >= logging.WARNING or not record.pathname.startswith(self._quiet_dirs)


def quiet_library_logs() -> None:
  """Drops the INFO logs of libraries that report every step (orbax logs each save in ~30 lines)
  from absl's handler, which train.py and eval.py log through."""
  from absl import logging as absl_logging
  import jax
  import orbax.checkpoint as ocp
  quiet_dirs = tuple(os.path.dirname(module.__file__) for module in (ocp, jax))
  absl_logging.get_absl_handler().addFilter(_LibraryInfoFilter(quiet_dirs))


def import_tensorflow_quietly() -> None:
  """Imports TensorFlow without the notices it prints while loading.

  Each of its two shared libraries logs "oneDNN custom operations are on" (an INFO line, with absl's
  "All log messages before absl::InitializeLog()" before it) as it loads, which TF_CPP_MIN_LOG_LEVEL
  does not reach; so file descriptor 2 points to /dev/null during the import. oneDNN stays on
  (TF_ENABLE_ONEDNN_OPTS is left alone). TF_CPP_MIN_LOG_LEVEL=1, unless set, drops TensorFlow's
  later INFO logs. Whatever else it prints while loading is lost; an import error is raised.
  """
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  if "tensorflow" in sys.modules:
    return
  sys.stderr.flush()
  saved_stderr = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)
  try:
    import tensorflow  # noqa: F401
  finally:
    os.dup2(saved_stderr, 2)
    os.close(saved_stderr)
    os.close(devnull)
