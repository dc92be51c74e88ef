"""Pictures: boxes land on the right pixels, predictions sit beside the ground truth, the threshold
hides low scores, and the loss plot is written. On real coco-mini images."""

import json
import os

import numpy as np
from PIL import Image

from detr_jax import visualize
from detr_jax.data import coco


def _first_val_image(coco_mini):
  with open(coco.annotation_path(str(coco_mini), "val2017")) as f:
    dataset = json.load(f)
  image = min(dataset["images"], key=lambda i: i["id"])
  return dataset, image, os.path.join(str(coco_mini), "val2017", image["file_name"])


def test_draw_boxes_outlines_each_box_in_its_category_colour(coco_mini):
  _, _, path = _first_val_image(coco_mini)
  original = Image.open(path).convert("RGB")
  drawn = np.asarray(visualize.draw_boxes(original, [[40, 60, 200, 180]], [18], ["dog 0.93"]))
  pixels = np.asarray(original)
  colour = visualize.category_colour(18)
  # Outline width max(2, 640 / 300) = 2 px: rows 180 and 179 are the bottom edge, inside x = 40..200.
  assert (drawn[180, 40:201] == colour).all() and (drawn[179, 40:201] == colour).all()
  assert (drawn[60:181, 200] == colour).all()
  np.testing.assert_array_equal(drawn[100:170, 50:190], pixels[100:170, 50:190])   # the inside is untouched
  np.testing.assert_array_equal(drawn[200:, :], pixels[200:, :])
  assert visualize.category_colour(18) != visualize.category_colour(19)


def test_validation_pictures_put_predictions_beside_ground_truth(coco_mini):
  dataset, image, path = _first_val_image(coco_mini)
  truth = [a for a in dataset["annotations"] if a["image_id"] == image["id"]]
  assert truth
  kept = {"image_id": image["id"], "category_id": truth[0]["category_id"], "bbox": truth[0]["bbox"], "score": 0.9}
  hidden = {**kept, "bbox": [0, 0, 30, 30], "score": 0.2}
  pictures = visualize.validation_pictures(coco.annotation_path(str(coco_mini), "val2017"),
                                           os.path.join(str(coco_mini), "val2017"), [kept, hidden], 0.5, num_images=1)
  assert list(pictures) == [image["id"]]
  picture = np.asarray(pictures[image["id"]])
  width, height = image["width"], image["height"]
  assert picture.shape == (height, 2 * width + 8, 3)
  left, right = picture[:, :width], picture[:, width + 8:]
  original = np.asarray(Image.open(path).convert("RGB"))
  np.testing.assert_array_equal(left[:28, :28], original[:28, :28])   # the 0.2 detection is not drawn
  assert _bottom_edge_drawn(left, truth[0])
  drawn_on_right = [_bottom_edge_drawn(right, annotation) for annotation in truth]
  assert sum(drawn_on_right) >= 0.7 * len(truth)   # later boxes and captions may cover an edge
  other_categories = [a for a in truth[1:] if a["category_id"] != truth[0]["category_id"]]
  assert not any(_bottom_edge_drawn(left, annotation) for annotation in other_categories)


def _bottom_edge_drawn(picture, annotation) -> bool:
  """Whether every column of the annotation's bottom edge has its category colour in one of the
  rows around it (PIL rounds the float coordinates)."""
  x, y, w, h = annotation["bbox"]
  bottom = min(int(y + h), picture.shape[0] - 1)
  strip = picture[max(bottom - 2, 0):bottom + 2, int(x) + 3:int(x + w) - 3]
  if strip.shape[1] == 0:
    return False
  return bool((strip == visualize.category_colour(annotation["category_id"])).all(-1).any(0).all())


def test_plot_losses_writes_a_png(tmp_path):
  from clu import metric_writers
  workdir = str(tmp_path / "run")
  writer = metric_writers.create_default_writer(workdir)
  for step in range(1, 4):
    writer.write_scalars(step, {"loss": 3.0 / step, "loss_ce": 1.0 / step, "class_error": 50.0})
  writer.flush()
  output = visualize.plot_losses([workdir], str(tmp_path / "losses.png"))
  with Image.open(output) as plot:
    assert plot.format == "PNG" and plot.width > 600
