"""Detection post-processing for COCO evaluation (official `PostProcess` in `models/detr.py`)."""

import jax
import jax.numpy as jnp

from detr_jax import box_ops


def detections(outputs, original_sizes):
  """Turns model outputs into scored detections, one per object query (no threshold, no NMS).

  Args:
    outputs: the model's dict with "pred_logits" [B, Q, K + 1] and "pred_boxes" [B, Q, 4]
      (cxcywh normalised to the unpadded image).
    original_sizes: [B, 2] (height, width) in pixels of the original images.
  Returns:
    scores [B, Q] float32 (softmax probability of the best real class), labels [B, Q] int32
    (class index = COCO category id), boxes [B, Q, 4] float32 xyxy in original-image pixels.
  """
  probs = jax.nn.softmax(outputs["pred_logits"], axis=-1)[..., :-1]
  scores = probs.max(axis=-1)
  labels = probs.argmax(axis=-1).astype(jnp.int32)
  height, width = original_sizes[:, 0], original_sizes[:, 1]
  scale = jnp.stack([width, height, width, height], axis=-1).astype(jnp.float32)[:, None, :]
  return scores, labels, box_ops.cxcywh_to_xyxy(outputs["pred_boxes"]) * scale
