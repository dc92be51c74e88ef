"""Panoptic post-processing and PQ: hand-computed cases, the ground truth against itself, PNG round trips."""

import collections
import json

import numpy as np
import pytest
import tensorflow as tf

from detr_jax.data import coco_panoptic
from detr_jax.evaluation import panoptic_quality
from detr_jax.models import backbone, postprocess
from tests.helpers import require_shared_file

THING, STUFF, OTHER_THING = 1, 100, 2
CATEGORIES = {THING: {"isthing": 1}, OTHER_THING: {"isthing": 1}, STUFF: {"isthing": 0}}


def _pq(gt_ids, gt_segments, pred_ids, pred_segments):
  stats = collections.defaultdict(panoptic_quality.CategoryStat)
  panoptic_quality.accumulate(stats, np.array(gt_ids), gt_segments, np.array(pred_ids), pred_segments)
  return stats, panoptic_quality.summarize(stats, CATEGORIES)


def _segments(ids, categories, crowd=()):
  ids = np.array(ids)
  return [{"id": i, "category_id": c, "iscrowd": int(i in crowd), "area": int((ids == i).sum())}
          for i, c in categories.items()]


def test_iou_above_half_matches():
  gt = [[1, 1, 1, 1, 2, 2]]
  pred = [[7, 7, 7, 0, 7, 0]]      # intersection 3, union 4 + 4 - 3 = 5: IoU 0.6; stuff 2 is missed
  stats, result = _pq(gt, _segments(gt, {1: THING, 2: STUFF}), pred, [{"id": 7, "category_id": THING}])
  assert (stats[THING].tp, stats[THING].fp, stats[THING].fn) == (1, 0, 0) and stats[STUFF].fn == 1
  assert result["Things"]["pq"] == pytest.approx(0.6) and result["Things"]["sq"] == pytest.approx(0.6)
  assert result["Things"]["rq"] == 1.0 and result["Stuff"]["pq"] == 0.0
  assert result["All"]["pq"] == pytest.approx(0.3) and result["All"]["n"] == 2


def test_iou_of_exactly_half_is_a_miss_and_a_false_positive():
  gt = [[1, 1, 2, 2]]
  pred = [[7, 7, 7, 7]]           # IoU 2/4 with either segment
  stats, result = _pq(gt, _segments(gt, {1: THING, 2: THING}), pred, [{"id": 7, "category_id": THING}])
  assert (stats[THING].tp, stats[THING].fp, stats[THING].fn) == (0, 1, 2)
  assert result["All"]["pq"] == 0.0


def test_void_pixels_leave_the_union_and_void_predictions_are_ignored():
  gt = [[1, 1, 0, 0, 0, 0]]
  pred = [[7, 7, 7, 8, 8, 8]]     # 7: IoU 2 / (3 + 2 - 2 - 1 void) = 1.0; 8 lies on void only
  stats, result = _pq(gt, _segments(gt, {1: THING}), pred,
                      [{"id": 7, "category_id": THING}, {"id": 8, "category_id": STUFF}])
  assert stats[THING].iou == pytest.approx(1.0) and stats[STUFF].fp == 0
  assert result["All"]["pq"] == 1.0 and result["Stuff"]["n"] == 0


def test_crowd_regions_absorb_predictions_and_are_never_missed():
  gt = [[5, 5, 5, 5, 1, 1]]
  pred = [[7, 7, 7, 0, 8, 8]]     # 7 sits on the crowd region of its category; 8 matches segment 1
  stats, result = _pq(gt, _segments(gt, {5: THING, 1: THING}, crowd={5}), pred,
                      [{"id": 7, "category_id": THING}, {"id": 8, "category_id": THING}])
  assert (stats[THING].tp, stats[THING].fp, stats[THING].fn) == (1, 0, 0)
  # The same prediction of another category is a false positive: crowd only absorbs its own category.
  stats, result = _pq(gt, _segments(gt, {5: THING, 1: THING}, crowd={5}), pred,
                      [{"id": 7, "category_id": OTHER_THING}, {"id": 8, "category_id": THING}])
  assert stats[OTHER_THING].fp == 1
  assert result["Things"]["pq"] == pytest.approx((1.0 + 0.0) / 2)


def test_png_and_segments_info_must_agree():
  with pytest.raises(ValueError, match="in the PNG but not in segments_info"):
    _pq([[1, 1]], _segments([[1, 1]], {1: THING}), [[7, 9]], [{"id": 7, "category_id": THING}])


def test_ground_truth_against_itself_scores_one(coco_mini):
  gt_json = coco_mini / "annotations" / "panoptic_train2017.json"
  require_shared_file(gt_json, "coco-mini's panoptic annotations")
  folder = str(coco_mini / "annotations" / "panoptic_train2017")
  result = panoptic_quality.pq_compute(str(gt_json), folder, str(gt_json), folder)
  categories = json.loads(gt_json.read_text())["categories"]
  assert result["All"]["n"] > 50 and result["Things"]["n"] > 20 and result["Stuff"]["n"] > 20
  assert result["Things"]["n"] + result["Stuff"]["n"] == result["All"]["n"] <= len(categories)
  for group in result.values():
    assert (group["pq"], group["sq"], group["rq"]) == (1.0, 1.0, 1.0)


