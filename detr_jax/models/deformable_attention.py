"""Multi-scale deformable attention in pure JAX (Zhu et al. 2021, Sec. 4.1, Eq. 3; official
`models/ops/modules/ms_deform_attn.py` and `functions/ms_deform_attn_func.py`).

Each query attends to P points per head on each of L feature levels, at locations predicted from
the query around its reference point; the values there are read by bilinear interpolation with
zero padding, as `F.grid_sample(align_corners=False, padding_mode="zeros")` and the official
CUDA kernel read them. Two implementations of the same arithmetic: pure JAX (the corners gathered
from the flattened levels), which runs and exports everywhere, and on the CPU a kernel
(`sampling_kernel`, `deformable_sampling_cpu.cc`) that XLA:CPU calls instead when it is built.
"""

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from detr_jax.models import initializers, sampling_kernel


def deformable_sampling(value: jnp.ndarray, spatial_shapes: Sequence[tuple[int, int]],
                        locations: jnp.ndarray, weights: jnp.ndarray) -> jnp.ndarray:
  """Bilinear reads of `value` at `locations`, weighted and summed over levels and points.

  The official `ms_deform_attn_core_pytorch`: per level, `grid_sample(value_l, 2 * loc - 1,
  mode="bilinear", padding_mode="zeros", align_corners=False)`. In pixels of level l a location
  (x, y) is read at (x * W_l - 0.5, y * H_l - 0.5), between its floor and floor + 1 in each
  direction; corners outside the map contribute 0. Differentiable in all three arrays.

  Each of the L * P * 4 (level, point, corner) reads is one gather of [B, Q, M] rows of D
  channels, accumulated in place: on XLA:CPU that is ~3x faster than one gather of all of them
  followed by a weighted sum (which materialises [B, Q, M, L*P*4, D]). The gradient is written by
  hand (`_sampling_backward`): forward + backward 1.7-1.8x faster than with JAX's own gradient at
  the training step's and the main job's maps (512x512 and 168x168), 15% slower at 800x1066
  (`benchmarks/deformable_attention.py`, `docs/benchmarks.md`). Lowered for the CPU, float32 values
  go to the CPU kernel instead (`sampling_kernel`, faster than both); `sampling_kernel.portable()`
  keeps the pure-JAX version for artefacts that run elsewhere.

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
  total = value.shape[1]
  if total != sum(h * w for h, w in spatial_shapes):
    raise ValueError(f"value has {total} positions but spatial_shapes {list(spatial_shapes)} give "
                     f"{sum(h * w for h, w in spatial_shapes)}.")
  return _sampling(value, tuple(tuple(shape) for shape in spatial_shapes), locations, weights)


_CORNERS = ((0, 0), (0, 1), (1, 0), (1, 1))


def _bilinear_coefficients(spatial_shapes, locations, weights):
  """The weight of each corner (dy, dx) of `_CORNERS`, 4 x [B, Q, M, L, P] float32: bilinear weight
  times attention weight, 0 where the corner lies outside the map; and each location's top-left
  corner in pixels of its level, [B, Q, M, L, P, 2] int32 (x, y)."""
  sizes = np.array([(w, h) for h, w in spatial_shapes], np.float32)          # [L, 2] as (W, H)
  pixel = locations.astype(jnp.float32) * sizes[:, None, :] - 0.5              # [B, Q, M, L, P, 2]
  floor = jnp.floor(pixel)
  frac = pixel - floor
  floor = floor.astype(jnp.int32)
  width = sizes[:, None, 0].astype(np.int32)                                   # [L, 1]
  height = sizes[:, None, 1].astype(np.int32)
  weights = weights.astype(jnp.float32)
  coefficients = []
  for dy, dx in _CORNERS:
    x = floor[..., 0] + dx
    y = floor[..., 1] + dy
    inside = (x >= 0) & (x < width) & (y >= 0) & (y < height)
    bilinear = (frac[..., 0] if dx else 1 - frac[..., 0]) * (frac[..., 1] if dy else 1 - frac[..., 1])
    coefficients.append(jnp.where(inside, bilinear * weights, 0.0))
  return coefficients, floor


def _row_of_head(batch, rows_per_image, heads):
  """[B, 1, M, 1]: the row of (image b, head m) at position 0 of a [B, rows_per_image, M, ...]
  table flattened to rows; jnp, not np: the batch may be a symbolic dimension (jax.export)."""
  return (jnp.arange(batch)[:, None, None, None] * rows_per_image * heads
          + np.arange(heads)[None, None, :, None])


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _sampling(value, spatial_shapes, locations, weights):
  """`deformable_sampling` once its arguments are checked; spatial_shapes a tuple of tuples. The
  platform is chosen inside the forward and backward rules, not around `_sampling`: a choice under
  differentiation would carry both implementations' residuals."""
  if not sampling_kernel.usable(value):
    return _gather_sampling(value, spatial_shapes, locations, weights)
  batch, queries = locations.shape[:2]
  return jax.lax.platform_dependent(
      value, locations, weights,
      cpu=lambda v, l, w: sampling_kernel.forward(v, spatial_shapes, l, w).reshape(batch, queries, -1),
      default=lambda v, l, w: _gather_sampling(v, spatial_shapes, l, w))


