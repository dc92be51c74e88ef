r"""COCO evaluation of a DETR checkpoint: jit-compiled inference over the mesh, pycocotools AP, PQ.

Usage:
  python eval.py --config configs/detr_r50.py --checkpoint CKPT --data_dir DIR \
      [--split val2017] [--output_dir OUT] [--max_images N] [--config.eval_batch_size=16]

CKPT is a train.py workdir (its latest checkpoint), an orbax directory written by
`python -m detr_jax.porting import`, or a PyTorch `.pth` / `.safetensors` file (official or
Hugging Face), ported on the fly. The model's architecture comes from the checkpoint; the config
gives the data settings (scale, padding), the eval batch size and, for `.pth` files, DC5.
Box AP always; mask AP too for a panoptic (mask) model. With a panoptic config
(`data.source="coco_panoptic"`, e.g. configs/detr_r50_panoptic.py) the images of
`annotations/panoptic_{split}.json` are evaluated, adding PQ, SQ and RQ (all, things, stuff).
Prints the metrics table; OUT gets metrics.json, detections.json (COCO results format), for mask
models segmentations.json (RLE masks) and for panoptic configs panoptic.json + panoptic/*.png.
"""


from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from detr_jax import evaluation, families, sharding, system
from detr_jax.data import pipeline, sources

_CONFIG = config_flags.DEFINE_config_file("config", "configs/detr_r50.py", "Config file (data and eval settings).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "train.py workdir, orbax directory, .pth or .safetensors file.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "COCO folder; default config.data.data_dir.")
_SPLIT = flags.DEFINE_string("split", None, "Split to evaluate; default config.data.eval_split.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where to write metrics.json and detections.json.")
_MAX_IMAGES = flags.DEFINE_integer("max_images", None, "Evaluate only the first N images (by id).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-process).")
flags.mark_flags_as_required(["checkpoint"])


def main(argv):
  del argv
  system.retain_freed_host_memory()   # before JAX starts its threads
  system.quiet_library_logs()
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  config = _CONFIG.value
  mesh = sharding.create_mesh()
  model, variables = families.load_model(_CHECKPOINT.value, config.model.dilation, mesh)
  data_dir = _DATA_DIR.value or sources.data_dir(config.data, _CHECKPOINT.value)
  split = _SPLIT.value or config.data.eval_split
  metrics = evaluation.evaluate(model, variables, data_dir, split, config.eval_batch_size,
                                pipeline.PipelineOptions.from_config(config.data), mesh,
                                output_dir=_OUTPUT_DIR.value, max_images=_MAX_IMAGES.value,
                                panoptic=sources.is_panoptic(config.data))
  print(f"{families.describe(model)} on {data_dir}/{split} ({metrics['num_images']} images):")
  print(evaluation.metrics_table(metrics))


if __name__ == "__main__":
  app.run(main)
