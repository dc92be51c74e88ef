"""`detr-port export --hf` directories run in transformers' `pipeline("object-detection")` and give the
in-process Predictor's detections on real coco-mini images, for DETR and Deformable DETR; the export
names COCO's classes in config.json and writes the eval preprocessing of the checkpoint's scale.

The models are random tiny ones whose class heads are made peaked (scaled kernel; COCO's unused ids
pushed down, as a trained model's are) and whose queries are made distinct (scaled `query_embed`), so
that a few detections of several labels pass a threshold.
transformers resizes with PIL (to uint8) and detr_jax in float with tf.image, so the images are
resized once with PIL to the processed size, which neither side then changes; the Predictor does not
pad (`pad_multiple=1`), as transformers does not pad an image alone.

Tolerances: scores 1e-4; boxes 1e-2 pixels where transformers' processor and model are run as the
pipeline runs them (the pipeline itself returns boxes truncated to int pixels: within 1 pixel).
Measured 2026-12-03 (float32 CPU): scores <= 1.4e-6, float boxes <= 3.1e-5 pixels (7 DETR and 4 Deformable
DETR detections of 2 to 3 labels).
"""

import json

import jax
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from detr_jax import families, inference
from detr_jax.data import coco_categories, pipeline, transforms
from detr_jax.porting import cli, huggingface
from tests.helpers import tiny_config, tiny_deformable_config

SCALE = 0.25   # processor size {"shortest_edge": 200, "longest_edge": 333}
SCORE_TOLERANCE, BOX_TOLERANCE = 1e-4, 1e-2
MARGIN = 1e-3   # no score lies this close to the threshold
COCO = coco_categories.coco_categories(91)
PROCESSOR_TYPES = {"detr": "DetrImageProcessor", "deformable_detr": "DeformableDetrImageProcessor"}


def _peaked_detector(config, gain: float):
  """(model, variables) of config.model with COCO's 91 slots: the official initialisation, then every class
  head's kernel times `gain` and -20 on the biases of COCO's unused ids, and `query_embed` times 30."""
  config.model.num_classes = 91
  model = families.build_model(config.model)
  variables = families.of_model(model).init_variables(model, jax.random.PRNGKey(0))
  unused = np.setdiff1d(np.arange(91), [c["id"] for c in COCO])
  params = dict(variables["params"])
  for name in [name for name in params if name.startswith("class_embed")]:
    bias = np.array(params[name]["bias"])
    bias[unused] -= 20.0
    params[name] = {"kernel": np.asarray(params[name]["kernel"]) * gain, "bias": bias}
  params["query_embed"] = np.asarray(params["query_embed"]) * 30.0
  return model, {**variables, "params": params}


@pytest.fixture(scope="module")
def detr(coco_mini):
  """`tiny_config`'s DETR-R18 (width 64, 1 encoder and 2 decoder layers, 12 queries)."""
  return _peaked_detector(tiny_config(coco_mini), gain=10.0)


@pytest.fixture(scope="module")
def deformable_detr(coco_mini):
  """Single-scale (for time) with refinement (a head per layer, exported untied); one-stage, since two-stage ports
  may rank proposals whose scores differ by ~1e-6 in another order. Sigmoid scores saturate at DETR's gain."""
  config = tiny_deformable_config(coco_mini)
  config.model.update(num_feature_levels=1, two_stage=False)
  return _peaked_detector(config, gain=3.0)


@pytest.fixture(scope="module")
def processed_size_images(coco_mini):
  """Two real val images (landscape, portrait) resized once with PIL to shorter side round(800 * SCALE)."""
  side = round(800 * SCALE)
  images = []
  for name in ("000000000139.jpg", "000000000802.jpg"):
    image = Image.open(coco_mini / "val2017" / name).convert("RGB")
    ratio = side / min(image.size)
    images.append(image.resize((round(image.width * ratio), round(image.height * ratio)), Image.BILINEAR))
  for image in images:
    assert max(image.size) <= round(1333 * SCALE)
    size = transforms.target_size(image.height, image.width, side, round(1333 * SCALE))
    assert (int(size[0]), int(size[1])) == (image.height, image.width), "detr_jax would resize the image"
  return images


def _threshold(detections, kept: int) -> float:
  """A threshold that at least `kept` detections of every image pass, no score within MARGIN of it."""
  scores = np.sort([d["score"] for image in detections for d in image])[::-1]
  lowest = min(sorted(d["score"] for d in image)[-kept] for image in detections)
  gaps = [k for k in range(1, len(scores)) if scores[k - 1] <= lowest and scores[k - 1] - scores[k] > 2 * MARGIN]
  assert gaps, "no threshold keeps the scores clear of it"
  return float(scores[gaps[0] - 1] + scores[gaps[0]]) / 2


