"""Deformable DETR's focal matching and set loss against transformers' DeformableDetrLoss (PyTorch),
configured like the official recipe, and the two-stage `_enc` terms against the official
`SetCriterion.forward`'s encoder branch, written here in torch with transformers' matcher and loss terms.

Random predictions, real coco-mini targets, one image without targets. transformers hard-codes the
focal term's weight to 1 (official 2): its terms are compared one by one, and the gradients with the
official weights applied here. Its cardinality_error counts sigmoid > 0.5 (the official code
counts queries whose argmax is not the last class): that term is checked against a transcription.
Tolerance 1e-5 for every gradient and term (terms also 1e-6 relative: loss_ce, ~70 here, is a
float32 sum of 163,800 focal terms). Measured 2026-11-22: terms within 1.5e-5 absolute (2.2e-7
relative), gradients within 1.2e-7.
"""

import re

import jax
import numpy as np
import pytest
import torch
from transformers import DeformableDetrConfig
from transformers.loss.loss_deformable_detr import (DeformableDetrForObjectDetectionLoss, DeformableDetrHungarianMatcher,
                                                    DeformableDetrImageLoss)

from detr_jax.losses import focal_criterion, matcher

TOLERANCE = 1e-5
# loss_ce sums 6 x 300 x 91 focal terms to tens: float32 resolves it to ~1e-6 relative.
RELATIVE_TOLERANCE = 1e-6
LAYERS, QUERIES, CLASSES, POSITIONS = 6, 300, 91, 400
WEIGHTS = {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}   # official cls/bbox/giou_loss_coef


def random_predictions(batch, seed):
  """Decoder logits [L, B, Q, K] and boxes, and two-stage proposals [B, S, K] / [B, S, 4] with the
  boxes of invalid positions at 1.0, as the model gives them (sigmoid of +inf)."""
  rng = np.random.default_rng(seed)
  # Around the official prior logit (-4.6), spread so that some queries score high.
  logits = rng.normal(-4.6, 2.0, (LAYERS, batch, QUERIES, CLASSES)).astype(np.float32)
  boxes = (1 / (1 + np.exp(-rng.normal(0, 1.5, (LAYERS, batch, QUERIES, 4))))).astype(np.float32)
  enc_logits = rng.normal(-4.6, 2.0, (batch, POSITIONS, CLASSES)).astype(np.float32)
  enc_boxes = (1 / (1 + np.exp(-rng.normal(0, 1.5, (batch, POSITIONS, 4))))).astype(np.float32)
  enc_boxes[:, -40:] = 1.0
  return logits, boxes, enc_logits, enc_boxes


def as_outputs(logits, boxes, enc_logits=None, enc_boxes=None):
  outputs = {"pred_logits": logits[-1], "pred_boxes": boxes[-1],
             "aux_outputs": [{"pred_logits": l, "pred_boxes": b} for l, b in zip(logits[:-1], boxes[:-1])]}
  if enc_logits is not None:
    outputs["enc_outputs"] = {"pred_logits": enc_logits, "pred_boxes": enc_boxes}
  return outputs


def torch_targets(lists, zero_labels=False):
  return [{"class_labels": torch.zeros(len(l), dtype=torch.long) if zero_labels else torch.from_numpy(l).long(),
           "boxes": torch.from_numpy(b)} for l, b in lists]


def reference(logits, boxes, enc_logits, enc_boxes, lists):
  """(terms, gradients w.r.t. the four arrays of the officially weighted total) in torch."""
  config = DeformableDetrConfig(num_labels=CLASSES, class_cost=2, bbox_cost=5, giou_cost=2, focal_alpha=0.25,
                                auxiliary_loss=True, decoder_layers=LAYERS, use_timm_backbone=False, backbone=None,
                                use_pretrained_backbone=False)
  tensors = [torch.from_numpy(a).requires_grad_() for a in (logits, boxes, enc_logits, enc_boxes)]
  _, terms, _ = DeformableDetrForObjectDetectionLoss(tensors[0][-1], torch_targets(lists), "cpu", tensors[1][-1],
                                                     config, tensors[0], tensors[1])
  # The official encoder branch: every label set to 0, matched and scored like a decoder layer.
  enc_criterion = DeformableDetrImageLoss(DeformableDetrHungarianMatcher(class_cost=2, bbox_cost=5, giou_cost=2),
                                          CLASSES, 0.25, ["labels", "boxes"])
  enc_terms = enc_criterion({"logits": tensors[2], "pred_boxes": tensors[3]}, torch_targets(lists, zero_labels=True))
  terms.update({f"{name}_enc": value for name, value in enc_terms.items()})
  base_name = lambda name: re.sub(r"(_\d+|_enc)$", "", name)
  total = sum(WEIGHTS[base_name(name)] * value for name, value in terms.items() if not name.startswith("cardinality"))
  total.backward()
  return {k: v.item() for k, v in terms.items()}, [t.grad.numpy() for t in tensors]


