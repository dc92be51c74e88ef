r"""Checks a COCO-format dataset through the real pipeline before training on it.

  python -m detr_jax.data.check DATA_DIR [--split val2017] [--scale 1.0] [--batch_size 2]

Prints the images and boxes kept, what was skipped and why (each item named by its image id and
file), the categories and the num_classes to configure, and the pipeline's throughput in
images/s (eval transform, this machine); progress bars with ETA go to stderr. Then one line per
error and "N error(s)", exit status 1; or "No errors.", exit status 0. Errors: images that are
missing, unreadable, truncated or undecodable, or whose decoded size differs from the json's;
images and annotations without a required key; annotations of unknown images or categories and
malformed bboxes. A data_dir, split or json that cannot be read as a COCO split gives one line on
stderr and exit status 1.

Training runs the json-level checks too (`coco.load_coco_folder` logs one line of counts), but
not the decode pass, which reads every image.
"""

import argparse
import sys
import time

import tqdm

from detr_jax import system
from detr_jax.data import coco

# TensorFlow and `pipeline` are imported in the functions that use them, once the json has loaded:
# the import takes seconds and prints log lines of its own (silenced), which would bury a one-line error.

UNDECODABLE = "undecodable image"
SIZE_MISMATCH = "decoded size differs from the json's"


def _progress(description: str, total: int) -> tqdm.tqdm:
  """A progress bar with ETA on stderr, counting images."""
  return tqdm.tqdm(total=total, desc=description, unit="image", file=sys.stderr)


def decoded_sizes(records: coco.CocoRecords) -> dict:
  """{path: (height, width)} of every image of `records` that decodes; the others are absent."""
  system.import_tensorflow_quietly()
  import tensorflow as tf
  from detr_jax.data import pipeline
  paths = tf.data.Dataset.from_tensor_slices(records.paths)
  shapes = paths.map(lambda p: (p, tf.shape(pipeline.decode_image(p))[:2]), num_parallel_calls=tf.data.AUTOTUNE)
  sizes = {}
  with _progress("Decoding", len(records)) as bar:
    for path, (height, width) in shapes.ignore_errors().as_numpy_iterator():
      sizes[path.decode()] = (int(height), int(width))
      bar.update()
  return sizes


def decode_errors(records: coco.CocoRecords) -> list:
  """[(reason, name)] for each image that fails to decode or whose decoded (height, width) is not the json's.

  The pipeline scales boxes by the decoded size, as the official code does, so a wrong json size
  would go unnoticed there; it is still an error in the dataset (COCO evaluation tools read it).
  """
  sizes = decoded_sizes(records)
  errors = []
  for path, image_id, json_size in zip(records.paths.tolist(), records.image_ids.tolist(), records.sizes.tolist()):
    name = f"image {image_id} ({path})"
    size = sizes.get(path)
    if size is None:
      errors.append((UNDECODABLE, name))
    elif size != tuple(json_size):
      errors.append((SIZE_MISMATCH, f"{name}: decoded {size[0]}x{size[1]}, json {json_size[0]}x{json_size[1]} "
                                    "(height x width)"))
  return errors


def pipeline_pass(records: coco.CocoRecords, scale: float, batch_size: int) -> tuple:
  """(images, seconds) of one pass of the eval pipeline over `records`; batches that fail are dropped."""
  from detr_jax.data import pipeline
  dataset = pipeline.eval_dataset(records, batch_size, pipeline.PipelineOptions(scale=scale), process=(0, 1))
  start = time.perf_counter()
  with _progress("Pipeline", len(records)) as bar:
    for batch in dataset.ignore_errors().as_numpy_iterator():
      bar.update(int(batch["image_valid"].sum()))
  return bar.n, time.perf_counter() - start


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m detr_jax.data.check", description=__doc__.split("\n")[0])
  parser.add_argument("data_dir")
  parser.add_argument("--split", default="val2017")
  parser.add_argument("--scale", type=float, default=1.0, help="image size scale of the pipeline")
  parser.add_argument("--batch_size", type=int, default=2)
  args = parser.parse_args(argv)
  try:
    records = coco.load_coco_folder(args.data_dir, args.split)
  except coco.DatasetError as error:
    print(f"error: {error}", file=sys.stderr)
    return 1

  print(f"{args.data_dir} / {args.split}: {len(records)} images, {len(records.labels)} boxes kept")
  print(f"Skipped: {records.skipped.summary()}")
  used = sorted(set(records.labels.tolist()))
  print(f"{len(records.categories)} categories, ids {min(records.categories)}..{max(records.categories)}; "
        f"{len(used)} used by the kept boxes")
  print(f"Configure num_classes = {records.num_classes} (max category id + 1; 'no object' is index "
        f"{records.num_classes})")

  errors = records.skipped.errors() + decode_errors(records)
  images, seconds = pipeline_pass(records, args.scale, args.batch_size)
  print(f"Pipeline (eval transform, scale {args.scale}): {images} images in {seconds:.1f} s, "
        f"{images / seconds:.1f} images/s")

  for reason, name in errors:
    print(f"error: {reason}: {name}")
  print(f"{len(errors)} error(s)" if errors else "No errors.")
  return 1 if errors else 0


if __name__ == "__main__":
  sys.exit(main())
