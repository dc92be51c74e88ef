"""The real coco-mini data for tests and benchmarks: its folder, and real targets in the layouts
detr_jax and transformers take."""

import functools
import json
import os
import pathlib

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
COCO_MINI = pathlib.Path(os.environ.get("DETR_JAX_COCO_MINI", REPO_ROOT.parent / "shared" / "coco-mini"))


def coco_targets(coco_mini, image_ids, max_boxes=None):
  """Real targets of coco-mini train images, crowd boxes dropped, padded to `max_boxes`.

  Returns {"labels" [B, T] int32, "boxes" [B, T, 4] cxcywh normalised, "target_valid" [B, T] bool} and the
  unpadded per-image lists (labels, boxes) for reference implementations.
  """
  data = train_annotations(coco_mini)
  images = {image["id"]: image for image in data["images"]}
  per_image = {image_id: [] for image_id in image_ids}
  for ann in data["annotations"]:
    if ann["image_id"] in per_image and not ann["iscrowd"]:
      per_image[ann["image_id"]].append(ann)
  lists = []
  for image_id in image_ids:
    width, height = images[image_id]["width"], images[image_id]["height"]
    labels = np.array([a["category_id"] for a in per_image[image_id]], np.int32)
    boxes = np.array([[(x + w / 2) / width, (y + h / 2) / height, w / width, h / height]
                      for x, y, w, h in (a["bbox"] for a in per_image[image_id])], np.float32).reshape(-1, 4)
    lists.append((labels, boxes))
  max_boxes = max_boxes or max(len(l) for l, _ in lists)
  padded = {"labels": np.zeros((len(lists), max_boxes), np.int32),
            "boxes": np.zeros((len(lists), max_boxes, 4), np.float32),
            "target_valid": np.zeros((len(lists), max_boxes), bool)}
  for i, (labels, boxes) in enumerate(lists):
    padded["labels"][i, :len(labels)] = labels
    padded["boxes"][i, :len(labels)] = boxes
    padded["target_valid"][i, :len(labels)] = True
  return padded, lists


@functools.lru_cache(maxsize=None)
def train_annotations(coco_mini) -> dict:
  """coco-mini's instances_train2017.json, parsed once per session (callers must not mutate it)."""
  return json.loads((coco_mini / "annotations" / "instances_train2017.json").read_text())


def coco_train_image_ids(coco_mini, count, offset=0):
  return sorted(image["id"] for image in train_annotations(coco_mini)["images"])[offset:offset + count]
