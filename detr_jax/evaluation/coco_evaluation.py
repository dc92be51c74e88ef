"""COCO evaluation: jit-compiled inference over the mesh, official post-processing, pycocotools, PQ.

The flow follows the official `engine.evaluate`:
- every object query becomes a detection (`PostProcess`: no threshold, no NMS), boxes in absolute
  xywh of the original image, scored by pycocotools' COCOeval("bbox");
- a mask model's detections also get binary masks (`PostProcessSegm`), RLE-encoded and scored by
  COCOeval("segm") as mask AP;
- on a COCO panoptic split, `PostProcessPanoptic` turns each image into segments (PNG + json in
  the COCO panoptic format) scored with PQ, SQ and RQ (`panoptic_quality`). As in the official
  code, box and mask AP are then measured on the same images against the split's instances json.
Each process post-processes the images it holds; results are gathered on every process. Process 0
shows a progress bar with ETA on stderr; pycocotools' 12-line summaries and the best and worst
categories by AP are logged at INFO. Used by eval.py and by the evaluation during training.
"""

import collections
import contextlib
import io
import json
import os
from typing import Iterable, Optional

from absl import logging
import flax.linen as nn
import jax
import numpy as np
import tensorflow as tf
import tqdm
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from detr_jax import families, sharding
from detr_jax.data import coco, coco_panoptic, pipeline, sources
from detr_jax.evaluation import panoptic_quality
from detr_jax.models import postprocess

METRIC_NAMES = ("AP", "AP50", "AP75", "AP_S", "AP_M", "AP_L", "AR@1", "AR@10", "AR@100", "AR_S", "AR_M", "AR_L")
MASK_METRIC_NAMES = tuple(f"mask_{name}" for name in METRIC_NAMES)
PANOPTIC_METRIC_NAMES = ("PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st")
_PANOPTIC_GROUPS = (("All", ""), ("Things", "_th"), ("Stuff", "_st"))


def make_predict_fn(model: nn.Module, masks: bool = False, panoptic: bool = False, intermediates: bool = False):
  """jit(variables, batch) -> per-image predictions, sharded like the batch.

  Always "scores" [B, Q] float32, "labels" [B, Q] int32 (COCO category ids) and "boxes" [B, Q, 4]
  xyxy in original-image pixels (the family's official post-processing). With `masks`, also "masks" [B, Q, H, W]
  bool (`postprocess.instance_masks`; H, W the padded input size). With `panoptic`, also the raw
  "pred_logits" [B, Q, K + 1] and "pred_masks" [B, Q, H/4, W/4] for `postprocess.panoptic`. With
  `intermediates`, also "intermediates": what the model sows (attention maps, `transformer.MultiheadAttention`;
  sampling locations and weights, `deformable_attention.MSDeformAttn`), and "queries" [B, Q] int32, the object
  query of each detection.
  The variables are replicated, so XLA runs each device's images where they are.
  """
  family = families.of_model(model)

  def predict(variables, batch):
    if intermediates:
      outputs, sown = model.apply(variables, batch["image"], batch["pixel_mask"], mutable=["intermediates"])
    else:
      outputs = model.apply(variables, batch["image"], batch["pixel_mask"])
    scores, labels, boxes = family.detections(outputs, batch["orig_size"])
    predictions = {"scores": scores, "labels": labels, "boxes": boxes}
    if intermediates:
      predictions.update(intermediates=sown["intermediates"], queries=family.detection_queries(outputs))
    if masks:
      predictions["masks"] = postprocess.instance_masks(outputs["pred_masks"], batch["size"], batch["image"].shape[1:3])
    if panoptic:
      predictions.update(pred_logits=outputs["pred_logits"], pred_masks=outputs["pred_masks"])
    return predictions

  return jax.jit(predict)


