"""train.py / eval.py: sharding invariance, exact resume, multi-process, NaN stop, COCO evaluation.

All on real coco-mini images at a small resolution, with a tiny DETR so that a step takes well
under a second on 2 cores.
"""

import json
import os
import signal
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import coco_mini_cpu
from detr_jax import checkpoints, evaluation, families, sharding, summaries, training
from detr_jax.data import pipeline
from detr_jax.models import postprocess
from detr_jax.training import loop
from references.transformers_detr import hf_detr
from tests.helpers import (LOSS_TERMS, REPO_ROOT, instrumented_train_step, require_shared_file, run_on_cpu_devices,
                           tiny_config, tiny_deformable_config, xla_flags)



TRAIN_SCRIPT = """
import json, os, signal, sys
import jax
import pytest
args = json.loads(sys.argv[1])
if "process_id" in args:
  jax.distributed.initialize(f"localhost:{args['port']}", args["num_processes"], args["process_id"])
from detr_jax import summaries, training
from tests.helpers import LOSS_TERMS, instrumented_train_step, tiny_config, tiny_deformable_config
calls = []
def on_call(index, batch):
  calls.append(index)
  if index == args.get("sigterm_at_call") and jax.process_index() == args.get("sigterm_process"):
    os.kill(os.getpid(), signal.SIGTERM)   # the preemption notice reaches one host
  return batch
instrumented_train_step(pytest.MonkeyPatch(), on_call)
make_config = tiny_deformable_config if args.get("family") == "deformable_detr" else tiny_config
config = make_config(args["data_dir"], num_train_steps=args.get("steps", 2),
                     checkpoint_every_steps=args.get("checkpoint_every_steps", 2))
state = training.train_and_evaluate(config, args["workdir"])
scalars = summaries.read_scalars(args["workdir"]) if jax.process_index() == 0 else {}
print(json.dumps({"devices": jax.device_count(), "step": int(state.step), "calls": len(calls),
                  **{k: scalars[k] for k in (*LOSS_TERMS, "grad_norm") if k in scalars}}))
"""


def _assert_same_losses(a, b, atol, grad_norm_rtol=1e-6):
  """Loss terms within `atol`, the gradient norm (~200 at the first step) within `grad_norm_rtol`."""
  for term in (*LOSS_TERMS, "grad_norm"):
    assert sorted(a[term]) == sorted(b[term]) == ["1", "2"], term
    for step in a[term]:
      tolerance = grad_norm_rtol * abs(b[term][step]) if term == "grad_norm" else atol
      assert abs(a[term][step] - b[term][step]) <= tolerance, (term, step, a[term][step], b[term][step])


def _max_parameter_difference(workdir_a, workdir_b) -> float:
  """Largest |difference| between the final variables of two training workdirs."""
  _, a = families.load_model(str(workdir_a))
  _, b = families.load_model(str(workdir_b))
  return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(jnp.abs(x - y).max()), a, b)))


