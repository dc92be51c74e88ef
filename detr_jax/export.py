r"""Export for serving: a `jax.export` artefact (StableHLO) and a TensorFlow SavedModel, for every family.

Usage:
  python -m detr_jax.export CKPT OUT_DIR [--height H --width W | --buckets HxW ...] [--dtype bfloat16]
  (or detr-export)

CKPT is any checkpoint `families.load_model` reads. OUT_DIR gets, for one padded input size H x W:

  detector.jax_export   `jax.export` serialisation, batch dimension symbolic, for CPU, CUDA and TPU:
                        (images [b, H, W, 3] float32 ImageNet-normalised, zero-padded; pixel_mask [b, H, W]
                        bool, True on real pixels; original_sizes [b, 2] int32 (height, width))
                        -> (scores [b, N] float32, labels [b, N] int32 category ids, boxes [b, N, 4] float32
                        xyxy in original pixels): the family's official post-processing, no threshold.
                        Reload with `jax.export.deserialize(bytes).call(...)`; detr_jax is not needed.
  saved_model/          TensorFlow SavedModel (jax2tf, native serialisation), signature "serving_default":
                        images uint8 [b, h, w, 3] (one size per batch, any size whose eval resize fits H x W)
                        -> {"scores", "labels", "boxes"} as above; the resize (official eval transform times the
                        checkpoint's scale), normalisation and padding run inside, for TF Serving.
  serving_config.json   the sizes and their files ("buckets"), scale, dtype, family, N, the default score
                        threshold and the category names.

H x W defaults to a square that holds the eval resize of any image (the longest side, 1333 x scale,
rounded up to 32). `--buckets` exports several padded sizes instead (e.g. 800x1088 800x1344 1344x800 at
scale 1), so that an image is not padded far beyond its own size: one `detector_HxW.jax_export` per
size, and one SavedModel that pads each batch to the smallest size (by area) that holds its eval resize.
Mask models (DETR's panoptic model) are refused: their outputs are full-size masks and the panoptic
post-processing runs on the host. Errors end the command with one line and status 1.
"""

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from detr_jax import entry, system
from detr_jax.data import image_sizes

JAX_EXPORT_FILE = "detector.jax_export"                 # one size
BUCKET_EXPORT_FILE = "detector_{height}x{width}.jax_export"   # each size of --buckets
SAVED_MODEL_DIR = "saved_model"
SERVING_CONFIG_FILE = "serving_config.json"
PLATFORMS = ("cpu", "cuda", "tpu")


def serving_function(model):
  """(variables, images, pixel_mask, original_sizes) -> (scores, labels, boxes) of `model`, as the module
  docstring's detector.jax_export, scores and boxes in float32 whatever the compute dtype."""
  import jax.numpy as jnp
  from detr_jax import families
  detections = families.of_model(model).detections

  def detect(variables, images, pixel_mask, original_sizes):
    scores, labels, boxes = detections(model.apply(variables, images, pixel_mask), original_sizes)
    return scores.astype(jnp.float32), labels, boxes.astype(jnp.float32)

  return detect


def _input_specs(height: int, width: int):
  import jax
  import jax.numpy as jnp
  (batch,) = jax.export.symbolic_shape("b")
  return (jax.ShapeDtypeStruct((batch, height, width, 3), jnp.float32),
          jax.ShapeDtypeStruct((batch, height, width), jnp.bool_), jax.ShapeDtypeStruct((batch, 2), jnp.int32))


def export_jax(model, variables, height: int, width: int):
  """The `jax.export.Exported` of `serving_function` for H x W inputs, the variables embedded as constants."""
  import functools
  import jax
  from detr_jax.models import sampling_kernel
  detect = functools.partial(serving_function(model), jax.device_get(variables))
  with sampling_kernel.portable():   # the artefact runs elsewhere: no kernel of this process in it
    return jax.export.export(jax.jit(detect), platforms=PLATFORMS)(*_input_specs(height, width))


