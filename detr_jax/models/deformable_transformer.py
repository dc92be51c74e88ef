"""Deformable DETR's encoder-decoder (Zhu et al. 2021, Sec. 4.1 and A.4; official
`models/deformable_transformer.py`).

The encoder's self-attention and the decoder's cross-attention are multi-scale deformable
attention around reference points; the decoder's self-attention is ordinary multi-head attention.
Feature levels are flattened row-major and concatenated: [B, S, d], S = sum(H_l * W_l). With box
refinement each decoder layer's box becomes the next layer's (detached) 4-d reference; in the
two-stage variant the encoder proposes the decoder's initial boxes and queries.
"""

import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from detr_jax.models import initializers
from detr_jax.models.deformable_attention import MSDeformAttn
from detr_jax.models.transformer import Dropout, FeedForward, MultiheadAttention, layer_norm



def top_k(values, k: int):
  """`jax.lax.top_k` along the last axis (ties: lower index first) by a stable sort: lax.top_k lowers to a
  CHLO op whose portable serialisation TensorFlow 2.21's XlaCallModule cannot read, so a SavedModel
  export (`detr_jax.export`) of Deformable DETR needs this form. Returns (values [..., k], indices [..., k] int32)."""
  indices = jnp.argsort(-values, axis=-1, stable=True)[..., :k].astype(jnp.int32)
  return jnp.take_along_axis(values, indices, axis=-1), indices

def inverse_sigmoid(x: jnp.ndarray, eps: float = 1e-5) -> jnp.ndarray:
  """log(x / (1 - x)) with x clamped to [0, 1] and both x and 1 - x to >= eps (official `inverse_sigmoid`)."""
  x = jnp.clip(x, 0.0, 1.0)
  return jnp.log(jnp.maximum(x, eps) / jnp.maximum(1.0 - x, eps))


def valid_sizes(padding_mask: jnp.ndarray) -> jnp.ndarray:
  """[B, h, w] bool (True = padded) -> [B, 2] float32 (unpadded width, unpadded height) in positions,
  counted along the first row and column as the official code counts them."""
  valid_height = jnp.sum(~padding_mask[:, :, 0], axis=1).astype(jnp.float32)
  valid_width = jnp.sum(~padding_mask[:, 0, :], axis=1).astype(jnp.float32)
  return jnp.stack([valid_width, valid_height], axis=-1)


def valid_ratios(padding_mask: jnp.ndarray) -> jnp.ndarray:
  """[B, h, w] bool (True = padded) -> [B, 2] float32: unpadded width / w and height / h (official `get_valid_ratio`)."""
  _, height, width = padding_mask.shape
  return valid_sizes(padding_mask) / np.array([width, height], np.float32)


def encoder_reference_points(spatial_shapes: Sequence[tuple[int, int]], ratios: jnp.ndarray) -> jnp.ndarray:
  """Every pixel centre of every level as a reference point (official `get_reference_points`).

  Args:
    spatial_shapes: the L static (H_l, W_l).
    ratios: [B, L, 2] valid ratios (x, y) of each level.
  Returns:
    [B, S, L, 2] float32 (x, y): the centre normalised by its own level's unpadded size, then
    scaled by every level's valid ratio.
  """
  points = []
  for level, (height, width) in enumerate(spatial_shapes):
    y, x = np.meshgrid(np.arange(height, dtype=np.float32) + 0.5, np.arange(width, dtype=np.float32) + 0.5,
                       indexing="ij")
    ref_y = y.reshape(-1)[None] / (ratios[:, None, level, 1] * height)
    ref_x = x.reshape(-1)[None] / (ratios[:, None, level, 0] * width)
    points.append(jnp.stack([ref_x, ref_y], axis=-1))
  return jnp.concatenate(points, axis=1)[:, :, None] * ratios[:, None]


def encoder_proposals(memory: jnp.ndarray, padding_mask: jnp.ndarray, spatial_shapes: Sequence[tuple[int, int]]):
  """Two-stage proposals: a box at every pixel (official `gen_encoder_output_proposals`).

  Centres are pixel centres normalised by the level's unpadded size, width and height
  0.05 * 2**level; a proposal is valid when all four coordinates are in (0.01, 0.99).

  Args:
    memory: [B, S, d] encoder output. padding_mask: [B, S] bool, True on padded positions.
  Returns:
    memory [B, S, d] zeroed at padded and invalid positions, and the proposals [B, S, 4] as
    logits (inverse sigmoid of cxcywh), +inf at padded and invalid positions.
  """
  batch = memory.shape[0]
  proposals, start = [], 0
  for level, (height, width) in enumerate(spatial_shapes):
    mask = padding_mask[:, start:start + height * width].reshape(batch, height, width)
    y, x = np.meshgrid(np.arange(height, dtype=np.float32), np.arange(width, dtype=np.float32), indexing="ij")
    grid = np.stack([x, y], axis=-1)[None]
    centre = (grid + 0.5) / valid_sizes(mask)[:, None, None, :]
    size = jnp.full_like(centre, 0.05 * 2.0**level)
    proposals.append(jnp.concatenate([centre, size], axis=-1).reshape(batch, -1, 4))
    start += height * width
  proposals = jnp.concatenate(proposals, axis=1)
  valid = jnp.all((proposals > 0.01) & (proposals < 0.99), axis=-1, keepdims=True) & ~padding_mask[..., None]
  logits = jnp.where(valid, jnp.log(proposals / (1 - proposals)), jnp.inf)
  return jnp.where(valid, memory, jnp.zeros((), memory.dtype)), logits