@pytest.mark.parametrize("family", ["detr", "deformable_detr"])
def test_one_and_eight_devices_train_alike(coco_mini, tmp_path, family):
  args = lambda name: json.dumps({"data_dir": str(coco_mini), "workdir": str(tmp_path / name), "family": family})
  one = run_on_cpu_devices(TRAIN_SCRIPT, args("one"), devices=1)
  eight = run_on_cpu_devices(TRAIN_SCRIPT, args("eight"), devices=8)
  assert (one["devices"], eight["devices"]) == (1, 8)
  assert one["loss"]["1"] != one["loss"]["2"]
  _assert_same_losses(one, eight, atol=1e-5)   # same global batch of 8; float summation order differs
  # Two AdamW steps move each element by ~2 * lr = 4e-4; measured difference 2.2e-7 (DETR), 1.5e-6
  # (Deformable DETR, whose sampling gradients are scatter-adds summed in another order; the issue asks 1e-5).
  tolerance = {"detr": 1e-6, "deformable_detr": 1e-5}[family]
  assert _max_parameter_difference(tmp_path / "one", tmp_path / "eight") <= tolerance


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _train_on_two_processes(**args) -> list[dict]:
  """TRAIN_SCRIPT on 2 localhost processes of 2 CPU devices each; each process's printed JSON."""
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS=xla_flags(2), JAX_PLATFORMS="cpu",
             PYTHONPATH=str(REPO_ROOT))
  runs = [subprocess.Popen([sys.executable, "-c", TRAIN_SCRIPT, json.dumps(
              {**args, "port": port, "num_processes": 2, "process_id": i})],
              env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for i in range(2)]
  outputs = [run.communicate(timeout=600) for run in runs]
  for run, (_, stderr) in zip(runs, outputs):
    assert run.returncode == 0, stderr[-3000:]
  return [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in outputs]


def test_two_processes_train_like_one(coco_mini, tmp_path):
  two, _ = _train_on_two_processes(data_dir=str(coco_mini), workdir=str(tmp_path / "two"))
  one = run_on_cpu_devices(TRAIN_SCRIPT, json.dumps({"data_dir": str(coco_mini), "workdir": str(tmp_path / "one")}),
                           devices=4)
  assert two["devices"] == one["devices"] == 4
  _assert_same_losses(one, two, atol=1e-5)
  assert _max_parameter_difference(tmp_path / "one", tmp_path / "two") <= 1e-6


def test_sigterm_to_one_of_two_processes_saves_the_same_step_on_both(coco_mini, tmp_path):
  """jax.distributed's preemption sync (orbax `reached_preemption`) makes both processes agree on
  the step to save after one of them gets SIGTERM; both exit cleanly, and a rerun resumes there."""
  run = dict(data_dir=str(coco_mini), workdir=str(tmp_path / "run"), checkpoint_every_steps=1000)
  preempted = _train_on_two_processes(**run, steps=40, sigterm_process=1, sigterm_at_call=3)
  saved = preempted[0]["step"]
  assert [out["step"] for out in preempted] == [saved, saved] and 3 <= saved < 40
  with checkpoints.manager(run["workdir"]) as manager:
    assert manager.latest_step() == saved   # periodic saves are 1000 steps apart
  resumed = _train_on_two_processes(**run, steps=saved + 2)
  assert [(out["step"], out["calls"]) for out in resumed] == [(saved + 2, 2), (saved + 2, 2)]


@pytest.mark.parametrize("make_config", [tiny_config, tiny_deformable_config], ids=["detr", "deformable_detr"])
def test_sigterm_then_resume_equals_uninterrupted_run(coco_mini, tmp_path, monkeypatch, make_config):
  config = make_config(coco_mini, batch_size=2, num_train_steps=6)
  config.loss.solver = "host"
  if config.model.name == "deformable_detr":
    # Single-scale, one-stage compiles in half the time; its sampling offsets and reference points
    # still carry the extra optimiser group. test_one_and_eight_devices_train_alike trains every module.
    config.model.update(num_feature_levels=1, with_box_refine=False, two_stage=False)
  image_ids = {"full": [], "split": []}
  run = {"name": "full", "kill_at": None}

  def on_call(index, batch):
    image_ids[run["name"]].append(np.asarray(batch["image_id"]))
    if index == run["kill_at"]:
      os.kill(os.getpid(), signal.SIGTERM)   # preemption arrives during step 3
    return batch
  instrumented_train_step(monkeypatch, on_call)
  handler = signal.getsignal(signal.SIGTERM)

  training.train_and_evaluate(config, str(tmp_path / "full"))
  run.update(name="split", kill_at=3)
  training.train_and_evaluate(config, str(tmp_path / "split"))
  assert signal.getsignal(signal.SIGTERM) == handler
  with checkpoints.manager(str(tmp_path / "split")) as manager:
    assert manager.latest_step() == 3
  run["kill_at"] = None
  training.train_and_evaluate(config, str(tmp_path / "split"))

  np.testing.assert_array_equal(np.stack(image_ids["full"]), np.stack(image_ids["split"]))
  full, split = summaries.read_scalars(str(tmp_path / "full")), summaries.read_scalars(str(tmp_path / "split"))
  for term in LOSS_TERMS:
    assert sorted(full[term]) == sorted(split[term]) == list(range(1, 7))
    np.testing.assert_allclose([split[term][s] for s in range(1, 7)], [full[term][s] for s in range(1, 7)],
                               rtol=0, atol=1e-6, err_msg=term)
  _, full_variables = families.load_model(str(tmp_path / "full"))
  _, split_variables = families.load_model(str(tmp_path / "split"))
  differences = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), full_variables, split_variables))
  assert max(differences) <= 1e-6


