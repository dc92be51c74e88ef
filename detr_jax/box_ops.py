"""Box conversions (official `util/box_ops.py`). Boxes are [..., 4] float arrays."""

import jax.numpy as jnp


def cxcywh_to_xyxy(boxes: jnp.ndarray) -> jnp.ndarray:
  """(cx, cy, w, h) -> (x0, y0, x1, y1), in whatever units the input uses."""
  cx, cy, w, h = jnp.moveaxis(boxes, -1, 0)
  return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def xyxy_to_cxcywh(boxes: jnp.ndarray) -> jnp.ndarray:
  """(x0, y0, x1, y1) -> (cx, cy, w, h), in whatever units the input uses."""
  x0, y0, x1, y1 = jnp.moveaxis(boxes, -1, 0)
  return jnp.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)
