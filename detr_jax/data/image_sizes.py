"""The official image sizes in pixels (`datasets/coco.py`, make_coco_transforms), before `data.scale`.

Without TensorFlow, so that porting and export read the same numbers as the TF transforms.
"""

EVAL_SHORTER_SIDE = 800   # the validation resize: shorter side 800 ...
MAX_SIDE = 1333           # ... longer side at most 1333, in training and validation


def scaled(pixels: int, scale: float) -> int:
  """`pixels` times the run's `data.scale`, rounded to the nearest integer (1.0 = the paper's sizes)."""
  return int(round(pixels * scale))


def round_up(pixels, multiple: int):
  """`pixels` rounded up to a multiple of `multiple` (a padded side); an int, or an integer array or
  tf.Tensor of sides (the input pipeline pads its batches with it), of the same type."""
  return -(-pixels // multiple) * multiple
