"""Multi-scale deformable attention in pure JAX (Zhu et al. 2021, Sec. 4.1, Eq. 3; official
`models/ops/modules/ms_deform_attn.py` and `functions/ms_deform_attn_func.py`).

Each query attends to P points per head on each of L feature levels, at locations predicted from
the query around its reference point; the values there are read by bilinear interpolation with
zero padding, as `F.grid_sample(align_corners=False, padding_mode="zeros")` and the official
CUDA kernel read them. No custom kernel: the corners are gathered from the flattened levels.
"""

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from detr_jax.models import initializers


def deformable_sampling(value: jnp.ndarray, spatial_shapes: Sequence[tuple[int, int]],
                        locations: jnp.ndarray, weights: jnp.ndarray) -> jnp.ndarray:
  """Bilinear reads of `value` at `locations`, weighted and summed over levels and points.

  The official `ms_deform_attn_core_pytorch`: per level, `grid_sample(value_l, 2 * loc - 1,
  mode="bilinear", padding_mode="zeros", align_corners=False)`. In pixels of level l a location
  (x, y) is read at (x * W_l - 0.5, y * H_l - 0.5), between its floor and floor + 1 in each
  direction; corners outside the map contribute 0. Differentiable in all three arrays.

  Each of the L * P * 4 (level, point, corner) reads is one gather of [B, Q, M] rows of D
  channels, accumulated in place: on XLA:CPU that is ~3x faster than one gather of all of them
  followed by a weighted sum (which materialises [B, Q, M, L*P*4, D]).

  Args:
    value: [B, S, M, D], the levels flattened row-major and concatenated, S = sum(H_l * W_l);
      M heads of D channels.
    spatial_shapes: the L static (H_l, W_l).
    locations: [B, Q, M, L, P, 2] float, (x, y) normalised to [0, 1] on each level (outside
      that range reads zeros).
    weights: [B, Q, M, L, P] attention weights.
  Returns:
    [B, Q, M * D] in value's dtype, heads concatenated.
  Raises:
    ValueError: S does not equal the sum of the spatial shapes' areas.
  """
  batch, total, heads, channels = value.shape
  if total != sum(h * w for h, w in spatial_shapes):
    raise ValueError(f"value has {total} positions but spatial_shapes {list(spatial_shapes)} give "
                     f"{sum(h * w for h, w in spatial_shapes)}.")
  queries, _, levels, points, _ = locations.shape[1:]
  sizes = np.array([(w, h) for h, w in spatial_shapes], np.float32)          # [L, 2] as (W, H)
  starts = np.cumsum([0] + [h * w for h, w in spatial_shapes])[:-1, None]      # [L, 1]
  pixel = locations.astype(jnp.float32) * sizes[:, None, :] - 0.5              # [B, Q, M, L, P, 2]
  floor = jnp.floor(pixel)
  frac = pixel - floor
  floor = floor.astype(jnp.int32)
  width = sizes[:, None, 0].astype(np.int32)                                   # [L, 1]
  height = sizes[:, None, 1].astype(np.int32)
  weights = weights.astype(jnp.float32)
  # Row of value.reshape(B * S * M, D) that holds (image b, position s, head m); jnp, not np: the batch
  # may be a symbolic dimension (jax.export).
  head_rows = (jnp.arange(batch)[:, None, None, None, None] * total * heads
               + np.arange(heads)[None, None, :, None, None])
  rows = value.reshape(batch * total * heads, channels)
  out = jnp.zeros((batch, queries, heads, channels), jnp.float32)
  for dy in (0, 1):
    for dx in (0, 1):
      x = floor[..., 0] + dx
      y = floor[..., 1] + dy
      inside = (x >= 0) & (x < width) & (y >= 0) & (y < height)
      bilinear = (frac[..., 0] if dx else 1 - frac[..., 0]) * (frac[..., 1] if dy else 1 - frac[..., 1])
      coefficient = jnp.where(inside, bilinear * weights, 0.0)                 # [B, Q, M, L, P]
      position = jnp.clip(y, 0, height - 1) * width + jnp.clip(x, 0, width - 1) + starts
      index = position * heads + head_rows
      for level in range(levels):
        for point in range(points):
          read = rows[index[:, :, :, level, point]].astype(jnp.float32)      # [B, Q, M, D]
          out = out + read * coefficient[:, :, :, level, point, None]
  return out.reshape(batch, queries, heads * channels).astype(value.dtype)


