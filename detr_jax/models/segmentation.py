"""DETR's panoptic mask head (paper Sec. 4.4, official `models/segmentation.py`).

`MHAttentionMap` attends from each object query's final decoder embedding to the encoder memory
and returns the attention maps (no values); `MaskHead` (official `MaskHeadSmallConv`) turns the
projected features concatenated with those maps into one mask logit map per query at 1/4 of the
input resolution, fusing backbone layers 3, 2 and 1 on the way up, FPN style.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from detr_jax.models import backbone as backbone_lib

MODULE_NAMES = ("bbox_attention", "mask_head")   # the parameters the panoptic extension adds
GROUP_NORM_GROUPS = 8
GROUP_NORM_EPS = 1e-5  # torch.nn.GroupNorm's default; Flax's is 1e-6

# kaiming_uniform_(a=1) as in the official MaskHeadSmallConv: bound sqrt(3 / fan_in).
_mask_conv_init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "uniform")


class MHAttentionMap(nn.Module):
  """Multi-head attention weights of object queries over the encoder memory (official `MHAttentionMap`).

  Call:
    queries: [B, Q, d] the last decoder layer's output.
    memory: [B, h, w, d] the encoder output.
    padding_mask: [B, h, w] bool, True on padded positions (they get zero weight).
  Returns:
    [B, Q, heads, h, w] float32 weights; as in the official code, the softmax runs over heads and
    positions together, so each query's weights sum to 1 over (heads, h, w).
  """

  hidden_dim: int
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, queries, memory, padding_mask):
    dense = lambda name: nn.Dense(self.hidden_dim, dtype=self.dtype, kernel_init=jax.nn.initializers.xavier_uniform(),
                                  bias_init=jax.nn.initializers.zeros, name=name)
    head_dim = self.hidden_dim // self.num_heads
    q = dense("q_linear")(queries)
    k = dense("k_linear")(memory)
    q = q.reshape(*q.shape[:2], self.num_heads, head_dim) * (float(head_dim) ** -0.5)
    k = k.reshape(*k.shape[:3], self.num_heads, head_dim)
    weights = jnp.einsum("bqnc,bhwnc->bqnhw", q, k).astype(jnp.float32)
    weights = jnp.where(padding_mask[:, None, None], -jnp.inf, weights)
    batch, num_queries = weights.shape[:2]
    return jax.nn.softmax(weights.reshape(batch, num_queries, -1), axis=-1).reshape(weights.shape)


def _repeat_per_query(x, num_queries):
  """[B, ...] -> [B * Q, ...], each image repeated for its queries (official `_expand`)."""
  return jnp.repeat(x, num_queries, axis=0)


class MaskHead(nn.Module):
  """The official `MaskHeadSmallConv`: 3x3 conv + GroupNorm(8) + ReLU blocks, upsampled FPN style.

  Call:
    src: [B, h, w, d] the projected backbone features (the transformer's input).
    attention_maps: [B, Q, heads, h, w] from MHAttentionMap.
    fpn_features: backbone outputs [layer3, layer2, layer1], strides 16, 8, 4 (NHWC).
  Returns:
    [B, Q, H/4, W/4] mask logits, H/4 x W/4 being layer1's size.
  """

  hidden_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, src, attention_maps, fpn_features: Sequence[jnp.ndarray]):
    batch, num_queries, num_heads, height, width = attention_maps.shape
    maps = attention_maps.reshape(batch * num_queries, num_heads, height, width).transpose(0, 2, 3, 1)
    x = jnp.concatenate([_repeat_per_query(src, num_queries), maps.astype(src.dtype)], axis=-1)
    widths = [x.shape[-1], self.hidden_dim // 2, self.hidden_dim // 4, self.hidden_dim // 8, self.hidden_dim // 16]

    def conv(features, kernel, name):
      return nn.Conv(features, (kernel, kernel), padding=kernel // 2, dtype=self.dtype, kernel_init=_mask_conv_init,
                     bias_init=jax.nn.initializers.zeros, name=name)

    def block(x, index):
      x = conv(widths[index - 1], 3, f"lay{index}")(x)
      # min(8, channels) as transformers does: 8 for the official width 256, valid for narrow heads.
      groups = min(GROUP_NORM_GROUPS, widths[index - 1])
      x = nn.GroupNorm(groups, epsilon=GROUP_NORM_EPS, dtype=jnp.float32, name=f"gn{index}")(x)
      return nn.relu(x).astype(self.dtype)

    x = block(x, 1)
    x = block(x, 2)
    for stage, fpn in enumerate(fpn_features):
      adapted = _repeat_per_query(conv(widths[stage + 1], 1, f"adapter{stage + 1}")(fpn.astype(self.dtype)), num_queries)
      x = block(adapted + backbone_lib.legacy_nearest_resize(x, adapted.shape[1:3]), stage + 3)
    masks = conv(1, 3, "out_lay")(x).astype(jnp.float32)
    return masks.reshape(batch, num_queries, *masks.shape[1:3])

