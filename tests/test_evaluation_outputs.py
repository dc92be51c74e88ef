"""What evaluation shows and writes besides metrics.json: per-category AP, pycocotools' summary in
the log, the progress bar, and the flattened config that train.py records as hparams.

Per-category AP is checked against pycocotools itself: COCOeval run once per category
(`params.catIds=[c]`) on the same detections, whose stats[0] and stats[1] are that category's AP and
AP50. The detections are real coco-mini ground truth, jittered, partly dropped, mislabelled and
randomly scored, so that the APs spread over (0, 1); no model runs.
"""

import contextlib
import io
import json
import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import generated
from detr_jax import evaluation, sharding
from detr_jax.data import pipeline
from detr_jax.models import postprocess
from detr_jax.training import loop

NUM_IMAGES = 24
SUMMARY_FIRST_LINE = " Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]"


def _quiet(fn, *args):
  """fn(*args) without pycocotools' prints."""
  with contextlib.redirect_stdout(io.StringIO()):
    return fn(*args)


def _accumulated_cocoeval(ground_truth, results, image_ids, iou_type, category_ids=None):
  """pycocotools COCOeval after evaluate() and accumulate(), over `category_ids` (default: all)."""
  from pycocotools.cocoeval import COCOeval
  evaluator = COCOeval(ground_truth, _quiet(ground_truth.loadRes, [dict(r) for r in results]), iou_type)
  evaluator.params.imgIds = list(image_ids)
  if category_ids is not None:
    evaluator.params.catIds = list(category_ids)
  _quiet(evaluator.evaluate)
  _quiet(evaluator.accumulate)
  return evaluator


def _assert_equal_to_cocoeval_per_category(rows, ground_truth, results, image_ids, iou_type, prefix=""):
  """Each row's AP and AP50 equal COCOeval's stats[0] and stats[1] with catIds=[its category] (-1 there: None
  here); its num_instances equals the non-crowd annotations of the category on `image_ids`."""
  annotations = [a for a in ground_truth.dataset["annotations"] if a["image_id"] in set(image_ids)]
  assert [row["category_id"] for row in rows] == sorted(ground_truth.getCatIds())
  for row in rows:
    category = row["category_id"]
    assert row["name"] == ground_truth.cats[category]["name"]
    assert row["num_instances"] == sum(a["category_id"] == category and not a["iscrowd"] for a in annotations)
    single = _accumulated_cocoeval(ground_truth, results, image_ids, iou_type, [category])
    _quiet(single.summarize)
    for key, expected in ((f"{prefix}AP", single.stats[0]), (f"{prefix}AP50", single.stats[1])):
      if expected == -1:
        assert row[key] is None, (category, key)
      else:
        assert row[key] == pytest.approx(expected, abs=1e-9), (category, key)


def _assert_spread(rows, key):
  """The check is not vacuous: categories without ground truth (None), and APs strictly inside (0, 1)."""
  values = [row[key] for row in rows]
  assert None in values
  assert sum(0 < v < 1 for v in values if v is not None) >= 5, values


def _jittered_ground_truth_predictions(variables, batch):
  """Per image: every ground-truth box shifted by up to 5% of its size, with a random score; one in six
  labelled "no object" (dropped) and one in eight given a random category (a false positive)."""
  del variables
  num_classes, max_boxes = 91, batch["labels"].shape[1]
  keys = jax.vmap(lambda image_id: jax.random.fold_in(jax.random.PRNGKey(0), image_id))(batch["image_id"])
  noise = jax.vmap(lambda key: jax.random.uniform(key, (max_boxes, 8)))(keys)
  labels = jnp.where(noise[..., 0] < 1 / 8, (noise[..., 1] * num_classes).astype(jnp.int32), batch["labels"])
  labels = jnp.where(batch["target_valid"] & (noise[..., 2] > 1 / 6), labels, num_classes)
  boxes = batch["boxes"].at[..., :2].add(0.1 * (noise[..., 3:5] - 0.5) * batch["boxes"][..., 2:])
  logits = (1 + 8 * noise[..., 5:6]) * jax.nn.one_hot(labels, num_classes + 1)   # scores spread over (0.01, 0.99)
  scores, labels, boxes = postprocess.detections({"pred_logits": logits, "pred_boxes": boxes}, batch["orig_size"])
  return {"scores": scores, "labels": labels, "boxes": boxes}


