r"""Trains DETR, resuming from the workdir's latest checkpoint, then evaluates (COCO AP).

Usage:
  python train.py --config configs/detr_r50.py --workdir DIR [--config.key=value ...]

Multi-process (one process per host): pass --coordinator_address, --num_processes and
--process_id, or run where `jax.distributed.initialize()` finds them itself (TPU pods, SLURM).
"""

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from detr_jax import system, training

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, summaries and evaluation results go here.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-process).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-process).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  system.retain_freed_host_memory()   # before JAX starts its threads
  system.quiet_library_logs()
  if _DISTRIBUTED.value or _COORDINATOR.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  training.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
