r"""Serving speed: images/s of `inference.Predictor`, the reloaded `jax.export` artefact and the TensorFlow
SavedModel (`detr_jax.export`) against transformers' `pipeline("object-detection")`, same weights, same images.

DETR-R50 with random weights (transformers' model, ported), real coco-mini val images (landscape, so
that one exported H x W holds them all: 800 x 1344 at scale 1; with --buckets, the artefacts are
exported at each image's eval-resize size rounded up to 32, and the Predictor pads to multiples of 32
as well, so that no path pads far beyond the image), one image per call, everything from
the file or uint8 array to the detections (decoding, resizing, normalisation, post-processing
included), in one process, the four alternating. Prints images/s of each and the ratio to the pipeline.

  python benchmarks/serving.py [--images 4] [--iters 3] [--scale 1.0] [--model detr|deformable] [--buckets]
"""

import argparse
import json
import os
import sys
import tempfile

import jax
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks.timing import interleaved_median_seconds  # noqa: E402
from detr_jax import export, families, inference, porting, system  # noqa: E402
from detr_jax.data import coco_categories, image_sizes  # noqa: E402
from detr_jax.data import pipeline as pipeline_lib  # noqa: E402
from references.coco_mini import COCO_MINI  # noqa: E402
from references.transformers_deformable_detr import hf_deformable_detr  # noqa: E402
from references.transformers_detr import hf_detr  # noqa: E402

REFERENCES = {"detr": lambda: hf_detr(50), "deformable": lambda: hf_deformable_detr(with_box_refine=True)}


def landscape_images(count: int) -> list[str]:
  """The first `count` landscape coco-mini val images (width > height), by file name."""
  folder = COCO_MINI / "val2017"
  paths = []
  for name in sorted(os.listdir(folder)):
    with Image.open(folder / name) as image:
      if image.width > image.height:
        paths.append(str(folder / name))
    if len(paths) == count:
      return paths
  raise SystemExit(f"{folder} has fewer than {count} landscape images.")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--images", type=int, default=4)
  parser.add_argument("--iters", type=int, default=3)
  parser.add_argument("--scale", type=float, default=1.0)
  parser.add_argument("--model", choices=sorted(REFERENCES), default="detr")
  parser.add_argument("--buckets", action="store_true", help="export one size per image, pad to multiples of 32")
  args = parser.parse_args()
  system.retain_freed_host_memory()
  from transformers import pipeline
  import tensorflow as tf

  reference = REFERENCES[args.model]()
  model, variables = porting.load_pytorch_checkpoint(reference.state_dict())
  categories = coco_categories.coco_categories(model.num_classes)
  workdir = tempfile.mkdtemp()
  checkpoint, export_dir, hf_dir = (os.path.join(workdir, name) for name in ("checkpoint", "export", "hf"))
  families.save_model_dir(checkpoint, model, variables, categories)
  with open(os.path.join(checkpoint, "config.json"), "w") as f:
    json.dump({"data": {"scale": args.scale}}, f)
  paths = landscape_images(args.images)
  arrays = [np.asarray(Image.open(path).convert("RGB")) for path in paths]
  options = pipeline_lib.PipelineOptions(scale=args.scale, pad_multiple=32 if args.buckets else 128)
  predictor = inference.Predictor.from_checkpoint(checkpoint, threshold=0.0, options=options)
  if args.buckets:
    sizes = export.padded_sizes([predictor.padded_shape(predictor.preprocess(path)["size"]) for path in paths])
  else:
    sizes = [(image_sizes.round_up(image_sizes.scaled(image_sizes.EVAL_SHORTER_SIDE, args.scale), 32),
              export.default_size(args.scale))]
  serving_config = export.export_checkpoint(checkpoint, export_dir, buckets=sizes)
  families.of_model(model).save_hf_pretrained(model, variables, hf_dir, categories=categories, scale=args.scale)

  exported = {}
  for bucket in serving_config["buckets"]:
    with open(os.path.join(export_dir, bucket["file"]), "rb") as f:
      exported[bucket["height"], bucket["width"]] = jax.export.deserialize(f.read())
  saved_model = tf.saved_model.load(os.path.join(export_dir, export.SAVED_MODEL_DIR)).signatures["serving_default"]
  hf_pipeline = pipeline("object-detection", model=hf_dir, device="cpu")

  def run_exported(path):
    example = predictor.preprocess(path)
    rows, cols = example["image"].shape[:2]
    height, width = next((h, w) for h, w in exported if h >= rows and w >= cols)   # sorted by area
    image = np.zeros((1, height, width, 3), np.float32)
    mask = np.zeros((1, height, width), bool)
    image[0, :rows, :cols], mask[0, :rows, :cols] = example["image"], True
    return jax.block_until_ready(exported[height, width].call(image, mask, example["orig_size"][None]))

  runs = {
      "Predictor": lambda: [predictor.predict([path]) for path in paths],
      "jax.export": lambda: [run_exported(path) for path in paths],
      "SavedModel": lambda: [saved_model(images=tf.constant(array[None])) for array in arrays],
      "HF pipeline": lambda: [hf_pipeline(Image.open(path), threshold=0.0) for path in paths],
  }
  seconds = interleaved_median_seconds(list(runs.values()), args.iters)
  per_second = {name: len(paths) / s for name, s in zip(runs, seconds)}
  print(f"JAX {jax.__version__} on {jax.devices()[0].device_kind}; torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads; {families.describe(model)}; {len(paths)} coco-mini val images, "
        f"scale {args.scale}, export {' '.join(f'{h}x{w}' for h, w in exported)}, Predictor pad_multiple "
        f"{options.pad_multiple}; median of {args.iters} alternating rounds")
  print(f"{'path':>12} {'images/s':>9} {'x pipeline':>11}")
  for name, rate in per_second.items():
    print(f"{name:>12} {rate:9.3f} {rate / per_second['HF pipeline']:11.2f}")


if __name__ == "__main__":
  main()
