r"""Input pipeline throughput on coco-mini at full resolution: ours against DetrImageProcessor.

Ours: the training pipeline (decode, official augmentation, normalise, pad to buckets, batch 2),
with its parallel map sized to this machine's cores. Reference: transformers' DetrImageProcessor
doing resize (shorter side 800, max 1333) + normalise + pad on the same images, decoded with PIL.
Both read the images from disk. Prints images/s for each and the ratio.

  python benchmarks/input_pipeline.py [--coco_mini ../shared/coco-mini] [--images 96]
"""

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from detr_jax import system  # noqa: E402
from detr_jax.data import coco, pipeline  # noqa: E402
from references.coco_mini import COCO_MINI  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--coco_mini", default=str(COCO_MINI))
  parser.add_argument("--images", type=int, default=96)
  parser.add_argument("--batch_size", type=int, default=2)
  args = parser.parse_args()
  from PIL import Image
  from transformers import DetrImageProcessor

  records = coco.load_coco_folder(args.coco_mini, "train2017")
  steps = args.images // args.batch_size
  dataset = pipeline.train_dataset(records, args.batch_size, 0, pipeline.PipelineOptions(), process=(0, 1))
  iterator = dataset.as_numpy_iterator()
  next(iterator)  # builds the pipeline and fills its buffers once
  start = time.perf_counter()
  for _ in range(steps):
    next(iterator)
  ours = steps * args.batch_size / (time.perf_counter() - start)

  processor = DetrImageProcessor()
  paths = records.paths[:steps * args.batch_size].tolist()
  start = time.perf_counter()
  for i in range(0, len(paths), args.batch_size):
    images = [Image.open(p).convert("RGB") for p in paths[i:i + args.batch_size]]
    processor(images=images, return_tensors="np")
  reference = len(paths) / (time.perf_counter() - start)
  print(f"{steps * args.batch_size} coco-mini train images, batch {args.batch_size}, full resolution, "
        f"{system.available_cores()} cores")
  print(f"DetrImageProcessor (resize + normalise + pad): {reference:.1f} images/s")
  print(f"detr_jax train pipeline (decode + augment + pad): {ours:.1f} images/s")
  print(f"ratio: {ours / reference:.2f}x")


if __name__ == "__main__":
  main()
