"""The tf.data pipeline on real coco-mini data, and its handling of bad input."""

import json
import os
import shutil

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
import tensorflow as tf

from detr_jax.data import check, coco, pipeline, transforms
from references.official_preprocessing import official_size
from tests.helpers import run_on_cpu_devices

SMALL = pipeline.PipelineOptions(scale=0.25, pad_multiple=32)


@pytest.fixture(scope="module")
def train_records(coco_mini):
  return coco.load_coco_folder(str(coco_mini), "train2017")


@pytest.fixture(scope="module")
def val_records(coco_mini):
  return coco.load_coco_folder(str(coco_mini), "val2017")


def test_target_size_matches_official():
  rng = np.random.default_rng(0)
  cases = [(640, 426, 800, 1333), (426, 640, 800, 1333), (500, 333, 800, 1333), (640, 640, 800, 1333),
           (1333, 100, 800, 1333), (640, 480, 480, 1333), (640, 427, 600, None), (384, 600, 512, 1333)]
  cases += [(int(w), int(h), int(s), 1333) for w, h, s in zip(rng.integers(50, 2000, 300), rng.integers(50, 2000, 300),
                                                              rng.choice(transforms.TRAIN_SCALES, 300))]
  for w, h, size, max_size in cases:
    got = tuple(int(x) for x in transforms.target_size(h, w, size, max_size))
    assert got == official_size(w, h, size, max_size), (w, h, size, max_size)


def test_eval_boxes_round_trip_to_annotations(coco_mini, val_records):
  annotations = json.loads((coco_mini / "annotations" / "instances_val2017.json").read_text())
  images = {im["id"]: im for im in annotations["images"]}
  expected = {}
  for ann in annotations["annotations"]:
    expected.setdefault(ann["image_id"], []).append(ann)
  dataset = pipeline.eval_dataset(val_records, 8, pipeline.PipelineOptions(scale=0.5), process=(0, 1))
  seen = set()
  for batch in dataset.as_numpy_iterator():
    for i in np.flatnonzero(batch["image_valid"]):
      image_id = int(batch["image_id"][i])
      seen.add(image_id)
      height, width = batch["orig_size"][i]
      assert (height, width) == (images[image_id]["height"], images[image_id]["width"])
      cx, cy, w, h = (batch["boxes"][i][batch["target_valid"][i]] * [width, height, width, height]).T
      got = np.stack([cx - w / 2, cy - h / 2, w, h], axis=1)
      want = np.array([a["bbox"] for a in expected.get(image_id, []) if not a["iscrowd"]]).reshape(-1, 4)
      np.testing.assert_allclose(got, want, atol=0.5)  # pixels of the original image
      assert len(got) == len(want)  # every crowd box gone, every other box kept
  assert seen == set(images)



def test_flip_moves_boxes_with_pixels(train_records):
  example = pipeline.coco_folder_examples(train_records)(tf.constant(3, tf.int64))
  flipped = transforms.horizontal_flip(example)
  image, image_f = example["image"].numpy(), flipped["image"].numpy()
  width = image.shape[1]
  np.testing.assert_array_equal(image_f, image[:, ::-1])
  for box, box_f in zip(example["boxes"].numpy(), flipped["boxes"].numpy()):
    x0, y0, x1, y1 = np.round(box).astype(int)
    x0f, _, x1f, _ = np.round(box_f).astype(int)
    assert (x0f, x1f) == (width - x1, width - x0)
    np.testing.assert_array_equal(image_f[y0:y1, x0f:x1f], image[y0:y1, x0:x1][:, ::-1])
  np.testing.assert_allclose(transforms.horizontal_flip(flipped)["boxes"], example["boxes"], atol=1e-3)  # float32 px


