"""COCO panoptic folders (official `datasets/coco_panoptic.py`).

Layout: `annotations/panoptic_{split}.json`, `annotations/panoptic_{split}/*.png` (segment ids
RGB-encoded: id = R + 256 G + 256^2 B, 0 = unlabelled) and `{split}/*.jpg`. Each segment of
`segments_info` becomes a mask, its category id a label, and its box the tight xyxy box of the
mask (official `masks_to_boxes`). Crowd segments are kept, as in the official loader.
"""

import dataclasses
import glob
import json
import os

import numpy as np
import tensorflow as tf

from detr_jax.data import coco


@dataclasses.dataclass
class PanopticRecords:
  """One split, columnar: paths [N], png_paths [N], image_ids [N] int64, sizes [N, 2] (height,
  width); segment_ids [M] int32 and labels [M] int32 for all segments, with row_lengths [N];
  categories {id: {"name", "isthing"}}; skipped: what was left out and why."""

  paths: np.ndarray
  png_paths: np.ndarray
  image_ids: np.ndarray
  sizes: np.ndarray
  segment_ids: np.ndarray
  labels: np.ndarray
  row_lengths: np.ndarray
  categories: dict
  skipped: coco.SkipReport

  def __len__(self) -> int:
    return len(self.paths)

  @property
  def num_classes(self) -> int:
    """Classifier slots to configure: max category id + 1."""
    return max(self.categories) + 1

  def first(self, count: int) -> "PanopticRecords":
    """The first `count` images (in id order) with their segments."""
    num_segments = int(self.row_lengths[:count].sum())
    return dataclasses.replace(self, paths=self.paths[:count], png_paths=self.png_paths[:count],
                               image_ids=self.image_ids[:count], sizes=self.sizes[:count],
                               segment_ids=self.segment_ids[:num_segments], labels=self.labels[:num_segments],
                               row_lengths=self.row_lengths[:count])

  @property
  def thing_ids(self) -> set:
    return {i for i, c in self.categories.items() if c["isthing"]}


def annotation_path(data_dir: str, split: str) -> str:
  """The panoptic json of a split: `data_dir/annotations/panoptic_{split}.json`."""
  return os.path.join(data_dir, "annotations", f"panoptic_{split}.json")


def available_splits(data_dir: str) -> list:
  """The splits that have a panoptic json in `data_dir/annotations`, sorted, e.g. ["train2017", "val2017"]."""
  paths = glob.glob(annotation_path(data_dir, "*"))
  return sorted(os.path.basename(path)[len("panoptic_"):-len(".json")] for path in paths)


def png_folder(data_dir: str, split: str) -> str:
  """The segment PNGs of a split: `data_dir/annotations/panoptic_{split}/`."""
  return os.path.join(data_dir, "annotations", f"panoptic_{split}")


def load_panoptic_folder(data_dir: str, split: str = "train2017") -> PanopticRecords:
  """Reads and validates a COCO panoptic split.

  Raises:
    coco.DatasetError: the json, the PNG folder or the image folder is missing, or the json is
      unreadable or lists no annotations or categories.
  Images or PNGs that are missing, empty or not images are skipped and counted by file name.
  """
  ann_path = annotation_path(data_dir, split)
  png_dir = png_folder(data_dir, split)
  image_dir = os.path.join(data_dir, split)
  for path, isdir in ((ann_path, False), (png_dir, True), (image_dir, True)):
    if not (os.path.isdir(path) if isdir else os.path.isfile(path)):
      raise coco.DatasetError(f"{path} does not exist.")
  try:
    with open(ann_path) as f:
      data = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise coco.DatasetError(f"{ann_path} is not valid JSON ({error}).") from error
  if not data.get("annotations") or not data.get("categories"):
    raise coco.DatasetError(f"{ann_path} lists no annotations or no categories.")

  images = {image["id"]: image for image in data.get("images", [])}
  skipped = coco.SkipReport()
  columns = {k: [] for k in ("paths", "png_paths", "image_ids", "sizes", "segment_ids", "labels", "row_lengths")}
  for ann in sorted(data["annotations"], key=lambda a: a["image_id"]):
    image = images.get(ann["image_id"])
    if image is None:
      skipped.add("annotation of an image absent from `images`", ann["image_id"])
      continue
    path, png_path = os.path.join(image_dir, image["file_name"]), os.path.join(png_dir, ann["file_name"])
    problem = coco.image_problem(path) or coco.image_problem(png_path)
    if problem:
      skipped.add(problem, f"{image['file_name']} / {ann['file_name']}")
      continue
    segments = ann["segments_info"]
    columns["paths"].append(path)
    columns["png_paths"].append(png_path)
    columns["image_ids"].append(image["id"])
    columns["sizes"].append((image["height"], image["width"]))
    columns["segment_ids"].extend(s["id"] for s in segments)
    columns["labels"].extend(s["category_id"] for s in segments)
    columns["row_lengths"].append(len(segments))
  if not columns["paths"]:
    raise coco.DatasetError(f"No usable images in {image_dir}:\n{skipped.summary()}")
  return PanopticRecords(
      paths=np.array(columns["paths"]), png_paths=np.array(columns["png_paths"]),
      image_ids=np.array(columns["image_ids"], np.int64), sizes=np.array(columns["sizes"], np.int32),
      segment_ids=np.array(columns["segment_ids"], np.int32), labels=np.array(columns["labels"], np.int32),
      row_lengths=np.array(columns["row_lengths"], np.int64),
      categories={c["id"]: {"name": c["name"], "isthing": bool(c["isthing"])} for c in data["categories"]},
      skipped=skipped)


def rgb_to_id(rgb):
  """[..., 3] panoptic PNG pixels, already cast to a wide integer type (numpy or TF) -> [...]
  segment ids: R + 256 G + 256^2 B (panopticapi's `rgb2id`)."""
  return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
  """[...] segment ids -> [..., 3] uint8 PNG pixels (panopticapi's `id2rgb`, inverse of rgb_to_id)."""
  ids = ids.astype(np.int64)
  return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], axis=-1).astype(np.uint8)


def read_segment_ids(png_path):
  """A panoptic PNG (path string or string tensor) -> [H, W] int32 segment ids, as a TF tensor.

  Works eagerly (`.numpy()` for numpy) and inside tf.data maps.
  """
  return rgb_to_id(tf.cast(tf.io.decode_png(tf.io.read_file(png_path), channels=3), tf.int32))


def masks_to_boxes(masks):
  """[N, H, W] bool -> [N, 4] float32 xyxy: min and max pixel index (official `masks_to_boxes`)."""
  def extent(axis_any, size):
    index = tf.range(size, dtype=tf.float32)
    low = tf.reduce_min(tf.where(axis_any, index, 1e8), axis=-1)
    high = tf.reduce_max(tf.where(axis_any, index, 0.0), axis=-1)
    return low, high
  x0, x1 = extent(tf.reduce_any(masks, axis=1), tf.shape(masks)[2])
  y0, y1 = extent(tf.reduce_any(masks, axis=2), tf.shape(masks)[1])
  return tf.stack([x0, y0, x1, y1], axis=-1)