def _query(label, num_classes, score_logit=10.0):
  logits = np.full(num_classes + 1, -10.0)
  logits[label] = score_logit
  return logits


def test_panoptic_postprocessing_hand_case():
  """Queries: a thing (left half), two of the same stuff class (right quarters), a below-threshold
  query and a tiny thing segment. The stuff pair is merged; the merged-away query then has area 0
  and, like the tiny segment (4 pixels at 16x16), is dropped, after which the map is recomputed
  without merging, as in the official code."""
  num_classes, h, w = 120, 8, 8
  logits = np.stack([_query(THING, num_classes), _query(STUFF, num_classes), _query(STUFF, num_classes),
                     _query(OTHER_THING, num_classes, score_logit=-9.0), _query(OTHER_THING, num_classes)])
  masks = np.full((5, h, w), -5.0, np.float32)
  masks[0] = -6
  masks[0, :, :4] = 5
  masks[1, :4, 4:] = 5
  masks[2, 4:, 4:] = 5
  masks[3] = 9                    # would win everywhere, but scores below 0.85
  masks[4, 0, 0] = 6              # one pixel at 8x8, 4 pixels at 16x16
  ids, segments = postprocess.panoptic(logits, masks, (h, w), (16, 16), thing_ids={THING, OTHER_THING})
  assert [(s["id"], s["category_id"], s["isthing"]) for s in segments] == [(0, THING, True), (1, STUFF, False)]
  expected = np.zeros((16, 16), np.int32)
  expected[:, 8:] = 1             # the remaining stuff query takes the whole right half
  np.testing.assert_array_equal(ids, expected)
  assert [s["area"] for s in segments] == [128, 128]


def test_panoptic_png_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 1, (30, 251))
  logits[:12, 3] = 12              # 12 confident queries of category 3
  masks = rng.normal(0, 1, (30, 20, 24)).astype(np.float32)
  ids, segments = postprocess.panoptic(logits, masks, (80, 96), (120, 150), thing_ids={3})
  png_path = str(tmp_path / "segments.png")
  tf.io.write_file(png_path, tf.io.encode_png(coco_panoptic.id_to_rgb(ids)))
  decoded = coco_panoptic.read_segment_ids(png_path).numpy()
  np.testing.assert_array_equal(decoded, ids)
  assert ids.shape == (120, 150) and len(segments) > 5
  assert all(s["area"] == int((decoded == s["id"]).sum()) > 4 for s in segments)
  assert set(np.unique(decoded)) <= {s["id"] for s in segments}


def _official_postprocess_segm(pred_masks, processed_sizes, original_sizes):
  """The official PostProcessSegm (models/segmentation.py), written with torch ops as the reference."""
  import torch.nn.functional as F
  max_h, max_w = processed_sizes.max(0)[0].tolist()
  masks = F.interpolate(pred_masks, size=(max_h, max_w), mode="bilinear", align_corners=False)
  masks = (masks.sigmoid() > 0.5).cpu()
  results = []
  for mask, (img_h, img_w), original in zip(masks, processed_sizes.tolist(), original_sizes):
    cropped = mask[:, :img_h, :img_w].unsqueeze(1)
    results.append(F.interpolate(cropped.float(), size=tuple(original.tolist()), mode="nearest").byte()[:, 0].numpy())
  return results, F.interpolate(pred_masks, size=(max_h, max_w), mode="bilinear", align_corners=False)


def test_instance_masks_match_the_official_postprocess_segm():
  """Two images of different processed sizes, padded beyond both; masks at 1/4 of the padded input.

  Tolerance: our bilinear weights come from jax.image.scale_and_translate and differ from
  torch's by float32 rounding (~1e-5), so a pixel may flip only where the interpolated logit
  is that close to 0. Every flipped pixel must be one of those.
  """
  import torch
  rng = np.random.default_rng(0)
  padded_size, pred_masks = (192, 256), rng.normal(0, 2, (2, 7, 48, 64)).astype(np.float32)
  processed = np.array([[160, 213], [150, 224]], np.int32)
  original = np.array([[480, 640], [427, 640]], np.int32)
  expected, logits = _official_postprocess_segm(torch.tensor(pred_masks), torch.tensor(processed), original)
  ours = np.asarray(postprocess.instance_masks(pred_masks, processed, padded_size))
  for i in range(2):
    result = postprocess.original_instance_masks(ours[i], processed[i], original[i])
    assert result.shape == expected[i].shape == (7, *original[i])
    flipped = result != expected[i].astype(bool)
    if flipped.any():
      rows = backbone.legacy_nearest_indices(int(processed[i][0]), int(original[i][0]))
      cols = backbone.legacy_nearest_indices(int(processed[i][1]), int(original[i][1]))
      near_zero = np.abs(logits[i].numpy()[:, rows][:, :, cols]) < 1e-4
      assert near_zero[flipped].all()
    assert flipped.mean() < 1e-5
