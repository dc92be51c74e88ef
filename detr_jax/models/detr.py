"""The DETR detector: backbone, transformer, class and box heads (official `models/detr.py`).

Paper: Carion et al., "End-to-End Object Detection with Transformers", ECCV 2020, Sec. 3.2.
"""

from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from detr_jax.models import backbone as backbone_lib
from detr_jax.models import initializers
from detr_jax.models import position_encoding
from detr_jax.models import segmentation
from detr_jax.models import transformer as transformer_lib

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class MLP(nn.Module):
  """Dense layers with ReLU between them (official `MLP`, the box head). PyTorch default init,
  except for the last layer where `last_kernel_init` / `last_bias_init` are given (Deformable DETR
  zeroes it)."""

  hidden_dim: int
  output_dim: int
  num_layers: int
  dtype: Any = jnp.float32
  last_kernel_init: Optional[Callable] = None
  last_bias_init: Optional[Callable] = None

  @nn.compact
  def __call__(self, x):
    fan_in = x.shape[-1]
    for i in range(self.num_layers):
      last = i == self.num_layers - 1
      features = self.output_dim if last else self.hidden_dim
      kernel_init = (last and self.last_kernel_init) or initializers.torch_default_kernel
      bias_init = (last and self.last_bias_init) or initializers.torch_default_bias(fan_in)
      x = nn.Dense(features, dtype=self.dtype, kernel_init=kernel_init, bias_init=bias_init, name=f"layers_{i}")(x)
      fan_in = features
      if i < self.num_layers - 1:
        x = nn.relu(x)
    return x


class DETR(nn.Module):
  """DETR for object detection, and with `masks=True` for panoptic segmentation (official `DETRsegm`).

  Attributes mirror the official command-line arguments; `num_classes` is the number of
  category slots (91 for COCO: the category id is the class index), and the class head has
  num_classes + 1 outputs with "no object" last. `dtype` is the compute dtype ("float32" or
  "bfloat16"); parameters are always float32, softmax and LayerNorm statistics float32.

  Call:
    images: [B, H, W, 3] float32, RGB normalised with the ImageNet mean and std, zero-padded
      bottom/right to the batch's shape.
    pixel_mask: [B, H, W] bool, True on real pixels.
    train: enables dropout (needs a "dropout" rng).

  Returns a dict:
    "pred_logits": [B, Q, num_classes + 1] float32.
    "pred_boxes": [B, Q, 4] float32, (cx, cy, w, h) normalised to the unpadded image.
    "aux_outputs": list of num_decoder_layers - 1 dicts with the same two keys, one per
      earlier decoder layer (only when `aux_loss`).
    "pred_masks": [B, Q, H/4, W/4] float32 mask logits (only when `masks`; see segmentation.py).
  Raises:
    ValueError: unknown `dtype` or `position_embedding`, or an invalid backbone choice.
  """

  num_classes: int = 91
  num_queries: int = 100
  hidden_dim: int = 256
  num_heads: int = 8
  num_encoder_layers: int = 6
  num_decoder_layers: int = 6
  dim_feedforward: int = 2048
  dropout: float = 0.1
  pre_norm: bool = False
  backbone_depth: int = 50
  dilation: bool = False
  position_embedding: str = "sine"
  aux_loss: bool = True
  masks: bool = False
  dtype: str = "float32"

  @nn.compact
  def __call__(self, images, pixel_mask, train: bool = False) -> Mapping[str, Any]:
    if self.dtype not in DTYPES:
      raise ValueError(f"Unknown compute dtype {self.dtype!r}; choose one of {sorted(DTYPES)}.")
    dtype = DTYPES[self.dtype]
    stages = backbone_lib.ResNet(self.backbone_depth, self.dilation, dtype, name="backbone")(images)
    features = stages[-1]
    height, width = features.shape[1:3]
    padding_mask = backbone_lib.downsample_mask(~pixel_mask, (height, width))
    pos = self._position_encoding(padding_mask)

    in_channels = features.shape[-1]
    src = backbone_lib.PointwiseConv(
        self.hidden_dim, dtype=dtype, use_bias=True, kernel_init=initializers.torch_default_kernel,
        bias_init=initializers.torch_default_bias(in_channels), name="input_proj")(features)
    query_embed = self.param("query_embed", jax.nn.initializers.normal(1.0),
                             (self.num_queries, self.hidden_dim))
    batch = images.shape[0]
    hs, memory = transformer_lib.Transformer(
        self.num_heads, self.num_encoder_layers, self.num_decoder_layers, self.dim_feedforward,
        self.dropout, self.pre_norm, dtype, name="transformer",
    )(src.reshape(batch, height * width, self.hidden_dim), padding_mask.reshape(batch, -1),
      pos.reshape(batch, height * width, -1), query_embed, deterministic=not train)

    logits = nn.Dense(self.num_classes + 1, dtype=dtype, kernel_init=initializers.torch_default_kernel,
                      bias_init=initializers.torch_default_bias(self.hidden_dim), name="class_embed")(hs)
    boxes = MLP(self.hidden_dim, 4, 3, dtype, name="bbox_embed")(hs)
    logits = logits.astype(jnp.float32)
    boxes = jax.nn.sigmoid(boxes.astype(jnp.float32))
    outputs = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
    if self.aux_loss:
      outputs["aux_outputs"] = [{"pred_logits": l, "pred_boxes": b} for l, b in zip(logits[:-1], boxes[:-1])]
    if self.masks:
      attention = segmentation.MHAttentionMap(self.hidden_dim, self.num_heads, dtype, name="bbox_attention")(
          hs[-1], memory.reshape(batch, height, width, self.hidden_dim), padding_mask)
      outputs["pred_masks"] = segmentation.MaskHead(self.hidden_dim, dtype, name="mask_head")(
          src, attention, stages[2::-1])
    return outputs

  def _position_encoding(self, padding_mask):
    if self.position_embedding == "sine":
      return position_encoding.sine_position_encoding(padding_mask, self.hidden_dim // 2)
    if self.position_embedding == "learned":
      return position_encoding.LearnedPositionEncoding(self.hidden_dim // 2, name="position_embedding")(padding_mask)
    raise ValueError(f"Unknown position_embedding {self.position_embedding!r}; use 'sine' or 'learned'.")


def from_config(config: Mapping[str, Any]) -> DETR:
  """Builds a DETR from a config mapping (a `config.model` ConfigDict or a plain dict).

  Raises:
    TypeError: a key that is not a DETR attribute.
  """
  return DETR(**dict(config))


def model_config(model: DETR) -> dict[str, Any]:
  """The DETR attributes of `model` as a plain dict (the inverse of `from_config`)."""
  return {field: getattr(model, field) for field in DETR.__dataclass_fields__ if field not in ("parent", "name")}


def describe(config: Mapping[str, Any]) -> str:
  """A one-line name such as "DETR-R50-DC5 (91 classes, 100 queries)" for a model config mapping."""
  return (f"DETR-R{config['backbone_depth']}{'-DC5' if config['dilation'] else ''}"
          f"{'-panoptic' if config.get('masks') else ''} ({config['num_classes']} classes, {config['num_queries']} queries)")


def init_variables(model: DETR, rng: jax.Array):
  """Initialises {"params", "batch_stats"} with the official initialisers (jit-compiled).

  Parameter shapes do not depend on the image size, so a small dummy image is used.
  """
  images = jnp.zeros((1, 64, 64, 3), jnp.float32)
  mask = jnp.ones((1, 64, 64), bool)
  return jax.jit(model.init)({"params": rng}, images, mask)
