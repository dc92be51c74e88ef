"""Shared fixtures: the real coco-mini data, loss-test targets and the reference key lists."""

import json
import pathlib

import numpy as np
import pytest

from references.coco_mini import COCO_MINI, coco_targets, coco_train_image_ids
from references.official_preprocessing import padded_batch
from tests.helpers import SHARED_REFERENCE, require_shared_file


@pytest.fixture(scope="session")
def coco_mini() -> pathlib.Path:
  """The coco-mini folder (env DETR_JAX_COCO_MINI, default ../shared/coco-mini)."""
  require_shared_file(COCO_MINI / "annotations" / "instances_val2017.json",
                      "set DETR_JAX_COCO_MINI to the coco-mini folder")
  return COCO_MINI


@pytest.fixture(scope="session")
def two_real_images(coco_mini):
  """Two coco-mini val images of different aspect ratios (landscape and portrait), padded together."""
  return padded_batch([coco_mini / "val2017" / "000000000139.jpg", coco_mini / "val2017" / "000000000802.jpg"], 320)


@pytest.fixture(scope="session")
def official_shapes():
  """Every key and shape of the official detr-r50, detr-r50-dc5, detr-r101 and detr-r50-panoptic checkpoints."""
  path = SHARED_REFERENCE / "official-state-dict-keys.json"
  require_shared_file(path, "the reference key lists live in ../shared/reference (env DETR_JAX_REFERENCE)")
  return json.loads(path.read_text())


@pytest.fixture(scope="session")
def batch_targets(coco_mini):
  """Loss-test targets: 8 real coco-mini train images (0 to 40+ boxes) plus an image without
  targets, padded to 100 boxes; and the unpadded per-image (labels, boxes) lists."""
  ids = coco_train_image_ids(coco_mini, 8)
  padded, lists = coco_targets(coco_mini, ids, max_boxes=100)
  padded = {k: np.concatenate([v, np.zeros_like(v[:1])]) for k, v in padded.items()}
  lists.append((np.zeros(0, np.int32), np.zeros((0, 4), np.float32)))
  return padded, lists
