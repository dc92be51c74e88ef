"""DETR's encoder-decoder transformer (official `models/transformer.py`, paper Sec. 3.2).

Positional encodings are added to queries and keys at every attention layer, never to values.
The decoder returns every layer's output passed through the shared final LayerNorm; the next
layer receives the un-normed output. Sequences are batch-major: [B, S, d].
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from detr_jax.models import initializers


def layer_norm(dtype, name):
  """nn.LayerNorm with PyTorch's eps 1e-5 (Flax defaults to 1e-6); statistics are reduced in float32."""
  return nn.LayerNorm(epsilon=1e-5, dtype=dtype, name=name)


class Dropout(nn.Module):
  """Inverted dropout (`torch.nn.Dropout`) drawing 16 random bits per decision, two per 32-bit draw.

  Same contract as `nn.Dropout`: the "dropout" rng stream, identity when deterministic, kept
  values scaled up so that the expectation is unchanged. JAX's sharding-invariant threefry
  spends one hash per 32-bit value, and the masks of DETR's twelve layers (21M decisions per
  step at batch 2, 512x512) took 94 ms of a CPU training step; using both 16-bit halves of each
  value makes it 64 ms. A value is kept when its 16 bits are below
  round((1 - rate) * 2**16), so the effective rate is within 2**-17 of `rate`, and kept values
  are divided by that keep probability exactly.

  Input and output: any shape [..., N], any float dtype.
  """

  rate: float

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if deterministic or self.rate == 0:
      return x
    if self.rate >= 1:
      return jnp.zeros_like(x)
    threshold = max(1, round((1 - self.rate) * 2**16))
    width = x.shape[-1]
    bits = jax.random.bits(self.make_rng("dropout"), (*x.shape[:-1], (width + 1) // 2), jnp.uint32)
    uniform16 = jnp.concatenate([bits >> 16, bits & 0xFFFF], axis=-1)[..., :width]
    scale = jnp.asarray(2**16 / threshold, x.dtype)
    return jnp.where(uniform16 < threshold, x * scale, jnp.zeros((), x.dtype))


class MultiheadAttention(nn.Module):
  """`torch.nn.MultiheadAttention` with a fused input projection, batch-major.

  Parameters: `in_proj_kernel` [d, 3d] (columns q, k, v; xavier-uniform over the fused matrix
  as in the official init), `in_proj_bias` [3d] (zeros), `out_proj` Dense (bias zeros).
  Queries are scaled by head_dim ** -0.5; logits and softmax are float32 whatever the
  compute dtype.

  Call: query [B, T, d], key [B, S, d], value [B, S, d], key_padding_mask [B, S] bool
  (True = ignore) -> [B, T, d]. With the "intermediates" collection mutable, also sows
  "attention_weights": [B, T, S] float32, the attention probabilities averaged over heads.
  """

  num_heads: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, query, key, value, key_padding_mask: Optional[jnp.ndarray] = None,
               deterministic: bool = True):
    d_model = query.shape[-1]
    head_dim = d_model // self.num_heads
    in_kernel = self.param("in_proj_kernel", initializers.xavier_uniform, (d_model, 3 * d_model))
    in_bias = self.param("in_proj_bias", nn.initializers.zeros, (3 * d_model,))

    def project(x, index):
      kernel = in_kernel[:, index * d_model:(index + 1) * d_model].astype(self.dtype)
      bias = in_bias[index * d_model:(index + 1) * d_model].astype(self.dtype)
      y = jnp.dot(x.astype(self.dtype), kernel) + bias
      return y.reshape(*y.shape[:-1], self.num_heads, head_dim)

    q = project(query, 0) * jnp.asarray(head_dim**-0.5, self.dtype)
    k = project(key, 1)
    v = project(value, 2)
    logits = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32)
    if key_padding_mask is not None:
      logits = jnp.where(key_padding_mask[:, None, None, :], jnp.finfo(jnp.float32).min, logits)
    weights = jax.nn.softmax(logits, axis=-1)
    # The head-averaged map PyTorch's MultiheadAttention returns, kept only when "intermediates" is
    # mutable (attention pictures, `inference.Predictor.attention`).
    self.sow("intermediates", "attention_weights", weights.mean(axis=1))
    weights = Dropout(self.dropout)(weights, deterministic=deterministic)
    out = jnp.einsum("bhts,bshd->bthd", weights.astype(self.dtype), v)
    out = out.reshape(*out.shape[:2], d_model)
    return nn.Dense(d_model, dtype=self.dtype, kernel_init=initializers.xavier_uniform,
                    bias_init=nn.initializers.zeros, name="out_proj")(out)