def test_nan_loss_stops_naming_the_step_and_keeps_the_checkpoint(coco_mini, tmp_path, monkeypatch):
  """The host reads the losses only at log steps and saves (here step 4, a save): the step-3 update
  is skipped on the device, the run stops naming step 3, and no checkpoint holds a NaN."""
  config = tiny_config(coco_mini, batch_size=2, num_train_steps=6, checkpoint_every_steps=2, log_every_steps=5)
  original = loop.make_train_step
  around_nan_step = {}

  def make(*args):
    step_fn = original(*args)
    calls = []

    def wrapped(state, batch):
      calls.append(None)
      if len(calls) != 3:
        return step_fn(state, batch)
      around_nan_step["before"] = jax.device_get(state)   # the call donates `state`
      new_state, metrics, loss = step_fn(state, {**batch, "image": batch["image"] * jnp.nan})
      around_nan_step["after"] = jax.device_get(new_state)
      return new_state, metrics, loss
    return wrapped
  monkeypatch.setattr(loop, "make_train_step", make)
  with pytest.raises(training.NonFiniteLossError, match="Loss is nan at step 3.*step 2"):
    training.train_and_evaluate(config, str(tmp_path))
  before, after = around_nan_step["before"], around_nan_step["after"]
  assert int(after.step) == int(before.step) == 2
  jax.tree.map(np.testing.assert_array_equal, after.params, before.params)
  jax.tree.map(np.testing.assert_array_equal, after.opt_state, before.opt_state)
  with checkpoints.manager(str(tmp_path)) as manager:
    assert max(manager.all_steps()) == 2   # orbax also keeps its first save, at step 1
  _, variables = families.load_model(str(tmp_path))
  assert all(bool(jnp.isfinite(leaf).all()) for leaf in jax.tree.leaves(variables))


def test_evaluation_of_ground_truth_boxes_scores_one(coco_mini):
  """The whole eval path (pipeline, sharding, post-processing, xywh, pycocotools) with perfect predictions."""
  def ground_truth_predictions(variables, batch):
    del variables
    num_classes = 91
    labels = jnp.where(batch["target_valid"], batch["labels"], num_classes)
    outputs = {"pred_logits": 30.0 * jax.nn.one_hot(labels, num_classes + 1), "pred_boxes": batch["boxes"]}
    return dict(zip(("scores", "labels", "boxes"), postprocess.detections(outputs, batch["orig_size"])))

  metrics = evaluation.evaluate(None, {}, str(coco_mini), "val2017", 8, pipeline.PipelineOptions(scale=0.25,
                                max_boxes=50), sharding.create_mesh(), max_images=40,
                                predict_fn=jax.jit(ground_truth_predictions))
  assert metrics["num_images"] == 40
  # Boxes were clipped to the image and stored in float32: IoU with the annotations is ~1, not exactly 1.
  assert metrics["AP50"] == pytest.approx(1.0, abs=1e-6)
  assert metrics["AP"] >= 0.99


def _coco_stats(annotation_path, results_path, iou_type, image_ids):
  from pycocotools.coco import COCO
  from pycocotools.cocoeval import COCOeval
  ground_truth = COCO(str(annotation_path))
  evaluator = COCOeval(ground_truth, ground_truth.loadRes(str(results_path)), iou_type)
  evaluator.params.imgIds = image_ids
  evaluator.evaluate()
  evaluator.accumulate()
  evaluator.summarize()
  return list(evaluator.stats)


def _assert_files_rescore_to_metrics(out, coco_mini, split, image_ids):
  """detections.json, segmentations.json and panoptic.json + PNGs, scored again by pycocotools and
  pq_compute straight from the files, give metrics.json."""
  from detr_jax.evaluation import panoptic_quality
  metrics = json.loads((out / "metrics.json").read_text())
  annotations = coco_mini / "annotations"
  for results, iou_type, names in (("detections.json", "bbox", evaluation.METRIC_NAMES),
                                   ("segmentations.json", "segm", evaluation.MASK_METRIC_NAMES)):
    stats = _coco_stats(annotations / f"instances_{split}.json", out / results, iou_type, image_ids)
    assert [metrics[name] for name in names] == pytest.approx(stats, abs=1e-12), results
  panoptic = json.loads((out / "panoptic.json").read_text())["annotations"]
  assert sorted(a["image_id"] for a in panoptic) == image_ids
  assert sorted(os.listdir(out / "panoptic")) == sorted(a["file_name"] for a in panoptic)
  summary = panoptic_quality.pq_compute(str(annotations / f"panoptic_{split}.json"),
                                        str(annotations / f"panoptic_{split}"), str(out / "panoptic.json"),
                                        str(out / "panoptic"))
  for group, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
    for name in ("PQ", "SQ", "RQ"):
      assert metrics[name + suffix] == pytest.approx(summary[group][name.lower()], abs=1e-12), name + suffix
  return metrics


