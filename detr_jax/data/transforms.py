"""DETR's augmentations as TensorFlow ops (official `datasets/transforms.py` and `datasets/coco.py`).

An example is {"image": [H, W, 3] float32 in [0, 255], "boxes": [N, 4] float32 xyxy pixels,
"labels": [N] int32, ...}, and for panoptic data also "segment_masks": [N, H, W] bool, which every
geometric op transforms with the image (nearest resizing, as the official code). Inference examples
have an image only: `resize`, `eval_resize` and `normalize` also take a batch of equal-sized images
[B, H, W, 3] (the exported SavedModel's input). Randomness is
stateless: every op takes a [2] int32 seed, so the same (seed, element index) always gives the
same augmentation.
"""

import tensorflow as tf

from detr_jax.data.image_sizes import EVAL_SHORTER_SIDE, MAX_SIDE, scaled

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TRAIN_SCALES = tuple(range(480, 801, 32))


def target_size(height, width, size, max_size=None):
  """Official `get_size_with_aspect_ratio`: (new_h, new_w) with shorter side `size`, longer <= max_size.

  Python float64 arithmetic, round-half-even and truncation, reproduced in float64 TF ops.
  """
  h, w = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
  size = tf.cast(size, tf.float64)
  if max_size is not None:
    short, long = tf.minimum(h, w), tf.maximum(h, w)
    size = tf.where(long / short * size > max_size, tf.round(max_size * short / long), size)
  new_h = tf.where(w < h, tf.floor(size * h / w), size)
  new_w = tf.where(w < h, size, tf.floor(size * w / h))
  # Official returns the original size when the shorter side already equals `size`.
  keep = ((w <= h) & (w == size)) | ((h <= w) & (h == size))
  new_h, new_w = tf.where(keep, h, new_h), tf.where(keep, w, new_w)
  return tf.cast(new_h, tf.int32), tf.cast(new_w, tf.int32)


def resize(example, size, max_size=None):
  """Resizes the shorter side to `size` (bilinear, antialiased when shrinking) and scales the boxes (if any:
  inference examples have none)."""
  image = example["image"]
  height, width = tf.shape(image)[-3], tf.shape(image)[-2]
  new_h, new_w = target_size(height, width, size, max_size)
  resized = tf.image.resize(image, tf.stack([new_h, new_w]), method="bilinear", antialias=True)
  example = {**example, "image": resized}
  if "boxes" in example:
    ratio = tf.cast(tf.stack([new_w, new_h, new_w, new_h]), tf.float32) / tf.cast(
        tf.stack([width, height, width, height]), tf.float32)
    example["boxes"] = example["boxes"] * ratio
  if "segment_masks" in example:
    masks = tf.gather(example["segment_masks"], _legacy_nearest_indices(height, new_h), axis=1)
    example["segment_masks"] = tf.gather(masks, _legacy_nearest_indices(width, new_w), axis=2)
  return example


def _legacy_nearest_indices(in_size, out_size):
  """Source rows of PyTorch's `F.interpolate(mode="nearest")`: floor(dst * in / out) in float32."""
  scale = tf.cast(in_size, tf.float32) / tf.cast(out_size, tf.float32)
  indices = tf.cast(tf.floor(tf.cast(tf.range(out_size), tf.float32) * scale), tf.int32)
  return tf.minimum(indices, in_size - 1)


def random_resize(example, sizes, max_size, seed):
  """Official `RandomResize`: a shorter side drawn uniformly from `sizes`."""
  index = tf.random.stateless_uniform([], seed, 0, len(sizes), dtype=tf.int32)
  return resize(example, tf.gather(tf.constant(sizes), index), max_size)


def horizontal_flip(example):
  """Official `RandomHorizontalFlip`'s flip: mirrors the image; xyxy pixel boxes x -> width - x."""
  image = example["image"]
  width = tf.cast(tf.shape(image)[1], tf.float32)
  x0, y0, x1, y1 = tf.unstack(example["boxes"], axis=-1)
  flipped = {**example, "image": image[:, ::-1], "boxes": tf.stack([width - x1, y0, width - x0, y1], axis=-1)}
  if "segment_masks" in example:
    flipped["segment_masks"] = example["segment_masks"][:, :, ::-1]
  return flipped