class FeedForward(nn.Module):
  """linear2(dropout(relu(linear1(x)))), PyTorch default biases, xavier-uniform kernels."""

  dim_feedforward: int
  dropout: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool):
    d_model = x.shape[-1]
    y = nn.Dense(self.dim_feedforward, dtype=self.dtype, kernel_init=initializers.xavier_uniform,
                 bias_init=initializers.torch_default_bias(d_model), name="linear1")(x)
    y = Dropout(self.dropout)(nn.relu(y), deterministic=deterministic)
    return nn.Dense(d_model, dtype=self.dtype, kernel_init=initializers.xavier_uniform,
                    bias_init=initializers.torch_default_bias(self.dim_feedforward), name="linear2")(y)


class EncoderLayer(nn.Module):
  """Official `TransformerEncoderLayer` (post-norm, or pre-norm with `pre_norm=True`)."""

  num_heads: int
  dim_feedforward: int
  dropout: float
  pre_norm: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, src, pos, padding_mask, deterministic: bool):
    attn = MultiheadAttention(self.num_heads, self.dropout, self.dtype, name="self_attn")
    ffn = FeedForward(self.dim_feedforward, self.dropout, self.dtype, name="ffn")
    norm1, norm2 = layer_norm(self.dtype, "norm1"), layer_norm(self.dtype, "norm2")
    drop = lambda x: Dropout(self.dropout)(x, deterministic=deterministic)

    if self.pre_norm:
      x = norm1(src)
      src = src + drop(attn(x + pos, x + pos, x, padding_mask, deterministic))
      return src + drop(ffn(norm2(src), deterministic))
    src = norm1(src + drop(attn(src + pos, src + pos, src, padding_mask, deterministic)))
    return norm2(src + drop(ffn(src, deterministic)))


class DecoderLayer(nn.Module):
  """Official `TransformerDecoderLayer`: self-attention, cross-attention to memory, FFN."""

  num_heads: int
  dim_feedforward: int
  dropout: float
  pre_norm: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tgt, memory, pos, query_pos, memory_padding_mask, deterministic: bool):
    self_attn = MultiheadAttention(self.num_heads, self.dropout, self.dtype, name="self_attn")
    cross_attn = MultiheadAttention(self.num_heads, self.dropout, self.dtype, name="multihead_attn")
    ffn = FeedForward(self.dim_feedforward, self.dropout, self.dtype, name="ffn")
    norm1, norm2, norm3 = (layer_norm(self.dtype, f"norm{i}") for i in (1, 2, 3))
    drop = lambda x: Dropout(self.dropout)(x, deterministic=deterministic)
    keys = memory + pos

    if self.pre_norm:
      x = norm1(tgt)
      tgt = tgt + drop(self_attn(x + query_pos, x + query_pos, x, None, deterministic))
      x = norm2(tgt)
      tgt = tgt + drop(cross_attn(x + query_pos, keys, memory, memory_padding_mask, deterministic))
      return tgt + drop(ffn(norm3(tgt), deterministic))
    tgt = norm1(tgt + drop(self_attn(tgt + query_pos, tgt + query_pos, tgt, None, deterministic)))
    tgt = norm2(tgt + drop(cross_attn(tgt + query_pos, keys, memory, memory_padding_mask, deterministic)))
    return norm3(tgt + drop(ffn(tgt, deterministic)))


class Transformer(nn.Module):
  """Encoder + decoder with all intermediate decoder outputs (official `Transformer`).

  Call:
    src: [B, S, d] projected backbone features, S = h * w in row-major order.
    padding_mask: [B, S] bool, True on padded positions.
    pos: [B, S, d] spatial positional encoding.
    query_pos: [Q, d] object query embeddings (the decoder input itself starts at zeros).
  Returns:
    hs: [L, B, Q, d], every decoder layer's output after the decoder LayerNorm.
    memory: [B, S, d], the encoder output.
  """

  num_heads: int = 8
  num_encoder_layers: int = 6
  num_decoder_layers: int = 6
  dim_feedforward: int = 2048
  dropout: float = 0.1
  pre_norm: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, src, padding_mask, pos, query_pos, deterministic: bool = True):
    layer_args = (self.num_heads, self.dim_feedforward, self.dropout, self.pre_norm, self.dtype)
    pos = pos.astype(self.dtype)
    memory = src.astype(self.dtype)
    for i in range(self.num_encoder_layers):
      memory = EncoderLayer(*layer_args, name=f"encoder_layers_{i}")(memory, pos, padding_mask, deterministic)
    if self.pre_norm:
      memory = layer_norm(self.dtype, "encoder_norm")(memory)

    query_pos = jnp.broadcast_to(query_pos.astype(self.dtype), (src.shape[0], *query_pos.shape))
    tgt = jnp.zeros_like(query_pos)
    decoder_norm = layer_norm(self.dtype, "decoder_norm")
    intermediate = []
    for i in range(self.num_decoder_layers):
      tgt = DecoderLayer(*layer_args, name=f"decoder_layers_{i}")(
          tgt, memory, pos, query_pos, padding_mask, deterministic)
      intermediate.append(decoder_norm(tgt))
    return jnp.stack(intermediate), memory