def official_cardinality_error(logits, lists):
  """Official `loss_cardinality`: queries whose argmax is not the last class, against the target count."""
  predicted = (logits.argmax(-1) != logits.shape[-1] - 1).sum(-1)
  return float(np.abs(predicted - np.array([len(l) for l, _ in lists])).mean())


@pytest.mark.parametrize("solver", ["host", "device"])
def test_terms_and_gradients_match_the_official_loss(batch_targets, solver):
  padded, lists = batch_targets
  arrays = random_predictions(len(lists), seed=0)
  ref_terms, ref_grads = reference(*arrays, lists)

  criterion = focal_criterion.FocalSetCriterion(num_classes=CLASSES, solver=solver)

  def total(*arrays):
    return criterion(as_outputs(*arrays), padded)

  (loss, terms), grads = jax.jit(jax.value_and_grad(total, argnums=(0, 1, 2, 3), has_aux=True))(*arrays)
  assert sorted(terms) == sorted(focal_criterion.focal_term_names(LAYERS, two_stage=True))
  compared = [name for name in ref_terms if not name.startswith("cardinality")]
  assert len(compared) == 3 * LAYERS + 3
  for name in compared:
    np.testing.assert_allclose(terms[name], ref_terms[name], atol=TOLERANCE, rtol=RELATIVE_TOLERANCE, err_msg=name)
  for name, grad, ref_grad in zip(("logits", "boxes", "enc_logits", "enc_boxes"), grads, ref_grads):
    assert np.abs(ref_grad).max() > 0, name
    np.testing.assert_allclose(grad, ref_grad, atol=TOLERANCE, rtol=0, err_msg=name)
  logits, _, enc_logits, _ = arrays
  np.testing.assert_allclose(terms["cardinality_error"], official_cardinality_error(logits[-1], lists), atol=1e-6)
  np.testing.assert_allclose(terms["cardinality_error_2"], official_cardinality_error(logits[2], lists), atol=1e-6)
  np.testing.assert_allclose(terms["cardinality_error_enc"], official_cardinality_error(enc_logits, lists), atol=1e-6)
  expected_total = sum(WEIGHTS[name] * (terms[name] + sum(terms[f"{name}_{i}"] for i in range(LAYERS - 1))
                                        + terms[f"{name}_enc"]) for name in WEIGHTS)
  np.testing.assert_allclose(loss, expected_total, rtol=1e-6)


def test_focal_matching_cost_matches_transformers(batch_targets):
  padded, lists = batch_targets
  logits, boxes, _, _ = random_predictions(len(lists), seed=1)
  reference_matcher = DeformableDetrHungarianMatcher(class_cost=2, bbox_cost=5, giou_cost=2)
  indices = reference_matcher({"logits": torch.from_numpy(logits[-1]), "pred_boxes": torch.from_numpy(boxes[-1])},
                              torch_targets(lists))
  query_index = matcher.match(logits[-1:], boxes[-1:], padded["labels"], padded["boxes"], padded["target_valid"],
                              matcher.CostWeights(2.0, 5.0, 2.0, 0.25))[0]
  for b, (queries, targets) in enumerate(indices):
    np.testing.assert_array_equal(np.asarray(query_index[b])[targets.numpy()], queries.numpy())


def test_padded_targets_never_leak(batch_targets):
  padded, _ = batch_targets
  arrays = random_predictions(len(padded["target_valid"]), seed=2)
  criterion = focal_criterion.FocalSetCriterion(num_classes=CLASSES)
  garbage = dict(padded, labels=np.where(padded["target_valid"], padded["labels"], 77),
                 boxes=np.where(padded["target_valid"][..., None], padded["boxes"], np.nan))
  _, clean = criterion(as_outputs(*arrays), padded)
  _, dirty = criterion(as_outputs(*arrays), garbage)
  for name in clean:
    np.testing.assert_array_equal(clean[name], dirty[name], err_msg=name)