def _local_images(predict_fn, variables, dataset: tf.data.Dataset, mesh: Mesh):
  """Yields (predictions, image_id, processed size, original size) per real image of this process, in numpy.

  Process 0 shows a tqdm progress bar over the batches, with ETA, on stderr; every process runs as many batches.
  """
  batch_sharding = sharding.batch_sharding(mesh)
  batches = tqdm.tqdm(pipeline.prefetch_to_mesh(dataset, batch_sharding), desc="Evaluating", unit="batch",
                      total=int(dataset.cardinality()), disable=jax.process_index() != 0)
  for batch in batches:
    predictions = predict_fn(variables, batch)
    image_info = {k: batch[k] for k in ("image_id", "size", "orig_size", "image_valid")}
    local, info = jax.tree.map(np.asarray, multihost_utils.global_array_to_host_local_array(
        (predictions, image_info), mesh, batch_sharding.spec))
    for i in np.flatnonzero(info["image_valid"]):
      yield {k: v[i] for k, v in local.items()}, int(info["image_id"][i]), info["size"][i], info["orig_size"][i]


def _detection_results(prediction: dict, image_id: int) -> list[dict]:
  """COCO results {"image_id", "category_id", "bbox" [x, y, w, h] pixels, "score"}, one per query."""
  xywh = prediction["boxes"].astype(np.float64)
  xywh[:, 2:] -= xywh[:, :2]
  return [{"image_id": image_id, "category_id": int(label), "bbox": [float(v) for v in box], "score": float(score)}
          for score, label, box in zip(prediction["scores"], prediction["labels"], xywh)]


def _segmentation_results(prediction: dict, image_id: int, processed_size, original_size) -> list[dict]:
  """COCO results with "segmentation" (RLE of the original-size mask), one per query (official CocoEvaluator)."""
  from pycocotools import mask as mask_utils
  masks = postprocess.original_instance_masks(prediction["masks"], processed_size, original_size)
  rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
  return [{"image_id": image_id, "category_id": int(label), "score": float(score),
           "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")}}
          for score, label, rle in zip(prediction["scores"], prediction["labels"], rles)]


def _allgather_json(items: list) -> list:
  """Concatenates every process's JSON-serialisable list, in process order, on every process."""
  if jax.process_count() == 1:
    return items
  data = np.frombuffer(json.dumps(items).encode(), np.uint8)
  lengths = np.asarray(multihost_utils.process_allgather(np.array([len(data)], np.int32))).reshape(-1)
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:len(data)] = data
  gathered = np.asarray(multihost_utils.process_allgather(padded))
  return [item for row, length in zip(gathered, lengths) for item in json.loads(row[:length].tobytes())]


def _cocoeval(annotation_path: str, results: list[dict], image_ids, iou_type: str):
  """pycocotools COCOeval(iou_type) of `results` on `image_ids`, evaluated, accumulated and summarised.

  The 12-line summary that pycocotools prints is logged at INFO instead; its loading messages are dropped.
  Returns:
    the pycocotools.cocoeval.COCOeval, with its 12 `stats` and its `eval["precision"]`.
  Raises:
    ValueError: `results` is empty.
  """
  from pycocotools.coco import COCO
  from pycocotools.cocoeval import COCOeval
  if not results:
    raise ValueError("No detections to evaluate.")
  with contextlib.redirect_stdout(io.StringIO()):
    ground_truth = COCO(annotation_path)
    # loadRes adds fields (area, segmentation, id) to the dicts it is given.
    evaluator = COCOeval(ground_truth, ground_truth.loadRes([dict(r) for r in results]), iou_type)
    evaluator.params.imgIds = sorted(int(i) for i in image_ids)
    evaluator.evaluate()
    evaluator.accumulate()
  with contextlib.redirect_stdout(io.StringIO()) as summary:
    evaluator.summarize()
  logging.info("pycocotools COCOeval(%s) on %d images:\n%s", iou_type, len(evaluator.params.imgIds),
               summary.getvalue().rstrip())
  return evaluator


def _summary_metrics(evaluator, prefix: str = "") -> dict:
  """METRIC_NAMES (with `prefix`) -> value of a summarised COCOeval's 12 stats."""
  return {prefix + name: float(value) for name, value in zip(METRIC_NAMES, evaluator.stats)}


