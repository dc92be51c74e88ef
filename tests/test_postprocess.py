"""Post-processing against independent references: `postprocess.detections` against transformers'
`post_process_object_detection` (the official `PostProcess`), and `postprocess.panoptic` against a
torch transcription of the official `PostProcessPanoptic.forward` (models/segmentation.py)."""

import collections
import functools
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from detr_jax.models import postprocess

NUM_PANOPTIC_CLASSES = 250                         # the official panoptic head: 250 classes + "no object"
THING_IDS = frozenset(range(91))                   # official is_thing_map: ids <= 90 are things
STUFF_LABELS = (92, 118, 150, 184, 199)


def _val_image_sizes(coco_mini, count):
  """(height, width) of the first `count` coco-mini val images, in id order."""
  images = json.loads((coco_mini / "annotations" / "instances_val2017.json").read_text())["images"]
  return np.array([(image["height"], image["width"]) for image in sorted(images, key=lambda i: i["id"])[:count]],
                  np.int32)


def test_detections_match_transformers(coco_mini):
  """Random logits [3, 100, 92] with "no object" (+2) the top class of many queries, sigmoid boxes,
  the original sizes of three real val images (landscape and portrait).

  Tolerances: scores 1e-6 (float32 softmax of the same logits; measured 1.5e-8); labels exact;
  boxes 1e-4 px: both compute cx -/+ w/2 and the scaling in float32, so they may differ by an ulp
  of the largest coordinate (881 px here: 6.1e-5); measured 0 (bit-identical).
  """
  from transformers import DetrImageProcessorPil
  from transformers.models.detr.modeling_detr import DetrObjectDetectionOutput
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 1, (3, 100, 92)).astype(np.float32)
  logits[..., -1] += 2
  boxes = (1 / (1 + np.exp(-rng.normal(0, 1.5, (3, 100, 4))))).astype(np.float32)
  sizes = _val_image_sizes(coco_mini, 3)
  assert {tuple(s) for s in sizes} >= {(426, 640), (640, 424)}
  assert (logits.argmax(-1) == 91).mean() > 0.2   # dropping "no object" changes many labels
  expected = DetrImageProcessorPil().post_process_object_detection(
      DetrObjectDetectionOutput(logits=torch.from_numpy(logits), pred_boxes=torch.from_numpy(boxes)),
      threshold=-1.0, target_sizes=torch.from_numpy(sizes))
  scores, labels, xyxy = postprocess.detections({"pred_logits": jnp.asarray(logits), "pred_boxes": jnp.asarray(boxes)},
                                                jnp.asarray(sizes))
  for i, reference in enumerate(expected):
    assert len(reference["scores"]) == 100
    np.testing.assert_allclose(scores[i], reference["scores"].numpy(), atol=1e-6, rtol=0)
    np.testing.assert_array_equal(labels[i], reference["labels"].numpy())
    np.testing.assert_allclose(xyxy[i], reference["boxes"].numpy(), atol=1e-4, rtol=0)


def _id_to_rgb(ids):
  """panopticapi's id2rgb: segment id -> (id % 256, id // 256 % 256, id // 65536 % 256) as uint8."""
  rgb, rest = np.zeros((*ids.shape, 3), np.uint8), ids.copy()
  for channel in range(3):
    rgb[..., channel] = rest % 256
    rest //= 256
  return rgb


