"""The CPU kernel of the multi-scale deformable sampling (`deformable_sampling_cpu.cc`, an XLA FFI
kernel built when the package is installed): its forward and backward as JAX functions.

`deformable_attention.deformable_sampling` calls it on the CPU for float32 values; on GPU and TPU, in
other dtypes, under `portable()` (artefacts for other machines: `jax.export`, jax2tf) and where the
kernel was not built, the pure-JAX version runs instead. Both compute the same arithmetic
(`tests/test_deformable_attention.py` holds both to PyTorch's grid_sample path).

The library is looked for beside this file (a build in place) and then in the other detr_jax
packages on sys.path, so that tests run from a checkout use the kernel `pip install .` built.
"""

import contextlib
import contextvars
import ctypes
import functools
import importlib.machinery
import logging
import pathlib
import sys
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

LIBRARY_NAME = "_deformable_sampling_cpu"
FORWARD_TARGET = "detr_jax_deformable_sampling_forward"
BACKWARD_TARGET = "detr_jax_deformable_sampling_backward"

_portable = contextvars.ContextVar("detr_jax_portable_sampling", default=False)


def _library_path() -> Optional[pathlib.Path]:
  """The built library: beside this file, else in the first detr_jax/models/ on sys.path that holds it
  (a checkout's tests import the checkout's package, and `pip install .` put the library in site-packages)."""
  names = [LIBRARY_NAME + suffix for suffix in importlib.machinery.EXTENSION_SUFFIXES]
  folders = [pathlib.Path(__file__).parent] + [pathlib.Path(entry or ".") / "detr_jax" / "models" for entry in sys.path]
  for folder in folders:
    for name in names:
      if (folder / name).is_file():
        return folder / name
  return None


@functools.cache
def available() -> bool:
  """Whether the kernel was built and is registered with XLA:CPU (loaded once per process)."""
  path = _library_path()
  if path is None:
    logging.info("The deformable sampling's CPU kernel is not built (pip install . builds it); "
                 "the pure-JAX sampling runs on the CPU instead.")
    return False
  try:
    library = ctypes.cdll.LoadLibrary(str(path))
  except OSError as error:   # a build for another machine or jaxlib: the pure-JAX sampling still runs
    logging.warning("Cannot load the deformable sampling's CPU kernel %s (%s); reinstall detr_jax "
                    "(pip install .) to rebuild it. The pure-JAX sampling runs instead.", path, error)
    return False
  jax.ffi.register_ffi_target(FORWARD_TARGET, jax.ffi.pycapsule(library.DeformableSamplingForward), platform="cpu")
  jax.ffi.register_ffi_target(BACKWARD_TARGET, jax.ffi.pycapsule(library.DeformableSamplingBackward), platform="cpu")
  return True


@contextlib.contextmanager
def portable():
  """Within it, `deformable_sampling` traces the pure-JAX version only: for what is lowered to run on
  other machines or platforms (`jax.export`, jax2tf), which cannot carry this process's kernel. It
  governs traces made inside it: a function jitted and called before keeps its first trace."""
  token = _portable.set(True)
  try:
    yield
  finally:
    _portable.reset(token)


def usable(value: jnp.ndarray) -> bool:
  """Whether `deformable_sampling` may lower `value`'s sampling to the kernel on the CPU."""
  return value.dtype == jnp.float32 and not _portable.get() and available()


def _level_sizes(spatial_shapes):
  return dict(heights=np.array([h for h, _ in spatial_shapes], np.int64),
              widths=np.array([w for _, w in spatial_shapes], np.int64))


def forward(value, spatial_shapes, locations, weights):
  """`deformable_attention.deformable_sampling` by the kernel (the official
  `ms_deformable_im2col_cuda` on the CPU): float32 value [B, S, M, D]; locations [B, Q, M, L, P, 2],
  (x, y) normalised to [0, 1] on each level; weights [B, Q, M, L, P] -> float32 [B, Q, M, D]. Not
  differentiable by itself: `deformable_attention._sampling` pairs it with `backward`. Lowers only for
  the CPU once `available()`; inconsistent shapes raise jax.errors.JaxRuntimeError when it runs."""
  batch, _, heads, channels = value.shape
  return jax.ffi.ffi_call(FORWARD_TARGET, jax.ShapeDtypeStruct((batch, locations.shape[1], heads, channels),
                                                              jnp.float32), vmap_method="sequential")(
      value, locations.astype(jnp.float32), weights.astype(jnp.float32), **_level_sizes(spatial_shapes))


def backward(spatial_shapes, value, locations, weights, cotangent):
  """The gradients of `forward` by the kernel (the official `ms_deformable_col2im_cuda` on the CPU):
  (value, locations, weights) float32, in their shapes (locations' per normalised unit), from the
  cotangent of its output, [B, Q, M * D] or [B, Q, M, D]. Errors as `forward`'s."""
  shapes = tuple(jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in (value, locations, weights))
  cotangent = cotangent.astype(jnp.float32).reshape(locations.shape[:3] + value.shape[3:])
  return jax.ffi.ffi_call(BACKWARD_TARGET, shapes, vmap_method="sequential")(
      value, locations.astype(jnp.float32), weights.astype(jnp.float32), cotangent, **_level_sizes(spatial_shapes))
