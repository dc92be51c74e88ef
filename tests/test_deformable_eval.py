"""eval.py on a Deformable DETR checkpoint file, as a user runs it: transformers' `model.safetensors`
of a random-weight refinement model, ported on the fly, over real coco-mini val images.

Checked: the official post-processing's 100 detections per image (top 100 over all (query, class)
pairs, so one query may give several), and metrics.json equal to pycocotools re-scoring
detections.json.
"""

import json

import numpy as np

from detr_jax import evaluation
from references.transformers_deformable_detr import hf_deformable_detr
from tests.test_entry_points import run_command

IMAGES = 2


def test_eval_py_on_a_transformers_safetensors_file(coco_mini, tmp_path):
  hf_deformable_detr(with_box_refine=True).save_pretrained(tmp_path / "hf")
  out = tmp_path / "eval"
  run = run_command("eval.py", "--config", "configs/deformable_detr_r50_refine.py",
                    "--checkpoint", str(tmp_path / "hf" / "model.safetensors"), "--data_dir", str(coco_mini),
                    "--output_dir", str(out), "--max_images", str(IMAGES), "--config.data.scale=0.25",
                    "--config.per_device_eval_batch_size=2")
  assert run.returncode == 0, run.stderr[-3000:]
  assert "Deformable-DETR-R50 multi-scale + refinement (91 classes, 300 queries)" in run.stdout

  detections = json.loads((out / "detections.json").read_text())
  image_ids = sorted({d["image_id"] for d in detections})
  assert len(image_ids) == IMAGES
  for image_id in image_ids:
    scores = [d["score"] for d in detections if d["image_id"] == image_id]
    assert len(scores) == 100 and scores == sorted(scores, reverse=True)
  queries_reused = len(detections) - len({(d["image_id"], tuple(d["bbox"])) for d in detections})
  assert queries_reused > 0   # random weights: some queries score high for several classes

  metrics = json.loads((out / "metrics.json").read_text())
  rescored = evaluation.coco_metrics(str(coco_mini / "annotations" / "instances_val2017.json"), detections, image_ids)
  for name, value in rescored.items():
    np.testing.assert_equal(metrics[name], value, err_msg=name)