def _assert_same_detections(actual, expected: list[dict], box_tolerance: float, what: str):
  """Each of `actual` [(label name, score, [x0, y0, x1, y1])] (any order) has its own `expected` detection of
  that label, score and box; none is left over."""
  remaining = list(expected)
  assert len(actual) == len(expected), what
  for label, score, box in actual:
    match = next((d for d in remaining if d["label"] == label and abs(d["score"] - score) <= SCORE_TOLERANCE
                  and np.abs(np.subtract(d["box"], box)).max() <= box_tolerance), None)
    assert match is not None, f"{what}: no Predictor detection matches {label} {score} {box}"
    remaining.remove(match)


@pytest.mark.parametrize("family", ["detr", "deformable_detr"])
def test_pipeline_gives_the_predictor_detections(request, tmp_path, processed_size_images, family):
  model, variables = request.getfixturevalue(family)
  families.of_model(model).save_hf_pretrained(model, variables, str(tmp_path / "hf"), categories=COCO, scale=SCALE)
  predictor = inference.Predictor(model, variables, categories=COCO, threshold=0.0,
                                  options=pipeline.PipelineOptions(scale=SCALE, pad_multiple=1))
  everything = predictor.predict(processed_size_images)
  predictor.threshold = _threshold(everything, kept=2)
  expected = predictor.predict(processed_size_images)
  assert all(expected) and len({d["label"] for image in expected for d in image}) > 1
  assert "N/A" not in {d["label"] for image in expected for d in image}

  detector = transformers.pipeline("object-detection", model=str(tmp_path / "hf"), device="cpu")
  processor = detector.image_processor
  assert type(processor).__name__.removesuffix("Pil") == PROCESSOR_TYPES[family]   # the PIL class without torchvision
  results = detector(processed_size_images, threshold=predictor.threshold)
  for i, (result, image) in enumerate(zip(results, processed_size_images)):
    _assert_same_detections([(r["label"], r["score"], [r["box"][k] for k in ("xmin", "ymin", "xmax", "ymax")])
                             for r in result], expected[i], 1.0, f"pipeline, image {i}")
    # The pipeline's own steps (preprocess, _forward, postprocess), without its cast of the boxes to int.
    inputs = processor(images=[image], return_tensors="pt")
    assert tuple(inputs["pixel_values"].shape[2:]) == (image.height, image.width)
    with torch.no_grad():
      outputs = detector.model(**inputs)
    found = processor.post_process_object_detection(outputs, predictor.threshold, [(image.height, image.width)])[0]
    _assert_same_detections([(detector.model.config.id2label[int(label)], float(score), box.tolist())
                             for score, label, box in zip(found["scores"], found["labels"], found["boxes"])],
                            expected[i], BOX_TOLERANCE, f"processor and model, image {i}")


def test_cli_export_of_a_workdir_names_the_classes_and_resizes_at_its_scale(tmp_path, coco_mini, detr):
  """A train.py workdir's categories.json and `data.scale` reach config.json and preprocessor_config.json."""
  model, variables = detr
  config = tiny_config(coco_mini)
  config.model.num_classes = 91
  config.data.scale = 0.4
  families.save_model_dir(str(tmp_path / "workdir"), model, variables, COCO)
  (tmp_path / "workdir" / "config.json").write_text(config.to_json())
  assert cli.main(["export", str(tmp_path / "workdir"), str(tmp_path / "hf"), "--hf"]) == 0

  hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
  names = {c["id"]: c["name"] for c in COCO}
  assert hf_config["id2label"] == {str(i): names.get(i, "N/A") for i in range(91)}
  assert hf_config["label2id"] == {c["name"]: c["id"] for c in COCO}
  assert (hf_config["id2label"]["1"], hf_config["id2label"]["12"], hf_config["id2label"]["90"]) == (
      "person", "N/A", "toothbrush")
  processing = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
  assert processing["image_processor_type"] == "DetrImageProcessor"
  assert processing["size"] == {"shortest_edge": 320, "longest_edge": 533}
  assert (processing["do_resize"], processing["do_rescale"], processing["do_normalize"], processing["do_pad"]) == (
      True, True, True, True)
  np.testing.assert_allclose(processing["rescale_factor"], 1 / 255, rtol=1e-12)
  np.testing.assert_allclose(processing["image_mean"], transforms.IMAGENET_MEAN, rtol=1e-12)
  np.testing.assert_allclose(processing["image_std"], transforms.IMAGENET_STD, rtol=1e-12)
  reloaded = transformers.AutoImageProcessor.from_pretrained(str(tmp_path / "hf"))
  assert (reloaded.size.shortest_edge, reloaded.size.longest_edge) == (320, 533)
  # Read back as a checkpoint: the transformers directory loads, its id2label names the classes ("N/A" left out).
  ported, _ = families.load_model(str(tmp_path / "hf"))
  assert [(c["id"], c["name"]) for c in families.load_categories(str(tmp_path / "hf"), ported)] == [
      (c["id"], c["name"]) for c in COCO]


def test_categories_outside_the_class_slots_are_refused():
  with pytest.raises(ValueError, match=r"Category ids \[91\] do not fit the model's 91 class slots"):
    huggingface.label_maps([{"id": 1, "name": "person"}, {"id": 91, "name": "extra"}], 91)