def _rgb_to_id(rgb):
  """panopticapi's rgb2id."""
  rgb = rgb.astype(np.int64)
  return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def _official_panoptic(pred_logits, pred_masks, processed_size, target_size, threshold=0.85):
  """One image through the official `PostProcessPanoptic.forward`, transcribed with torch ops.

  Returns the segment-id map [*target_size], segments_info, and the areas of every pass (the
  first pass merges stuff; the later ones follow each removal of segments of <= 4 pixels).
  """
  logits, masks = torch.from_numpy(pred_logits), torch.from_numpy(pred_masks)
  scores, labels = logits.softmax(-1).max(-1)
  keep = labels.ne(logits.shape[-1] - 1) & (scores > threshold)
  classes = labels[keep]
  masks = F.interpolate(masks[keep][:, None], size=tuple(processed_size), mode="bilinear", align_corners=False)[:, 0]
  height, width = masks.shape[-2:]
  masks = masks.flatten(1)
  stuff_groups = collections.defaultdict(list)
  for k, label in enumerate(classes.tolist()):
    if label not in THING_IDS:
      stuff_groups[label].append(k)

  def ids_and_areas(masks, merge_stuff):
    if masks.shape[0] == 0:
      ids = torch.zeros((height, width), dtype=torch.long)
    else:
      ids = masks.transpose(0, 1).softmax(-1).argmax(-1).view(height, width)
    if merge_stuff:
      for group in stuff_groups.values():
        if len(group) > 1:
          for k in group:
            ids.masked_fill_(ids.eq(k), group[0])
    image = Image.fromarray(_id_to_rgb(ids.numpy())).resize((target_size[1], target_size[0]), Image.NEAREST)
    ids = torch.from_numpy(_rgb_to_id(np.asarray(image)))
    return ids, [int(ids.eq(k).sum()) for k in range(masks.shape[0])]

  ids, areas = ids_and_areas(masks, merge_stuff=True)
  passes = [areas]
  if classes.numel():
    while True:
      small = torch.tensor([area <= 4 for area in areas], dtype=torch.bool)
      if not small.any():
        break
      classes, masks = classes[~small], masks[~small]
      ids, areas = ids_and_areas(masks, merge_stuff=False)
      passes.append(areas)
  segments = [{"id": i, "isthing": label in THING_IDS, "category_id": label, "area": area}
              for i, (label, area) in enumerate(zip(classes.tolist(), areas))]
  return ids.numpy(), segments, passes


def _class_logits(rng, label, score):
  """Random logits [251] whose softmax gives `label` probability `score` (> 0.5, so it is the best class)."""
  logits = rng.normal(0, 1, NUM_PANOPTIC_CLASSES + 1)
  others = np.delete(logits, label)
  logits[label] = np.log(score / (1 - score)) + np.log(np.exp(others).sum())
  return logits


