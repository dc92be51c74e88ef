"""COCO-format datasets: `annotations/instances_{split}.json` plus the `{split}/` image folder.

Follows official `datasets/coco.py` (`ConvertCocoPolysToMask`): crowd boxes are dropped, boxes
are clipped to the image, and boxes with no area are dropped. Clipping needs the image's size,
which the official code takes from the decoded image, not from the json; so it happens in the
pipeline (`pipeline.coco_folder_examples`), and this module only drops what no image size can
save (boxes of zero or negative width or height). The class index is the category id, so
num_classes = max category id + 1 ("no object" is the index after it).

Problems are never silent: each skipped image or annotation is counted in a `SkipReport` under
its reason, named by its image id and file (and annotation id), and inputs that cannot be read
as a COCO split raise `DatasetError` with a one-line message naming the file.
"""

import collections
import dataclasses
import glob
import json
import logging
import math
import os

import numpy as np


class DatasetError(ValueError):
  """The dataset cannot be read at all; the message names the file."""


COCO_KEYS = ("images", "annotations", "categories")
IMAGE_KEYS = ("id", "file_name", "height", "width")
ANNOTATION_KEYS = ("id", "image_id", "category_id", "bbox")

IMAGE_WITHOUT_KEY = f"image without a required key ({', '.join(IMAGE_KEYS)})"
ANNOTATION_WITHOUT_KEY = f"annotation without a required key ({', '.join(ANNOTATION_KEYS)})"
ANNOTATION_OF_UNKNOWN_IMAGE = "annotation of an image id absent from images"
MALFORMED_BBOX = "bbox is not 4 finite numbers [x, y, width, height]"
UNKNOWN_CATEGORY = "category id absent from categories"
DEGENERATE_BOX = "degenerate box (zero or negative width or height)"

# Skip reasons that are mistakes in the dataset, as opposed to what the official code drops by design
# (crowd annotations, degenerate boxes, images without annotations); `python -m detr_jax.data.check`
# exits 1 on them.
ERROR_REASONS = frozenset({
    "missing image file", "empty or tiny image file", "truncated JPEG (no end-of-image marker)",
    "truncated PNG (no IEND chunk)", "not a JPEG or PNG file", IMAGE_WITHOUT_KEY, ANNOTATION_WITHOUT_KEY,
    ANNOTATION_OF_UNKNOWN_IMAGE, MALFORMED_BBOX, UNKNOWN_CATEGORY})