def test_evaluation_of_ground_truth_segments(coco_mini, tmp_path):
  """Box AP, mask AP and PQ through the whole eval path with the ground-truth panoptic segments as
  predictions (full-resolution mask logits of +-10, one-hot class logits).

  Bounds: each image is resized to 800 px and its segments come back by nearest resizing, so
  boundary pixels move. Every segment must still be found (RQ = 1) with PQ >= 0.99 (0.9945
  measured). Mask AP compares panoptic segments with the instance annotations, which COCO
  edited to make panoptic segments disjoint, so mask AP50 >= 0.95 (0.985 measured), not 1.
  """
  def ground_truth_predictions(variables, batch):
    del variables
    labels = jnp.where(batch["target_valid"], batch["labels"], 250)
    pred_logits, pred_masks = 30.0 * jax.nn.one_hot(labels, 251), jnp.where(batch["segment_masks"], 10.0, -10.0)
    scores, labels, boxes = postprocess.detections({"pred_logits": pred_logits, "pred_boxes": batch["boxes"]},
                                                   batch["orig_size"])
    return {"scores": scores, "labels": labels, "boxes": boxes, "pred_logits": pred_logits, "pred_masks": pred_masks,
            "masks": postprocess.instance_masks(pred_masks, batch["size"], batch["image"].shape[1:3])}

  require_shared_file(coco_mini / "annotations" / "panoptic_train2017.json", "coco-mini's panoptic annotations")
  out = tmp_path / "out"
  # One image per batch, no padding: the padded mask map is exactly the processed image.
  options = pipeline.PipelineOptions(scale=1.0, max_boxes=100, pad_multiple=1)
  metrics = evaluation.evaluate(None, {}, str(coco_mini), "train2017", 1, options, sharding.create_mesh(),
                                output_dir=str(out), max_images=6, predict_fn=jax.jit(ground_truth_predictions),
                                panoptic=True, keep_segment_masks=True)
  panoptic_json = json.loads((coco_mini / "annotations" / "panoptic_train2017.json").read_text())
  image_ids = sorted(a["image_id"] for a in panoptic_json["annotations"])[:6]
  assert metrics["num_images"] == len(image_ids) == 6
  assert metrics["RQ"] == 1.0 and metrics["PQ"] >= 0.99
  assert metrics["AP50"] == pytest.approx(1.0, abs=1e-6) and metrics["mask_AP50"] >= 0.95
  _assert_files_rescore_to_metrics(out, coco_mini, "train2017", image_ids)


