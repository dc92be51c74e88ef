"""Builds the deformable sampling's CPU kernel (`detr_jax/models/deformable_sampling_cpu.cc`) against the
XLA FFI headers that jaxlib ships; everything else about the package is in pyproject.toml. The build is
optional: without a C++ compiler the package installs and the pure-JAX sampling runs on the CPU too."""

import os

import jaxlib
from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "detr_jax.models._deformable_sampling_cpu", ["detr_jax/models/deformable_sampling_cpu.cc"],
    include_dirs=[os.path.join(os.path.dirname(jaxlib.__file__), "include")],
    extra_compile_args=["-std=c++17", "-O3", "-fopenmp-simd"], language="c++", optional=True)])
