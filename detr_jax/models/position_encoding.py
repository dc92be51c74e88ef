"""2D positional encodings of the feature map (official DETR `models/position_encoding.py`)."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp


def sine_position_encoding(padding_mask: jnp.ndarray, num_pos_feats: int = 128,
                           temperature: float = 10000.0, offset: float = 0.0) -> jnp.ndarray:
  """The normalised sine encoding of the paper (Sec. A.4), official `PositionEmbeddingSine`.

  Positions are the cumulative count of real pixels down the rows (y) and across the columns
  (x), plus `offset`, divided by the last count + 1e-6 and scaled to 2*pi; each axis gives
  `num_pos_feats` channels, sin on even and cos on odd frequencies, interleaved.

  Args:
    padding_mask: [B, h, w] bool, True on padded positions.
    num_pos_feats: channels per axis (hidden_dim // 2).
    temperature: frequency base.
    offset: added to the counts before normalising: 0 in DETR, -0.5 in Deformable DETR (its
      `PositionEmbeddingSine`, which places each position at its pixel centre).

  Returns:
    [B, h, w, 2 * num_pos_feats] float32, channels ordered [y, x].
  """
  not_mask = (~padding_mask).astype(jnp.float32)
  y_embed = jnp.cumsum(not_mask, axis=1)
  x_embed = jnp.cumsum(not_mask, axis=2)
  eps, scale = 1e-6, 2 * math.pi
  y_embed = (y_embed + offset) / (y_embed[:, -1:, :] + eps) * scale
  x_embed = (x_embed + offset) / (x_embed[:, :, -1:] + eps) * scale
  dim_t = jnp.arange(num_pos_feats, dtype=jnp.float32)
  dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)

  def interleave(positions):
    angles = positions[..., None] / dim_t
    stacked = jnp.stack([jnp.sin(angles[..., 0::2]), jnp.cos(angles[..., 1::2])], axis=-1)
    return stacked.reshape(*angles.shape[:-1], num_pos_feats)

  return jnp.concatenate([interleave(y_embed), interleave(x_embed)], axis=-1)


class LearnedPositionEncoding(nn.Module):
  """Absolute learned encoding, official `PositionEmbeddingLearned` (at most 50 rows and columns).

  Call: padding_mask [B, h, w] bool -> [B, h, w, 2 * num_pos_feats] float32, channels [x, y].
  Parameters `row_embed`, `col_embed`: [50, num_pos_feats], initialised U(0, 1).

  Raises:
    ValueError: the feature map is larger than 50 in either direction.
  """

  num_pos_feats: int = 128
  max_size: int = 50

  @nn.compact
  def __call__(self, padding_mask):
    batch, height, width = padding_mask.shape
    if height > self.max_size or width > self.max_size:
      raise ValueError(f"Learned position encoding supports feature maps up to {self.max_size}x"
                       f"{self.max_size}, got {height}x{width}; use the sine encoding.")
    uniform = jax.nn.initializers.uniform(1.0)
    row_embed = nn.Embed(self.max_size, self.num_pos_feats, embedding_init=uniform, name="row_embed")
    col_embed = nn.Embed(self.max_size, self.num_pos_feats, embedding_init=uniform, name="col_embed")
    x_emb = col_embed(jnp.arange(width))
    y_emb = row_embed(jnp.arange(height))
    pos = jnp.concatenate([
        jnp.broadcast_to(x_emb[None, :, :], (height, width, self.num_pos_feats)),
        jnp.broadcast_to(y_emb[:, None, :], (height, width, self.num_pos_feats)),
    ], axis=-1)
    return jnp.broadcast_to(pos[None], (batch, height, width, 2 * self.num_pos_feats))