def coco_metrics(annotation_path: str, results: list[dict], image_ids, iou_type: str = "bbox") -> dict:
  """pycocotools COCOeval(iou_type) of `results` on `image_ids`; returns METRIC_NAMES -> value.

  iou_type: "bbox" (results carry "bbox") or "segm" (results carry an RLE "segmentation").
  pycocotools' 12-line summary is logged at INFO.
  Raises:
    ValueError: `results` is empty.
  """
  return _summary_metrics(_cocoeval(annotation_path, results, image_ids, iou_type))


def _mean_precision(precision: np.ndarray) -> Optional[float]:
  """Mean of the entries above -1 (COCOeval's mark for "no ground truth"); None where there are none."""
  defined = precision[precision > -1]
  return float(np.mean(defined)) if defined.size else None


def category_ap(evaluator, prefix: str = "") -> list[dict]:
  """Per-category AP and AP50 of an accumulated pycocotools COCOeval, computed as pycocotools' summary and
  detectron2 do.

  COCOeval's eval["precision"] is [T IoU thresholds, R recall points, K categories, A area ranges, M maxDets].
  A category's AP is the mean of its precisions over IoU 0.5:0.95 and the recall points at area "all" and
  maxDets 100, ignoring the -1 entries; AP50 the same at IoU 0.5 alone: what COCOeval's stats[0] and stats[1]
  are with `params.catIds=[category]`.
  Returns:
    one dict per category of the ground truth, in id order: "category_id", "name", "num_instances" (non-crowd
    ground-truth annotations on the evaluated images), f"{prefix}AP" and f"{prefix}AP50" (float in [0, 1], None
    for a category without ground truth on the evaluated images).
  """
  params, ground_truth = evaluator.params, evaluator.cocoGt
  precision = evaluator.eval["precision"][..., params.areaRngLbl.index("all"), params.maxDets.index(100)]
  iou_50 = params.iouThrs.tolist().index(0.5)
  instances = collections.Counter(annotation["category_id"] for image_id in params.imgIds
                                  for annotation in ground_truth.imgToAnns[image_id] if not annotation.get("iscrowd"))
  return [{"category_id": category["id"], "name": category["name"], "num_instances": instances[category["id"]],
           f"{prefix}AP": _mean_precision(precision[:, :, k]),
           f"{prefix}AP50": _mean_precision(precision[iou_50, :, k])}
          for k, category in enumerate(ground_truth.loadCats(params.catIds))]


def _log_best_and_worst_categories(per_category: Iterable[dict], key: str, count: int = 10) -> None:
  """Logs the `count` categories with the highest and the lowest `key` ("AP", "mask_AP"), those without ground
  truth left out."""
  ranked = sorted((row for row in per_category if row[key] is not None), key=lambda row: row[key], reverse=True)
  shown = min(count, len(ranked))

  def listing(rows):
    return ", ".join(f"{row['name']} ({row['category_id']}) {row[key]:.4f}" for row in rows)

  logging.info("%s per category, of %d categories with ground truth:\n%d best: %s\n%d worst: %s", key, len(ranked),
               shown, listing(ranked[:shown]), shown, listing(ranked[::-1][:shown]))


def metrics_table(metrics: dict) -> str:
  """Box, mask and panoptic metrics (those present) as text: per group, names over values (4 decimals)."""
  blocks = []
  for title, group in (("bbox", METRIC_NAMES), ("segm", MASK_METRIC_NAMES), ("panoptic", PANOPTIC_METRIC_NAMES)):
    names = [n for n in group if n in metrics]
    if not names:
      continue
    widths = [max(len(n), 6) for n in names]
    header = " | ".join(n.rjust(w) for n, w in zip(names, widths))
    values = " | ".join(f"{metrics[n]:.4f}".rjust(w) for n, w in zip(names, widths))
    blocks.append(f"{title}:\n{header}\n{'-' * len(header)}\n{values}")
  return "\n".join(blocks)