@dataclasses.dataclass
class SkipReport:
  """What was left out of a dataset, and why. `items` maps a reason to example names."""

  items: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(list))

  def add(self, reason: str, name) -> None:
    self.items[reason].append(name)

  def counts(self) -> dict:
    return {reason: len(names) for reason, names in sorted(self.items.items())}

  def errors(self) -> list:
    """[(reason, name)] of every item skipped for a reason in ERROR_REASONS, by reason."""
    return [(reason, name) for reason, names in sorted(self.items.items()) if reason in ERROR_REASONS
            for name in names]

  def count_line(self) -> str:
    """The counts on one line, e.g. "16 x crowd annotation; 1 x missing image file"."""
    return "; ".join(f"{count} x {reason}" for reason, count in self.counts().items())

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

  paths [N] str, image_ids [N] int64, sizes [N, 2] int32 (height, width as the json gives them;
  the pipeline uses the decoded image's, and `python -m detr_jax.data.check` compares the two);
  boxes [M, 4] float32 xyxy pixels, not yet clipped to the image, and labels [M] int32 for all
  kept annotations, with row_lengths [N] giving each image's share, in order.
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


def available_splits(data_dir: str) -> list:
  """The splits that have an instances json in `data_dir/annotations`, sorted, e.g. ["train2017", "val2017"]."""
  paths = glob.glob(annotation_path(data_dir, "*"))
  prefix, suffix = len("instances_"), len(".json")
  return sorted(os.path.basename(path)[prefix:-suffix] for path in paths)


def _missing_keys(item, keys) -> list:
  """The keys of `keys` that the parsed json `item` lacks; all of them when it is not an object."""
  return [key for key in keys if not isinstance(item, dict) or key not in item]


def _quoted(keys) -> str:
  return ", ".join(json.dumps(key) for key in keys)


def _read_instances_json(ann_path: str) -> dict:
  """The parsed instances json, checked to be a COCO object with images and categories.

  Raises:
    DatasetError: the file cannot be read or parsed, lacks "images", "annotations" or
      "categories" or has one that is not a list of objects, lists no images or no categories,
      or a category lacks "id" or "name".
  """
  try:
    with open(ann_path) as f:
      data = json.load(f)
  except OSError as error:
    raise DatasetError(f"{ann_path} cannot be read ({error.strerror}).") from error
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise DatasetError(f"{ann_path} is not valid JSON ({error}); is the file empty or truncated?") from error
  missing = _missing_keys(data, COCO_KEYS)
  if missing:
    raise DatasetError(f"{ann_path} is not a COCO instances file: it has no {_quoted(missing)}.")
  for key in COCO_KEYS:
    if not isinstance(data[key], list) or not all(isinstance(item, dict) for item in data[key]):
      raise DatasetError(f"{ann_path} is not a COCO instances file: {json.dumps(key)} is not a list of objects.")
  if not data["images"] or not data["categories"]:
    raise DatasetError(f"{ann_path} lists no images or no categories.")
  for index, category in enumerate(data["categories"]):
    missing = _missing_keys(category, ("id", "name"))
    if missing:
      raise DatasetError(f"{ann_path}: categories[{index}] has no {_quoted(missing)}.")
  return data


def _image_name(image: dict) -> str:
  """How skips name an image: "image 139 (000000000139.jpg)"."""
  return f"image {image.get('id', '(no id)')} ({image.get('file_name', 'no file_name')})"


def _is_xywh(bbox) -> bool:
  """Whether `bbox` is a list of 4 finite numbers (json booleans are not numbers)."""
  return (isinstance(bbox, list) and len(bbox) == 4
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox))


def _annotations_by_image(annotations: list, image_ids: set, skipped: SkipReport) -> dict:
  """{image id: [annotation]}; annotations without an image_id, or with one absent from `image_ids`, go
  to `skipped`."""
  by_image = collections.defaultdict(list)
  for annotation in annotations:
    if "image_id" not in annotation:
      skipped.add(ANNOTATION_WITHOUT_KEY, f"annotation {annotation.get('id', '(no id)')} has no \"image_id\"")
    elif annotation["image_id"] not in image_ids:
      skipped.add(ANNOTATION_OF_UNKNOWN_IMAGE,
                  f"annotation {annotation.get('id', '(no id)')} (image_id {annotation['image_id']})")
    else:
      by_image[annotation["image_id"]].append(annotation)
  return by_image


def _kept_annotation(annotation: dict, image_name: str, categories: dict, skipped: SkipReport):
  """(xyxy box [4] in pixels, category id) of a usable annotation of image `image_name`, or None
  after adding the reason to `skipped`."""
  name = f"annotation {annotation.get('id', '(no id)')} of {image_name}"
  missing = _missing_keys(annotation, ANNOTATION_KEYS)
  if missing:
    skipped.add(ANNOTATION_WITHOUT_KEY, f"{name} has no {_quoted(missing)}")
  elif annotation.get("iscrowd", 0):
    skipped.add("crowd annotation", name)
  elif annotation["category_id"] not in categories:
    skipped.add(UNKNOWN_CATEGORY, f"{name}, category {annotation['category_id']}")
  elif not _is_xywh(annotation["bbox"]):
    skipped.add(MALFORMED_BBOX, f"{name}, bbox {json.dumps(annotation['bbox'])}")
  elif annotation["bbox"][2] <= 0 or annotation["bbox"][3] <= 0:
    skipped.add(DEGENERATE_BOX, f"{name}, bbox {json.dumps(annotation['bbox'])}")
  else:
    x, y, w, h = annotation["bbox"]
    return [x, y, x + w, y + h], annotation["category_id"]
  return None