def test_evaluate_writes_per_category_ap_and_logs_the_summary(coco_mini, tmp_path, caplog, capsys):
  from pycocotools.coco import COCO
  out = tmp_path / "out"
  with caplog.at_level(logging.INFO):
    metrics = evaluation.evaluate(None, {}, str(coco_mini), "val2017", 8,
                                  pipeline.PipelineOptions(scale=0.25, max_boxes=50), sharding.create_mesh(),
                                  output_dir=str(out), max_images=NUM_IMAGES,
                                  predict_fn=jax.jit(_jittered_ground_truth_predictions))
  captured = capsys.readouterr()
  ground_truth = _quiet(COCO, str(coco_mini / "annotations" / "instances_val2017.json"))
  image_ids = sorted(ground_truth.getImgIds())[:NUM_IMAGES]
  detections = json.loads((out / "detections.json").read_text())
  rows = json.loads((out / "metrics_per_category.json").read_text())
  assert all(row.keys() == {"category_id", "name", "num_instances", "AP", "AP50"} for row in rows)
  _assert_spread(rows, "AP")
  _assert_equal_to_cocoeval_per_category(rows, ground_truth, detections, image_ids, "bbox")

  # pycocotools' 12-line summary goes to the log, not stdout.
  log = caplog.text
  summary_start = log.index(SUMMARY_FIRST_LINE)
  summary = log[summary_start:].splitlines()[:12]
  assert [line.split(" = ")[-1] for line in summary] == [f"{metrics[name]:.3f}" for name in evaluation.METRIC_NAMES]
  assert "Average Recall" in summary[-1] and "Average Precision" not in captured.out

  # The best and worst categories by AP, named with their AP.
  ranked = sorted((row for row in rows if row["AP"] is not None), key=lambda row: row["AP"], reverse=True)
  named = [f"{row['name']} ({row['category_id']}) {row['AP']:.4f}" for row in ranked]
  assert f"10 best: {', '.join(named[:10])}\n" in log
  assert f"10 worst: {', '.join(named[::-1][:10])}" in log

  # tqdm's progress bar over the 3 batches, on stderr.
  assert "Evaluating: 100%" in captured.err and "3/3" in captured.err


def _shifted_ground_truth_masks(ground_truth, image_ids, seed=0):
  """COCO "segm" results: every non-crowd ground-truth mask rolled by up to 6 px, with a random score in [0, 1);
  one in six dropped and one in eight given a random category. Each image also gets 11 false positives scored
  above 1 (its first mask rolled by half the image), so that maxDets 10 and 100 differ."""
  from pycocotools import mask as mask_utils
  rng = np.random.default_rng(seed)
  category_ids = ground_truth.getCatIds()
  results = []

  def result(annotation, shift, category, score):
    rle = mask_utils.encode(np.asfortranarray(np.roll(ground_truth.annToMask(annotation), shift, axis=(0, 1))))
    return {"image_id": annotation["image_id"], "category_id": category, "score": score,
            "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")}}

  for image_id in image_ids:
    annotations = ground_truth.loadAnns(ground_truth.getAnnIds(imgIds=image_id, iscrowd=False))
    for annotation in annotations:
      if rng.random() < 1 / 6:
        continue
      category = int(rng.choice(category_ids)) if rng.random() < 1 / 8 else annotation["category_id"]
      results.append(result(annotation, tuple(rng.integers(-6, 7, size=2)), category, float(rng.random())))
    if annotations:
      image = ground_truth.imgs[image_id]
      far = (image["height"] // 2, image["width"] // 2)
      results.extend(result(annotations[0], far, annotations[0]["category_id"], 1 + float(rng.random()))
                     for _ in range(11))
  return results


# pycocotools 2.0.11 decodes masks through an __array__ that numpy 2 warns about (annToMask, mask IoU).
@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")
def test_category_ap_of_masks_equals_cocoeval_per_category(coco_mini):
  from pycocotools.coco import COCO
  ground_truth = _quiet(COCO, str(coco_mini / "annotations" / "instances_val2017.json"))
  image_ids = sorted(ground_truth.getImgIds())[:NUM_IMAGES]
  results = _shifted_ground_truth_masks(ground_truth, image_ids)
  rows = evaluation.category_ap(_accumulated_cocoeval(ground_truth, results, image_ids, "segm"), prefix="mask_")
  assert all(row.keys() == {"category_id", "name", "num_instances", "mask_AP", "mask_AP50"} for row in rows)
  _assert_spread(rows, "mask_AP")
  _assert_equal_to_cocoeval_per_category(rows, ground_truth, results, image_ids, "segm", prefix="mask_")


def test_flat_hparams_joins_nested_keys_and_stringifies_the_rest():
  config = ml_collections.ConfigDict({"seed": 42, "name": "run", "flag": True,
                                      "model": {"hidden_dim": 64, "dtype": None, "nested": {"lr": 1e-4}},
                                      "data": {"fixed_size": (136, 136), "splits": ["train", "val"]}})
  assert loop.flat_hparams(config) == {"seed": 42, "name": "run", "flag": True, "model.hidden_dim": 64,
                                       "model.dtype": "None", "model.nested.lr": 1e-4,
                                       "data.fixed_size": "(136, 136)", "data.splits": "['train', 'val']"}
  # A real config: every leaf, under its dotted path, as a TensorBoard hparam type.
  config = generated.get_config()
  hparams = loop.flat_hparams(config)
  assert (hparams["model.hidden_dim"], hparams["optimizer.lr"], hparams["data.fixed_size"]) == (
      config.model.hidden_dim, config.optimizer.lr, str(config.data.fixed_size))
  assert all(isinstance(value, (bool, int, float, str)) for value in hparams.values())
