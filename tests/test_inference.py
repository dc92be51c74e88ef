"""`inference.Predictor` and `detr-predict` on real coco-mini images: eval.py's numbers for the same images,
any input form, one program per padding bucket, the checkpoint's names, pictures, one-line errors."""

import json

import jax
import numpy as np
import pytest
from PIL import Image

from detr_jax import evaluation, families, inference, predict_cli, sharding
from detr_jax.data import coco, coco_categories, pipeline
from tests.helpers import run_on_cpu_devices, tiny_config, tiny_deformable_config

OPTIONS = pipeline.PipelineOptions(scale=0.25, pad_multiple=64)
# Same program inputs, other batch compositions and compiled programs: float32 rounding only.
SCORE_TOLERANCE, BOX_TOLERANCE = 1e-5, 1e-3   # box tolerance in original-image pixels
NUM_IMAGES = 4


_CONFIGS = {"detr": tiny_config, "deformable_detr": tiny_deformable_config}


@pytest.fixture(scope="module")
def checkpoints(coco_mini, tmp_path_factory):
  """family name -> (directory, model, variables): a random tiny model with COCO's 91 slots and COCO's
  names, saved as a checkpoint directory when first asked for."""
  made = {}

  def get(name):
    if name not in made:
      config = _CONFIGS[name](coco_mini)
      config.model.num_classes = 91
      model = families.build_model(config.model)
      variables = families.of_model(model).init_variables(model, jax.random.PRNGKey(1))
      directory = str(tmp_path_factory.mktemp(name))
      families.save_model_dir(directory, model, variables, coco_categories.coco_categories(91))
      made[name] = directory, model, variables
    return made[name]

  return get


@pytest.fixture
def checkpoint(checkpoints):
  """The DETR checkpoint of `checkpoints`."""
  return checkpoints("detr")


@pytest.mark.parametrize("family", sorted(_CONFIGS))
def test_predictions_equal_eval_py_detections(checkpoints, family, coco_mini, tmp_path):
  """eval.py's detections.json (one image per batch, so each padded alone) against Predictor at threshold 0
  over the same val images, given as paths, bucketed in batches of 2."""
  directory, model, variables = checkpoints(family)
  mesh = sharding.create_mesh()
  evaluation.evaluate(model, variables, str(coco_mini), "val2017", 1, OPTIONS, mesh, output_dir=str(tmp_path),
                      max_images=NUM_IMAGES)
  evaluated = json.loads((tmp_path / "detections.json").read_text())
  records = coco.load_coco_folder(str(coco_mini), "val2017", keep_empty=True).first(NUM_IMAGES)
  predictor = inference.Predictor.from_checkpoint(directory, threshold=0.0, options=OPTIONS, batch_size=2)
  predicted = predictor.predict(list(records.paths))
  for image_id, detections in zip(records.image_ids, predicted):
    expected = sorted((d for d in evaluated if d["image_id"] == image_id), key=lambda d: -d["score"])
    assert len(detections) == len(expected)
    np.testing.assert_allclose([d["score"] for d in detections], [d["score"] for d in expected],
                               atol=SCORE_TOLERANCE, rtol=0)
    for detection in detections:
      x0, y0, x1, y1 = detection["box"]
      assert any(e["category_id"] == detection["category_id"] and abs(e["score"] - detection["score"]) <= SCORE_TOLERANCE
                 and np.abs(np.subtract(e["bbox"], [x0, y0, x1 - x0, y1 - y0])).max() <= BOX_TOLERANCE
                 for e in expected), detection
    names = dict(coco_categories.THINGS)   # slots without a category (0, 12, ...) are named by their id
    assert all(d["label"] == names.get(d["category_id"], str(d["category_id"])) for d in detections)


def test_input_forms_agree_and_buckets_compile_once(checkpoint, coco_mini):
  """A path, its PIL image and its uint8 array give identical detections (TF's accurate IDCT decodes PIL's
  pixels). Six images (grayscale among them) of three padded shapes compile three programs."""
  directory, _, _ = checkpoint
  predictor = inference.Predictor.from_checkpoint(directory, threshold=0.0, options=OPTIONS, batch_size=2)
  path = coco_mini / "val2017" / "000000000139.jpg"
  image = Image.open(path).convert("RGB")
  by_path, by_pil, by_array = predictor.predict([str(path), image, np.asarray(image)])
  assert by_path == by_pil == by_array
  wide = np.asarray(image.resize((600, 150)))
  portrait = np.asarray(image.transpose(Image.Transpose.ROTATE_90))
  predictor.predict([wide, np.asarray(image), portrait, wide, portrait, np.asarray(image.convert("L"))])
  shapes = {predictor.padded_shape(predictor.preprocess(x)["size"]) for x in (wide, np.asarray(image), portrait)}
  assert len(shapes) == 3
  assert predictor._predict._cache_size() == 3


