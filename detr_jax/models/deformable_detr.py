"""The Deformable DETR detector (Zhu et al., "Deformable DETR: Deformable Transformers for
End-to-End Object Detection", ICLR 2021; official `models/deformable_detr.py`).

The five official variants: single-scale (`num_feature_levels=1`), single-scale DC5 (+
`dilation`), multi-scale (4 levels: layer2..4 and a stride-2 3x3 conv on layer4), + iterative box
refinement (`with_box_refine`), ++ two-stage (`two_stage`, which needs refinement).
"""

import math
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from detr_jax.models import backbone as backbone_lib
from detr_jax.models import initializers
from detr_jax.models import position_encoding
from detr_jax.models.deformable_transformer import DeformableTransformer, refine_boxes
from detr_jax.models.detr import DTYPES, MLP

# Class head bias: the prior probability 0.01 of focal-loss training (Lin et al. 2017, Sec. 4.1).
CLASS_PRIOR_BIAS = -math.log((1 - 0.01) / 0.01)


def _constant(value):
  return lambda key, shape, dtype=jnp.float32: jnp.full(shape, value, dtype)


def _box_bias(size_logit: float):
  """Last box-layer bias: 0 for the centre, `size_logit` for width and height."""
  return lambda key, shape, dtype=jnp.float32: jnp.array([0.0, 0.0, size_logit, size_logit], dtype)