def test_train_batches_are_valid_and_bucketed(train_records):
  for batch in pipeline.train_dataset(train_records, 4, 7, SMALL, process=(0, 1)).take(12).as_numpy_iterator():
    # The smallest multiple of 32 that holds the batch's largest image in each direction.
    largest = batch["size"].max(0)
    assert batch["image"].shape[1:3] == tuple(-(-largest // 32) * 32), (batch["image"].shape, largest)
    for i in range(4):
      boxes = batch["boxes"][i][batch["target_valid"][i]]
      xyxy = np.concatenate([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], axis=1)
      assert (xyxy >= -1e-6).all() and (xyxy <= 1 + 1e-6).all()  # inside the (cropped) image
      assert (boxes[:, 2:] > 0).all()
      h, w = batch["size"][i]
      assert max(h, w) <= round(1333 * 0.25) and batch["pixel_mask"][i].sum() == h * w
      assert batch["pixel_mask"][i, :h, :w].all()
      assert not batch["image"][i][~batch["pixel_mask"][i]].any()  # zero padding


def test_same_seed_same_batches_and_resume(train_records):
  def batches(seed, start_step, count):
    dataset = pipeline.train_dataset(train_records, 2, seed, SMALL, start_step=start_step, process=(0, 1))
    return list(dataset.take(count).as_numpy_iterator())
  first = batches(3, 0, 5)
  again = batches(3, 0, 5)
  resumed = batches(3, 3, 2)
  other = batches(4, 0, 1)
  for a, b in zip(first, again):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  for a, b in zip(first[3:], resumed):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(first[0]["image_id"], other[0]["image_id"])


def test_global_batches_do_not_depend_on_the_process_count(train_records):
  """Two processes with 2 images each see exactly the global batches of one process with 4."""
  def batches(batch_size, process):
    dataset = pipeline.train_dataset(train_records, batch_size, 5, SMALL, start_step=1, process=process)
    return list(dataset.take(2).as_numpy_iterator())
  single, first, second = batches(4, (0, 1)), batches(2, (0, 2)), batches(2, (1, 2))
  for whole, a, b in zip(single, first, second):
    np.testing.assert_array_equal(whole["image_id"], np.concatenate([a["image_id"], b["image_id"]]))
    np.testing.assert_array_equal(whole["boxes"], np.concatenate([a["boxes"], b["boxes"]]))
    height, width = a["image"].shape[1:3]
    np.testing.assert_array_equal(whole["image"][:2, :height, :width], a["image"])   # same augmentation


def test_two_processes_read_disjoint_shards(train_records, val_records):
  def epoch_ids(process):
    steps = (len(train_records) // 2) // 8
    dataset = pipeline.train_dataset(train_records, 8, 0, pipeline.PipelineOptions(scale=0.1, pad_multiple=64),
                                     process=process)
    return np.concatenate([b["image_id"] for b in dataset.take(steps).as_numpy_iterator()])
  ids0, ids1 = epoch_ids((0, 2)), epoch_ids((1, 2))
  assert len(set(ids0)) == len(ids0) and not set(ids0) & set(ids1)
  assert set(ids0) | set(ids1) == set(train_records.image_ids.tolist())

  def eval_ids(process):
    batches = list(pipeline.eval_dataset(val_records, 8, pipeline.PipelineOptions(scale=0.1), process=process)
                   .as_numpy_iterator())
    return batches, np.concatenate([b["image_id"][b["image_valid"]] for b in batches])
  (batches0, e0), (batches1, e1) = eval_ids((0, 2)), eval_ids((1, 2))
  assert len(batches0) == len(batches1)  # equal step counts on every host
  assert not set(e0) & set(e1) and set(e0) | set(e1) == set(val_records.image_ids.tolist())


# --------------------------------------------------------------------------------------------
# Bad input, built from copies of coco-mini files in a temporary folder.

@pytest.fixture
def broken_dataset(coco_mini, tmp_path):
  from PIL import Image
  source = json.loads((coco_mini / "annotations" / "instances_val2017.json").read_text())
  images = source["images"][:8]
  (tmp_path / "annotations").mkdir()
  (tmp_path / "val2017").mkdir()
  for image in images:
    shutil.copy(coco_mini / "val2017" / image["file_name"], tmp_path / "val2017" / image["file_name"])
  names = [im["file_name"] for im in images]
  folder = tmp_path / "val2017"
  raw = (folder / names[0]).read_bytes()
  (folder / names[0]).write_bytes(raw[:len(raw) // 2])                    # truncated JPEG
  (folder / names[1]).write_bytes(b"<html>not an image</html>" * 10)        # corrupt file
  picture = Image.open(folder / names[2])
  png_name = names[2].replace(".jpg", ".png")
  picture.save(folder / png_name)                                          # PNG
  images[2]["file_name"] = png_name
  picture.convert("L").save(folder / names[3])                             # grayscale JPEG
  picture.convert("CMYK").save(folder / names[4])                          # CMYK JPEG
  os.remove(folder / names[5])                                             # missing file
  ids = [im["id"] for im in images]
  anns = [a for a in source["annotations"] if a["image_id"] in ids and a["image_id"] != ids[6]]  # ids[6]: no annotations
  extra = [
      {"id": 1, "image_id": ids[7], "bbox": [-50, -50, 100, 100], "category_id": 1, "iscrowd": 0, "area": 1},
      {"id": 2, "image_id": ids[7], "bbox": [10, 10, 0, 20], "category_id": 1, "iscrowd": 0, "area": 0},
      {"id": 3, "image_id": ids[7], "bbox": [10, 10, 20, 20], "category_id": 999, "iscrowd": 0, "area": 1},
  ]
  source.update(images=images, annotations=anns + extra)
  (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(source))
  return tmp_path, ids, names


def test_bad_inputs_are_named_and_counted(broken_dataset):
  folder, ids, names = broken_dataset
  records = coco.load_coco_folder(str(folder), "val2017")
  skipped = records.skipped.items
  assert skipped["truncated JPEG (no end-of-image marker)"] == [f"image {ids[0]} ({names[0]})"]
  assert skipped["not a JPEG or PNG file"] == [f"image {ids[1]} ({names[1]})"]
  assert skipped["missing image file"] == [f"image {ids[5]} ({names[5]})"]
  assert skipped[coco.DEGENERATE_BOX] == [f"annotation 2 of image {ids[7]} ({names[7]}), bbox [10, 10, 0, 20]"]
  assert skipped[coco.UNKNOWN_CATEGORY] == [f"annotation 3 of image {ids[7]} ({names[7]}), category 999"]
  kept = records.image_ids.tolist()
  assert set(kept) == {ids[2], ids[3], ids[4], ids[6], ids[7]}
  assert records.row_lengths[kept.index(ids[6])] == 0  # kept for eval without annotations
  # PNG, grayscale and CMYK decode to RGB and go through the pipeline.
  batches = list(pipeline.eval_dataset(records, 5, pipeline.PipelineOptions(scale=0.25), process=(0, 1))
                 .as_numpy_iterator())
  assert sorted(batches[0]["image_id"].tolist()) == sorted(kept)
  assert np.isfinite(batches[0]["image"]).all()
  # The box partly outside the image is clipped to it by the pipeline: [0, 0, 50, 50] px, cxcywh normalised.
  index = batches[0]["image_id"].tolist().index(ids[7])
  height, width = batches[0]["orig_size"][index]
  clipped = batches[0]["boxes"][index][batches[0]["target_valid"][index]][-1]
  np.testing.assert_allclose(clipped, np.array([25, 25, 50, 50]) / [width, height, width, height], rtol=1e-6)
  without = coco.load_coco_folder(str(folder), "val2017", keep_empty=False)
  assert without.skipped.items["image without annotations"] == [f"image {ids[6]} ({names[6]})"]


def test_check_cli_reports_errors(broken_dataset, capsys):
  folder, _, names = broken_dataset
  assert check.main([str(folder), "--scale", "0.25"]) == 1
  out = capsys.readouterr().out
  assert "not a JPEG or PNG file" in out and names[1] in out
  assert "Configure num_classes = 91" in out and "error(s)" in out and "images/s" in out


def test_empty_and_missing_inputs(tmp_path, capsys):
  with pytest.raises(coco.DatasetError, match="does not exist"):
    coco.load_coco_folder(str(tmp_path / "nowhere"), "val2017")
  (tmp_path / "annotations").mkdir()
  (tmp_path / "val2017").mkdir()
  (tmp_path / "annotations" / "instances_val2017.json").write_text("")
  with pytest.raises(coco.DatasetError, match="instances_val2017.json is not valid JSON"):
    coco.load_coco_folder(str(tmp_path), "val2017")
  (tmp_path / "annotations" / "instances_val2017.json").write_text('{"images": [], "annotations": [], "categories": []}')
  with pytest.raises(coco.DatasetError, match="lists no images"):
    coco.load_coco_folder(str(tmp_path), "val2017")
  assert check.main([str(tmp_path / "nowhere")]) == 1
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "does not exist" in err  # a one-line error


def mock_tfds_coco(builder, **_):
  """Examples in tfds coco/2017's feature layout: boxes normalised (ymin, xmin, ymax, xmax),
  labels 0..79 (tfds's contiguous ids), one crowd box per image."""
  def example(i):
    return {"image": np.full((120 + 10 * i, 160, 3), 40 * i, np.uint8), "image/id": np.int64(1000 + i),
            "image/filename": f"{i}.jpg",
            "objects": {"bbox": np.array([[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 1.0, 1.0], [0.3, 0.3, 0.9, 0.8]], np.float32),
                        "label": np.array([0, 79, 11], np.int64), "is_crowd": np.array([False, True, False]),
                        "area": np.array([1, 1, 1], np.int64), "id": np.array([1, 2, 3], np.int64)}}
  return tf.data.Dataset.from_generator(lambda: (example(i) for i in range(6)), output_signature=tf.nest.map_structure(
      lambda x: tf.TensorSpec(np.shape(x) if np.ndim(x) != 3 else (None, 160, 3), tf.as_dtype(np.asarray(x).dtype)),
      example(0)))


def test_tfds_source_maps_to_category_ids():
  """tfds coco/2017 cannot be downloaded here; `tfds.testing.mock_data` stands in for it."""
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(as_dataset_fn=mock_tfds_coco):
    batches = list(pipeline.tfds_dataset("validation", 2, 0, SMALL, train=False, process=(0, 1)).as_numpy_iterator())
    train = list(pipeline.tfds_dataset("train", 2, 0, SMALL, train=True, process=(0, 1)).take(2).as_numpy_iterator())
  assert [int(i) for b in batches for i in b["image_id"]] == [1000 + i for i in range(6)]
  for batch in batches:
    assert batch["target_valid"].sum(1).tolist() == [2, 2]  # the crowd box is dropped
    np.testing.assert_array_equal(batch["labels"][:, :2], [[1, 13], [1, 13]])  # tfds 0 -> id 1, 11 -> id 13
    h, w = batch["size"][0]
    np.testing.assert_allclose(batch["boxes"][0, 0], [0.4, 0.3, 0.4, 0.4], atol=1e-5)  # cxcywh normalised
    assert batch["image"].shape[1] % 32 == 0
  for batch in train:
    assert set(batch["labels"][batch["target_valid"]].tolist()) <= {1, 13}


GLOBAL_BATCH_SCRIPT = """
import json, sys
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from detr_jax.data import coco, pipeline
records = coco.load_coco_folder(sys.argv[1], "val2017")
options = pipeline.PipelineOptions(scale=0.1, pad_multiple=32)
dataset = pipeline.eval_dataset(records, 8, options, max_images=16)
local = list(dataset.as_numpy_iterator())
sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
batches = list(pipeline.prefetch_to_mesh(dataset, sharding))
result = {"count": len(batches), "devices": len(batches[0]["image"].sharding.device_set),
          "equal": all(np.array_equal(np.asarray(g[k]), l[k]) for g, l in zip(batches, local) for k in l),
          "shard_shape": list(batches[0]["image"].addressable_shards[0].data.shape)}
print(json.dumps(result))
"""


def test_global_batches_on_8_device_mesh(coco_mini):
  result = run_on_cpu_devices(GLOBAL_BATCH_SCRIPT, str(coco_mini))
  assert result["count"] == 2 and result["devices"] == 8 and result["equal"]
  assert result["shard_shape"][0] == 1  # 8 images over 8 devices
