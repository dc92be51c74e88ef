"""The official Deformable DETR checkpoint layout (fundamentalvision/Deformable-DETR
`models/deformable_detr.py`, the released `r50_deformable_detr*-checkpoint.pth` files).

Module names follow DETR's official layout (`official.official_key`), with two twists of the
official model: one module registered under several names is stored under each of them.
  * Without refinement the class and box heads are one module listed once per decoder layer:
    `class_embed.0` ... `class_embed.5` (and `bbox_embed.*`) are six copies of one head.
  * With refinement the decoder holds the box heads too (`transformer.decoder.bbox_embed.i`
    is `bbox_embed.i`), and in two-stage the class heads (`transformer.decoder.class_embed.i`).
Reading accepts the copies only when they are equal; writing produces every one of them.
"""

import re
from typing import Any, Mapping

import flax
import jax
import numpy as np

from detr_jax import checkpoints
from detr_jax.models import deformable_detr
from detr_jax.porting import official

DECODER_PREFIX = "transformer.decoder."


def is_official_layout(state_dict: Mapping[str, Any]) -> bool:
  """True for official Deformable DETR keys (`transformer.level_embed`)."""
  return "transformer.level_embed" in state_dict


def official_keys(path: tuple[str, ...], num_decoder_layers: int, with_box_refine: bool,
                  two_stage: bool) -> list[str]:
  """Every official key that stores the Flax leaf at `path` (collection excluded); the first is its own.

  Example: ("class_embed", "kernel") without refinement -> ["class_embed.0.weight", ...,
  "class_embed.5.weight"]; ("bbox_embed_2", "layers_0", "bias") with refinement ->
  ["bbox_embed.2.layers.0.bias", "transformer.decoder.bbox_embed.2.layers.0.bias"].
  """
  key = official.official_key(path)
  head = re.match(r"^(class_embed|bbox_embed)\.(\d+\.)?", key)
  if not head:
    return [key]
  if not with_box_refine:
    rest = key[len("class_embed.") if key.startswith("class_embed") else len("bbox_embed."):]
    return [f"{head.group(1)}.{i}.{rest}" for i in range(num_decoder_layers)]
  keys = [key]
  if head.group(1) == "bbox_embed" or two_stage:
    keys.append(DECODER_PREFIX + key)
  return keys


def infer_model_config(state_dict: Mapping[str, np.ndarray], dilation: bool = False,
                       num_heads: int = 8) -> dict[str, Any]:
  """Reads the Deformable DETR variant from official keys and shapes.

  Levels, refinement, two-stage, classes, queries, layer counts, widths and points are read;
  DC5 (`dilation`) and `num_heads` cannot be. Two-stage files have no query embedding: their
  query count is the official 300 (override `num_queries` otherwise).
  Raises:
    checkpoints.CheckpointMismatchError: the keys do not describe a Deformable DETR.
  """
  required = ["transformer.level_embed", "class_embed.0.weight", "transformer.encoder.layers.0.linear1.weight",
              "transformer.encoder.layers.0.self_attn.attention_weights.weight",
              "transformer.decoder.layers.0.cross_attn.attention_weights.weight"]
  absent = [k for k in required if k not in state_dict]
  if absent:
    raise checkpoints.CheckpointMismatchError(f"Not a Deformable DETR state dict: missing {absent}.")
  levels, hidden_dim = state_dict["transformer.level_embed"].shape
  points = lambda key: int(state_dict[key].shape[0]) // (num_heads * int(levels))
  keys = list(state_dict)
  return {
      "num_classes": int(state_dict["class_embed.0.weight"].shape[0]),
      "num_queries": int(state_dict["query_embed.weight"].shape[0]) if "query_embed.weight" in state_dict else 300,
      "hidden_dim": int(hidden_dim),
      "num_heads": num_heads,
      "num_encoder_layers": official.count_indices(keys, "transformer.encoder.layers."),
      "num_decoder_layers": official.count_indices(keys, "transformer.decoder.layers."),
      "dim_feedforward": int(state_dict["transformer.encoder.layers.0.linear1.weight"].shape[0]),
      "num_feature_levels": int(levels),
      "enc_n_points": points("transformer.encoder.layers.0.self_attn.attention_weights.weight"),
      "dec_n_points": points("transformer.decoder.layers.0.cross_attn.attention_weights.weight"),
      "backbone_depth": official.infer_resnet_depth(state_dict),
      "dilation": dilation,
      "with_box_refine": "transformer.decoder.bbox_embed.0.layers.0.weight" in state_dict,
      "two_stage": "transformer.enc_output.weight" in state_dict,
  }


def load_state_dict(state_dict: Mapping[str, np.ndarray], dilation: bool = False, num_heads: int = 8, **overrides):
  """An official-layout Deformable DETR state dict as a Flax DeformableDETR, strictly.

  Args:
    state_dict: {official key: float32 numpy array in PyTorch's layout}.
    dilation: True for the single-scale DC5 variant (keys cannot show it).
    num_heads: attention heads (8 in every published model; not readable from shapes).
    **overrides: DeformableDETR attributes to force (e.g. `dtype="bfloat16"`, `num_queries` of a
      two-stage file); architecture fields that disagree with the checkpoint raise.
  Returns:
    (model, variables): a `deformable_detr.DeformableDETR` and {"params", "batch_stats"}.
  Raises:
    checkpoints.CheckpointMismatchError: missing, unexpected or shape-mismatched keys (all listed),
      or copies of a shared head that differ.
  """
  config = {**infer_model_config(state_dict, dilation, num_heads), **overrides}
  model = deformable_detr.from_config(config)
  filled = official.fill(
      official.variable_shapes(model, deformable_detr.init_variables), state_dict, deformable_detr.describe(config),
      keys_of=lambda path: official_keys(path, model.num_decoder_layers, model.with_box_refine, model.two_stage),
      copies="one module stored twice" if model.with_box_refine else "one head shared by every decoder layer",
      copies_hint=" A checkpoint with a distinct head per decoder layer is a refinement model (with_box_refine=True).")
  return model, flax.traverse_util.unflatten_dict({path: jax.numpy.asarray(v) for path, v in filled.items()})


def to_pytorch_state_dict(variables) -> dict[str, np.ndarray]:
  """Exports Deformable DETR {"params", "batch_stats"} to the official keys (float32 numpy), every
  copy of a shared head included; for an imported checkpoint it equals the original exactly.

  The variant is read from the variables (per-layer heads, the two-stage encoder output).
  """
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables))
  params = variables["params"]
  with_box_refine = "class_embed_0" in params
  two_stage = "enc_output" in params["transformer"]
  num_decoder_layers = sum(name.startswith("decoder_layers_") for name in params["transformer"])
  exported = {}
  for path, value in flat.items():
    value = np.asarray(official.to_torch_layout(path, np.asarray(value, np.float32)))
    for key in official_keys(path[1:], num_decoder_layers, with_box_refine, two_stage):
      exported[key] = value
  return exported