def _panoptic_inputs(seed, mask_size):
  """100 queries in shuffled order, with their roles:

  10 things and 6 stuff (three of class 92, two of 150, one of 199) scoring 0.86-0.95; 12 scoring
  0.80-0.84 and 12 confident "no object" (0.86-0.95), whose masks are raised by 4 so that any of
  them wrongly kept would take pixels; 4 things scoring 0.9 with masks of -30 but for one peak
  (12, 20, 28 or 36), which win a few pixels at most; the rest random. Mask logits have std 3, so
  the two best logits of a pixel are rarely within float32 rounding of each other.
  """
  rng = np.random.default_rng(seed)
  rows, roles = [], []
  for label in rng.integers(1, 91, 10):
    rows.append(_class_logits(rng, label, rng.uniform(0.86, 0.95))), roles.append("kept")
  for label in (92, 92, 92, 150, 150, 199):
    rows.append(_class_logits(rng, label, rng.uniform(0.86, 0.95))), roles.append("kept")
  for _ in range(12):
    label = rng.integers(1, 91) if rng.random() < 0.5 else rng.choice(STUFF_LABELS)
    rows.append(_class_logits(rng, label, rng.uniform(0.80, 0.84))), roles.append("dropped")
  for _ in range(12):
    rows.append(_class_logits(rng, NUM_PANOPTIC_CLASSES, rng.uniform(0.86, 0.95))), roles.append("dropped")
  for _ in range(4):
    rows.append(_class_logits(rng, rng.integers(1, 91), 0.9)), roles.append("tiny")
  while len(rows) < 100:
    rows.append(rng.normal(0, 1, NUM_PANOPTIC_CLASSES + 1)), roles.append("rest")
  roles = np.array(roles)
  masks = rng.normal(0, 3, (100, *mask_size))
  masks[roles == "dropped"] += 4
  height, width = mask_size
  for k, peak, (row, col) in zip(np.flatnonzero(roles == "tiny"), (12, 20, 28, 36),
                                 [(height // 4, width // 4), (height // 4, 3 * width // 4),
                                  (3 * height // 4, width // 4), (3 * height // 4, 3 * width // 4)]):
    masks[k] = -30
    masks[k, row, col] = peak
  order = rng.permutation(100)
  return np.stack(rows)[order].astype(np.float32), masks[order].astype(np.float32)


PANOPTIC_CASES = {  # name: seed, mask logits size, processed size, target size
    "up_x8.5_x9.6": (0, (16, 24), (50, 67), (427, 640)),
    "up_portrait": (1, (32, 24), (120, 83), (640, 427)),
    "down_x1.5": (2, (40, 56), (150, 213), (100, 142)),
    "down_x1.7_x1.76": (3, (30, 40), (120, 160), (70, 91)),
    "down_x3.3": (4, (50, 50), (200, 197), (61, 59)),
    "up_height_down_width": (5, (20, 30), (80, 120), (100, 90)),
}


@functools.lru_cache(maxsize=None)
def _panoptic_case(name):
  """(logits, masks, processed size, target size, the official result) of one case."""
  seed, mask_size, processed_size, target_size = PANOPTIC_CASES[name]
  logits, masks = _panoptic_inputs(seed, mask_size)
  return logits, masks, processed_size, target_size, _official_panoptic(logits, masks, processed_size, target_size)


@pytest.mark.parametrize("name", PANOPTIC_CASES)
def test_panoptic_matches_the_official_postprocess(name):
  """Segment-id map and segments_info (id, category_id, isthing, area), exactly.

  Tolerance: none. Our bilinear resize (jax.image.resize) and torch's differ by float32 rounding
  (measured <= 2e-6), which could move a pixel only where its two best logits are that close;
  with mask logits of std 3 no pixel is, and no flip was observed.
  """
  logits, masks, processed_size, target_size, (expected_ids, expected_segments, _) = _panoptic_case(name)
  ids, segments = postprocess.panoptic(logits, masks, processed_size, target_size, THING_IDS)
  assert ids.shape == expected_ids.shape == target_size
  np.testing.assert_array_equal(ids, expected_ids)
  assert segments == expected_segments


def test_panoptic_cases_exercise_every_rule():
  """The reference's passes show that the inputs reach every rule: best-class scores on both sides
  of 0.85, stuff queries merged away (area 0), segments of 1-3 and of exactly 4 pixels (dropped)
  and of 5 (kept), and a second pass in every case."""
  first_pass_areas, last_pass_areas = [], []
  for name in PANOPTIC_CASES:
    logits, _, _, _, (_, segments, passes) = _panoptic_case(name)
    probs = torch.from_numpy(logits).softmax(-1)[:, :-1].max(-1).values.numpy()
    assert ((probs > 0.80) & (probs < 0.84)).sum() >= 5 and ((probs > 0.86) & (probs < 0.95)).sum() >= 16
    assert len(passes) >= 2 and len(segments) >= 10
    assert {s["category_id"] for s in segments if not s["isthing"]} == {92, 150, 199}
    assert passes[0].count(0) >= 3     # two of the three class-92 queries and one of the two class-150
    first_pass_areas += passes[0]
    last_pass_areas += passes[-1]
  assert 4 in first_pass_areas and {1, 2, 3} & set(first_pass_areas) and 5 in last_pass_areas


def test_panoptic_id_map_resize_matches_pil_nearest():
  """The id map's nearest resize alone, on 40 random (processed, target) size pairs, up and down.

  Six kept queries own a 2 x 3 checkerboard of single rows and columns of the processed map, so a
  target pixel sampled from the wrong source row or column gets the wrong id. The mask logits are
  given at the processed size, where bilinear resizing is the identity. Exact.
  """
  rng = np.random.default_rng(0)
  logits = np.stack([_class_logits(rng, label, 0.9) for label in (1, 2, 3, 4, 5, 6)]).astype(np.float32)
  for _ in range(40):
    processed_size, target_size = (tuple(int(s) for s in rng.integers(20, 200, 2)) for _ in range(2))
    rows, cols = np.indices(processed_size)
    owner = rows % 2 * 3 + cols % 3
    masks = np.where(owner[None] == np.arange(6)[:, None, None], 5.0, -5.0).astype(np.float32)
    expected_ids, expected_segments, _ = _official_panoptic(logits, masks, processed_size, target_size)
    ids, segments = postprocess.panoptic(logits, masks, processed_size, target_size, THING_IDS)
    np.testing.assert_array_equal(ids, expected_ids, err_msg=f"{processed_size} -> {target_size}")
    assert segments == expected_segments
