"""COCO box evaluation: jit-compiled inference over the mesh, official post-processing, pycocotools.

The flow follows the official `engine.evaluate` with `PostProcess` and `CocoEvaluator`: every
object query becomes a detection (no threshold, no NMS), boxes go to absolute xywh of the
original image, and pycocotools' COCOeval("bbox") scores them. Used by eval.py and by the
evaluation during training.
"""

import contextlib
import io
import json
import os
from typing import Optional

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from detr_jax import detr, postprocess
from detr_jax.data import coco, pipeline

METRIC_NAMES = ("AP", "AP50", "AP75", "AP_S", "AP_M", "AP_L", "AR@1", "AR@10", "AR@100", "AR_S", "AR_M", "AR_L")


def make_predict_fn(model: detr.DETR):
  """jit(variables, batch) -> (scores [B, Q], labels [B, Q], boxes [B, Q, 4] xyxy original pixels).

  The batch arrives sharded over the mesh's data axis and the variables replicated, so XLA
  runs each device's images where they are.
  """
  def predict(variables, batch):
    outputs = model.apply(variables, batch["image"], batch["pixel_mask"])
    return postprocess.detections(outputs, batch["orig_size"])

  return jax.jit(predict)


def predict_detections(predict_fn, variables, dataset, mesh: Mesh, batch_axis: str = "data") -> list[dict]:
  """Runs `predict_fn` over an eval dataset; returns COCO results of all processes' images.

  Every process gets the full list (gathered across processes); padding examples are dropped.
  Each result is {"image_id", "category_id", "bbox" [x, y, w, h] pixels, "score"}.
  """
  sharding = NamedSharding(mesh, PartitionSpec(batch_axis))
  results = []
  for batch in pipeline.prefetch_to_mesh(dataset, sharding):
    scores, labels, boxes = predict_fn(variables, batch)
    gathered = multihost_utils.process_allgather(
        {"scores": scores, "labels": labels, "boxes": boxes, "image_id": batch["image_id"],
         "example_mask": batch["example_mask"]}, tiled=True)
    xywh = gathered["boxes"].copy()
    xywh[..., 2:] -= xywh[..., :2]
    for i in np.flatnonzero(gathered["example_mask"]):
      image_id = int(gathered["image_id"][i])
      results.extend({"image_id": image_id, "category_id": int(label), "bbox": [float(v) for v in box],
                      "score": float(score)}
                     for score, label, box in zip(gathered["scores"][i], gathered["labels"][i], xywh[i]))
  return results


def coco_metrics(annotation_path: str, results: list[dict], image_ids) -> dict:
  """pycocotools COCOeval("bbox") of `results` on `image_ids`; returns METRIC_NAMES -> value.

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
    evaluator = COCOeval(ground_truth, ground_truth.loadRes([dict(r) for r in results]), "bbox")
    evaluator.params.imgIds = sorted(int(i) for i in image_ids)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
  return {name: float(value) for name, value in zip(METRIC_NAMES, evaluator.stats)}


def metrics_table(metrics: dict) -> str:
  """METRIC_NAMES -> value as a two-line text table (names over values, 4 decimals)."""
  names = [n for n in METRIC_NAMES if n in metrics]
  widths = [max(len(n), 6) for n in names]
  header = " | ".join(n.rjust(w) for n, w in zip(names, widths))
  values = " | ".join(f"{metrics[n]:.4f}".rjust(w) for n, w in zip(names, widths))
  return f"{header}\n{'-' * len(header)}\n{values}"


def evaluate(model: detr.DETR, variables, data_dir: str, split: str, batch_size: int,
             options: pipeline.PipelineOptions, mesh: Mesh, output_dir: Optional[str] = None,
             max_images: Optional[int] = None, predict_fn=None) -> dict:
  """COCO box metrics of `model` on a COCO folder's split.

  Args:
    data_dir, split: `annotations/instances_{split}.json` and `{split}/` under data_dir.
    batch_size: images per step over all processes (a multiple of the mesh's device count).
      Padding is part of the input (as in the official code), so scores vary with it slightly.
    options: resize and padding options (scale, pad_multiple or fixed_size).
    output_dir: where process 0 writes detections.json (COCO results) and metrics.json.
    max_images: evaluate only the first N images by id.
    predict_fn: a `make_predict_fn(model)`, to reuse its compiled programs across calls.
  Returns:
    METRIC_NAMES -> value (with "num_images"), the same on every process.
  Raises:
    coco.DatasetError: the folder or annotation file is missing or invalid.
    ValueError: batch_size is not a multiple of the process count.
  """
  if batch_size % jax.process_count():
    raise ValueError(f"Eval batch size {batch_size} is not a multiple of the {jax.process_count()} processes.")
  records = coco.load_coco_folder(data_dir, split, keep_empty=True)
  dataset = pipeline.eval_dataset(records, batch_size // jax.process_count(), options, max_images=max_images)
  predict_fn = predict_fn or make_predict_fn(model)
  replicated = jax.device_put(variables, NamedSharding(mesh, PartitionSpec()))
  results = predict_detections(predict_fn, replicated, dataset, mesh)
  image_ids = records.image_ids[:max_images] if max_images else records.image_ids
  metrics = coco_metrics(coco.annotation_path(data_dir, split), results, image_ids)
  metrics["num_images"] = len(image_ids)
  if output_dir and jax.process_index() == 0:
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "detections.json"), "w") as f:
      json.dump(results, f)
    with open(os.path.join(output_dir, "metrics.json"), "w") as f:
      json.dump(metrics, f, indent=2)
  return metrics
