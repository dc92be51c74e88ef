"""The DETR set loss (paper Sec. 3.1 and A.2, official `SetCriterion` in `models/detr.py`).

Targets are padded to a fixed count per image:
    {"labels": [B, T] int32 class indices (COCO category ids),
     "boxes":  [B, T, 4] float32 cxcywh normalised to the unpadded image,
     "target_valid": [B, T] bool, True on real targets}.
Padded entries never reach a loss or a gradient, whatever they hold.

Normalisation: the official code divides the box losses on each GPU by
num_boxes = max(total targets on all GPUs / world size, 1) and DDP then averages the GPUs'
gradients; that equals dividing the global sum by the global target count. Here the loss is
written over the global batch (jit over the mesh inserts the cross-device sums), so
num_boxes = max(total valid targets, 1) and the result does not depend on the device count.
"""

import dataclasses
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from detr_jax import box_ops
from detr_jax.losses import matcher as matcher_lib


def at_matched_queries(per_query, query_index):
  """[..., Q, F] predictions at each target's matched query -> [..., T, F].

  Unmatched targets (index -1) read query 0; callers mask them out.
  """
  return jnp.take_along_axis(per_query, jnp.maximum(query_index, 0)[..., None], axis=-2)


PER_LAYER_TERMS = ("loss_ce", "loss_bbox", "loss_giou", "cardinality_error")


def term_names(num_layers: int) -> list[str]:
  """The keys of SetCriterion's `terms` for outputs with `num_layers` decoder layers (aux included)."""
  return [*PER_LAYER_TERMS, *(f"{name}_{i}" for name in PER_LAYER_TERMS for i in range(num_layers - 1)),
          "class_error"]


def focal_terms(logits, targets, alpha: float = 0.25, gamma: float = 2.0):
  """RetinaNet's focal loss of each logit (Lin et al. 2017, Eq. 5), elementwise: same shape as `logits`."""
  prob = jax.nn.sigmoid(logits)
  cross_entropy = optax.sigmoid_binary_cross_entropy(logits, targets)
  p_t = prob * targets + (1 - prob) * (1 - targets)
  alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
  return alpha_t * cross_entropy * (1 - p_t) ** gamma


def sigmoid_focal_loss(logits, targets, alpha: float = 0.25, gamma: float = 2.0):
  """RetinaNet's focal loss averaged over pixels (official `sigmoid_focal_loss`): [..., P] -> [...]."""
  return focal_terms(logits, targets, alpha, gamma).mean(-1)


def dice_loss(logits, targets):
  """1 - soft Dice coefficient with +1 smoothing (official `dice_loss`): [..., P] -> [...]."""
  prob = jax.nn.sigmoid(logits)
  return 1 - (2 * (prob * targets).sum(-1) + 1) / (prob.sum(-1) + targets.sum(-1) + 1)


