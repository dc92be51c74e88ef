"""Facts about the host machine."""

import os


def available_cores() -> int:
  """CPU cores this process may run on (its affinity mask, where the OS has one)."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
