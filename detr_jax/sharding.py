"""The device mesh: one data-parallel axis over every device of every process.

Batches are sharded along `BATCH_AXIS`; model and optimiser state are replicated.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

BATCH_AXIS = "data"


def create_mesh() -> Mesh:
  """A 1-D mesh of every device of every process, axis `BATCH_AXIS`."""
  return Mesh(np.array(jax.devices()), (BATCH_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Arrays split along their first (batch) dimension over the mesh."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """Arrays held whole on every device."""
  return NamedSharding(mesh, PartitionSpec())