def sampling_offsets_bias(num_heads: int, num_levels: int, num_points: int):
  """The official initial sampling offsets: head m points along angle 2*pi*m/M, scaled so the
  larger component is 1, point p at (p + 1) times that, on every level; order (m, l, p, xy)."""

  def init(key, shape, dtype=jnp.float32):
    del key
    angles = np.arange(num_heads, dtype=np.float32) * (2.0 * math.pi / num_heads)
    grid = np.stack([np.cos(angles), np.sin(angles)], -1)
    grid = grid / np.abs(grid).max(-1, keepdims=True)
    grid = np.tile(grid[:, None, None, :], (1, num_levels, num_points, 1))
    grid = grid * np.arange(1, num_points + 1, dtype=np.float32)[None, None, :, None]
    return jnp.asarray(grid.reshape(shape), dtype)

  return init


class MSDeformAttn(nn.Module):
  """Multi-scale deformable attention (official `MSDeformAttn`), d_model = M * D.

  Parameters (official names): `sampling_offsets` Dense(d -> M*L*P*2), weight 0 and the
  direction-pattern bias; `attention_weights` Dense(d -> M*L*P), all 0 (softmax over the L*P
  values of each head); `value_proj`, `output_proj` Dense(d -> d), Xavier-uniform, bias 0.
  Offsets and attention weights are computed in float32 whatever the compute dtype, because
  sampling locations need float32 resolution on large maps.

  Call:
    query: [B, Q, d] (the official caller adds the positional encoding).
    reference_points: [B, Q, L, 2] (x, y) normalised, or [B, Q, L, 4] boxes (cx, cy, w, h).
    value_input: [B, S, d], the flattened levels of `spatial_shapes`.
    spatial_shapes: the L static (H_l, W_l).
    padding_mask: [B, S] bool, True on padded positions (their values are zeroed).
  Returns:
    [B, Q, d] in the compute dtype. With the "intermediates" collection mutable, also sows
    "sampling_locations" [B, Q, M, L, P, 2] float32 ((x, y) normalised to each level's padded map) and
    "sampling_weights" [B, Q, M, L, P] float32, their attention weights (each head's sum to 1).
  Raises:
    ValueError: d_model not divisible by the heads, or reference points neither 2-d nor 4-d.
  """

  num_heads: int = 8
  num_levels: int = 4
  num_points: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, query, reference_points, value_input, spatial_shapes, padding_mask):
    d_model = query.shape[-1]
    if d_model % self.num_heads:
      raise ValueError(f"d_model {d_model} is not divisible by num_heads {self.num_heads}.")
    heads, levels, points = self.num_heads, self.num_levels, self.num_points
    batch, queries = query.shape[:2]
    value = nn.Dense(d_model, dtype=self.dtype, kernel_init=initializers.xavier_uniform,
                     bias_init=nn.initializers.zeros, name="value_proj")(value_input)
    value = jnp.where(padding_mask[..., None], jnp.zeros((), value.dtype), value)
    value = value.reshape(batch, value.shape[1], heads, d_model // heads)

    query32 = query.astype(jnp.float32)
    offsets = nn.Dense(heads * levels * points * 2, kernel_init=nn.initializers.zeros,
                       bias_init=sampling_offsets_bias(heads, levels, points), name="sampling_offsets")(query32)
    offsets = offsets.reshape(batch, queries, heads, levels, points, 2)
    logits = nn.Dense(heads * levels * points, kernel_init=nn.initializers.zeros,
                      bias_init=nn.initializers.zeros, name="attention_weights")(query32)
    weights = jax.nn.softmax(logits.reshape(batch, queries, heads, levels * points), axis=-1)
    weights = weights.reshape(batch, queries, heads, levels, points)

    reference = reference_points.astype(jnp.float32)[:, :, None, :, None, :]
    if reference_points.shape[-1] == 2:
      normalizer = np.array([(w, h) for h, w in spatial_shapes], np.float32)[:, None, :]
      locations = reference + offsets / normalizer
    elif reference_points.shape[-1] == 4:
      locations = reference[..., :2] + offsets / points * reference[..., 2:] * 0.5
    else:
      raise ValueError(f"reference_points must end in 2 or 4 coordinates, got shape {reference_points.shape}.")
    # Kept only when "intermediates" is mutable (attention pictures, `inference.Predictor.attention`).
    self.sow("intermediates", "sampling_locations", locations)
    self.sow("intermediates", "sampling_weights", weights)
    out = deformable_sampling(value, spatial_shapes, locations, weights)
    return nn.Dense(d_model, dtype=self.dtype, kernel_init=initializers.xavier_uniform,
                    bias_init=nn.initializers.zeros, name="output_proj")(out)
