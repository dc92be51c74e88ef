r"""Checks a COCO-format dataset through the real pipeline before training on it.

  python -m detr_jax.data.check DATA_DIR [--split val2017] [--scale 1.0] [--batch_size 2]

Prints the images and boxes kept, every skipped item with its reason, the categories and the
num_classes to configure, the files that fail to decode, and the pipeline's throughput in
images/s (eval transform, this machine). Exits 1 when it finds errors: unreadable or
undecodable images, or annotations whose category id is not in `categories`.
"""

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

from detr_jax.data import coco, pipeline  # noqa: E402

ERROR_REASONS = ("missing image file", "empty or tiny image file", "truncated JPEG (no end-of-image marker)",
                 "truncated PNG (no IEND chunk)", "not a JPEG or PNG file", "category id absent from categories")


def undecodable_images(records: coco.CocoRecords) -> list[str]:
  """Paths that pass the header check but fail to decode."""
  paths = tf.data.Dataset.from_tensor_slices(records.paths)
  decoded = paths.map(lambda p: (p, tf.shape(pipeline.decode_image(p))), num_parallel_calls=tf.data.AUTOTUNE)
  ok = {p.decode() for p, _ in decoded.ignore_errors().as_numpy_iterator()}
  return [p for p in records.paths.tolist() if p not in ok]


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

  counts = records.skipped.counts()
  print(f"{args.data_dir} / {args.split}: {len(records)} images, {len(records.labels)} boxes kept")
  print(f"Skipped: {records.skipped.summary()}")
  used = sorted(set(records.labels.tolist()))
  print(f"{len(records.categories)} categories, ids {min(records.categories)}..{max(records.categories)}; "
        f"{len(used)} used by the kept boxes")
  print(f"Configure num_classes = {records.num_classes} (max category id + 1; 'no object' is index "
        f"{records.num_classes})")

  failed = undecodable_images(records)
  for path in failed:
    print(f"undecodable image: {path}")

  options = pipeline.PipelineOptions(scale=args.scale)
  dataset = pipeline.eval_dataset(records, args.batch_size, options, process=(0, 1))
  start, seen = time.perf_counter(), 0
  for batch in dataset.ignore_errors().as_numpy_iterator():
    seen += int(batch["image_valid"].sum())
  elapsed = time.perf_counter() - start
  print(f"Pipeline (eval transform, scale {args.scale}): {seen} images in {elapsed:.1f} s, "
        f"{seen / elapsed:.1f} images/s")

  errors = sum(counts.get(reason, 0) for reason in ERROR_REASONS) + len(failed)
  print(f"{errors} error(s)" if errors else "No errors.")
  return 1 if errors else 0


if __name__ == "__main__":
  sys.exit(main())