def proposal_position_embedding(box_logits: jnp.ndarray, num_pos_feats: int = 128,
                                temperature: float = 10000.0) -> jnp.ndarray:
  """Sine embedding of proposal boxes (official `get_proposal_pos_embed`).

  [B, Q, 4] box logits -> [B, Q, 4 * num_pos_feats]: sigmoid(logit) * 2*pi over
  `num_pos_feats` frequencies per coordinate, sin and cos interleaved, coordinates in order.
  """
  dim_t = jnp.arange(num_pos_feats, dtype=jnp.float32)
  dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)
  angles = jax.nn.sigmoid(box_logits.astype(jnp.float32))[..., None] * (2 * math.pi) / dim_t
  stacked = jnp.stack([jnp.sin(angles[..., 0::2]), jnp.cos(angles[..., 1::2])], axis=-1)
  return stacked.reshape(*box_logits.shape[:-1], 4 * num_pos_feats)


class EncoderLayer(nn.Module):
  """Official `DeformableTransformerEncoderLayer` (post-norm): deformable self-attention with
  query = src + pos, norm1, FFN, norm2."""

  num_heads: int
  num_levels: int
  num_points: int
  dim_feedforward: int
  dropout: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, src, pos, reference_points, spatial_shapes, padding_mask, deterministic: bool):
    drop = lambda x: Dropout(self.dropout)(x, deterministic=deterministic)
    attended = MSDeformAttn(self.num_heads, self.num_levels, self.num_points, self.dtype, name="self_attn")(
        src + pos, reference_points, src, spatial_shapes, padding_mask)
    src = layer_norm(self.dtype, "norm1")(src + drop(attended))
    ffn = FeedForward(self.dim_feedforward, self.dropout, self.dtype, name="ffn")
    return layer_norm(self.dtype, "norm2")(src + drop(ffn(src, deterministic)))


class DecoderLayer(nn.Module):
  """Official `DeformableTransformerDecoderLayer`: self-attention (q = k = tgt + query_pos) then
  `norm2`; deformable cross-attention to the memory then `norm1`; FFN then `norm3`."""

  num_heads: int
  num_levels: int
  num_points: int
  dim_feedforward: int
  dropout: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tgt, query_pos, reference_points, memory, spatial_shapes, padding_mask, deterministic: bool):
    drop = lambda x: Dropout(self.dropout)(x, deterministic=deterministic)
    q = tgt + query_pos
    attended = MultiheadAttention(self.num_heads, self.dropout, self.dtype, name="self_attn")(
        q, q, tgt, None, deterministic)
    tgt = layer_norm(self.dtype, "norm2")(tgt + drop(attended))
    attended = MSDeformAttn(self.num_heads, self.num_levels, self.num_points, self.dtype, name="cross_attn")(
        tgt + query_pos, reference_points, memory, spatial_shapes, padding_mask)
    tgt = layer_norm(self.dtype, "norm1")(tgt + drop(attended))
    ffn = FeedForward(self.dim_feedforward, self.dropout, self.dtype, name="ffn")
    return layer_norm(self.dtype, "norm3")(tgt + drop(ffn(tgt, deterministic)))


