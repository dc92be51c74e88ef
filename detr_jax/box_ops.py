"""Box operations (official `util/box_ops.py`), vectorised and jit-able.

Boxes are [..., 4] float arrays: cxcywh = (cx, cy, w, h), xyxy = (x0, y0, x1, y1), in any one
unit (pixels or normalised). IoU and GIoU broadcast over leading axes; `pairwise_*` compare
every box of one set with every box of another.

Degenerate boxes (zero or negative width or height) never produce NaN or Inf: the official code
asserts on them, here the affected ratios are defined as 0. Widths and heights below zero count
as zero.
"""

import jax.numpy as jnp


def cxcywh_to_xyxy(boxes: jnp.ndarray) -> jnp.ndarray:
  """(cx, cy, w, h) -> (x0, y0, x1, y1), in whatever units the input uses."""
  cx, cy, w, h = jnp.moveaxis(boxes, -1, 0)
  return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def xyxy_to_cxcywh(boxes: jnp.ndarray) -> jnp.ndarray:
  """(x0, y0, x1, y1) -> (cx, cy, w, h), in whatever units the input uses."""
  x0, y0, x1, y1 = jnp.moveaxis(boxes, -1, 0)
  return jnp.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)


def area(boxes_xyxy: jnp.ndarray) -> jnp.ndarray:
  """[..., 4] xyxy -> [...] area, with negative sides counted as zero."""
  wh = jnp.maximum(boxes_xyxy[..., 2:] - boxes_xyxy[..., :2], 0)
  return wh[..., 0] * wh[..., 1]


def _safe_divide(numerator, denominator):
  positive = denominator > 0
  return jnp.where(positive, numerator / jnp.where(positive, denominator, 1), 0)


def box_iou(boxes1: jnp.ndarray, boxes2: jnp.ndarray):
  """IoU of xyxy boxes, broadcasting [..., 4] against [..., 4]. Returns (iou, union)."""
  top_left = jnp.maximum(boxes1[..., :2], boxes2[..., :2])
  bottom_right = jnp.minimum(boxes1[..., 2:], boxes2[..., 2:])
  wh = jnp.maximum(bottom_right - top_left, 0)
  inter = wh[..., 0] * wh[..., 1]
  union = area(boxes1) + area(boxes2) - inter
  return _safe_divide(inter, union), union


def generalized_box_iou(boxes1: jnp.ndarray, boxes2: jnp.ndarray) -> jnp.ndarray:
  """Generalised IoU (Rezatofighi et al., CVPR 2019) of xyxy boxes, broadcasting; in [-1, 1]."""
  iou, union = box_iou(boxes1, boxes2)
  top_left = jnp.minimum(boxes1[..., :2], boxes2[..., :2])
  bottom_right = jnp.maximum(boxes1[..., 2:], boxes2[..., 2:])
  wh = jnp.maximum(bottom_right - top_left, 0)
  enclosing = wh[..., 0] * wh[..., 1]
  return iou - _safe_divide(enclosing - union, enclosing)


def pairwise_iou(boxes1: jnp.ndarray, boxes2: jnp.ndarray) -> jnp.ndarray:
  """[..., N, 4] x [..., M, 4] xyxy -> [..., N, M] IoU."""
  return box_iou(boxes1[..., :, None, :], boxes2[..., None, :, :])[0]


def pairwise_generalized_box_iou(boxes1: jnp.ndarray, boxes2: jnp.ndarray) -> jnp.ndarray:
  """[..., N, 4] x [..., M, 4] xyxy -> [..., N, M] GIoU."""
  return generalized_box_iou(boxes1[..., :, None, :], boxes2[..., None, :, :])