def load_coco_folder(data_dir: str, split: str = "val2017", keep_empty: bool = True) -> CocoRecords:
  """Reads and validates a COCO-format split.

  Args:
    data_dir: folder with `annotations/instances_{split}.json` and `{split}/`.
    split: e.g. "train2017", "val2017".
    keep_empty: keep images without (valid) annotations; True for eval, configurable for train.
  Returns:
    CocoRecords with every kept image and annotation; skips are in `.skipped`.
  Raises:
    DatasetError: the folder, the split's annotation file (the message lists the splits there
      are) or the image folder is missing; the json cannot be read or parsed, is not a COCO
      instances file (no "images", "annotations" or "categories"), lists no images or no
      categories; or no image is usable. Problems of single images and annotations (missing
      keys, files, categories, degenerate boxes) are not raised: they are skipped and counted in
      `.skipped`, and logged on one line.
  """
  if not os.path.isdir(data_dir):
    raise DatasetError(f"Dataset folder {data_dir!r} does not exist.")
  ann_path = annotation_path(data_dir, split)
  image_dir = os.path.join(data_dir, split)
  if not os.path.isfile(ann_path):
    splits = available_splits(data_dir)
    there = f"the splits there are {', '.join(splits)}" if splits else "there is no annotations/instances_*.json"
    raise DatasetError(f"Split {split!r} does not exist: no {ann_path}; {there}.")
  if not os.path.isdir(image_dir):
    raise DatasetError(f"Image folder {image_dir} does not exist.")
  data = _read_instances_json(ann_path)

  categories = {c["id"]: c["name"] for c in data["categories"]}
  skipped = SkipReport()
  complete_images = []
  for image in data["images"]:
    missing = _missing_keys(image, IMAGE_KEYS)
    if missing:
      skipped.add(IMAGE_WITHOUT_KEY, f"{_image_name(image)} has no {_quoted(missing)}")
    else:
      complete_images.append(image)
  listed_ids = {image["id"] for image in data["images"] if "id" in image}
  by_image = _annotations_by_image(data["annotations"], listed_ids, skipped)

  paths, image_ids, sizes, boxes, labels, row_lengths = [], [], [], [], [], []
  for image in sorted(complete_images, key=lambda im: im["id"]):
    image_name = _image_name(image)
    path = os.path.join(image_dir, image["file_name"])
    problem = image_problem(path)
    if problem:
      skipped.add(problem, image_name)
      continue
    kept = [box_label for ann in by_image.get(image["id"], [])
            if (box_label := _kept_annotation(ann, image_name, categories, skipped))]
    if not kept and not keep_empty:
      skipped.add("image without annotations", image_name)
      continue
    paths.append(path)
    image_ids.append(image["id"])
    sizes.append((image["height"], image["width"]))
    boxes.extend(b for b, _ in kept)
    labels.extend(l for _, l in kept)
    row_lengths.append(len(kept))
  if not paths:
    raise DatasetError(f"No usable images in {image_dir}:\n{skipped.summary()}")
  if skipped.items:
    # One line, cheap: the json-level checks run at every load; the decode pass is data.check's alone.
    log = logging.warning if skipped.errors() else logging.info
    log("%s/%s: skipped %s (python -m detr_jax.data.check %s --split %s names each)", data_dir, split,
        skipped.count_line(), data_dir, split)
  return CocoRecords(
      paths=np.array(paths), image_ids=np.array(image_ids, np.int64), sizes=np.array(sizes, np.int32),
      boxes=np.array(boxes, np.float32).reshape(-1, 4), labels=np.array(labels, np.int32),
      row_lengths=np.array(row_lengths, np.int64), categories=categories, skipped=skipped)