class DeformableTransformer(nn.Module):
  """Official `DeformableTransformer` with its encoder and decoder.

  The class and box heads belong to the detector; it passes them in because refinement and the
  two-stage proposals need them inside the decoder.

  Call:
    srcs: L arrays [B, H_l, W_l, d], the projected feature levels.
    padding_masks: L arrays [B, H_l, W_l] bool, True on padded positions.
    pos: L arrays [B, H_l, W_l, d] sine encodings (the level embedding is added here).
    query_embed: [Q, 2d] (query_pos | tgt), or None in two-stage.
    box_heads: with refinement, one box head per decoder layer (plus the encoder's in
      two-stage); None otherwise.
    encoder_class_head: the two-stage proposal class head, else None.
    num_proposals: the two-stage top-k.
  Returns a dict:
    "hs": [num_decoder_layers, B, Q, d] every decoder layer's output.
    "references": list of num_decoder_layers + 1 arrays [B, Q, 2 or 4] in [0, 1]: the initial
      reference and each layer's refined one (all equal without refinement), detached.
    "enc_logits" [B, S, C], "enc_box_logits" [B, S, 4] (two-stage only, +inf at invalid positions).
  """

  num_heads: int = 8
  num_encoder_layers: int = 6
  num_decoder_layers: int = 6
  dim_feedforward: int = 1024
  dropout: float = 0.1
  num_levels: int = 4
  enc_n_points: int = 4
  dec_n_points: int = 4
  two_stage: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, srcs, padding_masks, pos, query_embed: Optional[jnp.ndarray],
               box_heads: Optional[Sequence[Callable]] = None, encoder_class_head: Optional[Callable] = None,
               num_proposals: int = 300, deterministic: bool = True):
    d_model = srcs[0].shape[-1]
    batch = srcs[0].shape[0]
    spatial_shapes = tuple((src.shape[1], src.shape[2]) for src in srcs)
    level_embed = self.param("level_embed", jax.nn.initializers.normal(1.0), (self.num_levels, d_model))
    flat = lambda x: x.reshape(batch, -1, *x.shape[3:])
    src = jnp.concatenate([flat(s) for s in srcs], axis=1).astype(self.dtype)
    mask = jnp.concatenate([flat(m) for m in padding_masks], axis=1)
    pos = jnp.concatenate([flat(p) + level_embed[level] for level, p in enumerate(pos)], axis=1).astype(self.dtype)
    ratios = jnp.stack([valid_ratios(m) for m in padding_masks], axis=1)

    reference_points = encoder_reference_points(spatial_shapes, ratios)
    memory = src
    for i in range(self.num_encoder_layers):
      memory = EncoderLayer(self.num_heads, self.num_levels, self.enc_n_points, self.dim_feedforward, self.dropout,
                            self.dtype, name=f"encoder_layers_{i}")(
                                memory, pos, reference_points, spatial_shapes, mask, deterministic)

    outputs = {}
    if self.two_stage:
      proposal_memory, proposals = encoder_proposals(memory, mask, spatial_shapes)
      proposal_memory = nn.Dense(d_model, dtype=self.dtype, kernel_init=initializers.xavier_uniform,
                                 bias_init=initializers.torch_default_bias(d_model), name="enc_output")(proposal_memory)
      proposal_memory = layer_norm(self.dtype, "enc_output_norm")(proposal_memory)
      enc_logits = encoder_class_head(proposal_memory).astype(jnp.float32)
      enc_box_logits = box_heads[self.num_decoder_layers](proposal_memory).astype(jnp.float32) + proposals
      outputs.update(enc_logits=enc_logits, enc_box_logits=enc_box_logits)
      if enc_logits.shape[1] < num_proposals:
        raise ValueError(f"Two-stage selects {num_proposals} proposals but the feature levels {list(spatial_shapes)} "
                         f"have {enc_logits.shape[1]} positions; use larger images or fewer queries.")
      top = top_k(enc_logits[..., 0], num_proposals)[1]
      top_box_logits = jax.lax.stop_gradient(jnp.take_along_axis(enc_box_logits, top[..., None], axis=1))
      reference = jax.nn.sigmoid(top_box_logits)
      queries = nn.Dense(2 * d_model, dtype=self.dtype, kernel_init=initializers.xavier_uniform,
                         bias_init=initializers.torch_default_bias(2 * d_model), name="pos_trans")(
                             proposal_position_embedding(top_box_logits, d_model // 2))
      queries = layer_norm(self.dtype, "pos_trans_norm")(queries)
      query_pos, tgt = queries[..., :d_model], queries[..., d_model:]
    else:
      query_pos = jnp.broadcast_to(query_embed[:, :d_model].astype(self.dtype), (batch, query_embed.shape[0], d_model))
      tgt = jnp.broadcast_to(query_embed[:, d_model:].astype(self.dtype), query_pos.shape)
      reference = jax.nn.sigmoid(nn.Dense(2, kernel_init=initializers.xavier_uniform, bias_init=nn.initializers.zeros,
                                          name="reference_points")(query_pos.astype(jnp.float32)))

    references, hs = [reference], []
    for i in range(self.num_decoder_layers):
      level_scale = ratios if reference.shape[-1] == 2 else jnp.concatenate([ratios, ratios], axis=-1)
      tgt = DecoderLayer(self.num_heads, self.num_levels, self.dec_n_points, self.dim_feedforward, self.dropout,
                         self.dtype, name=f"decoder_layers_{i}")(
                             tgt, query_pos, reference[:, :, None] * level_scale[:, None], memory, spatial_shapes,
                             mask, deterministic)
      hs.append(tgt)
      if box_heads is not None:
        reference = jax.lax.stop_gradient(refine_boxes(box_heads[i](tgt), reference))
      references.append(reference)
    outputs.update(hs=jnp.stack(hs), references=references)
    return outputs


def refine_boxes(box_delta: jnp.ndarray, reference: jnp.ndarray) -> jnp.ndarray:
  """sigmoid(box head output + inverse_sigmoid(reference)), only the centre offset when the
  reference is a 2-d point (official `DeformableDETR.forward` and the decoder's refinement).

  box_delta: [..., 4] box head output; reference: [..., 2] or [..., 4] in [0, 1] -> [..., 4] cxcywh.
  """
  box_delta = box_delta.astype(jnp.float32)
  offset = inverse_sigmoid(reference)
  if reference.shape[-1] == 2:
    offset = jnp.concatenate([offset, jnp.zeros_like(offset)], axis=-1)
  return jax.nn.sigmoid(box_delta + offset)
