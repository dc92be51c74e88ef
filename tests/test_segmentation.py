"""The panoptic mask head against transformers' DetrForSegmentation; panoptic checkpoint porting."""

import jax
import numpy as np
import pytest
import torch

from detr_jax import porting
from references.transformers_detr import hf_detr
from tests.helpers import assert_same_state_dict, random_state_dict


@pytest.mark.parametrize("depth", [50, 18])
def test_pred_masks_match_transformers(two_real_images, depth):
  """Random weights (GroupNorm and conv biases randomised too) on two real images of different shapes."""
  images, mask = two_real_images
  reference = hf_detr(depth, segmentation=True, num_labels=250, seed=4)
  model, variables = porting.load_pytorch_checkpoint({k: v.numpy() for k, v in reference.state_dict().items()})
  assert model.masks and model.num_classes == 250
  with torch.no_grad():
    expected = reference(pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2),
                         pixel_mask=torch.from_numpy(mask).long())
  out = jax.jit(model.apply)(variables, images, mask)
  assert out["pred_masks"].shape == expected.pred_masks.shape == (2, 100, -(-images.shape[1] // 4), -(-images.shape[2] // 4))
  assert float(np.std(expected.pred_masks.numpy())) > 0.1   # masks that vary, so errors show
  np.testing.assert_allclose(out["pred_masks"], expected.pred_masks.numpy(), atol=1e-4, rtol=0)
  np.testing.assert_allclose(out["pred_logits"], expected.logits.numpy(), atol=1e-4, rtol=0)
  np.testing.assert_allclose(out["pred_boxes"], expected.pred_boxes.numpy(), atol=1e-4, rtol=0)


def test_official_panoptic_layout_round_trip(official_shapes):
  state_dict = random_state_dict(official_shapes["detr-r50-panoptic"])
  model, variables = porting.load_pytorch_checkpoint(state_dict)
  assert (model.masks, model.num_classes, model.backbone_depth) == (True, 250, 50)
  assert_same_state_dict(porting.to_pytorch_state_dict(variables), state_dict)


def test_panoptic_checkpoint_missing_a_mask_head_key_is_refused(official_shapes):
  state_dict = random_state_dict(official_shapes["detr-r50-panoptic"])
  del state_dict["mask_head.gn3.bias"]
  with pytest.raises(porting.CheckpointMismatchError, match="mask_head.gn3.bias"):
    porting.load_pytorch_checkpoint(state_dict)


def _instance_masks(coco_mini, image_ids, size):
  """Real coco-mini instance masks (crowd dropped) resized (nearest) to `size`, with their labels and boxes."""
  from pycocotools.coco import COCO
  from PIL import Image
  import contextlib
  import io
  with contextlib.redirect_stdout(io.StringIO()):
    coco = COCO(str(coco_mini / "annotations" / "instances_train2017.json"))
  per_image = []
  for image_id in image_ids:
    info = coco.imgs[image_id]
    annotations = [a for a in coco.imgToAnns[image_id] if not a["iscrowd"]]
    masks = np.stack([np.asarray(Image.fromarray(coco.annToMask(a)).resize(size[::-1], Image.NEAREST), bool)
                      for a in annotations])
    boxes = np.array([[(x + w / 2) / info["width"], (y + h / 2) / info["height"], w / info["width"],
                       h / info["height"]] for x, y, w, h in (a["bbox"] for a in annotations)], np.float32)
    per_image.append((np.array([a["category_id"] for a in annotations], np.int32), boxes, masks))
  return per_image


def test_mask_losses_and_gradients_match_transformers(coco_mini):
  """loss_mask (focal) and loss_dice on random mask logits against real masks; tolerance 1e-5."""
  from transformers import DetrConfig, ResNetConfig
  from transformers.loss.loss_for_object_detection import ForSegmentationLoss
  from detr_jax import losses
  from references.coco_mini import coco_train_image_ids
  size, mask_size, num_queries, max_targets = (96, 128), (24, 32), 50, 50
  per_image = _instance_masks(coco_mini, coco_train_image_ids(coco_mini, 3), size)
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 2, (3, num_queries, 92)).astype(np.float32)
  boxes = (1 / (1 + np.exp(-rng.normal(0, 1.5, (3, num_queries, 4))))).astype(np.float32)
  pred_masks = rng.normal(0, 3, (3, num_queries, *mask_size)).astype(np.float32)

  config = DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False, backbone=None, num_labels=91,
                      auxiliary_loss=False, backbone_config=ResNetConfig(out_features=["stage4"]))
  masks_t = torch.from_numpy(pred_masks).requires_grad_()
  labels = [{"class_labels": torch.from_numpy(l).long(), "boxes": torch.from_numpy(b),
             "masks": torch.from_numpy(m).float()} for l, b, m in per_image]
  _, ref_terms, _ = ForSegmentationLoss(torch.from_numpy(logits), labels, "cpu", torch.from_numpy(boxes), masks_t, config)
  (ref_terms["loss_mask"] + ref_terms["loss_dice"]).backward()

  targets = {"labels": np.zeros((3, max_targets), np.int32), "boxes": np.zeros((3, max_targets, 4), np.float32),
             "target_valid": np.zeros((3, max_targets), bool),
             "segment_masks": np.zeros((3, max_targets, *size), bool)}
  for i, (l, b, m) in enumerate(per_image):
    targets["labels"][i, :len(l)], targets["boxes"][i, :len(l)], targets["target_valid"][i, :len(l)] = l, b, True
    targets["segment_masks"][i, :len(l)] = m
  criterion = losses.SetCriterion(num_classes=91)

  def mask_terms(pred_masks):
    _, terms = criterion({"pred_logits": logits, "pred_boxes": boxes, "pred_masks": pred_masks}, targets)
    return terms["loss_mask"] + terms["loss_dice"], terms
  (_, terms), grad = jax.jit(jax.value_and_grad(mask_terms, has_aux=True))(pred_masks)
  for name in ("loss_mask", "loss_dice", "loss_ce", "loss_bbox", "loss_giou"):
    np.testing.assert_allclose(terms[name], ref_terms[name].item(), atol=1e-5, rtol=0, err_msg=name)
  # Per-pixel gradients are small (pixel means divided by num_boxes): compare them relative to the largest.
  ref_grad = masks_t.grad.numpy()
  scale = np.abs(ref_grad).max()
  assert scale > 0
  np.testing.assert_array_equal(np.asarray(grad) != 0, ref_grad != 0)   # only matched queries get gradients
  np.testing.assert_allclose(grad / scale, ref_grad / scale, atol=1e-5, rtol=0)
