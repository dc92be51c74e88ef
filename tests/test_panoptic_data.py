"""COCO panoptic data: PNG segments to masks, and the official augmentations applied to masks."""

import json

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from detr_jax.data import coco_panoptic, pipeline, transforms
from tests.helpers import require_shared_file


@pytest.fixture(scope="module")
def panoptic_records(coco_mini):
  require_shared_file(coco_mini / "annotations" / "panoptic_train2017.json", "coco-mini's panoptic annotations")
  return coco_panoptic.load_panoptic_folder(str(coco_mini), "train2017")


def test_segments_become_masks_labels_and_boxes(coco_mini, panoptic_records):
  data = json.loads((coco_mini / "annotations" / "panoptic_train2017.json").read_text())
  assert len(panoptic_records) == len(data["annotations"]) == 100
  annotations = {a["image_id"]: a for a in data["annotations"]}
  load = pipeline.panoptic_examples(panoptic_records)
  for index in (0, 37, 99):
    example = load(index)
    annotation = annotations[int(example["image_id"])]
    rgb = np.asarray(Image.open(coco_mini / "annotations" / "panoptic_train2017" / annotation["file_name"]), np.int64)
    ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
    segments = annotation["segments_info"]
    np.testing.assert_array_equal(example["segment_masks"].numpy(), ids[None] == np.array([s["id"] for s in segments])[:, None, None])
    np.testing.assert_array_equal(example["labels"].numpy(), [s["category_id"] for s in segments])
    # The annotation's [x, y, w, h] is the tight box: official masks_to_boxes gives x + w - 1 as x_max.
    expected = np.array([[x, y, x + w - 1, y + h - 1] for x, y, w, h in (s["bbox"] for s in segments)], np.float32)
    np.testing.assert_array_equal(example["boxes"].numpy(), expected)
  assert panoptic_records.thing_ids == {c["id"] for c in data["categories"] if c["isthing"]}


def test_augmentations_move_masks_with_boxes(panoptic_records):
  """Flip + resize: each mask's own box equals the transformed box within 3 px. Random official
  augmentation (crops included): every mask stays inside its transformed box (crops clip boxes)."""
  load = pipeline.panoptic_examples(panoptic_records)
  checked = 0
  for index in range(6):
    example = load(index)
    flipped = transforms.resize(transforms.horizontal_flip(example), 300, 500)
    masks, boxes = flipped["segment_masks"].numpy(), flipped["boxes"].numpy()
    assert masks.shape[1:] == tuple(flipped["image"].shape[:2])
    # The official boxes of masks hold the last pixel index, which a flip (x -> W - x) moves by
    # 1 px against the flipped mask; boxes scale continuously, masks by nearest neighbour. A mask
    # left behind by the flip or the resize would be tens of pixels off.
    np.testing.assert_allclose(coco_panoptic.masks_to_boxes(masks).numpy(), boxes, atol=3.0)
    for k in range(4):
      augmented = transforms.train_augment(example, tf.constant([index, k]), scale=0.5)
      masks, boxes = augmented["segment_masks"].numpy(), augmented["boxes"].numpy()
      assert masks.shape[1:] == tuple(augmented["image"].shape[:2]) and len(masks) == len(boxes)
      present = masks.any(axis=(1, 2))
      from_masks = coco_panoptic.masks_to_boxes(masks[present]).numpy()
      assert (from_masks[:, :2] >= boxes[present, :2] - 3).all() and (from_masks[:, 2:] <= boxes[present, 2:] + 3).all()
      checked += int(present.sum())
  assert checked > 50


def test_panoptic_batches_pad_masks_with_the_images(panoptic_records):
  options = pipeline.PipelineOptions(scale=0.25, pad_multiple=32, max_boxes=60)
  batch = next(pipeline.train_dataset(panoptic_records, 2, 0, options, process=(0, 1)).as_numpy_iterator())
  assert batch["segment_masks"].shape == (2, 60, *batch["image"].shape[1:3])
  assert not batch["segment_masks"][~batch["target_valid"]].any()
  assert not (batch["segment_masks"] & ~batch["pixel_mask"][:, None]).any()   # no segment in the padding
  assert all(batch["segment_masks"][i, t].any() for i, t in zip(*np.nonzero(batch["target_valid"])))