class DeformableDETR(nn.Module):
  """Deformable DETR; attributes mirror the official command-line arguments.

  `num_classes` is the number of class slots (91 for COCO: the category id is the class index);
  classification is sigmoid per class, with no "no object" column. `dtype` is the compute dtype
  ("float32" or "bfloat16"); parameters, softmax, LayerNorm statistics, sampling locations and
  boxes are float32.

  Call:
    images: [B, H, W, 3] float32, RGB normalised with the ImageNet mean and std, zero-padded
      bottom/right to the batch's shape.
    pixel_mask: [B, H, W] bool, True on real pixels.
    train: enables dropout (needs a "dropout" rng).

  Returns a dict:
    "pred_logits": [B, Q, num_classes] float32 sigmoid logits of the last decoder layer.
    "pred_boxes": [B, Q, 4] float32, (cx, cy, w, h) normalised to the unpadded image.
    "aux_outputs": the same two keys for each earlier decoder layer (only when `aux_loss`).
    "enc_outputs": two-stage only, the encoder's proposals: "pred_logits" [B, S, num_classes]
      and "pred_boxes" [B, S, 4] over all S feature positions (boxes 1.0 where invalid).
  Raises:
    ValueError: unknown `dtype`, two-stage without refinement, 2 feature levels (the official
      code takes 1, or layer2..4 plus extra levels), an invalid backbone choice, or (two-stage)
      fewer feature positions than queries.
  """

  num_classes: int = 91
  num_queries: int = 300
  hidden_dim: int = 256
  num_heads: int = 8
  num_encoder_layers: int = 6
  num_decoder_layers: int = 6
  dim_feedforward: int = 1024
  dropout: float = 0.1
  num_feature_levels: int = 4
  enc_n_points: int = 4
  dec_n_points: int = 4
  backbone_depth: int = 50
  dilation: bool = False
  with_box_refine: bool = False
  two_stage: bool = False
  aux_loss: bool = True
  dtype: str = "float32"

  @property
  def num_heads_per_output(self) -> int:
    """How many class/box heads the variant has: one shared, or one per decoder layer (+1 two-stage)."""
    if not self.with_box_refine:
      return 1
    return self.num_decoder_layers + (1 if self.two_stage else 0)

  @nn.compact
  def __call__(self, images, pixel_mask, train: bool = False) -> Mapping[str, Any]:
    if self.dtype not in DTYPES:
      raise ValueError(f"Unknown compute dtype {self.dtype!r}; choose one of {sorted(DTYPES)}.")
    if self.two_stage and not self.with_box_refine:
      raise ValueError("two_stage needs with_box_refine (official Deformable DETR: --with_box_refine --two_stage).")
    dtype = DTYPES[self.dtype]
    stages = backbone_lib.ResNet(self.backbone_depth, self.dilation, dtype, name="backbone")(images)
    if self.num_feature_levels == 2:
      raise ValueError("num_feature_levels must be 1 (layer4) or at least 3 (layer2..4 and extra stride-2 convs), got 2.")
    backbone_levels = stages[1:] if self.num_feature_levels > 1 else stages[-1:]

    srcs = []
    for level, features in enumerate(backbone_levels):
      src = backbone_lib.PointwiseConv(self.hidden_dim, dtype=dtype, use_bias=True,
                                       kernel_init=initializers.xavier_uniform, name=f"input_proj_{level}_conv")(features)
      srcs.append(self._group_norm(f"input_proj_{level}_norm", src, dtype))
    for level in range(len(backbone_levels), self.num_feature_levels):
      src = nn.Conv(self.hidden_dim, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), dtype=dtype,
                    kernel_init=initializers.xavier_uniform, name=f"input_proj_{level}_conv")(
                        stages[-1] if level == len(backbone_levels) else srcs[-1])
      srcs.append(self._group_norm(f"input_proj_{level}_norm", src, dtype))
    padding_masks = [backbone_lib.downsample_mask(~pixel_mask, src.shape[1:3]) for src in srcs]
    pos = [position_encoding.sine_position_encoding(m, self.hidden_dim // 2, offset=-0.5) for m in padding_masks]

    class_heads = [nn.Dense(self.num_classes, dtype=dtype, kernel_init=initializers.torch_default_kernel,
                            bias_init=_constant(CLASS_PRIOR_BIAS), name=self._head_name("class_embed", i))
                   for i in range(self.num_heads_per_output)]
    # The official size bias -2 sits on the shared head, or on the first of the refinement heads;
    # two-stage resets it to 0 everywhere.
    box_heads = [MLP(self.hidden_dim, 4, 3, dtype, last_kernel_init=nn.initializers.zeros,
                     last_bias_init=_box_bias(-2.0 if i == 0 and not self.two_stage else 0.0),
                     name=self._head_name("bbox_embed", i))
                 for i in range(self.num_heads_per_output)]
    query_embed = None
    if not self.two_stage:
      query_embed = self.param("query_embed", jax.nn.initializers.normal(1.0), (self.num_queries, 2 * self.hidden_dim))
    transformer = DeformableTransformer(
        self.num_heads, self.num_encoder_layers, self.num_decoder_layers, self.dim_feedforward, self.dropout,
        self.num_feature_levels, self.enc_n_points, self.dec_n_points, self.two_stage, dtype, name="transformer")
    result = transformer(srcs, padding_masks, pos, query_embed, box_heads if self.with_box_refine else None,
                         class_heads[-1] if self.two_stage else None, self.num_queries, deterministic=not train)

    layer_outputs = []
    for layer in range(self.num_decoder_layers):
      hs = result["hs"][layer]
      head = layer if self.with_box_refine else 0
      layer_outputs.append({"pred_logits": class_heads[head](hs).astype(jnp.float32),
                            "pred_boxes": refine_boxes(box_heads[head](hs), result["references"][layer])})
    outputs = dict(layer_outputs[-1])
    if self.aux_loss:
      outputs["aux_outputs"] = layer_outputs[:-1]
    if self.two_stage:
      outputs["enc_outputs"] = {"pred_logits": result["enc_logits"],
                                "pred_boxes": jax.nn.sigmoid(result["enc_box_logits"])}
    return outputs

  def _head_name(self, base: str, index: int) -> str:
    return f"{base}_{index}" if self.with_box_refine else base

  def _group_norm(self, name, x, dtype):
    # GroupNorm(32, d) of the official input projections; PyTorch's eps.
    return nn.GroupNorm(num_groups=32, epsilon=1e-5, dtype=dtype, name=name)(x)


def from_config(config: Mapping[str, Any]) -> DeformableDETR:
  """Builds a DeformableDETR from a config mapping (`config.model` without "name", or a dict).

  Raises:
    TypeError: a key that is not a DeformableDETR attribute.
  """
  return DeformableDETR(**dict(config))


def model_config(model: DeformableDETR) -> dict[str, Any]:
  """The attributes of `model` as a plain dict (the inverse of `from_config`)."""
  return {field: getattr(model, field) for field in DeformableDETR.__dataclass_fields__
          if field not in ("parent", "name")}


def describe(config: Mapping[str, Any]) -> str:
  """A one-line name such as "Deformable-DETR-R50 multi-scale + refinement (91 classes, 300 queries)"."""
  levels = config.get("num_feature_levels", 4)
  variant = "single-scale" if levels == 1 else "multi-scale"
  if config.get("with_box_refine"):
    variant += " + refinement"
  if config.get("two_stage"):
    variant += " + two-stage"
  return (f"Deformable-DETR-R{config['backbone_depth']}{'-DC5' if config['dilation'] else ''} {variant} "
          f"({config['num_classes']} classes, {config['num_queries']} queries)")


def init_variables(model: DeformableDETR, rng: jax.Array):
  """Initialises {"params", "batch_stats"} with the official initialisers (jit-compiled).

  The refinement heads are deep copies in the official code (`_get_clones`), so every class head
  and every box head starts equal to the first; only the first box head's size bias differs
  (-2 on head 0, 0 elsewhere, 0 everywhere in two-stage).
  """
  # Large enough that two-stage finds num_queries proposals among the stride-8 positions.
  side = 64 * (2 + math.ceil(8 * math.sqrt(model.num_queries) / 64))
  images = jnp.zeros((1, side, side, 3), jnp.float32)
  mask = jnp.ones((1, side, side), bool)
  variables = flax.core.unfreeze(jax.jit(model.init)({"params": rng}, images, mask))
  if model.with_box_refine:
    params = variables["params"]
    # Copies, not the same arrays: a train state whose leaves share buffers cannot be donated.
    for i in range(1, model.num_heads_per_output):
      params[f"class_embed_{i}"] = jax.tree.map(jnp.copy, params["class_embed_0"])
      params[f"bbox_embed_{i}"] = {**jax.tree.map(jnp.copy, params["bbox_embed_0"]),
                                   "layers_2": params[f"bbox_embed_{i}"]["layers_2"]}
  return variables
