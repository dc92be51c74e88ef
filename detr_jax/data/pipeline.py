"""The tf.data input pipeline: sources, official transforms, padding buckets, sharding.

A batch (per host) is a dict of numpy arrays:
  image [b, H, W, 3] float32 (ImageNet-normalised, zero padding), pixel_mask [b, H, W] bool
  (True on real pixels), labels [b, T] int32 (category ids), boxes [b, T, 4] float32 cxcywh
  normalised to the unpadded image, target_valid [b, T] bool (real targets), image_id [b] int64,
  orig_size [b, 2] int32 (height, width of the original image), size [b, 2] int32 (unpadded
  height, width after resizing), image_valid [b] bool (False on eval padding examples); from
  panoptic records also segment_masks [b, T, H, W] bool (each target's segment, zero padding).
H and W come from a small set of shapes (multiples of `pad_multiple`, or `fixed_size`), so XLA
compiles a handful of programs.

Training order is a pure function of (seed, step) and does not depend on the process count:
epoch e visits a stateless permutation of the split, cut into global batches; process p reads
the p-th slice of each global batch, and the element at global position g is augmented with a
seed folded from (seed, g). One process on 4 devices and two processes on 2 devices each
therefore train on the same global batches. Resuming at step s skips s * global batch indices
before any image is read, and yields the same batches as an uninterrupted run.
"""

import collections
import dataclasses
import math
from typing import Optional

import jax
import numpy as np
import tensorflow as tf

from detr_jax import extras, system
from detr_jax.data import coco, coco_categories, coco_panoptic, image_sizes, transforms


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
  """Transform and batching options (the `config.data` fields of the same names).

  scale: multiplies every image size of the official recipe (1.0 = 800/1333); tests and CPU
    runs use e.g. 0.25 through the same code.
  augment: the official training augmentation; False trains on the eval resize (overfit checks).
  max_boxes: targets per image after padding (extra boxes are dropped).
  pad_multiple: batches are padded to multiples of this in H and W; ignored with fixed_size.
  fixed_size: (H, W) every batch is padded to; an image larger than it raises.
  keep_empty_train: keep training images without annotations (the official code does).
  """

  scale: float = 1.0
  augment: bool = True
  max_boxes: int = 100
  pad_multiple: int = 128
  fixed_size: Optional[tuple] = None
  keep_empty_train: bool = True

  @classmethod
  def from_config(cls, data_config) -> "PipelineOptions":
    """The options among `config.data`'s fields; other fields (paths, splits) are ignored."""
    fields = {f.name for f in dataclasses.fields(cls)}
    options = {k: v for k, v in dict(data_config).items() if k in fields}
    if options.get("fixed_size") is not None:
      options["fixed_size"] = tuple(options["fixed_size"])
    return cls(**options)


def decode_image(path):
  """Reads a JPEG/PNG (RGB, grayscale, CMYK or RGBA) as [H, W, 3] float32 in [0, 255].

  JPEGs are decoded with the accurate integer IDCT, which gives PIL's pixels (the official code
  reads images with PIL); TF's default fast IDCT is off by up to 23 grey levels on COCO images.
  """
  contents = tf.io.read_file(path)
  image = tf.cond(tf.io.is_jpeg(contents),
                  lambda: tf.io.decode_jpeg(contents, channels=3, dct_method="INTEGER_ACCURATE"),
                  lambda: tf.io.decode_image(contents, channels=3, expand_animations=False))
  return tf.cast(image, tf.float32)


def coco_folder_examples(records: coco.CocoRecords):
  """A function index -> decoded example {"image", "boxes" (xyxy px), "labels", "image_id", "orig_size"}.

  As in the official `ConvertCocoPolysToMask`, the boxes are clipped to the decoded image, boxes
  left with no area are dropped, and orig_size is the decoded (height, width): the json's sizes
  (`records.sizes`) may be wrong, which `python -m detr_jax.data.check` reports.
  """
  paths = tf.constant(records.paths)
  image_ids = tf.constant(records.image_ids)
  boxes = tf.RaggedTensor.from_row_lengths(records.boxes, records.row_lengths)
  labels = tf.RaggedTensor.from_row_lengths(records.labels, records.row_lengths)

  def example(index):
    image = decode_image(paths[index])
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    clipped = tf.clip_by_value(boxes[index], 0.0, tf.cast(tf.stack([width, height, width, height]), tf.float32))
    keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    return {"image": image, "boxes": tf.boolean_mask(clipped, keep), "labels": tf.boolean_mask(labels[index], keep),
            "image_id": image_ids[index], "orig_size": tf.stack([height, width])}

  return example


