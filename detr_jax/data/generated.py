"""A generated COCO-format dataset: the built-in default that needs no download.

Each image is a noisy grey background with 1..`max_objects` solid rectangles that do not
overlap; the category is the rectangle's colour, so classes and boxes are learnable from pixels. The folder has the
layout of a real COCO folder (`annotations/instances_{split}.json` and `{split}/*.jpg`), so
training and evaluation run through exactly the code that reads COCO.
"""

import json
import os

import numpy as np
import tensorflow as tf

from detr_jax.data import coco

CATEGORIES = (("red", (220, 40, 40)), ("green", (40, 190, 60)), ("blue", (40, 70, 220)), ("yellow", (230, 210, 40)))


def _image_and_annotations(rng, image_id, first_annotation_id, size_range, max_objects, smallest_side):
  height, width = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, 2))
  pixels = rng.normal(128, 20, (height, width, 3))
  annotations, taken = [], np.zeros((height, width), bool)
  for _ in range(int(rng.integers(1, max_objects + 1))):
    w, h = (int(v) for v in rng.integers((int(width * smallest_side), int(height * smallest_side)),
                                         (width // 2, height // 2)))
    x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
    # Rectangles never overlap, so every box is the whole visible rectangle and can be learnt from
    # the pixels; one that would overlap is left out.
    if taken[max(y - 2, 0):y + h + 2, max(x - 2, 0):x + w + 2].any():
      continue
    taken[y:y + h, x:x + w] = True
    category = int(rng.integers(len(CATEGORIES)))
    pixels[y:y + h, x:x + w] = np.array(CATEGORIES[category][1]) + rng.normal(0, 10, (h, w, 3))
    annotations.append({"id": first_annotation_id + len(annotations), "image_id": image_id,
                        "category_id": category + 1, "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
  return np.clip(pixels, 0, 255).astype(np.uint8), annotations


def write_coco_folder(directory: str, splits=(("train", 512), ("val", 32)), seed: int = 0,
                      size_range=(160, 256), max_objects: int = 4, smallest_side: float = 0.25) -> str:
  """Writes the dataset under `directory` (if not already there) and returns `directory`.

  Args:
    splits: (name, number of images) per split.
    size_range: image sides in pixels are drawn uniformly from this closed range.
    smallest_side: a rectangle's width and height are drawn from [smallest_side, 1/2) of the image's.
  The content is a pure function of the arguments; category ids are 1..4 (num_classes 5).
  """
  marker = os.path.join(directory, "annotations", "complete.json")
  settings = {"splits": [list(s) for s in splits], "seed": seed, "size_range": list(size_range),
              "max_objects": max_objects, "smallest_side": smallest_side}
  if os.path.isfile(marker):
    with open(marker) as f:
      if json.load(f) == settings:
        return directory
  os.makedirs(os.path.join(directory, "annotations"), exist_ok=True)
  rng = np.random.default_rng(seed)
  image_id, annotation_id = 1, 1
  for split, count in splits:
    os.makedirs(os.path.join(directory, split), exist_ok=True)
    images, annotations = [], []
    for _ in range(count):
      pixels, image_annotations = _image_and_annotations(rng, image_id, annotation_id, size_range, max_objects,
                                                         smallest_side)
      file_name = f"{image_id:012d}.jpg"
      tf.io.write_file(os.path.join(directory, split, file_name), tf.io.encode_jpeg(pixels, quality=95))
      images.append({"id": image_id, "file_name": file_name, "height": pixels.shape[0], "width": pixels.shape[1]})
      annotations.extend(image_annotations)
      image_id += 1
      annotation_id += len(image_annotations)
    categories = [{"id": i + 1, "name": name, "supercategory": "rectangle"} for i, (name, _) in enumerate(CATEGORIES)]
    with open(coco.annotation_path(directory, split), "w") as f:
      json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
  with open(marker, "w") as f:
    json.dump(settings, f)
  return directory
