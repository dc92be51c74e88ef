"""Export for serving (`detr_jax.export`): the jax.export artefact and the TensorFlow SavedModel, reloaded
in a fresh process that imports only jax, numpy and tensorflow, give the in-process Predictor's detections
on real coco-mini images, batches of 1 and 3, for DETR and Deformable DETR, and for DETR exported at two
padded sizes (--buckets) a portrait image too; and the command's errors."""

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

HEIGHT, WIDTH, SCALE = 224, 288, 0.25   # 240 x 320 images resize to 200 x 266 at scale 0.25, 320 x 240 to 266 x 200
SCORE_TOLERANCE, BOX_TOLERANCE = 1e-5, 1e-3   # the issue asks 1e-5; boxes in pixels of 240 x 320 images
# Deformable DETR is exported at the one size H x W; DETR with --buckets at H x W and W x H (equal areas, so
# the SavedModel tries H x W first), so that its portrait image takes the second size.
EXPORT_FLAGS = {"detr": ("--buckets", f"{HEIGHT}x{WIDTH}", f"{WIDTH}x{HEIGHT}"),
                "deformable_detr": ("--height", str(HEIGHT), "--width", str(WIDTH))}

RELOAD = r"""
import json, sys
import numpy as np
import jax
import tensorflow as tf
out_dir, inputs, cases, outputs = sys.argv[1:]
arrays = dict(np.load(inputs))
saved_model = tf.saved_model.load(f"{out_dir}/saved_model").signatures["serving_default"]
results = {}
for case, file in json.loads(cases):
  with open(f"{out_dir}/{file}", "rb") as f:
    detector = jax.export.deserialize(f.read())
  for name, value in zip(("scores", "labels", "boxes"), detector.call(
      arrays[f"{case}_image"], arrays[f"{case}_pixel_mask"], arrays[f"{case}_orig_size"])):
    results[f"jax_{case}_{name}"] = np.asarray(value)
  for name, value in saved_model(images=tf.constant(arrays[f"{case}_uint8"])).items():
    results[f"tf_{case}_{name}"] = value.numpy()
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


def _padded_inputs(predictor, images, height, width) -> dict:
  """The jax.export inputs of `images` (the Predictor's preprocessing, padded to height x width) and the
  SavedModel's (the uint8 images)."""
  examples = [predictor.preprocess(image) for image in images]
  batch = {"image": np.zeros((len(images), height, width, 3), np.float32),
           "pixel_mask": np.zeros((len(images), height, width), bool),
           "orig_size": np.stack([e["orig_size"] for e in examples]), "uint8": np.stack(images)}
  for i, example in enumerate(examples):
    rows, cols = example["image"].shape[:2]
    batch["image"][i, :rows, :cols] = example["image"]
    batch["pixel_mask"][i, :rows, :cols] = True
  return batch


@pytest.mark.parametrize("make_config", [tiny_config, tiny_deformable_config], ids=["detr", "deformable_detr"])
def test_exported_artefacts_reloaded_give_the_predictions(tmp_path, coco_mini, same_size_images, make_config):
  config = make_config(coco_mini)
  family = config.model.name
  checkpoint = _tiny_checkpoint(tmp_path / "checkpoint", config)
  out_dir = tmp_path / "export"
  assert export.main([checkpoint, str(out_dir), *EXPORT_FLAGS[family]]) == 0
  serving_config = json.loads((out_dir / export.SERVING_CONFIG_FILE).read_text())
  if family == "detr":
    assert serving_config["buckets"] == [
        {"height": HEIGHT, "width": WIDTH, "file": f"detector_{HEIGHT}x{WIDTH}.jax_export"},
        {"height": WIDTH, "width": HEIGHT, "file": f"detector_{WIDTH}x{HEIGHT}.jax_export"}]
  else:
    assert serving_config["buckets"] == [{"height": HEIGHT, "width": WIDTH, "file": export.JAX_EXPORT_FILE}]
  assert serving_config["scale"] == SCALE and {"id": 18, "name": "dog"} in serving_config["categories"]

  # Padding to multiples of 32 gives the Predictor the exported sizes: 224 x 288 landscape, 288 x 224 portrait.
  predictor = inference.Predictor.from_checkpoint(
      checkpoint, threshold=0.0, options=pipeline.PipelineOptions(scale=SCALE, pad_multiple=32))
  landscape = _padded_inputs(predictor, same_size_images, HEIGHT, WIDTH)
  cases = {"landscape_1": ({k: v[:1] for k, v in landscape.items()}, serving_config["buckets"][0]["file"]),
           "landscape_3": (landscape, serving_config["buckets"][0]["file"])}
  if family == "detr":
    portrait = [np.ascontiguousarray(np.rot90(same_size_images[0]))]
    cases["portrait_1"] = (_padded_inputs(predictor, portrait, WIDTH, HEIGHT), serving_config["buckets"][1]["file"])
  expected = {"landscape": predictor.predict(same_size_images)}
  if family == "detr":
    expected["portrait"] = predictor.predict(portrait)
  np.savez(tmp_path / "inputs.npz", **{f"{case}_{k}": v for case, (arrays, _) in cases.items() for k, v in arrays.items()})

  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  env.pop("PYTHONPATH", None)
  run = subprocess.run([sys.executable, "-c", RELOAD, str(out_dir), str(tmp_path / "inputs.npz"),
                        json.dumps([(case, file) for case, (_, file) in cases.items()]), str(tmp_path / "outputs.npz")],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  outputs = np.load(tmp_path / "outputs.npz")
  for artefact in ("jax", "tf"):
    for case, (arrays, _) in cases.items():
      for i in range(len(arrays["uint8"])):
        _assert_same_detections(outputs[f"{artefact}_{case}_scores"][i], outputs[f"{artefact}_{case}_labels"][i],
                                outputs[f"{artefact}_{case}_boxes"][i], expected[case.split("_")[0]][i],
                                f"{artefact} {case} image {i}")


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


def test_bucket_errors(tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    export.main([str(tmp_path / "missing"), str(tmp_path / "out"), "--buckets", "224by288"])
  assert exit_info.value.code == 2 and "'224by288' is not HxW" in capsys.readouterr().err
  with pytest.raises(SystemExit) as exit_info:
    export.main([str(tmp_path / "missing"), str(tmp_path / "out"), "--buckets", "224x288", "--height", "224"])
  assert exit_info.value.code == 1 and "leave out --height and --width" in capsys.readouterr().err
  with pytest.raises(ValueError, match="padded size 100x288: both sides must be positive multiples of 32"):
    export.padded_sizes([(224, 288), (100, 288)])
  assert export.padded_sizes([(288, 224), (224, 288), (224, 288), (96, 96)]) == [(96, 96), (224, 288), (288, 224)]