def test_bad_inputs_name_the_input(checkpoint, tmp_path):
  directory, _, _ = checkpoint
  predictor = inference.Predictor.from_checkpoint(directory, options=OPTIONS)
  with pytest.raises(FileNotFoundError, match="missing.jpg"):
    predictor.predict([str(tmp_path / "missing.jpg")])
  (tmp_path / "notes.jpg").write_text("not an image")
  with pytest.raises(ValueError, match="notes.jpg is not a JPEG"):
    predictor.predict([str(tmp_path / "notes.jpg")])
  with pytest.raises(ValueError, match=r"image 1: expected a uint8 image array .* float32 \[4, 4, 3\]"):
    predictor.predict([np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 3), np.float32)])


def test_predict_command_writes_detections_and_pictures(checkpoint, coco_mini, tmp_path, capsys):
  directory, _, _ = checkpoint
  folder = tmp_path / "images"
  folder.mkdir()
  for name in ("000000000139.jpg", "000000000802.jpg"):
    (folder / name).write_bytes((coco_mini / "val2017" / name).read_bytes())
  single = coco_mini / "val2017" / "000000005001.jpg"
  out = tmp_path / "out"
  assert predict_cli.main(["--checkpoint", directory, str(folder), str(single), "--output_dir", str(out),
                           "--threshold", "0.0", "--batch_size", "2"]) == 0
  results = json.loads((out / "detections.json").read_text())
  assert {r["image_id"] for r in results} == {139, 802, 5001}
  assert all(r["category_name"] == dict(coco_categories.THINGS).get(r["category_id"], str(r["category_id"]))
             for r in results)
  assert sorted(p.name for p in out.glob("*.jpg")) == ["000000000139.jpg", "000000000802.jpg", "000000005001.jpg"]
  with Image.open(out / "000000000802.jpg") as picture, Image.open(single.parent / "000000000802.jpg") as original:
    assert picture.size == original.size
  assert "3 images in" in capsys.readouterr().out

  with pytest.raises(SystemExit) as exit_info:
    predict_cli.main(["--checkpoint", directory, str(tmp_path / "nothing_here"), "--output_dir", str(out)])
  assert exit_info.value.code == 1
  error = capsys.readouterr().err
  assert error.startswith("error: No image file or folder") and error.count("\n") == 1


EIGHT_DEVICES_SCRIPT = r"""
import json, sys
import jax
import numpy as np
from jax.sharding import Mesh
from detr_jax import families, inference, sharding
from detr_jax.data import pipeline
from tests.helpers import tiny_config
config = tiny_config(sys.argv[1])
model = families.build_model(config.model)
variables = families.of_model(model).init_variables(model, jax.random.PRNGKey(1))
options = pipeline.PipelineOptions(scale=0.25, pad_multiple=64)
paths = [f"{sys.argv[1]}/val2017/{name}" for name in ("000000000139.jpg", "000000000802.jpg", "000000005001.jpg")]
one = inference.Predictor(model, variables, threshold=0.0, options=options,
                          mesh=Mesh(np.array(jax.devices()[:1]), (sharding.BATCH_AXIS,)))
eight = inference.Predictor(model, variables, threshold=0.0, options=options, batch_size=8)
print(json.dumps({"devices": eight.mesh.devices.size, "one": one.predict(paths), "eight": eight.predict(paths)}))
"""


def test_eight_devices_predict_as_one(coco_mini):
  """Batches of 8 sharded over 8 CPU devices (3 real images and 5 padding copies) give one device's detections."""
  result = run_on_cpu_devices(EIGHT_DEVICES_SCRIPT, str(coco_mini))
  assert result["devices"] == 8
  for one, eight in zip(result["one"], result["eight"]):
    assert [d["category_id"] for d in one] == [d["category_id"] for d in eight]
    np.testing.assert_allclose([d["score"] for d in one], [d["score"] for d in eight], atol=SCORE_TOLERANCE, rtol=0)
    np.testing.assert_allclose([d["box"] for d in one], [d["box"] for d in eight], atol=BOX_TOLERANCE, rtol=0)


def test_mask_model_detections_carry_original_size_masks(coco_mini):
  """A mask model's detections have [H, W] bool masks at the original size (PostProcessSegm), which the
  pictures overlay in each category's colour."""
  from detr_jax import visualize
  config = tiny_config(coco_mini)
  config.model.masks = True
  model = families.build_model(config.model)
  variables = families.of_model(model).init_variables(model, jax.random.PRNGKey(2))
  predictor = inference.Predictor(model, variables, threshold=0.0, options=OPTIONS)
  path = coco_mini / "val2017" / "000000000802.jpg"   # 640 x 424
  (detections,) = predictor.predict([str(path)])
  assert len(detections) == config.model.num_queries
  assert all(d["mask"].shape == (640, 424) and d["mask"].dtype == bool for d in detections)
  assert any(d["mask"].any() for d in detections)
  with Image.open(path) as image:
    overlaid = np.asarray(visualize.overlay_masks(image, [detections[0]["mask"]], [detections[0]["category_id"]]))
    plain = np.asarray(image.convert("RGB"))
    assert visualize.draw_detections(image, detections).size == image.size
  mask = detections[0]["mask"]
  tint = np.asarray(visualize.category_colour(detections[0]["category_id"]), np.float32)
  np.testing.assert_allclose(overlaid[mask], np.round(0.5 * plain[mask] + 0.5 * tint), atol=1)
  np.testing.assert_array_equal(overlaid[~mask], plain[~mask])