class _PanopticScorer:
  """Post-processes this process's images into COCO panoptic segments and accumulates PQ statistics."""

  def __init__(self, data_dir: str, split: str, records: coco_panoptic.PanopticRecords, png_dir: Optional[str]):
    with open(coco_panoptic.annotation_path(data_dir, split)) as f:
      self.gt_segments = {a["image_id"]: a["segments_info"] for a in json.load(f)["annotations"]}
    self.gt_pngs = dict(zip(records.image_ids.tolist(), records.png_paths.tolist()))
    self.categories, self.thing_ids = records.categories, records.thing_ids
    self.png_dir = png_dir
    self.stats = collections.defaultdict(panoptic_quality.CategoryStat)
    self.annotations = []

  def add(self, prediction: dict, image_id: int, processed_size, original_size) -> None:
    segment_ids, segments = postprocess.panoptic(prediction["pred_logits"], prediction["pred_masks"],
                                                 tuple(processed_size), tuple(original_size), self.thing_ids)
    gt_ids = coco_panoptic.read_segment_ids(self.gt_pngs[image_id]).numpy()
    panoptic_quality.accumulate(self.stats, gt_ids, self.gt_segments[image_id], segment_ids, segments, image_id)
    file_name = f"{image_id:012d}.png"
    if self.png_dir:
      tf.io.write_file(os.path.join(self.png_dir, file_name), tf.io.encode_png(coco_panoptic.id_to_rgb(segment_ids)))
    self.annotations.append({"image_id": image_id, "file_name": file_name, "segments_info": segments})

  def metrics(self) -> dict:
    """PANOPTIC_METRIC_NAMES -> value over all processes' images."""
    stats = collections.defaultdict(panoptic_quality.CategoryStat)
    local = [[c, s.iou, s.tp, s.fp, s.fn] for c, s in self.stats.items()]
    for category, iou, tp, fp, fn in _allgather_json(local):
      stat = stats[category]
      stat.iou, stat.tp, stat.fp, stat.fn = stat.iou + iou, stat.tp + tp, stat.fp + fp, stat.fn + fn
    unknown = {category: stat.fp for category, stat in stats.items() if category not in self.categories}
    if unknown:
      # panopticapi raises a KeyError here; a model with spare class slots can predict them.
      logging.warning("%d predicted segments of categories absent from the ground truth %s are not scored.",
                      sum(unknown.values()), sorted(unknown))
    summary = panoptic_quality.summarize(stats, self.categories)
    return {f"{name}{suffix}": summary[group][name.lower()]
            for group, suffix in _PANOPTIC_GROUPS for name in ("PQ", "SQ", "RQ")}


def write_validation_pictures(model: nn.Module, data_dir: str, split: str, output_dir: str,
                              num_images: int = 4) -> dict:
  """Predictions (those at or above the family's `score_threshold`) beside the ground truth for the first
  `num_images` images of the split by id, from the detections.json that `evaluate` wrote in `output_dir`:
  JPEGs in output_dir/pictures/<image id>.jpg. Returns {image id: PIL picture}.
  """
  from detr_jax import visualize
  with open(os.path.join(output_dir, "detections.json")) as f:
    detections = json.load(f)
  pictures = visualize.validation_pictures(coco.annotation_path(data_dir, split), os.path.join(data_dir, split),
                                           detections, families.of_model(model).score_threshold, num_images)
  os.makedirs(os.path.join(output_dir, "pictures"), exist_ok=True)
  for image_id, picture in pictures.items():
    picture.save(os.path.join(output_dir, "pictures", f"{image_id}.jpg"), quality=90)
  return pictures


