"""Where the data comes from: `config.data.source` and a split -> records or a tf.data source.

The one place that knows the sources; training, evaluation and eval.py ask it.
  coco_folder    annotations/instances_{split}.json + {split}/*.jpg (COCO or a custom dataset)
  coco_panoptic  annotations/panoptic_{split}.json + its PNG folder (+ instances json for box AP)
  generated      the built-in dataset (`generated.py`), written as a COCO folder first
  tfds           coco/2017 from a TFDS data dir or bucket (training only: evaluation needs the
                 COCO annotation json)
"""

import os

import ml_collections

from detr_jax import extras
from detr_jax.data import coco, coco_categories, coco_panoptic, generated, pipeline

SOURCES = ("coco_folder", "coco_panoptic", "generated", "tfds")


def check(data_config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming config.data.source and the valid sources if it is unknown."""
  if data_config.source not in SOURCES:
    raise ValueError(f"Unknown config.data.source={data_config.source!r}; choose one of {', '.join(SOURCES)}.")


def data_dir(data_config: ml_collections.ConfigDict, workdir: str) -> str:
  """The folder to read; for "generated" it is written first (default workdir/generated_data)."""
  check(data_config)
  if data_config.source == "generated":
    return generated.write_coco_folder(data_config.data_dir or os.path.join(workdir, "generated_data"))
  return data_config.data_dir


def check_split(data_config: ml_collections.ConfigDict, directory: str, split: str, *, evaluated: bool,
                dir_flag: str, split_flag: str) -> None:
  """Checks, reading and writing nothing, that the inputs of `split` exist, before a command starts work.

  Args:
    directory: the data folder (`data_dir`'s answer, or a command's flag).
    evaluated: the split will be scored (a panoptic split then needs its instances json too).
    dir_flag, split_flag: the command's flags that set the folder and the split, named in the errors.
  Raises:
    ValueError: an unknown source.
    coco.DatasetError: a COCO or panoptic source without a folder, a folder that does not exist,
      a split without its annotation file (the splits the folder has are listed), or a split's
      missing image or PNG folder. The contents are the loaders' to check.
    extras.MissingExtraError: the tfds source without tensorflow-datasets.
  The generated source is written when it is read, so there is nothing to check.
  """
  check(data_config)
  if data_config.source == "tfds":
    _tensorflow_datasets()
  if data_config.source not in ("coco_folder", "coco_panoptic"):
    return
  if not directory:
    raise coco.DatasetError(f"No data folder is set (config.data.source={data_config.source!r}): pass {dir_flag}=DIR.")
  if not os.path.isdir(directory):
    raise coco.DatasetError(f"Data folder {directory!r} does not exist: pass {dir_flag}=DIR.")
  layout = coco_panoptic if is_panoptic(data_config) else coco
  if not os.path.isfile(layout.annotation_path(directory, split)):
    splits = layout.available_splits(directory)
    there = (f"its splits are {', '.join(splits)}" if splits
             else f"it has no {os.path.relpath(layout.annotation_path(directory, '*'), directory)}")
    raise coco.DatasetError(f"{directory} has no split {split!r} (no {layout.annotation_path(directory, split)}); "
                            f"{there}: pass {split_flag}=SPLIT.")
  needed = [os.path.join(directory, split)]
  if is_panoptic(data_config):
    needed.append(coco_panoptic.png_folder(directory, split))
  for folder in needed:
    if not os.path.isdir(folder):
      raise coco.DatasetError(f"{folder} does not exist: split {split!r} of {directory} needs it.")
  if evaluated and is_panoptic(data_config) and not os.path.isfile(coco.annotation_path(directory, split)):
    raise coco.DatasetError(f"{coco.annotation_path(directory, split)} does not exist: box AP on split {split!r} "
                            "needs it beside the panoptic json.")


def _tensorflow_datasets():
  """The tensorflow_datasets module. Raises extras.MissingExtraError without it."""
  return extras.require("tensorflow_datasets", "config.data.source='tfds'", "tfds")


def is_panoptic(data_config: ml_collections.ConfigDict) -> bool:
  """Whether the source is a COCO panoptic split (segments for training, PQ in evaluation)."""
  return data_config.source == "coco_panoptic"


def can_evaluate(data_config: ml_collections.ConfigDict) -> bool:
  """Whether `data_config.eval_split` can be scored: set, and from a source with COCO annotation files."""
  return bool(data_config.eval_split) and data_config.source != "tfds"


def eval_records(directory: str, split: str, panoptic: bool):
  """The records to evaluate: the images of the panoptic json with `panoptic`, else of the instances json.

  Raises:
    coco.DatasetError: the folder or an annotation file is missing or invalid.
  """
  if panoptic:
    return coco_panoptic.load_panoptic_folder(directory, split)
  return coco.load_coco_folder(directory, split, keep_empty=True)


def categories(records) -> list[dict]:
  """The categories of COCO or COCO panoptic records as [{"id", "name", "isthing"}] in id order (what a
  checkpoint records, `checkpoints.write_categories`); an instances json's categories are all things."""
  return [{"id": int(i), "name": c["name"], "isthing": c["isthing"]} if isinstance(c, dict)
          else {"id": int(i), "name": c, "isthing": True} for i, c in sorted(records.categories.items())]


def training_records(config: ml_collections.ConfigDict, directory: str):
  """The training split's records, read and checked (None for tfds, which reads as it trains); before
  anything is written, so that a bad annotation file stops a run before its workdir exists.

  Raises:
    coco.DatasetError: the folder or its annotations are missing or invalid.
    ValueError: an unknown source, or config.model.num_classes below the dataset's category ids.
    extras.MissingExtraError: the tfds source without tensorflow-datasets.
  """
  data = config.data
  check(data)
  if data.source == "tfds":
    _tensorflow_datasets()
    return None
  if is_panoptic(data):
    records = coco_panoptic.load_panoptic_folder(directory, data.train_split)
  else:
    records = coco.load_coco_folder(directory, data.train_split, keep_empty=data.keep_empty_train)
  if data.train_max_images:
    records = records.first(data.train_max_images)
  if records.num_classes > config.model.num_classes:
    raise ValueError(f"{directory}/{data.train_split} has category ids up to {records.num_classes - 1}; "
                     f"set config.model.num_classes to at least {records.num_classes}.")
  return records


def training_dataset(config: ml_collections.ConfigDict, directory: str, records, options: pipeline.PipelineOptions,
                     per_process_batch: int, start_step: int):
  """(this process's training batches as a tf.data.Dataset, steps per epoch of config.batch_size, the
  dataset's categories as `categories` gives them; tfds coco/2017's are COCO's 80).

  records: `training_records(config, directory)`.
  """
  if records is None:
    data = config.data
    tfds = _tensorflow_datasets()
    num_images = tfds.builder("coco/2017", data_dir=directory or None).info.splits[data.train_split].num_examples
    dataset = pipeline.tfds_dataset(data.train_split, per_process_batch, config.seed, options, train=True,
                                    data_dir=directory or None, start_step=start_step)
    return dataset, num_images // config.batch_size, coco_categories.coco_categories(91)
  dataset = pipeline.train_dataset(records, per_process_batch, config.seed, options, start_step=start_step)
  return dataset, len(records) // config.batch_size, categories(records)