def panoptic_examples(records: coco_panoptic.PanopticRecords):
  """A function index -> {"image", "segment_masks" [N, H, W] bool, "boxes" xyxy px (of the masks), "labels",
  "image_id", "orig_size"} for a COCO panoptic split."""
  paths, png_paths = tf.constant(records.paths), tf.constant(records.png_paths)
  image_ids, sizes = tf.constant(records.image_ids), tf.constant(records.sizes)
  segment_ids = tf.RaggedTensor.from_row_lengths(records.segment_ids, records.row_lengths)
  labels = tf.RaggedTensor.from_row_lengths(records.labels, records.row_lengths)

  def example(index):
    masks = tf.equal(coco_panoptic.read_segment_ids(png_paths[index])[None], segment_ids[index][:, None, None])
    return {"image": decode_image(paths[index]), "segment_masks": masks, "boxes": coco_panoptic.masks_to_boxes(masks),
            "labels": labels[index], "image_id": image_ids[index], "orig_size": sizes[index]}

  return example


def _example_loader(records):
  if isinstance(records, coco_panoptic.PanopticRecords):
    return panoptic_examples(records)
  return coco_folder_examples(records)


def tfds_examples(split: str, data_dir: Optional[str], process_index: int, process_count: int,
                  shuffle_seed: Optional[int] = None):
  """tfds `coco/2017` mapped to the same example format (category ids, not tfds's 0..79 labels).

  tfds boxes are normalised (ymin, xmin, ymax, xmax); crowd boxes and boxes without area are
  dropped as in the COCO-folder source. Each process reads its part of `tfds.even_splits(split, process_count)`.
  """
  tfds = extras.require("tensorflow_datasets", "config.data.source='tfds'", "tfds")
  process_split = tfds.even_splits(split, n=process_count, drop_remainder=True)[process_index]
  read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed)
  dataset = tfds.load("coco/2017", split=process_split, data_dir=data_dir, shuffle_files=shuffle_seed is not None,
                      read_config=read_config)
  category_ids = tf.constant([i for i, _ in coco_categories.THINGS], tf.int32)

  def convert(element):
    image = tf.cast(element["image"], tf.float32)
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    objects = element["objects"]
    ymin, xmin, ymax, xmax = tf.unstack(objects["bbox"], axis=-1)
    scale = tf.cast(tf.stack([width, height, width, height]), tf.float32)
    boxes = tf.stack([xmin, ymin, xmax, ymax], axis=-1) * scale
    keep = ~objects["is_crowd"] & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return {"image": image, "boxes": tf.boolean_mask(boxes, keep),
            "labels": tf.boolean_mask(tf.gather(category_ids, tf.cast(objects["label"], tf.int32)), keep),
            "image_id": tf.cast(element["image/id"], tf.int64), "orig_size": tf.stack([height, width])}

  return dataset.map(convert, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _finish_example(example, max_boxes):
  example = transforms.normalize(example)
  num = tf.minimum(tf.shape(example["labels"])[0], max_boxes)
  pad = max_boxes - num
  image = example["image"]
  finished = {
      "image": image,
      "pixel_mask": tf.ones(tf.shape(image)[:2], tf.bool),
      "labels": tf.pad(example["labels"][:num], [[0, pad]]),
      "boxes": tf.pad(example["boxes"][:num], [[0, pad], [0, 0]]),
      "target_valid": tf.sequence_mask(num, max_boxes),
      "image_id": example["image_id"],
      "orig_size": tf.cast(example["orig_size"], tf.int32),
      "size": tf.cast(example["size"], tf.int32),
      "image_valid": tf.constant(True),
  }
  if "segment_masks" in example:
    finished["segment_masks"] = tf.pad(example["segment_masks"][:num], [[0, pad], [0, 0], [0, 0]])
  return finished


def _pad_batch(batch, options: PipelineOptions):
  height, width = tf.shape(batch["image"])[1], tf.shape(batch["image"])[2]
  if options.fixed_size is not None:
    target_h, target_w = options.fixed_size
    tf.debugging.assert_less_equal(tf.stack([height, width]), tf.constant([target_h, target_w]),
                                   message="an image is larger than data.fixed_size")
  else:
    target_h = image_sizes.round_up(height, options.pad_multiple)
    target_w = image_sizes.round_up(width, options.pad_multiple)
  extra = [[0, 0], [0, target_h - height], [0, target_w - width]]
  padded = {**batch, "image": tf.pad(batch["image"], extra + [[0, 0]]), "pixel_mask": tf.pad(batch["pixel_mask"], extra)}
  if "segment_masks" in batch:
    padded["segment_masks"] = tf.pad(batch["segment_masks"], [[0, 0], [0, 0], *extra[1:]])
  return padded


def _batch(dataset, batch_size, options: PipelineOptions):
  dataset = dataset.padded_batch(batch_size, drop_remainder=True)
  dataset = dataset.map(lambda b: _pad_batch(b, options), num_parallel_calls=tf.data.AUTOTUNE)
  return dataset.prefetch(tf.data.AUTOTUNE)


def _process():
  return jax.process_index(), jax.process_count()


def _parallel_map(dataset, fn):
  return dataset.map(fn, num_parallel_calls=system.available_cores(), deterministic=True)


def _train_example(seed: int, options: PipelineOptions):
  """(global position in the training stream, example) -> augmented, padded training example.

  The augmentation seed is folded from (seed, global position), so it depends on where the
  example falls in the global stream, never on timing, the source or the process count.
  With `options.augment` False the eval resize is used instead (for overfitting checks).
  """
  base_seed = tf.constant([seed, 0], tf.int64)

  def apply(position, example):
    if not options.augment:
      return _eval_example(example, options)
    augment_seed = tf.random.experimental.stateless_fold_in(base_seed, position)
    return _finish_example(transforms.train_augment(example, augment_seed, options.scale), options.max_boxes)

  return apply


def _this_process_slice(dataset, batch_size, process_index, process_count):
  """Keeps the elements (global position, ...) in this process's slice of each global batch."""
  return dataset.filter(lambda position, *_: position // batch_size % process_count == process_index)


def _eval_example(example, options: PipelineOptions):
  return _finish_example(transforms.eval_resize(example, options.scale), options.max_boxes)


def train_dataset(records: coco.CocoRecords, batch_size: int, seed: int, options: PipelineOptions,
                  start_step: int = 0, process: Optional[tuple] = None) -> tf.data.Dataset:
  """Endless training batches of `batch_size` (per process) from a COCO-folder split.

  Args:
    records: from `coco.load_coco_folder`, or `coco_panoptic.load_panoptic_folder` (batches then
      also hold "segment_masks" [b, T, H, W] bool, augmented with the images).
    batch_size: examples per process per step.
    seed: the run's seed; with `start_step` it fixes every batch. Each epoch is a fresh
      permutation, cut to a whole number of global batches (the tail is dropped).
    start_step: steps already taken (resume); skipped without reading images.
    process: (process_index, process_count), default from jax.
  Returns:
    a tf.data.Dataset of batches in the format of this module's docstring.
  Raises:
    ValueError: the split has fewer images than a global batch (batch_size x process count).
  """
  process_index, process_count = process or _process()
  num = len(records)
  global_batch = batch_size * process_count
  if num < global_batch:
    raise ValueError(f"{num} training images cannot fill a global batch of {global_batch} "
                     f"({batch_size} per process x {process_count} processes).")
  epoch_length = num // global_batch * global_batch

  def epoch_indices(epoch):
    order = tf.random.experimental.stateless_shuffle(tf.range(num, dtype=tf.int64),
                                                     seed=tf.stack([tf.constant(seed, tf.int64), epoch]))
    return tf.data.Dataset.from_tensor_slices(order[:epoch_length])

  indices = tf.data.Dataset.range(2**62).flat_map(epoch_indices).enumerate().skip(start_step * global_batch)
  indices = _this_process_slice(indices, batch_size, process_index, process_count)
  load = _example_loader(records)
  augment = _train_example(seed, options)
  dataset = _parallel_map(indices, lambda position, index: augment(position, load(index)))
  return _batch(dataset.ignore_errors(log_warning=True), batch_size, options)


def eval_dataset(records: coco.CocoRecords, batch_size: int, options: PipelineOptions,
                 process: Optional[tuple] = None, max_images: Optional[int] = None,
                 keep_segment_masks: bool = False) -> tf.data.Dataset:
  """One pass over the split in id order, each process taking every process_count-th image.

  Every process yields the same number of batches: the tail is filled with copies marked
  image_valid=False, which evaluation must drop. Panoptic records give "segment_masks" only with
  `keep_segment_masks`: evaluation does not need them, and at full size they are [T, H, W] per image.
  """
  process_index, process_count = process or _process()
  num = len(records) if max_images is None else min(max_images, len(records))
  per_process = math.ceil(math.ceil(num / process_count) / batch_size) * batch_size
  positions = np.arange(per_process) * process_count + process_index
  indices = tf.data.Dataset.from_tensor_slices((np.minimum(positions, num - 1), positions < num))
  load = _example_loader(records)

  def example(index, real):
    loaded = load(index)
    if not keep_segment_masks:
      loaded.pop("segment_masks", None)
    return {**_eval_example(loaded, options), "image_valid": real}

  return _batch(_parallel_map(indices, example), batch_size, options)


def tfds_dataset(split: str, batch_size: int, seed: int, options: PipelineOptions, train: bool,
                 data_dir: Optional[str] = None, start_step: int = 0, process: Optional[tuple] = None):
  """Batches from tfds `coco/2017` (a TFDS data dir or GCS bucket), same format as the folder source.

  Training shuffles files and examples with `seed` and repeats; resuming skips
  start_step * batch_size examples (read, then dropped: slower than the folder source).
  """
  process_index, process_count = process or _process()
  dataset = tfds_examples(split, data_dir, process_index, process_count, shuffle_seed=seed if train else None)
  if not train:
    return _batch(_parallel_map(dataset, lambda e: _eval_example(e, options)), batch_size, options)
  dataset = dataset.shuffle(1024, seed=seed, reshuffle_each_iteration=True).repeat().enumerate()
  # Each process reads its own tfds shard, so positions are made global as process slices.
  dataset = dataset.map(lambda k, e: (k // batch_size * batch_size * process_count
                                      + process_index * batch_size + k % batch_size, e))
  dataset = _parallel_map(dataset.skip(start_step * batch_size), _train_example(seed, options))
  return _batch(dataset, batch_size, options)


def _pad_to_common_shape(batch: dict) -> dict:
  """Pads image and pixel_mask to the largest (H, W) over all processes, which must agree."""
  from jax.experimental import multihost_utils
  shape = np.array(batch["image"].shape[1:3])
  height, width = np.asarray(multihost_utils.process_allgather(shape)).max(axis=0)
  extra = [(0, 0), (0, height - shape[0]), (0, width - shape[1])]
  padded = {**batch, "image": np.pad(batch["image"], extra + [(0, 0)]), "pixel_mask": np.pad(batch["pixel_mask"], extra)}
  if "segment_masks" in batch:
    padded["segment_masks"] = np.pad(batch["segment_masks"], [(0, 0), *extra])
  return padded


def to_global_batch(batch: dict, sharding) -> dict:
  """Per-process numpy batch -> global jax.Arrays sharded over the mesh's data axis.

  `sharding` is e.g. `detr_jax.sharding.batch_sharding(mesh)`; the global batch is the
  concatenation of every process's batch in process order. With several processes, images are
  first padded to the largest padded shape among them, since a global array has one shape.
  """
  if jax.process_count() > 1:
    batch = _pad_to_common_shape(batch)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def prefetch_to_mesh(dataset: tf.data.Dataset, sharding, size: int = 2):
  """Iterates global batches, keeping `size` batches already transferred to the devices."""
  queue = collections.deque()
  for batch in dataset.as_numpy_iterator():
    queue.append(to_global_batch(batch, sharding))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()