def random_size_crop(example, min_size, max_size, seed):
  """Official `RandomSizeCrop`: a crop of random size in [min_size, min(side, max_size)], then
  boxes are shifted, clipped to the crop, and those left with no area are dropped."""
  image = example["image"]
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  seeds = tf.random.experimental.stateless_split(seed, 4)
  crop_w = _randint(seeds[0], min_size, tf.minimum(width, max_size))
  crop_h = _randint(seeds[1], min_size, tf.minimum(height, max_size))
  top = _randint(seeds[2], 0, height - crop_h)
  left = _randint(seeds[3], 0, width - crop_w)
  image = image[top:top + crop_h, left:left + crop_w]
  offset = tf.cast(tf.stack([left, top, left, top]), tf.float32)
  limit = tf.cast(tf.stack([crop_w, crop_h, crop_w, crop_h]), tf.float32)
  boxes = tf.clip_by_value(example["boxes"] - offset, 0.0, limit)
  keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
  cropped = {**example, "image": image, "boxes": tf.boolean_mask(boxes, keep),
             "labels": tf.boolean_mask(example["labels"], keep)}
  if "segment_masks" in example:
    cropped["segment_masks"] = tf.boolean_mask(example["segment_masks"][:, top:top + crop_h, left:left + crop_w], keep)
  return cropped


def _randint(seed, low, high):
  """Uniform integer in [low, high] inclusive (Python's random.randint)."""
  return tf.random.stateless_uniform([], seed, low, tf.maximum(high, low) + 1, dtype=tf.int32)


def train_augment(example, seed, scale: float = 1.0):
  """The official training augmentation, all sizes multiplied by `scale` (1.0 = the paper's).

  flip (p=0.5); then with p=0.5 either RandomResize(480..800 step 32, max 1333) or
  RandomResize({400, 500, 600}) -> RandomSizeCrop(384, 600) -> RandomResize(480..800, max 1333).
  """
  seeds = tf.random.experimental.stateless_split(seed, 6)
  sizes = tuple(scaled(s, scale) for s in TRAIN_SCALES)
  max_size = scaled(MAX_SIDE, scale)
  flip = tf.random.stateless_uniform([], seeds[0]) < 0.5
  example = tf.cond(flip, lambda: horizontal_flip(example), lambda: example)

  def plain():
    return random_resize(example, sizes, max_size, seeds[2])

  def crop():
    cropped = random_resize(example, tuple(scaled(s, scale) for s in (400, 500, 600)), None, seeds[3])
    cropped = random_size_crop(cropped, scaled(384, scale), scaled(600, scale), seeds[4])
    return random_resize(cropped, sizes, max_size, seeds[5])

  return tf.cond(tf.random.stateless_uniform([], seeds[1]) < 0.5, plain, crop)


def eval_resize(example, scale: float = 1.0):
  """Official validation transform: shorter side 800, longer at most 1333 (times `scale`)."""
  return resize(example, scaled(EVAL_SHORTER_SIDE, scale), scaled(MAX_SIDE, scale))


def normalize(example):
  """ImageNet mean/std on RGB/255; boxes (if any) become cxcywh normalised by the unpadded image size."""
  image = example["image"]
  height, width = tf.shape(image)[-3], tf.shape(image)[-2]
  normalized = {**example, "image": (image / 255.0 - tf.constant(IMAGENET_MEAN)) / tf.constant(IMAGENET_STD),
                "size": tf.stack([height, width])}
  if "boxes" in example:
    x0, y0, x1, y1 = tf.unstack(example["boxes"], axis=-1)
    cxcywh = tf.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)
    normalized["boxes"] = cxcywh / tf.cast(tf.stack([width, height, width, height]), tf.float32)
  return normalized