def saved_model_module(model, variables, sizes: Sequence[tuple[int, int]], scale: float):
  """A tf.Module whose `serve(images uint8 [b, h, w, 3])` is the SavedModel's signature (module docstring);
  the variables are tf.Variables, the detector a jax2tf conversion with a polymorphic batch, lowered once
  per padded size of `sizes` ((H, W) pairs, the smallest by area first, as `padded_sizes` orders them)."""
  import jax
  import numpy as np
  import tensorflow as tf
  from jax.experimental import jax2tf
  from detr_jax.data import transforms
  from detr_jax.models import sampling_kernel
  converted = tf.autograph.experimental.do_not_convert(jax2tf.convert(
      serving_function(model), polymorphic_shapes=[None, "(b, ...)", "(b, ...)", "(b, ...)"],
      with_gradient=False, native_serialization_platforms=PLATFORMS))

  class Detector(tf.Module):

    def __init__(self):
      super().__init__()
      self.variables_tree = jax.tree.map(lambda v: tf.Variable(np.asarray(v), trainable=False),
                                         jax.device_get(variables))

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
    def serve(self, images):
      example = transforms.normalize(transforms.eval_resize({"image": tf.cast(images, tf.float32)}, scale))
      resized_h, resized_w = example["size"][0], example["size"][1]
      fits = tf.logical_and(tf.constant([h for h, _ in sizes]) >= resized_h,
                            tf.constant([w for _, w in sizes]) >= resized_w)
      tf.debugging.assert_equal(tf.reduce_any(fits), True, message=(
          f"the resized images fit none of the exported sizes {' '.join(f'{h}x{w}' for h, w in sizes)}"))
      batch = tf.shape(images)[0]
      original_sizes = tf.tile(tf.shape(images, out_type=tf.int32)[1:3][None], [batch, 1])

      def detect_at(height, width):
        def detect():
          padding = [[0, 0], [0, height - resized_h], [0, width - resized_w]]
          # Static H x W for the converted function, whose only symbolic dimension is the batch.
          padded = tf.ensure_shape(tf.pad(example["image"], padding + [[0, 0]]), [None, height, width, 3])
          pixel_mask = tf.ensure_shape(tf.pad(tf.ones([batch, resized_h, resized_w], tf.bool), padding),
                                       [None, height, width])
          with sampling_kernel.portable():   # jax2tf lowers here, for TF Serving on any machine
            return converted(self.variables_tree, padded, pixel_mask, original_sizes)
        return detect

      first_fit = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
      scores, labels, boxes = tf.switch_case(first_fit, [detect_at(h, w) for h, w in sizes])
      return {"scores": scores, "labels": labels, "boxes": boxes}

  return Detector()


def default_size(scale: float) -> int:
  """The side of the square that holds any image's eval resize: round(1333 x scale), rounded up to 32."""
  return image_sizes.round_up(image_sizes.scaled(image_sizes.MAX_SIDE, scale), 32)


