"""Pictures of what a detector sees: boxes, masks and panoptic segments drawn on images, attention maps,
predictions beside the ground truth, and the training loss curves.

Drawing uses PIL; the loss plot uses matplotlib (imported when called, with the Agg backend).
"""

import colorsys
import functools
import json
import os
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

from detr_jax import summaries

LOSS_PANELS = (("loss", "total loss (all decoder layers)"), ("loss_ce", "loss_ce (last layer)"),
               ("loss_bbox", "loss_bbox (L1, last layer)"), ("loss_giou", "loss_giou (last layer)"),
               ("class_error", "class_error % (last layer)"), ("cardinality_error", "cardinality_error (last layer)"))


def category_colour(category_id: int) -> tuple[int, int, int]:
  """A fixed, saturated RGB colour per category id (golden-ratio hues, so neighbours differ)."""
  red, green, blue = colorsys.hsv_to_rgb((category_id * 0.618034) % 1.0, 0.85, 0.95)
  return int(255 * red), int(255 * green), int(255 * blue)


def draw_boxes(image: Image.Image, boxes: Sequence[Sequence[float]], category_ids: Sequence[int],
               captions: Sequence[str]) -> Image.Image:
  """A copy of `image` (RGB) with each box outlined in its category's colour and captioned.

  Args:
    boxes: N boxes [x0, y0, x1, y1] in the image's pixels.
    category_ids: N category ids (they pick the colours).
    captions: N texts written at each box's top-left corner, e.g. "dog 0.93".
  """
  picture = image.convert("RGB")
  draw = ImageDraw.Draw(picture)
  width = max(2, round(max(picture.size) / 300))
  for box, category_id, caption in zip(boxes, category_ids, captions):
    colour = category_colour(int(category_id))
    x0, y0, x1, y1 = (float(v) for v in box)
    draw.rectangle((x0, y0, x1, y1), outline=colour, width=width)
    left, top, right, bottom = draw.textbbox((x0, y0), caption)
    text_top = max(0.0, y0 - (bottom - top) - 2)
    draw.rectangle((x0, text_top, x0 + right - left + 4, text_top + bottom - top + 2), fill=colour)
    draw.text((x0 + 2, text_top), caption, fill=(0, 0, 0))
  return picture


def overlay_masks(image: Image.Image, masks: Sequence[np.ndarray], category_ids: Sequence[int],
                  opacity: float = 0.5) -> Image.Image:
  """A copy of `image` (RGB) with each [H, W] bool mask (the image's size) tinted in its category's colour,
  later masks over earlier ones."""
  pixels = np.asarray(image.convert("RGB"), np.float32)
  for mask, category_id in zip(masks, category_ids):
    pixels[mask] = (1 - opacity) * pixels[mask] + opacity * np.asarray(category_colour(int(category_id)), np.float32)
  return Image.fromarray(np.round(pixels).astype(np.uint8))


def draw_panoptic(image: Image.Image, panoptic: dict, opacity: float = 0.6) -> Image.Image:
  """A copy of `image` (RGB) with `inference.Predictor.panoptic`'s segments tinted: stuff in its category's
  colour, each thing in a shade of its category's (so that two instances differ), white lines between
  segments and each segment's label at its centre of mass."""
  segmentation = panoptic["segmentation"]
  pixels = np.asarray(image.convert("RGB"), np.float32)
  labels = []   # (centre of mass (x, y), label)
  for segment in panoptic["segments"]:
    mask = segmentation == segment["id"]
    if not mask.any():
      continue
    colour = np.asarray(category_colour(segment["category_id"]), np.float32)
    if segment["isthing"]:
      colour = colour * (0.55 + 0.45 * ((segment["id"] * 0.618034) % 1.0))
    pixels[mask] = (1 - opacity) * pixels[mask] + opacity * colour
    rows, columns = np.nonzero(mask)
    labels.append(((float(columns.mean()), float(rows.mean())), segment["label"]))
  edges = np.zeros(segmentation.shape, bool)
  edges[:, 1:] |= segmentation[:, 1:] != segmentation[:, :-1]
  edges[1:] |= segmentation[1:] != segmentation[:-1]
  pixels[edges] = 255
  picture = Image.fromarray(np.round(pixels).astype(np.uint8))
  draw = ImageDraw.Draw(picture)
  for centre, label in labels:
    draw.text(centre, label, fill=(255, 255, 255), anchor="mm", stroke_width=1, stroke_fill=(0, 0, 0))
  return picture


def draw_detections(image: Image.Image, detections: Sequence[dict]) -> Image.Image:
  """`image` with `inference.Predictor` detections: their masks as a colour overlay (mask models), then
  their boxes captioned "label score"."""
  masked = [d for d in detections if "mask" in d]
  if masked:
    image = overlay_masks(image, [d["mask"] for d in masked], [d["category_id"] for d in masked])
  return draw_boxes(image, [d["box"] for d in detections], [d["category_id"] for d in detections],
                    [f"{d['label']} {d['score']:.2f}" for d in detections])


