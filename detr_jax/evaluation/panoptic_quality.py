"""Panoptic quality (Kirillov et al., CVPR 2019), computed as COCO's panopticapi `pq_compute` does.

panopticapi is not on the package registry, so its rules are reproduced here and checked against
hand-computed cases (tests/test_panoptic.py):
- a predicted and a ground-truth segment of the same category match when IoU > 0.5, where the
  union leaves out the prediction's pixels on VOID (id 0); ground-truth areas come from the json;
- unmatched ground truth counts as a false negative unless it is crowd;
- an unmatched prediction counts as a false positive unless more than half of it lies on VOID
  or on a crowd region of its category;
- PQ = sum IoU / (TP + FP/2 + FN/2), SQ = sum IoU / TP, RQ = TP / (TP + FP/2 + FN/2) per category,
  averaged over the categories that occur (TP + FP + FN > 0), for all, things and stuff.
"""

import collections
import dataclasses
import json
import os

import numpy as np

from detr_jax.data import coco_panoptic

VOID = 0
OFFSET = 256 * 256 * 256


@dataclasses.dataclass
class CategoryStat:
  iou: float = 0.0
  tp: int = 0
  fp: int = 0
  fn: int = 0


def accumulate(stats: dict, gt_ids: np.ndarray, gt_segments: list, pred_ids: np.ndarray, pred_segments: list,
               image_id=None) -> None:
  """Adds one image's matches to `stats` {category_id: CategoryStat}.

  gt_ids / pred_ids: [H, W] segment id maps; *_segments: COCO `segments_info` lists (gt entries
  need id, category_id, iscrowd, area; predictions id and category_id).
  Raises:
    ValueError: the maps differ in shape, or a prediction's PNG and segments_info disagree.
  """
  if gt_ids.shape != pred_ids.shape:
    raise ValueError(f"Image {image_id}: ground truth {gt_ids.shape} and prediction {pred_ids.shape} differ in size.")
  gt = {s["id"]: s for s in gt_segments}
  pred = {s["id"]: dict(s) for s in pred_segments}
  labels, counts = np.unique(pred_ids, return_counts=True)
  unlisted = [int(l) for l in labels if l not in pred and l != VOID]
  if unlisted:
    raise ValueError(f"Image {image_id}: segment ids {unlisted} are in the PNG but not in segments_info.")
  for label, count in zip(labels, counts):
    if label in pred:
      pred[label]["area"] = int(count)
  absent = [i for i, s in pred.items() if "area" not in s or s["area"] == 0]
  if absent:
    raise ValueError(f"Image {image_id}: segments {absent} are in segments_info but not in the PNG.")

  pairs, intersections = np.unique(gt_ids.astype(np.int64) * OFFSET + pred_ids.astype(np.int64), return_counts=True)
  overlap = {(int(p // OFFSET), int(p % OFFSET)): int(n) for p, n in zip(pairs, intersections)}
  gt_matched, pred_matched = set(), set()
  for (gt_id, pred_id), intersection in overlap.items():
    if gt_id not in gt or pred_id not in pred or gt[gt_id]["iscrowd"]:
      continue
    if gt[gt_id]["category_id"] != pred[pred_id]["category_id"]:
      continue
    union = pred[pred_id]["area"] + gt[gt_id]["area"] - intersection - overlap.get((VOID, pred_id), 0)
    iou = intersection / union
    if iou > 0.5:
      stat = stats[gt[gt_id]["category_id"]]
      stat.tp += 1
      stat.iou += iou
      gt_matched.add(gt_id)
      pred_matched.add(pred_id)
  crowd_by_category = {}
  for gt_id, segment in gt.items():
    if gt_id in gt_matched:
      continue
    if segment["iscrowd"]:
      crowd_by_category[segment["category_id"]] = gt_id
      continue
    stats[segment["category_id"]].fn += 1
  for pred_id, segment in pred.items():
    if pred_id in pred_matched:
      continue
    ignored = overlap.get((VOID, pred_id), 0)
    if segment["category_id"] in crowd_by_category:
      ignored += overlap.get((crowd_by_category[segment["category_id"]], pred_id), 0)
    if ignored / segment["area"] > 0.5:
      continue
    stats[segment["category_id"]].fp += 1


def summarize(stats: dict, categories: dict) -> dict:
  """{"All"|"Things"|"Stuff": {"pq", "sq", "rq", "n"}} from accumulated stats.

  categories: {category_id: {"isthing": bool, ...}}; categories without TP, FP or FN are left out.
  """
  results = {}
  for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
    pq = sq = rq = 0.0
    n = 0
    for category_id, info in categories.items():
      if isthing is not None and bool(info["isthing"]) != isthing:
        continue
      stat = stats.get(category_id, CategoryStat())
      if stat.tp + stat.fp + stat.fn == 0:
        continue
      n += 1
      denominator = stat.tp + 0.5 * stat.fp + 0.5 * stat.fn
      pq += stat.iou / denominator
      sq += stat.iou / stat.tp if stat.tp else 0.0
      rq += stat.tp / denominator
    results[name] = {"pq": pq / n if n else 0.0, "sq": sq / n if n else 0.0, "rq": rq / n if n else 0.0, "n": n}
  return results


def pq_compute(gt_json: str, gt_folder: str, pred_json: str, pred_folder: str) -> dict:
  """PQ, SQ, RQ of COCO-panoptic-format predictions (json + PNG folder) against the ground truth.

  Every image of the prediction json is scored; it must be in the ground truth.
  Raises:
    ValueError: a predicted image is missing from the ground truth, or PNG and json disagree.
  """
  with open(gt_json) as f:
    gt_data = json.load(f)
  with open(pred_json) as f:
    pred_data = json.load(f)
  gt_by_image = {a["image_id"]: a for a in gt_data["annotations"]}
  categories = {c["id"]: c for c in gt_data["categories"]}
  stats = collections.defaultdict(CategoryStat)
  for pred_ann in pred_data["annotations"]:
    gt_ann = gt_by_image.get(pred_ann["image_id"])
    if gt_ann is None:
      raise ValueError(f"Predicted image {pred_ann['image_id']} is not in {gt_json}.")
    gt_ids = coco_panoptic.read_segment_ids(os.path.join(gt_folder, gt_ann["file_name"])).numpy()
    pred_ids = coco_panoptic.read_segment_ids(os.path.join(pred_folder, pred_ann["file_name"])).numpy()
    accumulate(stats, gt_ids, gt_ann["segments_info"], pred_ids, pred_ann["segments_info"], pred_ann["image_id"])
  return summarize(stats, categories)
