"""Deformable DETR's set loss: focal matching and a sigmoid focal classification loss (Zhu et al.
2021, Sec. A.3; official `SetCriterion` in `models/deformable_detr.py`, `sigmoid_focal_loss` in
`models/segmentation.py`).

Targets are padded as for DETR (`set_criterion`): labels [B, T], boxes [B, T, 4] cxcywh, and
`target_valid` [B, T]. num_boxes = max(total valid targets, 1) over the global batch, which is
what the official per-GPU normalisation and DDP's gradient average amount to.
"""

import dataclasses
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from detr_jax.losses import matcher as matcher_lib
from detr_jax.losses.set_criterion import (PER_LAYER_TERMS, box_losses, cardinality_error, class_error, focal_terms,
                                           term_names)

ENCODER_SUFFIX = "_enc"


def focal_term_names(num_layers: int, two_stage: bool) -> list[str]:
  """The keys of FocalSetCriterion's `terms`: DETR's per-layer terms and class_error, plus the
  two-stage proposals' terms with the `_enc` suffix."""
  return [*term_names(num_layers), *((f"{name}{ENCODER_SUFFIX}" for name in PER_LAYER_TERMS) if two_stage else ())]


@dataclasses.dataclass(frozen=True)
class FocalSetCriterion:
  """Matches each decoder layer (and the two-stage proposals) with the focal cost and computes the
  official Deformable DETR loss terms.

  Attributes:
    num_classes: K, the sigmoid classes (no "no object" column).
    cost_weights: matching weights (official 2, 5, 2) with focal_alpha set (0.25).
    cls_loss_coef, bbox_loss_coef, giou_loss_coef: loss weights (official 2, 5, 2).
    focal_alpha: the focal loss's alpha (0.25); gamma is 2.
    solver, num_threads, mesh: as for `matcher.match`.

  Call: criterion(outputs, targets) with the model's output dict -> (loss, terms).
    loss: cls_loss_coef * loss_ce + bbox_loss_coef * loss_bbox + giou_loss_coef * loss_giou summed
      over every decoder layer and, in two-stage, the proposals; a float32 scalar.
    terms: loss_ce (focal: sum over queries and classes / num_boxes, the official
      `mean(1).sum() / num_boxes * num_queries`), loss_bbox, loss_giou, cardinality_error for the
      last layer, the same with _0 .. _{L-2} for earlier layers, with _enc for the proposals
      (matched to the targets with every label set to 0), and class_error (last layer).
  """

  num_classes: int
  cost_weights: matcher_lib.CostWeights = matcher_lib.CostWeights(2.0, 5.0, 2.0, 0.25)
  cls_loss_coef: float = 2.0
  bbox_loss_coef: float = 5.0
  giou_loss_coef: float = 2.0
  focal_alpha: float = 0.25
  solver: str = "host"
  num_threads: int = 1
  mesh: Optional[Mesh] = None

  def __call__(self, outputs: Mapping[str, Any], targets: Mapping[str, jnp.ndarray]):
    layers = [*outputs.get("aux_outputs", []), outputs]
    valid = targets["target_valid"].astype(bool)
    labels = jnp.where(valid, targets["labels"], 0).astype(jnp.int32)
    boxes = jnp.where(valid[..., None], targets["boxes"], 0.5).astype(jnp.float32)
    num_boxes = jnp.maximum(valid.sum(), 1).astype(jnp.float32)

    pred_logits = jnp.stack([layer["pred_logits"] for layer in layers]).astype(jnp.float32)
    pred_boxes = jnp.stack([layer["pred_boxes"] for layer in layers]).astype(jnp.float32)
    per_layer, query_index = self._terms(pred_logits, pred_boxes, labels, boxes, valid, num_boxes)
    terms = {name: per_layer[name][-1] for name in PER_LAYER_TERMS}
    terms.update({f"{name}_{i}": per_layer[name][i] for name in PER_LAYER_TERMS for i in range(len(layers) - 1)})
    terms["class_error"] = class_error(pred_logits[-1], labels, query_index[-1], query_index[-1] >= 0)
    loss = self._weighted(per_layer).sum()
    if "enc_outputs" in outputs:
      enc = outputs["enc_outputs"]
      enc_terms, _ = self._terms(enc["pred_logits"][None].astype(jnp.float32),
                                 enc["pred_boxes"][None].astype(jnp.float32), jnp.zeros_like(labels), boxes, valid,
                                 num_boxes)
      terms.update({f"{name}{ENCODER_SUFFIX}": enc_terms[name][0] for name in PER_LAYER_TERMS})
      loss = loss + self._weighted(enc_terms).sum()
    return loss, terms

  def _weighted(self, per_layer):
    return (self.cls_loss_coef * per_layer["loss_ce"] + self.bbox_loss_coef * per_layer["loss_bbox"]
            + self.giou_loss_coef * per_layer["loss_giou"])

  def _terms(self, pred_logits, pred_boxes, labels, boxes, valid, num_boxes):
    """Matching and the per-layer terms of [L, B, Q, K] logits and [L, B, Q, 4] boxes: ({name: [L]}, query_index)."""
    query_index = matcher_lib.match(pred_logits, pred_boxes, labels, boxes, valid, self.cost_weights,
                                    self.solver, self.num_threads, self.mesh)
    matched = query_index >= 0
    return {
        "loss_ce": self._loss_ce(pred_logits, labels, query_index, matched, num_boxes),
        **box_losses(pred_boxes, boxes, query_index, matched, num_boxes),
        "cardinality_error": cardinality_error(pred_logits, valid),
    }, query_index

  def _loss_ce(self, pred_logits, labels, query_index, matched, num_boxes):
    """Sigmoid focal loss over every query and class, one-hot targets at the matched queries: [L]."""
    num_queries = pred_logits.shape[2]
    assignment = jax.nn.one_hot(query_index, num_queries, dtype=bool) & matched[..., None]   # [L, B, T, Q]
    one_hot = jax.nn.one_hot(labels, pred_logits.shape[-1], dtype=jnp.float32)              # [B, T, K]
    targets = jnp.einsum("lbtq,btk->lbqk", assignment.astype(jnp.float32), one_hot)         # [L, B, Q, K]
    focal = focal_terms(pred_logits, targets, self.focal_alpha)
    return focal.mean(axis=2).sum(axis=(1, 2)) / num_boxes * num_queries
