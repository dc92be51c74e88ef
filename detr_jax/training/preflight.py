"""The checks of a training run that read no dataset and write nothing, so that a mistake in the
config or its inputs is refused before `train_and_evaluate` makes the workdir.

The dataset's contents (the annotation json, the images) are read, and checked, by the loop.
"""

import os

import ml_collections

from detr_jax import checkpoints, families
from detr_jax.data import sources


def check(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Checks `config` for a run in `workdir`; each error names the setting to change.

  Raises:
    ValueError: an unknown model family (config.model.name) or data source (config.data.source).
    coco.DatasetError: see `sources.check_split`, for the train split and for the eval split when
      the run evaluates.
    FileNotFoundError: config.init.checkpoint or config.init.backbone_checkpoint does not exist;
      checked when the workdir holds no checkpoints yet (a resumed run reads neither).
    extras.MissingExtraError: the tfds source without tensorflow-datasets, or an init checkpoint
      that needs PyTorch without it.
  """
  families.of_config(config.model)
  data = config.data
  dir_flag = "--config.data.data_dir"
  sources.check_split(data, data.data_dir, data.train_split, evaluated=False, dir_flag=dir_flag,
                      split_flag="--config.data.train_split")
  if sources.can_evaluate(data):
    sources.check_split(data, data.data_dir, data.eval_split, evaluated=True, dir_flag=dir_flag,
                        split_flag="--config.data.eval_split")
  if os.path.isdir(os.path.join(workdir, checkpoints.CHECKPOINT_DIR)):
    return
  for key in ("checkpoint", "backbone_checkpoint"):
    path = config.init[key]
    if path:
      try:
        families.check_checkpoint(path)
      except FileNotFoundError as error:
        raise FileNotFoundError(f"config.init.{key}: {error}") from None
