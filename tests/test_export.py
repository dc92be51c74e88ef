"""Export for serving (`detr_jax.export`): the jax.export artefact and the TensorFlow SavedModel, reloaded
in a fresh process that imports only jax, numpy and tensorflow, give the in-process Predictor's detections
on real coco-mini images, batches of 1 and 3, for DETR and Deformable DETR; and the command's errors."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from detr_jax import export, families, inference
from detr_jax.data import coco_categories, pipeline
from tests.helpers import REPO_ROOT, tiny_config, tiny_deformable_config

HEIGHT, WIDTH, SCALE = 224, 288, 0.25   # 240 x 320 images resize to 200 x 266 at scale 0.25
SCORE_TOLERANCE, BOX_TOLERANCE = 1e-5, 1e-3   # the issue asks 1e-5; boxes in pixels of 240 x 320 images

RELOAD = r"""
import sys
import numpy as np
import jax
import tensorflow as tf
out_dir, inputs, outputs = sys.argv[1:]
batch = dict(np.load(inputs))
with open(f"{out_dir}/detector.jax_export", "rb") as f:
  detector = jax.export.deserialize(f.read())
saved_model = tf.saved_model.load(f"{out_dir}/saved_model").signatures["serving_default"]
results = {}
for size in (1, 3):
  for name, value in zip(("scores", "labels", "boxes"), detector.call(
      batch["image"][:size], batch["pixel_mask"][:size], batch["orig_size"][:size])):
    results[f"jax_{size}_{name}"] = np.asarray(value)
  for name, value in saved_model(images=tf.constant(batch["uint8"][:size])).items():
    results[f"tf_{size}_{name}"] = value.numpy()
assert not any(module.startswith("detr_jax") for module in sys.modules), "the artefacts must not need detr_jax"
np.savez(outputs, **results)
"""


@pytest.fixture(scope="module")
def same_size_images(coco_mini):
  """Three real val images resized once with PIL to 240 x 320 uint8 (a SavedModel batch has one size)."""
  names = ("000000000139.jpg", "000000000802.jpg", "000000005001.jpg")
  return [np.asarray(Image.open(coco_mini / "val2017" / n).convert("RGB").resize((320, 240), Image.BILINEAR))
          for n in names]


def _tiny_checkpoint(directory, config) -> str:
  """A random tiny model of `config` with COCO's 91 slots, saved with categories and a workdir's config.json."""
  config.model.num_classes = 91
  config.data.scale = SCALE
  model = families.build_model(config.model)
  variables = families.of_model(model).init_variables(model, jax.random.PRNGKey(3))
  families.save_model_dir(str(directory), model, variables, coco_categories.coco_categories(91))
  (directory / "config.json").write_text(config.to_json())
  return str(directory)


def _assert_same_detections(scores, labels, boxes, expected: list[dict], what: str):
  """Every exported detection (any order) has a Predictor detection of its label, score and box; none is left."""
  remaining = list(expected)
  assert len(scores) == len(expected), what
  for score, label, box in zip(scores, labels, boxes):
    match = next((d for d in remaining if d["category_id"] == label and abs(d["score"] - score) <= SCORE_TOLERANCE
                  and np.abs(np.subtract(d["box"], box)).max() <= BOX_TOLERANCE), None)
    assert match is not None, f"{what}: no in-process detection matches {label} {score} {box}"
    remaining.remove(match)


@pytest.mark.parametrize("make_config", [tiny_config, tiny_deformable_config], ids=["detr", "deformable_detr"])
def test_exported_artefacts_reloaded_give_the_predictions(tmp_path, coco_mini, same_size_images, make_config):
  checkpoint = _tiny_checkpoint(tmp_path / "checkpoint", make_config(coco_mini))
  out_dir = tmp_path / "export"
  assert export.main([checkpoint, str(out_dir), "--height", str(HEIGHT), "--width", str(WIDTH)]) == 0
  serving_config = json.loads((out_dir / export.SERVING_CONFIG_FILE).read_text())
  assert (serving_config["height"], serving_config["width"], serving_config["scale"]) == (HEIGHT, WIDTH, SCALE)
  assert {"id": 18, "name": "dog"} in serving_config["categories"]

  predictor = inference.Predictor.from_checkpoint(
      checkpoint, threshold=0.0, options=pipeline.PipelineOptions(scale=SCALE, fixed_size=(HEIGHT, WIDTH)))
  expected = predictor.predict(same_size_images)
  examples = [predictor.preprocess(image) for image in same_size_images]
  batch = {"image": np.zeros((3, HEIGHT, WIDTH, 3), np.float32), "pixel_mask": np.zeros((3, HEIGHT, WIDTH), bool),
           "orig_size": np.stack([e["orig_size"] for e in examples]), "uint8": np.stack(same_size_images)}
  for i, example in enumerate(examples):
    height, width = example["image"].shape[:2]
    batch["image"][i, :height, :width] = example["image"]
    batch["pixel_mask"][i, :height, :width] = True
  np.savez(tmp_path / "inputs.npz", **batch)

  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  env.pop("PYTHONPATH", None)
  run = subprocess.run([sys.executable, "-c", RELOAD, str(out_dir), str(tmp_path / "inputs.npz"),
                        str(tmp_path / "outputs.npz")], env=env, cwd=tmp_path, capture_output=True, text=True,
                       timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  outputs = np.load(tmp_path / "outputs.npz")
  for artefact in ("jax", "tf"):
    for size in (1, 3):
      for i in range(size):
        _assert_same_detections(outputs[f"{artefact}_{size}_scores"][i], outputs[f"{artefact}_{size}_labels"][i],
                                outputs[f"{artefact}_{size}_boxes"][i], expected[i], f"{artefact} batch {size} image {i}")


def test_export_errors_are_one_line(tmp_path, coco_mini, capsys):
  with pytest.raises(SystemExit) as exit_info:
    export.main([str(tmp_path / "missing"), str(tmp_path / "out")])
  assert exit_info.value.code == 1
  assert "No checkpoint at" in capsys.readouterr().err
  config = tiny_config(coco_mini)
  config.model.masks = True
  checkpoint = _tiny_checkpoint(tmp_path / "mask_model", config)
  with pytest.raises(SystemExit):
    export.main([checkpoint, str(tmp_path / "out")])
  error = capsys.readouterr().err
  assert error.startswith("error: ") and "mask model" in error and error.count("\n") == 1
  assert not (tmp_path / "out").exists()