def padded_sizes(sizes: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
  """`sizes` ((H, W) pixel pairs) without repeats, the smallest area first, as the SavedModel tries them.

  Raises:
    ValueError: a side that is not a positive multiple of 32 (the backbone's stride).
  """
  for height, width in sizes:
    if height <= 0 or width <= 0 or height % 32 or width % 32:
      raise ValueError(f"padded size {height}x{width}: both sides must be positive multiples of 32 "
                       "(the backbone's stride).")
  return sorted(set(sizes), key=lambda size: (size[0] * size[1], size))


def export_checkpoint(checkpoint: str, out_dir: str, height: Optional[int] = None, width: Optional[int] = None,
                      dtype: Optional[str] = None, dilation: bool = False,
                      buckets: Optional[Sequence[tuple[int, int]]] = None) -> dict:
  """Writes the module docstring's OUT_DIR for `checkpoint`; returns serving_config.json's contents.

  Args:
    height, width: the padded input size (default `default_size` of the checkpoint's scale).
    dtype: the compute dtype ("float32", "bfloat16"); default the checkpoint's.
    buckets: several padded sizes (H, W) instead of height and width.
  Raises:
    FileNotFoundError, checkpoints.CheckpointMismatchError: see `families.load_model`.
    FileExistsError: OUT_DIR already holds an export.
    ValueError: a mask model, a size that is not a multiple of 32, buckets with height or width, an
      unknown dtype.
  """
  import tensorflow as tf
  from detr_jax import families, inference
  if os.path.exists(os.path.join(out_dir, JAX_EXPORT_FILE)) or os.path.exists(os.path.join(out_dir, SAVED_MODEL_DIR)):
    raise FileExistsError(f"{out_dir} already holds an export; choose an empty directory.")
  if buckets and (height or width):
    raise ValueError("--buckets gives the padded sizes itself: leave out --height and --width.")
  requested = padded_sizes(buckets) if buckets else None   # checked before the checkpoint is read
  predictor = inference.Predictor.from_checkpoint(checkpoint, dilation=dilation)
  model, family = predictor.model, predictor.family
  if families.has_masks(model):
    raise ValueError(f"{checkpoint} is a mask model ({families.describe(model)}); export serves box detectors: "
                     "export the detector it was trained from.")
  if dtype:
    model = model.clone(dtype=dtype)
  scale = predictor.options.scale
  sizes = requested or padded_sizes([(height or default_size(scale), width or default_size(scale))])
  files = [BUCKET_EXPORT_FILE.format(height=h, width=w) if buckets else JAX_EXPORT_FILE for h, w in sizes]
  variables = predictor.variables
  exported = [export_jax(model, variables, h, w) for h, w in sizes]
  os.makedirs(out_dir, exist_ok=True)
  for name, artefact in zip(files, exported):
    with open(os.path.join(out_dir, name), "wb") as f:
      f.write(artefact.serialize())
  module = saved_model_module(model, variables, sizes, scale)
  tf.saved_model.save(module, os.path.join(out_dir, SAVED_MODEL_DIR), signatures={"serving_default": module.serve})
  serving_config = {"family": family.name, "model": families.describe(model),
                    "buckets": [{"height": h, "width": w, "file": name} for (h, w), name in zip(sizes, files)],
                    "scale": scale, "dtype": model.dtype, "num_detections": exported[0].out_avals[0].shape[1],
                    "score_threshold": predictor.threshold,
                    "categories": [{"id": i, "name": name} for i, name in sorted(predictor.names.items())]}
  with open(os.path.join(out_dir, SERVING_CONFIG_FILE), "w") as f:
    json.dump(serving_config, f, indent=1)
  return serving_config


def _size(text: str) -> tuple[int, int]:
  """argparse type of a --buckets entry: "HxW" -> (H, W)."""
  height, x, width = text.lower().partition("x")
  if not (x and height.isdigit() and width.isdigit()):
    raise argparse.ArgumentTypeError(f"{text!r} is not HxW (e.g. 800x1344)")
  return int(height), int(width)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """The `detr-export` command; returns 0, exits with 1 on a user mistake and 2 on a usage error."""
  parser = argparse.ArgumentParser(prog="detr-export", description=__doc__.split("\n")[0])
  parser.add_argument("checkpoint")
  parser.add_argument("out_dir")
  parser.add_argument("--height", type=int, default=None, help="padded input height (multiple of 32)")
  parser.add_argument("--width", type=int, default=None, help="padded input width (multiple of 32)")
  parser.add_argument("--buckets", type=_size, nargs="+", default=None, metavar="HxW",
                      help="several padded input sizes instead of --height/--width, e.g. 800x1088 800x1344")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="compute dtype")
  parser.add_argument("--dilation", action="store_true", help="a .pth checkpoint is DC5")
  args = parser.parse_args(argv)
  system.import_tensorflow_quietly()
  system.quiet_library_logs()
  with entry.user_errors():
    serving_config = export_checkpoint(args.checkpoint, args.out_dir, args.height, args.width, args.dtype,
                                       args.dilation, args.buckets)
  buckets = serving_config["buckets"]
  sizes = ", ".join(f"{b['height']} x {b['width']}" for b in buckets)
  files = ", ".join(os.path.join(args.out_dir, b["file"]) for b in buckets)
  print(f"Exported {serving_config['model']} at {sizes} to {files} and {os.path.join(args.out_dir, SAVED_MODEL_DIR)}")
  return 0


def run() -> None:
  sys.exit(main())


if __name__ == "__main__":
  run()
