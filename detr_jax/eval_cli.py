r"""COCO evaluation of a checkpoint: jit-compiled inference over the mesh, pycocotools AP, PQ.

Usage:
  detr-eval --config configs/detr_r50.py --checkpoint CKPT --data_dir DIR \
      [--split val2017] [--output_dir OUT] [--max_images N] [--config.per_device_eval_batch_size=4]
  (or python eval.py ... in the repository; --config defaults to the detr_r50 config that ships with detr_jax)

CKPT is a train.py workdir (its latest checkpoint), an orbax directory written by
`detr-port import`, or a PyTorch `.pth` / `.safetensors` file (official or Hugging Face), ported
on the fly. The model's architecture comes from the checkpoint; the config gives the data settings
(scale, padding), the eval batch size and, for `.pth` files, DC5.
Box AP always; mask AP too for a panoptic (mask) model. With a panoptic config
(`data.source="coco_panoptic"`, e.g. configs/detr_r50_panoptic.py) the images of
`annotations/panoptic_{split}.json` are evaluated, adding PQ, SQ and RQ (all, things, stuff).
Prints the metrics table; OUT gets metrics.json, detections.json (COCO results format), pictures/
(predictions beside the ground truth for the first 4 images), for mask models segmentations.json
(RLE masks) and for panoptic configs panoptic.json + panoptic/*.png.

A mistake in the flags, the config, the checkpoint or the data ends the command with one line on
stderr and exit status 1; running out of device memory names --config.per_device_eval_batch_size.
"""

from typing import Optional

from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from detr_jax import entry, system

DEFAULT_CONFIG = entry.builtin_config("detr_r50.py")


def _define_flags() -> None:
  config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Config file (data and eval settings).")
  flags.DEFINE_string("checkpoint", None, "train.py workdir, orbax directory, .pth or .safetensors file.")
  flags.DEFINE_string("data_dir", None, "COCO folder; default config.data.data_dir.")
  flags.DEFINE_string("split", None, "Split to evaluate; default config.data.eval_split.")
  flags.DEFINE_string("output_dir", None, "Where to write metrics.json and detections.json.")
  flags.DEFINE_integer("max_images", None, "Evaluate only the first N images (by id).")
  flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-process).")
  flags.mark_flags_as_required(["checkpoint"])


def evaluate_checkpoint(config: ml_collections.ConfigDict, checkpoint: str, data_dir: Optional[str] = None,
                        split: Optional[str] = None, output_dir: Optional[str] = None,
                        max_images: Optional[int] = None) -> dict:
  """Evaluates `checkpoint` on `split` of `data_dir` (defaults: config.data's), prints the metrics table.

  Writes what `evaluation.evaluate` writes in `output_dir`. The checkpoint path and the split's
  files and annotations are checked before the model is loaded. A user mistake (see
  `entry.user_errors`) exits with status 1 and one line on stderr.
  Returns:
    the metrics.
  """
  # Imported here: entry.run sets up the process before TensorFlow and JAX load.
  import jax
  from detr_jax import evaluation, families, sharding
  from detr_jax.data import pipeline, sources
  with entry.user_errors("--config.per_device_eval_batch_size"):
    families.check_checkpoint(checkpoint)
    data_dir = data_dir or sources.data_dir(config.data, checkpoint)
    split = split or config.data.eval_split
    panoptic = sources.is_panoptic(config.data)
    sources.check_split(config.data, data_dir, split, evaluated=True, dir_flag="--data_dir", split_flag="--split")
    dataset_classes = sources.eval_records(data_dir, split, panoptic).num_classes   # the json's errors, before the load
    mesh = sharding.create_mesh()
    model, variables = families.load_model(checkpoint, config.model.dilation, mesh)
    if model.num_classes < dataset_classes:   # a user's choice (e.g. a subset model), so not an error
      logging.warning("The model's num_classes=%d does not cover %s/%s, whose category ids go up to %d: detections "
                      "of the categories with ids %d and above cannot be produced.", model.num_classes, data_dir,
                      split, dataset_classes - 1, model.num_classes)
    batch_size = config.per_device_eval_batch_size * mesh.devices.size
    metrics = evaluation.evaluate(model, variables, data_dir, split, batch_size,
                                  pipeline.PipelineOptions.from_config(config.data), mesh,
                                  output_dir=output_dir, max_images=max_images, panoptic=panoptic)
    if output_dir and jax.process_index() == 0 and "AP" in metrics:   # box AP scored: an instances json
      evaluation.write_validation_pictures(model, data_dir, split, output_dir)
  print(f"{families.describe(model)} on {data_dir}/{split} ({metrics['num_images']} images):")
  print(evaluation.metrics_table(metrics))
  return metrics


def _main() -> None:
  import jax
  system.quiet_library_logs()
  flag = flags.FLAGS
  if flag.distributed:
    jax.distributed.initialize()
  evaluate_checkpoint(flag.config, flag.checkpoint, flag.data_dir, flag.split, flag.output_dir, flag.max_images)


def run() -> None:
  """The `detr-eval` command."""
  entry.run(_define_flags, _main, default_config=DEFAULT_CONFIG)
