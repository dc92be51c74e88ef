"""COCO-format datasets: `annotations/instances_{split}.json` plus the `{split}/` image folder.

Follows official `datasets/coco.py` (`ConvertCocoPolysToMask`): crowd boxes are dropped, boxes
are clipped to the image, and boxes with no area are dropped. The class index is the category
id, so num_classes = max category id + 1 ("no object" is the index after it).

Problems are never silent: each skipped image or annotation is counted in a `SkipReport` with
the file name or id, and unreadable inputs raise `DatasetError` naming the file.
"""

import collections
import dataclasses
import json
import logging
import os

import numpy as np


class DatasetError(ValueError):
  """The dataset cannot be read at all; the message names the file."""


@dataclasses.dataclass
class SkipReport:
  """What was left out of a dataset, and why. `items` maps a reason to example names."""

  items: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(list))

  def add(self, reason: str, name) -> None:
    self.items[reason].append(name)

  def counts(self) -> dict:
    return {reason: len(names) for reason, names in sorted(self.items.items())}

  def summary(self, max_names: int = 5) -> str:
    if not self.items:
      return "nothing skipped"
    lines = []
    for reason, names in sorted(self.items.items()):
      shown = ", ".join(str(n) for n in names[:max_names]) + (", ..." if len(names) > max_names else "")
      lines.append(f"{len(names)} x {reason}: {shown}")
    return "\n".join(lines)


@dataclasses.dataclass
class CocoRecords:
  """The examples of one split, columnar, ready for tf.data.

  paths [N] str, image_ids [N] int64, sizes [N, 2] int32 (height, width);
  boxes [M, 4] float32 xyxy pixels and labels [M] int32 for all kept annotations, with
  row_lengths [N] giving each image's share, in order.
  """

  paths: np.ndarray
  image_ids: np.ndarray
  sizes: np.ndarray
  boxes: np.ndarray
  labels: np.ndarray
  row_lengths: np.ndarray
  categories: dict
  skipped: SkipReport

  @property
  def num_classes(self) -> int:
    """Classifier slots to configure: max category id + 1."""
    return max(self.categories) + 1

  def __len__(self) -> int:
    return len(self.paths)

  def first(self, count: int) -> "CocoRecords":
    """The first `count` images (in id order) with their annotations."""
    num_boxes = int(self.row_lengths[:count].sum())
    return dataclasses.replace(self, paths=self.paths[:count], image_ids=self.image_ids[:count],
                               sizes=self.sizes[:count], boxes=self.boxes[:num_boxes],
                               labels=self.labels[:num_boxes], row_lengths=self.row_lengths[:count])


def image_problem(path: str):
  """Cheap header/trailer check. Returns a reason string, or None for a plausible JPEG/PNG.

  Catches missing, empty, non-image and truncated files without decoding them.
  """
  if not os.path.isfile(path):
    return "missing image file"
  size = os.path.getsize(path)
  if size < 16:
    return "empty or tiny image file"
  with open(path, "rb") as f:
    head = f.read(8)
    f.seek(max(size - 12, 0))
    tail = f.read()
  if head[:2] == b"\xff\xd8":
    # JPEG ends with the EOI marker; some encoders pad a few bytes after it.
    return None if b"\xff\xd9" in tail else "truncated JPEG (no end-of-image marker)"
  if head == b"\x89PNG\r\n\x1a\n":
    return None if b"IEND" in tail else "truncated PNG (no IEND chunk)"
  return "not a JPEG or PNG file"


def annotation_path(data_dir: str, split: str) -> str:
  """The instances json of a COCO-format split: `data_dir/annotations/instances_{split}.json`."""
  return os.path.join(data_dir, "annotations", f"instances_{split}.json")


def load_coco_folder(data_dir: str, split: str = "val2017", keep_empty: bool = True) -> CocoRecords:
  """Reads and validates a COCO-format split.

  Args:
    data_dir: folder with `annotations/instances_{split}.json` and `{split}/`.
    split: e.g. "train2017", "val2017".
    keep_empty: keep images without (valid) annotations; True for eval, configurable for train.
  Returns:
    CocoRecords with every kept image and annotation; skips are in `.skipped`.
  Raises:
    DatasetError: the folder, the annotation file or the image folder is missing, the json is
      empty or unparsable, or it lists no images or no categories.
  """
  if not os.path.isdir(data_dir):
    raise DatasetError(f"Dataset folder {data_dir!r} does not exist.")
  ann_path = annotation_path(data_dir, split)
  image_dir = os.path.join(data_dir, split)
  if not os.path.isfile(ann_path):
    raise DatasetError(f"Annotation file {ann_path} does not exist.")
  if not os.path.isdir(image_dir):
    raise DatasetError(f"Image folder {image_dir} does not exist.")
  try:
    with open(ann_path) as f:
      data = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise DatasetError(f"{ann_path} is not valid JSON ({error}); is the file empty or truncated?") from error
  if not isinstance(data, dict) or not data.get("images") or not data.get("categories"):
    raise DatasetError(f"{ann_path} lists no images or no categories.")

  categories = {c["id"]: c["name"] for c in data["categories"]}
  skipped = SkipReport()
  by_image = collections.defaultdict(list)
  for ann in data.get("annotations", []):
    by_image[ann["image_id"]].append(ann)

  paths, image_ids, sizes, boxes, labels, row_lengths = [], [], [], [], [], []
  for image in sorted(data["images"], key=lambda im: im["id"]):
    path = os.path.join(image_dir, image["file_name"])
    problem = image_problem(path)
    if problem:
      skipped.add(problem, image["file_name"])
      continue
    height, width = image["height"], image["width"]
    kept = []
    for ann in by_image.get(image["id"], []):
      if ann.get("iscrowd", 0):
        skipped.add("crowd annotation", ann["id"])
        continue
      if ann["category_id"] not in categories:
        skipped.add("category id absent from categories", f"annotation {ann['id']} (image {image['id']}, "
                    f"category {ann['category_id']})")
        continue
      x, y, w, h = ann["bbox"]
      box = np.clip([x, y, x + w, y + h], 0, [width, height, width, height])
      if box[2] <= box[0] or box[3] <= box[1]:
        skipped.add("degenerate box (no area after clipping)", ann["id"])
        continue
      kept.append((box, ann["category_id"]))
    if not kept and not keep_empty:
      skipped.add("image without annotations", image["file_name"])
      continue
    paths.append(path)
    image_ids.append(image["id"])
    sizes.append((height, width))
    boxes.extend(b for b, _ in kept)
    labels.extend(l for _, l in kept)
    row_lengths.append(len(kept))
  if not paths:
    raise DatasetError(f"No usable images in {image_dir}:\n{skipped.summary()}")
  for reason, count in skipped.counts().items():
    logging.info("%s/%s: skipped %d x %s", data_dir, split, count, reason)
  return CocoRecords(
      paths=np.array(paths), image_ids=np.array(image_ids, np.int64), sizes=np.array(sizes, np.int32),
      boxes=np.array(boxes, np.float32).reshape(-1, 4), labels=np.array(labels, np.int32),
      row_lengths=np.array(row_lengths, np.int64), categories=categories, skipped=skipped)
