r"""Trains a detector, resuming from the workdir's latest checkpoint, then evaluates (COCO AP).

Usage:
  detr-train --config configs/detr_r50.py --workdir DIR [--config.key=value ...]
  (or python train.py ... in the repository)

Multi-process (one process per host): pass --coordinator_address, --num_processes and
--process_id, or run where `jax.distributed.initialize()` finds them itself (TPU pods, SLURM).

A mistake in the flags, the config or its inputs ends the command with one line on stderr and exit
status 1, before the workdir is made; running out of device memory names --config.batch_size.
"""

from absl import flags
import ml_collections
from ml_collections import config_flags

from detr_jax import entry, system


def _define_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Checkpoints, summaries and evaluation results go here.")
  flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-process).")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process).")
  flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process).")
  flags.DEFINE_integer("process_id", None, "This process's index (multi-process).")
  flags.mark_flags_as_required(["config", "workdir"])


def train(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Checks `config` (`preflight.check`), then `training.train_and_evaluate(config, workdir)`.

  Writes what train_and_evaluate writes in `workdir`, nothing when a check fails. A user mistake
  (see `entry.user_errors`; a non-finite loss too) exits with status 1 and one line on stderr.
  """
  # Imported here: entry.run sets up the process before TensorFlow and JAX load.
  from detr_jax import training
  from detr_jax.training import preflight
  with entry.user_errors("--config.batch_size", also=(training.NonFiniteLossError,)):
    preflight.check(config, workdir)
    training.train_and_evaluate(config, workdir)


def _main() -> None:
  import jax
  system.quiet_library_logs()
  flag = flags.FLAGS
  if flag.distributed or flag.coordinator_address:
    jax.distributed.initialize(flag.coordinator_address, flag.num_processes, flag.process_id)
  train(flag.config, flag.workdir)


def run() -> None:
  """The `detr-train` command."""
  entry.run(_define_flags, _main)