def test_eval_cli_on_ported_checkpoint_matches_pycocotools(coco_mini, tmp_path):
  """eval.py on a random-weight transformers checkpoint; detections.json re-scored independently.

  The model has 80 classes, so coco-mini's category ids 80..90 are beyond it: a warning, not an error. Also
  checked: what a user sees, the progress bar and pycocotools' summary on stderr (the log), the metrics table
  alone on stdout, and metrics_per_category.json.
  """
  import safetensors.torch
  from pycocotools.coco import COCO
  from pycocotools.cocoeval import COCOeval
  checkpoint = tmp_path / "model.safetensors"
  state_dict = hf_detr(depth=50, num_labels=80, seed=3).state_dict()
  safetensors.torch.save_file({k: v.contiguous() for k, v in state_dict.items()}, str(checkpoint))
  out = tmp_path / "out"
  run = subprocess.run([sys.executable, "eval.py", "--config", "configs/detr_r50.py", "--checkpoint", str(checkpoint),
                        "--data_dir", str(coco_mini), "--output_dir", str(out), "--max_images", "16",
                        "--config.data.scale=0.25", "--config.per_device_eval_batch_size=8"],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
  assert run.returncode == 0, run.stderr[-3000:]
  assert "AR@100" in run.stdout and "Average Precision" not in run.stdout
  assert (f"The model's num_classes=80 does not cover {coco_mini}/val2017, whose category ids go up to 90: "
          "detections of the categories with ids 80 and above cannot be produced." in run.stderr), run.stderr[-3000:]
  assert "Evaluating: 100%" in run.stderr
  assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in run.stderr
  per_category = json.loads((out / "metrics_per_category.json").read_text())
  assert len(per_category) == 80 and all(row["AP"] in (0.0, None) for row in per_category if row["category_id"] >= 80)
  metrics = json.loads((out / "metrics.json").read_text())
  detections = json.loads((out / "detections.json").read_text())
  ground_truth = COCO(str(coco_mini / "annotations" / "instances_val2017.json"))
  first_ids = sorted(ground_truth.getImgIds())[:16]
  assert len(detections) == 16 * 100 and {d["image_id"] for d in detections} == set(first_ids)
  assert all(set(d) == {"image_id", "category_id", "bbox", "score"} for d in detections)   # COCO results format
  evaluator = COCOeval(ground_truth, ground_truth.loadRes(str(out / "detections.json")), "bbox")
  evaluator.params.imgIds = first_ids
  evaluator.evaluate()
  evaluator.accumulate()
  evaluator.summarize()
  assert [metrics[name] for name in evaluation.METRIC_NAMES] == pytest.approx(list(evaluator.stats), abs=1e-12)


def test_eval_cli_panoptic_on_ported_segmentation_checkpoint(coco_mini, tmp_path):
  """eval.py with the panoptic config on a random-weight transformers DetrForSegmentation (R18).

  The class head's "person" bias is raised by 10, so that queries pass the 0.85 threshold and the
  panoptic post-processor writes real segments (stuff merging is covered by the ground-truth
  test above); the files are then re-scored independently.
  """
  import safetensors.torch
  import torch
  require_shared_file(coco_mini / "annotations" / "panoptic_train2017.json", "coco-mini's panoptic annotations")
  model = hf_detr(depth=18, segmentation=True, num_labels=250, seed=5)
  with torch.no_grad():
    model.detr.class_labels_classifier.bias[1] += 10.0
  checkpoint = tmp_path / "model.safetensors"
  safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(checkpoint))
  out = tmp_path / "out"
  run = subprocess.run([sys.executable, "eval.py", "--config", "configs/detr_r50_panoptic.py",
                        "--checkpoint", str(checkpoint), "--data_dir", str(coco_mini), "--split", "train2017",
                        "--output_dir", str(out), "--max_images", "3", "--config.data.scale=0.25",
                        "--config.per_device_eval_batch_size=2"],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
  assert run.returncode == 0, run.stderr[-3000:]
  assert "mask_AP" in run.stdout and "PQ_st" in run.stdout
  panoptic_json = json.loads((coco_mini / "annotations" / "panoptic_train2017.json").read_text())
  image_ids = sorted(a["image_id"] for a in panoptic_json["annotations"])[:3]
  metrics = _assert_files_rescore_to_metrics(out, coco_mini, "train2017", image_ids)
  segments = [s for a in json.loads((out / "panoptic.json").read_text())["annotations"] for s in a["segments_info"]]
  assert segments and {s["category_id"] for s in segments} == {1}
  assert len(json.loads((out / "segmentations.json").read_text())) == 3 * 100
  assert metrics["num_images"] == 3


def _flat(variables):
  import flax
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(variables))


def test_initialisation_from_detr_and_torchvision_checkpoints(tmp_path):
  import torch
  from configs import detr_r50
  from detr_jax import porting
  from detr_jax.models import detr
  reference = hf_detr(depth=18, seed=5)
  checkpoint = tmp_path / "detr.pth"
  torch.save({"model": reference.state_dict()}, checkpoint)
  _, ported = porting.load_pytorch_checkpoint(str(checkpoint))
  config = detr_r50.get_config()
  config.model.backbone_depth = 18
  config.init.checkpoint = str(checkpoint)

  loaded = _flat(training.initial_variables(config, families.build_model(config.model)))
  assert loaded.keys() == _flat(ported).keys()
  assert all(np.array_equal(loaded[k], v) for k, v in _flat(ported).items())

  config.model.num_classes = 5
  with pytest.raises(porting.CheckpointMismatchError, match="reset_class_head"):
    training.initial_variables(config, families.build_model(config.model))
  config.init.reset_class_head = True
  reset = _flat(training.initial_variables(config, families.build_model(config.model)))
  assert reset[("params", "class_embed", "kernel")].shape == (256, 6)
  assert all(np.array_equal(reset[k], v) for k, v in _flat(ported).items() if "class_embed" not in k)

  backbone_file = tmp_path / "resnet18.pth"
  prefix = "backbone.0.body."
  torch.save({k[len(prefix):]: torch.from_numpy(np.array(v)) for k, v in porting.to_pytorch_state_dict(ported).items()
              if k.startswith(prefix)}, backbone_file)
  config.init.update(checkpoint="", backbone_checkpoint=str(backbone_file), reset_class_head=False)
  fresh = _flat(detr.init_variables(families.build_model(config.model), jax.random.PRNGKey(config.seed)))
  with_backbone = _flat(training.initial_variables(config, families.build_model(config.model)))
  for key, value in with_backbone.items():
    expected = _flat(ported)[key] if key[1] == "backbone" else fresh[key]
    assert np.array_equal(value, expected), key