@dataclasses.dataclass(frozen=True)
class SetCriterion:
  """Matches each decoder layer independently and computes the official loss terms.

  Attributes:
    num_classes: class slots K; logits have K + 1 entries, "no object" last.
    eos_coef: cross-entropy weight of "no object" (0.1).
    cost_weights: the matching cost weights (1, 5, 2).
    bbox_loss_coef, giou_loss_coef: loss weights (5, 2); loss_ce has weight 1.
    solver: "host" (scipy through a callback) or "device" (optax Hungarian).
    num_threads: threads of the host solver.
    mesh: the device mesh when the batch is sharded (see `matcher.match`); None on a single device.
    mask_loss_coef, dice_loss_coef: weights (1, 1) of loss_mask (focal) and loss_dice, computed
      when the outputs hold "pred_masks" and the targets "segment_masks" ([B, T, H, W] bool, H x W the
      padded image size).

  Call: criterion(outputs, targets) with the model's output dict (aux outputs optional) ->
  (loss, terms). `loss` is the weighted sum of loss_ce, loss_bbox, loss_giou over all layers,
  a float32 scalar. `terms` holds loss_ce, loss_bbox, loss_giou, cardinality_error for the last
  layer, the same with suffixes _0 .. _{L-2} for the earlier layers, and class_error (top-1
  error of matched queries in %, last layer; 100 when nothing is matched), and with masks
  loss_mask and loss_dice (last layer). class_error and cardinality_error carry no gradient.
  """

  num_classes: int
  eos_coef: float = 0.1
  cost_weights: matcher_lib.CostWeights = matcher_lib.CostWeights()
  bbox_loss_coef: float = 5.0
  giou_loss_coef: float = 2.0
  solver: str = "host"
  num_threads: int = 1
  mesh: Optional[Mesh] = None
  mask_loss_coef: float = 1.0
  dice_loss_coef: float = 1.0

  def __call__(self, outputs: Mapping[str, Any], targets: Mapping[str, jnp.ndarray]):
    layers = [*outputs.get("aux_outputs", []), outputs]
    pred_logits = jnp.stack([layer["pred_logits"] for layer in layers]).astype(jnp.float32)
    pred_boxes = jnp.stack([layer["pred_boxes"] for layer in layers]).astype(jnp.float32)
    valid = targets["target_valid"].astype(bool)
    # Neutral values in padded slots keep NaN or garbage out of every product and gradient.
    labels = jnp.where(valid, targets["labels"], 0).astype(jnp.int32)
    boxes = jnp.where(valid[..., None], targets["boxes"], 0.5).astype(jnp.float32)

    query_index = matcher_lib.match(pred_logits, pred_boxes, labels, boxes, valid, self.cost_weights,
                                    self.solver, self.num_threads, self.mesh)
    matched = query_index >= 0                                                  # [L, B, T]
    num_boxes = jnp.maximum(valid.sum(), 1).astype(jnp.float32)

    per_layer = {
        "loss_ce": self._loss_ce(pred_logits, labels, query_index, matched),
        **box_losses(pred_boxes, boxes, query_index, matched, num_boxes),
        "cardinality_error": cardinality_error(pred_logits, valid),
    }
    terms = {name: per_layer[name][-1] for name in PER_LAYER_TERMS}
    terms.update({f"{name}_{i}": per_layer[name][i] for name in PER_LAYER_TERMS for i in range(len(layers) - 1)})
    terms["class_error"] = class_error(pred_logits[-1], labels, query_index[-1], matched[-1])
    loss = (per_layer["loss_ce"] + self.bbox_loss_coef * per_layer["loss_bbox"]
            + self.giou_loss_coef * per_layer["loss_giou"]).sum()
    if "pred_masks" in outputs:
      terms.update(self._mask_losses(outputs["pred_masks"], targets["segment_masks"], query_index[-1], matched[-1], num_boxes))
      loss = loss + self.mask_loss_coef * terms["loss_mask"] + self.dice_loss_coef * terms["loss_dice"]
    return loss, terms

  def _mask_losses(self, pred_masks, target_masks, query_index, matched, num_boxes):
    """Focal and Dice losses of the last layer's matched masks (the official code skips aux layers).

    pred_masks [B, Q, h, w] logits are upsampled bilinearly (align_corners=False, as the official
    `interpolate`) to the targets' [B, T, H, W] padded image size.
    """
    gathered = at_matched_queries(pred_masks.reshape(*pred_masks.shape[:2], -1).astype(jnp.float32), query_index)
    gathered = gathered.reshape(*query_index.shape, *pred_masks.shape[2:])
    upsampled = jax.image.resize(gathered, (*gathered.shape[:2], *target_masks.shape[2:]), "bilinear")
    logits = upsampled.reshape(*upsampled.shape[:2], -1)
    targets = target_masks.reshape(*target_masks.shape[:2], -1).astype(jnp.float32)
    per_target = {"loss_mask": sigmoid_focal_loss(logits, targets), "loss_dice": dice_loss(logits, targets)}
    return {name: jnp.where(matched, value, 0).sum() / num_boxes for name, value in per_target.items()}

  def _loss_ce(self, pred_logits, labels, query_index, matched):
    """Weighted cross-entropy over all queries, divided by the sum of weights: [L]."""
    num_queries = pred_logits.shape[2]
    assignment = jax.nn.one_hot(query_index, num_queries, dtype=bool) & matched[..., None]   # [L, B, T, Q]
    is_matched = assignment.any(axis=2)
    matched_label = jnp.where(assignment, labels[None, :, :, None], 0).sum(axis=2)
    target_classes = jnp.where(is_matched, matched_label, self.num_classes)                # [L, B, Q]
    log_probs = jax.nn.log_softmax(pred_logits, axis=-1)
    nll = -jnp.take_along_axis(log_probs, target_classes[..., None], axis=-1)[..., 0]
    weight = jnp.where(target_classes == self.num_classes, self.eos_coef, 1.0)
    return (weight * nll).sum(axis=(1, 2)) / weight.sum(axis=(1, 2))


def box_losses(pred_boxes, boxes, query_index, matched, num_boxes):
  """L1 (cxcywh) and 1 - GIoU (xyxy) summed over matched pairs, divided by num_boxes.

  pred_boxes [L, B, Q, 4], boxes [B, T, 4], query_index and matched [L, B, T] -> {"loss_bbox",
  "loss_giou"}: [L] each.
  """
  gathered = at_matched_queries(pred_boxes, query_index)                    # [L, B, T, 4]
  l1 = jnp.abs(gathered - boxes[None]).sum(-1)
  giou = box_ops.generalized_box_iou(box_ops.cxcywh_to_xyxy(gathered), box_ops.cxcywh_to_xyxy(boxes)[None])
  return {"loss_bbox": jnp.where(matched, l1, 0).sum(axis=(1, 2)) / num_boxes,
          "loss_giou": jnp.where(matched, 1 - giou, 0).sum(axis=(1, 2)) / num_boxes}


def cardinality_error(pred_logits, valid):
  """Mean over images of |#queries whose best class is not the last column - #targets| (official
  `loss_cardinality`, which Deformable DETR keeps for its sigmoid logits too): [L, B, Q, C] -> [L]."""
  logits = jax.lax.stop_gradient(pred_logits)
  predicted = (logits.argmax(-1) != logits.shape[-1] - 1).sum(-1)
  return jnp.abs(predicted - valid.sum(-1)).astype(jnp.float32).mean(-1)


def class_error(pred_logits, labels, query_index, matched):
  """100 - top-1 accuracy (%) of the matched queries' classes (official `accuracy`); 100 when
  nothing is matched. pred_logits [B, Q, C], labels, query_index, matched [B, T] -> scalar."""
  logits = jax.lax.stop_gradient(pred_logits)
  matched_logits = at_matched_queries(logits, query_index)                  # [B, T, C]
  correct = jnp.where(matched, matched_logits.argmax(-1) == labels, False).sum()
  count = matched.sum()
  return 100.0 - jnp.where(count > 0, 100.0 * correct / jnp.maximum(count, 1), 0.0)
