"""Shared fixtures: the real coco-mini data and reference PyTorch models built from config."""

import functools
import json
import os
import pathlib

import numpy as np
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
COCO_MINI = pathlib.Path(os.environ.get("DETR_JAX_COCO_MINI", REPO_ROOT.parent / "shared" / "coco-mini"))
from detr_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD


SHARED_REFERENCE = REPO_ROOT.parent / "shared" / "reference"


def require_shared_file(path: pathlib.Path, hint: str) -> None:
  """Skips the test when shared data is absent; CI sets DETR_JAX_REQUIRE_DATA=1 to fail instead."""
  if path.is_file():
    return
  reason = f"{path} not found: {hint}"
  if os.environ.get("DETR_JAX_REQUIRE_DATA") == "1":
    pytest.fail(f"required data missing (DETR_JAX_REQUIRE_DATA=1): {reason}")
  pytest.skip(reason)


@pytest.fixture(scope="session")
def coco_mini() -> pathlib.Path:
  """The coco-mini folder (env DETR_JAX_COCO_MINI, default ../shared/coco-mini)."""
  require_shared_file(COCO_MINI / "annotations" / "instances_val2017.json",
                      "set DETR_JAX_COCO_MINI to the coco-mini folder")
  return COCO_MINI


def padded_batch(paths, shorter_side):
  """Real images resized (PIL bilinear) to `shorter_side`, normalised, zero-padded together.

  Returns images [B, H, W, 3] float32 and pixel_mask [B, H, W] bool (True on real pixels).
  """
  from PIL import Image
  arrays = []
  for path in paths:
    image = Image.open(path).convert("RGB")
    scale = shorter_side / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
    arrays.append((np.asarray(image, np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD)
  height = max(a.shape[0] for a in arrays)
  width = max(a.shape[1] for a in arrays)
  images = np.zeros((len(arrays), height, width, 3), np.float32)
  mask = np.zeros((len(arrays), height, width), bool)
  for i, a in enumerate(arrays):
    images[i, :a.shape[0], :a.shape[1]] = a
    mask[i, :a.shape[0], :a.shape[1]] = True
  return images, mask


@pytest.fixture(scope="session")
def two_real_images(coco_mini):
  """Two coco-mini val images of different aspect ratios (landscape and portrait), padded together."""
  return padded_batch([coco_mini / "val2017" / "000000000139.jpg", coco_mini / "val2017" / "000000000802.jpg"], 320)


def hf_detr(depth=50, dilation=False, num_labels=91, seed=0, segmentation=False, **config_overrides):
  """transformers' DetrForObjectDetection (or DetrForSegmentation) with random weights, built from
  config (no hub), eval mode.

  transformers ignores `dilation` for non-timm backbones, so DC5 is applied by hand as torchvision's
  `replace_stride_with_dilation` does: layer4's strides become 1 and the 3x3 convs of its later
  blocks get dilation 2 and padding 2.
  """
  import torch
  from transformers import DetrConfig, DetrForObjectDetection, DetrForSegmentation, ResNetConfig
  torch.manual_seed(seed)
  layouts = {18: ("basic", [2, 2, 2, 2], [64, 128, 256, 512]), 34: ("basic", [3, 4, 6, 3], [64, 128, 256, 512]),
             50: ("bottleneck", [3, 4, 6, 3], [256, 512, 1024, 2048]),
             101: ("bottleneck", [3, 4, 23, 3], [256, 512, 1024, 2048])}
  layer_type, depths, hidden_sizes = layouts[depth]
  stages = ["stage1", "stage2", "stage3", "stage4"] if segmentation else ["stage4"]
  config = DetrConfig(
      use_timm_backbone=False, use_pretrained_backbone=False, backbone=None, num_labels=num_labels,
      backbone_config=ResNetConfig(layer_type=layer_type, depths=depths, hidden_sizes=hidden_sizes,
                                   out_features=stages), **config_overrides)
  model = (DetrForSegmentation if segmentation else DetrForObjectDetection)(config)
  detector = model.detr if segmentation else model
  if dilation:
    stage = detector.model.backbone.model.encoder.stages[3]
    stage.layers[0].shortcut.convolution.stride = (1, 1)
    stage.layers[0].layer[1].convolution.stride = (1, 1)
    for block in stage.layers[1:]:
      block.layer[1].convolution.dilation = (2, 2)
      block.layer[1].convolution.padding = (2, 2)
  # HF initialises every Linear with std 0.02, which makes all boxes nearly equal, and its
  # frozen-BN statistics are 0/1. PyTorch default inits (as in the official model) and random
  # statistics give outputs that vary enough for a comparison to see errors.
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
        module.reset_parameters()
      if hasattr(module, "running_var") and hasattr(module, "running_mean"):
        module.running_mean.uniform_(-0.1, 0.1)
        module.running_var.uniform_(0.5, 1.5)
        module.weight.uniform_(0.5, 1.5)
        module.bias.uniform_(-0.1, 0.1)
      if isinstance(module, torch.nn.GroupNorm):   # the mask head's norms start at 1 / 0
        module.weight.uniform_(0.5, 1.5)
        module.bias.uniform_(-0.1, 0.1)
      if isinstance(module, torch.nn.Conv2d) and module.bias is not None:   # and its conv biases at 0
        module.bias.uniform_(-0.1, 0.1)
  return model.eval()


def coco_targets(coco_mini, image_ids, max_boxes=None):
  """Real targets of coco-mini train images, crowd boxes dropped, padded to `max_boxes`.

  Returns {"labels" [B, T] int32, "boxes" [B, T, 4] cxcywh normalised, "mask" [B, T] bool} and the
  unpadded per-image lists (labels, boxes) for reference implementations.
  """
  data = train_annotations(coco_mini)
  images = {image["id"]: image for image in data["images"]}
  per_image = {image_id: [] for image_id in image_ids}
  for ann in data["annotations"]:
    if ann["image_id"] in per_image and not ann["iscrowd"]:
      per_image[ann["image_id"]].append(ann)
  lists = []
  for image_id in image_ids:
    width, height = images[image_id]["width"], images[image_id]["height"]
    labels = np.array([a["category_id"] for a in per_image[image_id]], np.int32)
    boxes = np.array([[(x + w / 2) / width, (y + h / 2) / height, w / width, h / height]
                      for x, y, w, h in (a["bbox"] for a in per_image[image_id])], np.float32).reshape(-1, 4)
    lists.append((labels, boxes))
  max_boxes = max_boxes or max(len(l) for l, _ in lists)
  padded = {"labels": np.zeros((len(lists), max_boxes), np.int32),
            "boxes": np.zeros((len(lists), max_boxes, 4), np.float32),
            "mask": np.zeros((len(lists), max_boxes), bool)}
  for i, (labels, boxes) in enumerate(lists):
    padded["labels"][i, :len(labels)] = labels
    padded["boxes"][i, :len(labels)] = boxes
    padded["mask"][i, :len(labels)] = True
  return padded, lists


@functools.lru_cache(maxsize=None)
def train_annotations(coco_mini) -> dict:
  """coco-mini's instances_train2017.json, parsed once per session (callers must not mutate it)."""
  return json.loads((coco_mini / "annotations" / "instances_train2017.json").read_text())


def coco_train_image_ids(coco_mini, count, offset=0):
  return sorted(image["id"] for image in train_annotations(coco_mini)["images"])[offset:offset + count]


def run_on_cpu_devices(script: str, *args: str, devices: int = 8) -> dict:
  """Runs `script` in a fresh Python with `devices` simulated CPU devices; returns its last line as JSON.

  XLA_FLAGS must be set before JAX starts, hence the subprocess.
  """
  import subprocess
  import sys
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
             PYTHONPATH=str(REPO_ROOT))
  run = subprocess.run([sys.executable, "-c", script, *args], env=env, cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  return json.loads(run.stdout.strip().splitlines()[-1])