def _gather_sampling(value, spatial_shapes, locations, weights):
  """The pure-JAX forward: one gather per (corner, level, point), accumulated."""
  batch, total, heads, channels = value.shape
  queries, _, levels, points, _ = locations.shape[1:]
  coefficients, floor = _bilinear_coefficients(spatial_shapes, locations, weights)
  height = np.array([h for h, _ in spatial_shapes], np.int32)[:, None]         # [L, 1]
  width = np.array([w for _, w in spatial_shapes], np.int32)[:, None]
  starts = np.cumsum([0] + [h * w for h, w in spatial_shapes])[:-1, None]      # [L, 1]
  rows = value.reshape(batch * total * heads, channels)
  head_rows = _row_of_head(batch, total, heads)[..., None]
  out = jnp.zeros((batch, queries, heads, channels), jnp.float32)
  for corner, (dy, dx) in enumerate(_CORNERS):
    x = jnp.clip(floor[..., 0] + dx, 0, width - 1)
    y = jnp.clip(floor[..., 1] + dy, 0, height - 1)
    index = (y * width + x + starts) * heads + head_rows                       # [B, Q, M, L, P]
    for level in range(levels):
      for point in range(points):
        read = rows[index[:, :, :, level, point]].astype(jnp.float32)        # [B, Q, M, D]
        out = out + read * coefficients[corner][:, :, :, level, point, None]
  return out.reshape(batch, queries, heads * channels).astype(value.dtype)


def _sampling_forward(value, spatial_shapes, locations, weights):
  return _sampling(value, spatial_shapes, locations, weights), (value, locations, weights)


def _neighbourhood_tables(value, spatial_shapes):
  """Per level, [B * (H + 1) * (W + 1) * M, 4 * D]: row (b, i, j, m) holds head m's pixels
  (i - 1 + dy, j - 1 + dx) for the corners of `_CORNERS`, zeros outside the map, so that one row
  serves every location whose top-left corner is (i - 1, j - 1), from -1 to H - 1 and W - 1."""
  batch, _, heads, channels = value.shape
  tables, start = [], 0
  for h, w in spatial_shapes:
    level_value = value[:, start:start + h * w].reshape(batch, h, w, heads, channels)
    start += h * w
    padded = jnp.pad(level_value.astype(jnp.float32), ((0, 0), (1, 1), (1, 1), (0, 0), (0, 0)))
    neighbourhoods = jnp.stack([padded[:, dy:dy + h + 1, dx:dx + w + 1] for dy, dx in _CORNERS], -2)
    tables.append(neighbourhoods.reshape(-1, 4 * channels))
  return tables


def _sampling_backward(spatial_shapes, residuals, cotangent):
  if not sampling_kernel.usable(residuals[0]):
    return _gather_sampling_backward(spatial_shapes, residuals, cotangent)
  return jax.lax.platform_dependent(
      residuals, cotangent,
      cpu=lambda residuals, cotangent: sampling_kernel.backward(spatial_shapes, *residuals, cotangent),
      default=lambda residuals, cotangent: _gather_sampling_backward(spatial_shapes, residuals, cotangent))


def _gather_sampling_backward(spatial_shapes, residuals, cotangent):
  """The pure-JAX gradient with one scatter-add of 4 * D wide rows per (level, point) into one buffer per
  level, in place. JAX's own gradient of the forward's gathers is one scatter-add of D-wide rows
  per (level, point, corner), each into its own zeroed copy of the whole value table, summed
  afterwards; XLA:CPU's scatter-add costs per row, and the copies cost memory traffic. The reads
  that the location and weight gradients need are gathered again, from the 4 * D wide rows, rather
  than kept from the forward pass: as fast here, and no [B, Q, M, D] array per read stays alive."""
  value, locations, weights = residuals
  batch, _, heads, channels = value.shape
  queries, points = locations.shape[1], locations.shape[4]
  coefficients, coefficients_pullback, floor = jax.vjp(
      lambda l, w: _bilinear_coefficients(spatial_shapes, l, w), locations, weights, has_aux=True)
  coefficients = jnp.stack(coefficients, -1)                                     # [B, Q, M, L, P, 4]
  tables, tables_pullback = jax.vjp(lambda v: _neighbourhood_tables(v, spatial_shapes), value)
  grad = cotangent.astype(jnp.float32).reshape(batch, queries, heads, 1, channels)
  table_grads, coefficient_grads = [], []
  for level, ((h, w), table) in enumerate(zip(spatial_shapes, tables)):
    # A top-left corner clipped here has all four corners outside the map: all four coefficients are 0.
    x = jnp.clip(floor[:, :, :, level, :, 0] + 1, 0, w)
    y = jnp.clip(floor[:, :, :, level, :, 1] + 1, 0, h)
    index = (y * (w + 1) + x) * heads + _row_of_head(batch, (h + 1) * (w + 1), heads)  # [B, Q, M, P]
    table_grad = jnp.zeros_like(table)
    for point in range(points):
      coefficient = coefficients[:, :, :, level, point, :, None]                  # [B, Q, M, 4, 1]
      table_grad = table_grad.at[index[..., point]].add(
          (coefficient * grad).reshape(batch, queries, heads, 4 * channels))
      read = table[index[..., point]].reshape(batch, queries, heads, 4, channels)
      coefficient_grads.append(jnp.sum(read * grad, -1))                          # [B, Q, M, 4]
    table_grads.append(table_grad)
  coefficient_grads = jnp.stack(coefficient_grads, 3).reshape(coefficients.shape)
  location_grad, weight_grad = coefficients_pullback(list(jnp.moveaxis(coefficient_grads, -1, 0)))
  (value_grad,) = tables_pullback(table_grads)
  return value_grad.astype(value.dtype), location_grad, weight_grad


_sampling.defvjp(_sampling_forward, _sampling_backward)


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