def evaluate(model: nn.Module, variables, data_dir: str, split: str, batch_size: int,
             options: pipeline.PipelineOptions, mesh: Mesh, output_dir: Optional[str] = None,
             max_images: Optional[int] = None, predict_fn=None, panoptic: bool = False,
             keep_segment_masks: bool = False) -> dict:
  """COCO metrics of `model` on a COCO folder's split: box AP, mask AP for mask models, PQ if `panoptic`.

  Args:
    data_dir, split: `annotations/instances_{split}.json` and `{split}/` under data_dir; with
      `panoptic`, also `annotations/panoptic_{split}.json` and its PNG folder, whose images are
      the ones evaluated (box and mask AP are then skipped, with a log line, if the instances
      json is absent).
    batch_size: images per step over all processes (a multiple of the mesh's device count).
      Padding is part of the input (as in the official code), so scores vary with it slightly.
    options: resize and padding options (scale, pad_multiple or fixed_size).
    output_dir: where process 0 writes metrics.json, detections.json (COCO results),
      metrics_per_category.json (where AP is scored: `category_ap`'s rows, with "mask_AP" and
      "mask_AP50" for mask models, null for categories without ground truth), for mask models
      segmentations.json (COCO results with RLE masks) and, with `panoptic`, panoptic.json with
      the PNGs in panoptic/ (COCO panoptic format; every process writes its own PNGs).
    max_images: evaluate only the first N images by id.
    predict_fn: a `make_predict_fn(...)`, to reuse its compiled programs across calls.
    keep_segment_masks: keep the ground-truth "segment_masks" ([B, T, H, W] bool) of panoptic
      records in the batches, for a `predict_fn` that reads them; evaluation itself does not.
  Logs pycocotools' summaries and the 10 best and worst categories by AP (and mask AP) at INFO;
  process 0 shows a progress bar over the batches on stderr.
  Returns:
    METRIC_NAMES (and MASK_METRIC_NAMES, PANOPTIC_METRIC_NAMES) -> value, with "num_images",
    the same on every process.
  Raises:
    coco.DatasetError: the folder or an annotation file is missing or invalid.
    ValueError: batch_size is not a multiple of the process count.
  """
  if batch_size % jax.process_count():
    raise ValueError(f"Eval batch size {batch_size} is not a multiple of the {jax.process_count()} processes.")
  instances_path = coco.annotation_path(data_dir, split)
  records = sources.eval_records(data_dir, split, panoptic)
  score_ap = os.path.isfile(instances_path)
  if not score_ap:
    logging.warning("%s does not exist: box and mask AP are skipped, only PQ is measured.", instances_path)
  image_ids = records.image_ids[:max_images] if max_images else records.image_ids
  dataset = pipeline.eval_dataset(records, batch_size // jax.process_count(), options, max_images=max_images,
                                  keep_segment_masks=keep_segment_masks)
  predict_fn = predict_fn or make_predict_fn(model, masks=families.has_masks(model) and score_ap, panoptic=panoptic)
  png_dir = os.path.join(output_dir, "panoptic") if output_dir and panoptic else None
  if png_dir:
    os.makedirs(png_dir, exist_ok=True)
  scorer = _PanopticScorer(data_dir, split, records, png_dir) if panoptic else None

  detections, segmentations = [], []
  replicated = jax.device_put(variables, sharding.replicated(mesh))
  for prediction, image_id, processed_size, original_size in _local_images(predict_fn, replicated, dataset, mesh):
    detections.extend(_detection_results(prediction, image_id))
    if score_ap and "masks" in prediction:
      segmentations.extend(_segmentation_results(prediction, image_id, processed_size, original_size))
    if scorer:
      scorer.add(prediction, image_id, processed_size, original_size)
  detections, segmentations = _allgather_json(detections), _allgather_json(segmentations)

  metrics, per_category = {}, {}   # per_category: category id -> its row of box (and mask) AP
  if score_ap:
    scored = [("bbox", "", detections)] + ([("segm", "mask_", segmentations)] if segmentations else [])
    for iou_type, prefix, results in scored:
      evaluator = _cocoeval(instances_path, results, image_ids, iou_type)
      metrics.update(_summary_metrics(evaluator, prefix))
      for row in category_ap(evaluator, prefix):
        per_category.setdefault(row["category_id"], {}).update(row)
      _log_best_and_worst_categories(per_category.values(), prefix + "AP")
  if scorer:
    metrics.update(scorer.metrics())
  metrics["num_images"] = len(image_ids)
  if output_dir:
    files = {"detections.json": detections, "metrics.json": metrics}
    if per_category:
      files["metrics_per_category.json"] = list(per_category.values())
    if segmentations:
      files["segmentations.json"] = segmentations
    if scorer:
      files["panoptic.json"] = {"annotations": _allgather_json(scorer.annotations)}
    if jax.process_index() == 0:
      os.makedirs(output_dir, exist_ok=True)
      for name, content in files.items():
        with open(os.path.join(output_dir, name), "w") as f:
          json.dump(content, f, indent=2 if name.startswith("metrics") else None)
  return metrics