def heat_overlay(image: Image.Image, heat: np.ndarray, opacity: float = 0.6) -> Image.Image:
  """`image` (RGB) blended with `heat` ([H, W] float, the image's size) in matplotlib's "inferno" colours,
  scaled so that its maximum is the brightest."""
  import matplotlib
  colours = matplotlib.colormaps["inferno"](heat / max(float(heat.max()), 1e-12))[..., :3] * 255
  pixels = (1 - opacity) * np.asarray(image.convert("RGB"), np.float32) + opacity * colours
  return Image.fromarray(np.round(pixels).astype(np.uint8))


def attention_pictures(image: Image.Image, maps: dict, count: int = 6) -> tuple[Image.Image, Image.Image]:
  """The official notebook's two figures from `inference.Predictor.attention`'s `maps`: (for each of the first
  `count` detections, its query's decoder cross-attention with its box, side by side; the encoder
  self-attention at each reference point, the point marked, side by side)."""
  decoder = [draw_boxes(heat_overlay(image, heat), [d["box"]], [d["category_id"]], [f"{d['label']} {d['score']:.2f}"])
             for d, heat in zip(maps["detections"][:count], maps["decoder"])]
  encoder = []
  for (x, y), heat in zip(maps["points"], maps["encoder"]):
    panel = heat_overlay(image, heat)
    radius = max(3, round(max(panel.size) / 100))
    ImageDraw.Draw(panel).ellipse((x - radius, y - radius, x + radius, y + radius), outline=(0, 255, 255), width=2)
    encoder.append(panel)
  row = lambda panels: functools.reduce(side_by_side, panels) if panels else image.convert("RGB")
  return row(decoder), row(encoder)


def side_by_side(left: Image.Image, right: Image.Image, gap: int = 8) -> Image.Image:
  """`left` and `right` (same height) in one white-separated RGB picture."""
  picture = Image.new("RGB", (left.width + gap + right.width, max(left.height, right.height)), (255, 255, 255))
  picture.paste(left, (0, 0))
  picture.paste(right, (left.width + gap, 0))
  return picture


def validation_pictures(annotation_path: str, image_dir: str, detections: Sequence[dict], score_threshold: float,
                        num_images: int = 4) -> dict[int, Image.Image]:
  """Predictions (left) beside the ground truth (right) for the first `num_images` images by id.

  Args:
    annotation_path: the split's COCO instances json (images, annotations, categories).
    image_dir: the folder of the split's image files.
    detections: COCO results (`detections.json` of `evaluation.evaluate`): image_id, category_id,
      bbox [x, y, w, h] in original pixels, score.
    score_threshold: detections scoring below it are not drawn.
  Returns:
    {image id: RGB picture}.
  """
  with open(annotation_path) as f:
    dataset = json.load(f)
  names = {c["id"]: c["name"] for c in dataset["categories"]}
  images = sorted(dataset["images"], key=lambda image: image["id"])[:num_images]
  pictures = {}
  for image in images:
    truth = [a for a in dataset["annotations"] if a["image_id"] == image["id"]]
    kept = [d for d in detections if d["image_id"] == image["id"] and d["score"] >= score_threshold]
    with Image.open(os.path.join(image_dir, image["file_name"])) as pixels:
      pixels.load()
      predicted = draw_boxes(pixels, [_xyxy(d["bbox"]) for d in kept], [d["category_id"] for d in kept],
                             [f"{names.get(d['category_id'], d['category_id'])} {d['score']:.2f}" for d in kept])
      expected = draw_boxes(pixels, [_xyxy(a["bbox"]) for a in truth], [a["category_id"] for a in truth],
                            [str(names.get(a["category_id"], a["category_id"])) for a in truth])
    pictures[image["id"]] = side_by_side(predicted, expected)
  return pictures


def _xyxy(bbox):
  x, y, w, h = bbox
  return x, y, x + w, y + h


def plot_losses(workdirs: Sequence[str], output_path: str, labels: Optional[Sequence[str]] = None,
                title: str = "") -> str:
  """Plots the loss terms of training runs (their TensorBoard summaries) to a PNG, runs overlaid.

  Panels whose tag a run did not log are left out for that run. Returns `output_path`.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  labels = labels or [os.path.basename(w.rstrip("/")) for w in workdirs]
  runs = [summaries.read_scalars(workdir) for workdir in workdirs]
  figure, axes = plt.subplots(2, 3, figsize=(13, 6.5))
  for ax, (tag, panel_title) in zip(axes.flat, LOSS_PANELS):
    for scalars, label in zip(runs, labels):
      steps = sorted(scalars.get(tag, {}))
      ax.plot(steps, [scalars[tag][s] for s in steps], label=label)
    ax.set_title(panel_title, fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  if len(runs) > 1:
    axes.flat[0].legend(fontsize=9)
  figure.suptitle(title)
  figure.tight_layout()
  figure.savefig(output_path, dpi=90)
  plt.close(figure)
  return output_path