def test_panoptic_segments_and_picture(coco_mini, checkpoints, tmp_path, capsys, monkeypatch):
  """`Predictor.panoptic` is `postprocess.panoptic` (the official PostProcessPanoptic, tested in
  test_panoptic.py) on the model's outputs for the image padded by hand; the picture tints each segment;
  `detr-predict --panoptic` writes both, and refuses a model without a mask head in one line."""
  from detr_jax import visualize
  from detr_jax.models import postprocess
  config = tiny_config(coco_mini)
  config.model.masks = True
  model = families.build_model(config.model)
  variables = families.of_model(model).init_variables(model, jax.random.PRNGKey(2))
  categories = [{"id": i, "name": f"class {i}", "isthing": i % 2 == 0} for i in range(config.model.num_classes)]
  predictor = inference.Predictor(model, variables, categories=categories, options=OPTIONS)
  path = coco_mini / "val2017" / "000000000802.jpg"   # 640 x 424
  result = predictor.panoptic(str(path), threshold=0.0)

  example = predictor.preprocess(str(path))
  height, width = predictor.padded_shape(example["size"])
  image = np.zeros((1, height, width, 3), np.float32)
  image[0, :example["image"].shape[0], :example["image"].shape[1]] = example["image"]
  pixel_mask = np.zeros((1, height, width), bool)
  pixel_mask[0, :example["image"].shape[0], :example["image"].shape[1]] = True
  outputs = jax.jit(model.apply)(variables, image, pixel_mask)
  thing_ids = {c["id"] for c in categories if c["isthing"]}
  expected_ids, expected_segments = postprocess.panoptic(np.asarray(outputs["pred_logits"][0]),
                                                         np.asarray(outputs["pred_masks"][0]), tuple(example["size"]),
                                                         (640, 424), thing_ids, 0.0)
  np.testing.assert_array_equal(result["segmentation"], expected_ids)
  assert [{k: v for k, v in s.items() if k != "label"} for s in result["segments"]] == expected_segments
  assert len(result["segments"]) >= 2 and {s["isthing"] for s in result["segments"]} == {True, False}
  assert all(s["label"] == f"class {s['category_id']}" for s in result["segments"])
  assert sum(s["area"] for s in result["segments"]) == 640 * 424
  # Without categories every class is a thing.
  unnamed = inference.Predictor(model, variables, options=OPTIONS).panoptic(str(path), threshold=0.0)["segments"]
  assert unnamed and all(s["isthing"] and s["label"] == str(s["category_id"]) for s in unnamed)

  with Image.open(path) as picture:
    plain = np.asarray(picture.convert("RGB"), np.float32)
    drawn = np.asarray(visualize.draw_panoptic(picture, result), np.float32)
  stuff = next(s for s in result["segments"] if not s["isthing"])
  inside = result["segmentation"] == stuff["id"]
  inside[1:] &= inside[:-1]
  inside[:, 1:] &= inside[:, :-1]   # away from the white boundary lines
  colour = np.asarray(visualize.category_colour(stuff["category_id"]), np.float32)
  differs = np.abs(drawn[inside] - np.round(0.4 * plain[inside] + 0.6 * colour)).max(axis=-1) > 1
  assert differs.mean() < 0.05   # only the label's text differs

  directory, _, _ = checkpoints("detr")
  mask_checkpoint = tmp_path / "panoptic"
  families.save_model_dir(str(mask_checkpoint), model, variables, categories)
  out = tmp_path / "out"
  batched = inference.Predictor.predict_iter

  def second_forward(*args, **kwargs):
    raise AssertionError("--panoptic ran the batched predictions too")

  monkeypatch.setattr(inference.Predictor, "predict_iter", second_forward)
  assert predict_cli.main(["--checkpoint", str(mask_checkpoint), str(path), "--output_dir", str(out),
                           "--panoptic"]) == 0
  monkeypatch.setattr(inference.Predictor, "predict_iter", batched)
  assert (out / "panoptic" / "000000000802.png").is_file()
  (listed,) = json.loads((out / "panoptic.json").read_text())
  assert listed["file_name"] == str(path)
  assert listed["segments_info"] == predictor.panoptic(str(path))["segments"]
  written = json.loads((out / "detections.json").read_text())
  assert [r["score"] for r in written] == [d["score"] for d in predictor.predict([str(path)])[0]]
  capsys.readouterr()
  with pytest.raises(SystemExit) as exit_info:
    predict_cli.main(["--checkpoint", directory, str(path), "--output_dir", str(tmp_path / "no"), "--panoptic"])
  assert exit_info.value.code == 1
  assert capsys.readouterr().err.strip().startswith("error: --panoptic needs a panoptic checkpoint")
  assert not (tmp_path / "no").exists()
