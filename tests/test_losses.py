"""The set loss and matcher against transformers' DetrLoss / DetrHungarianMatcher (PyTorch).

Random predictions, real targets from coco-mini. Every loss term (aux included) and the
gradients of the total loss with respect to logits and boxes agree within 1e-5.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import DetrConfig, ResNetConfig
from transformers.loss.loss_for_object_detection import ForObjectDetectionLoss, HungarianMatcher

from detr_jax import losses
from tests.helpers import as_model_outputs, random_outputs

TOLERANCE = 1e-5
LAYERS, QUERIES, CLASSES = 6, 100, 91


def hf_loss(logits, boxes, target_lists):
  """transformers' loss dict and the gradients of its total loss w.r.t. all logits and boxes."""
  config = DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False, backbone=None, num_labels=CLASSES,
                      auxiliary_loss=True, backbone_config=ResNetConfig(out_features=["stage4"]))
  logits_t = torch.from_numpy(logits).requires_grad_()
  boxes_t = torch.from_numpy(boxes).requires_grad_()
  labels = [{"class_labels": torch.from_numpy(l).long(), "boxes": torch.from_numpy(b)} for l, b in target_lists]
  loss, loss_dict, _ = ForObjectDetectionLoss(logits_t[-1], labels, "cpu", boxes_t[-1], config, logits_t, boxes_t)
  loss.backward()
  return loss.item(), {k: v.item() for k, v in loss_dict.items()}, logits_t.grad.numpy(), boxes_t.grad.numpy()


@pytest.mark.parametrize("solver", ["host", "device"])
def test_loss_terms_and_gradients_match_transformers(batch_targets, solver):
  padded, lists = batch_targets
  logits, boxes = random_outputs(len(lists), seed=0)
  ref_loss, ref_terms, ref_grad_logits, ref_grad_boxes = hf_loss(logits, boxes, lists)

  criterion = losses.SetCriterion(num_classes=CLASSES, solver=solver)
  def total(logits, boxes):
    return criterion(as_model_outputs(logits, boxes), padded)
  (loss, terms), (grad_logits, grad_boxes) = jax.jit(jax.value_and_grad(total, argnums=(0, 1), has_aux=True))(logits, boxes)

  assert set(ref_terms) <= set(terms)
  assert len(ref_terms) == 4 * LAYERS
  for name, value in ref_terms.items():
    np.testing.assert_allclose(terms[name], value, atol=TOLERANCE, rtol=0, err_msg=name)
  np.testing.assert_allclose(loss, ref_loss, atol=TOLERANCE * 10, rtol=1e-6)
  np.testing.assert_allclose(grad_logits, ref_grad_logits, atol=TOLERANCE, rtol=0)
  np.testing.assert_allclose(grad_boxes, ref_grad_boxes, atol=TOLERANCE, rtol=0)


def test_class_error_matches_official_accuracy(batch_targets):
  padded, lists = batch_targets
  logits, boxes = random_outputs(len(lists), seed=1)
  matcher = HungarianMatcher(class_cost=1, bbox_cost=5, giou_cost=2)
  labels = [{"class_labels": torch.from_numpy(l).long(), "boxes": torch.from_numpy(b)} for l, b in lists]
  indices = matcher({"logits": torch.from_numpy(logits[-1]), "pred_boxes": torch.from_numpy(boxes[-1])}, labels)
  matched_logits = torch.cat([torch.from_numpy(logits[-1][i])[src] for i, (src, _) in enumerate(indices)])
  matched_labels = torch.cat([torch.from_numpy(l).long()[tgt] for (l, _), (_, tgt) in zip(lists, indices)])
  expected = 100 - 100 * (matched_logits.argmax(-1) == matched_labels).float().mean().item()
  _, terms = losses.SetCriterion(num_classes=CLASSES)(as_model_outputs(logits, boxes), padded)
  np.testing.assert_allclose(terms["class_error"], expected, atol=1e-4)


def test_padded_targets_never_leak(batch_targets):
  padded, _ = batch_targets
  logits, boxes = random_outputs(len(padded["target_valid"]), seed=2)
  criterion = losses.SetCriterion(num_classes=CLASSES)
  grad_fn = jax.jit(jax.value_and_grad(lambda l, b, t: criterion(as_model_outputs(l, b), t), argnums=(0, 1), has_aux=True))
  (loss, terms), grads = grad_fn(logits, boxes, padded)
  garbage = dict(padded)
  pad = ~padded["target_valid"]
  garbage["labels"] = np.where(pad, 17, padded["labels"]).astype(np.int32)
  garbage["boxes"] = np.where(pad[..., None], np.float32(np.nan), padded["boxes"])
  (loss2, terms2), grads2 = grad_fn(logits, boxes, garbage)
  assert float(loss) == float(loss2)
  assert all(float(terms[k]) == float(terms2[k]) for k in terms)
  for g, g2 in zip(grads, grads2):
    np.testing.assert_array_equal(g, g2)


def test_no_targets_anywhere():
  logits, boxes = random_outputs(2, seed=3)
  empty = {"labels": np.zeros((2, 10), np.int32), "boxes": np.zeros((2, 10, 4), np.float32),
           "target_valid": np.zeros((2, 10), bool)}
  for solver in ("host", "device"):
    loss, terms = losses.SetCriterion(num_classes=CLASSES, solver=solver)(as_model_outputs(logits, boxes), empty)
    assert np.isfinite(float(loss))
    assert float(terms["loss_bbox"]) == float(terms["loss_giou"]) == 0.0
    assert float(terms["class_error"]) == 100.0
    # Every query's target is "no object": loss_ce is the plain mean NLL of the last class.
    expected_ce = -jax.nn.log_softmax(jnp.asarray(logits[-1]))[..., -1].mean()
    np.testing.assert_allclose(terms["loss_ce"], expected_ce, atol=TOLERANCE, rtol=0)