def test_panoptic_mask_head_trains_on_a_frozen_detector(coco_mini, tmp_path):
  """The panoptic recipe on coco-mini's panoptic annotations: only bbox_attention and the mask head
  move, and the final evaluation reports box AP, mask AP and PQ."""
  from detr_jax import porting
  from detr_jax.models import detr, segmentation
  require_shared_file(coco_mini / "annotations" / "panoptic_train2017.json", "coco-mini's panoptic annotations")
  config = tiny_config(coco_mini, batch_size=2, num_train_steps=2)
  config.model.update(masks=True, num_classes=250)
  config.data.update(source="coco_panoptic", max_boxes=60, eval_split="train2017")
  config.update(eval_max_images=2, per_device_per_device_eval_batch_size=2)
  config.optimizer.train_mask_head_only = True
  config.loss.solver = "host"
  model = families.build_model(config.model)
  box_model = families.build_model({**config.model, "masks": False})
  box_checkpoint = str(tmp_path / "box.pth")
  porting.save_pytorch_checkpoint(porting.to_pytorch_state_dict(detr.init_variables(box_model, jax.random.PRNGKey(7))),
                                  box_checkpoint)
  config.init.checkpoint = box_checkpoint
  start = _flat(training.initial_variables(config, model))

  training.train_and_evaluate(config, str(tmp_path / "run"))
  _, trained = families.load_model(str(tmp_path / "run"))
  trained = _flat(trained)
  assert trained.keys() == start.keys()
  for key, value in trained.items():
    if key[1] in segmentation.MODULE_NAMES:
      assert not np.array_equal(value, start[key]), key
    else:
      np.testing.assert_array_equal(value, start[key], err_msg=str(key))
  scalars = summaries.read_scalars(str(tmp_path / "run"))
  assert all(np.isfinite(scalars[name][2]) and scalars[name][2] > 0 for name in ("loss_mask", "loss_dice"))
  evaluated = json.loads((tmp_path / "run" / "eval_2" / "metrics.json").read_text())
  assert evaluated["num_images"] == 2
  assert {"AP", "mask_AP", "PQ", "PQ_th", "PQ_st"} <= evaluated.keys()
  assert {"eval/PQ", "eval/mask_AP"} <= scalars.keys()


def test_the_training_step_draws_dropout(coco_mini):
  """The jitted step trains with dropout: its loss differs from the deterministic loss of the same
  parameters and batch, and another seed gives another loss (dropout 0.1, real images and targets)."""
  from detr_jax import losses
  from detr_jax.models import detr
  from detr_jax.training import optim
  from references.coco_mini import coco_targets, coco_train_image_ids
  from references.official_preprocessing import padded_batch
  image_ids = coco_train_image_ids(coco_mini, 2)
  images, mask = padded_batch([coco_mini / "train2017" / f"{i:012d}.jpg" for i in image_ids], 128)
  batch = {"image": images, "pixel_mask": mask, **coco_targets(coco_mini, image_ids)[0]}
  model = detr.DETR(backbone_depth=18, hidden_dim=64, num_encoder_layers=1, num_decoder_layers=2, dim_feedforward=128,
                    num_queries=12, dropout=0.1)
  variables = detr.init_variables(model, jax.random.PRNGKey(0))
  criterion = losses.SetCriterion(num_classes=91, solver="host")
  tx = optim.create(coco_mini_cpu.get_config().optimizer, steps_per_epoch=10)
  train_step = training.make_train_step(model, criterion, tx, sharding.create_mesh(),
                                         training.metric_collection(losses.term_names(2)))
  # Each state gets its own copy of the variables: the step donates the state's buffers.
  step_losses = [float(train_step(training.create_train_state(jax.tree.map(jnp.array, variables), tx, seed), batch)[2])
                 for seed in (0, 1)]
  deterministic_loss = float(criterion(jax.jit(model.apply)(variables, images, mask), batch)[0])
  assert abs(step_losses[0] - deterministic_loss) > 1e-3 and abs(step_losses[1] - deterministic_loss) > 1e-3
  assert abs(step_losses[0] - step_losses[1]) > 1e-3
