"""The official DETR checkpoint layout (facebookresearch/detr `models/detr.py`, `DETRsegm`).

Every Flax leaf has exactly one official key (`official_key`); reading is strict: every key of
the state dict must be used and every Flax leaf filled, or `CheckpointMismatchError` lists what
is wrong. The architecture is read from the keys and shapes (`infer_model_config`), except DC5
and the number of heads, which keys cannot show.
"""

import re
from typing import Any, Mapping

import flax
import jax
import numpy as np

from detr_jax import checkpoints
from detr_jax.models import backbone as backbone_lib
from detr_jax.models import detr as detr_lib
from detr_jax.models import segmentation

# Flax module path (joined with ".") -> official module path. Applied in order.
_MODULE_RULES = [
    (r"^backbone\.", "backbone.0.body."),
    (r"^position_embedding\.", "backbone.1."),
    (r"\.encoder_layers_(\d+)\.", r".encoder.layers.\1."),
    (r"\.decoder_layers_(\d+)\.", r".decoder.layers.\1."),
    (r"\.encoder_norm\.", ".encoder.norm."),
    (r"\.decoder_norm\.", ".decoder.norm."),
    (r"\.ffn\.", "."),
    (r"^input_proj_(\d+)_conv\.", r"input_proj.\1.0."),   # Deformable DETR's per-level projections
    (r"^input_proj_(\d+)_norm\.", r"input_proj.\1.1."),
    (r"_(\d+)\.", r".\1."),
]
_LEAF_NAMES = {"kernel": "weight", "in_proj_kernel": "in_proj_weight", "scale": "weight",
               "embedding": "weight", "mean": "running_mean", "var": "running_var"}


# Panoptic checkpoints (official DETRsegm, HF DetrForSegmentation) nest the detector under this prefix.
PANOPTIC_PREFIX = "detr."


def official_key(path: tuple[str, ...]) -> str:
  """The official state-dict key of a Flax leaf path (collection excluded).

  Example: ("backbone", "layer1_0", "downsample_1", "mean")
  -> "backbone.0.body.layer1.0.downsample.1.running_mean".
  """
  *modules, leaf = path
  if not modules:  # a parameter declared on the root module, e.g. query_embed
    return f"{leaf}.weight"
  prefix = ".".join(modules) + "."
  for pattern, replacement in _MODULE_RULES:
    prefix = re.sub(pattern, replacement, prefix)
  return prefix + _LEAF_NAMES.get(leaf, leaf)


def to_torch_layout(path, value):
  """A Flax leaf in PyTorch's layout: Dense kernels transposed, conv kernels HWIO -> OIHW."""
  if path[-1].endswith("kernel"):
    return value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
  return value


def from_torch_layout(path, value):
  """The inverse of `to_torch_layout`."""
  if path[-1].endswith("kernel"):
    return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
  return value


def without_panoptic_prefix(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The detection keys of a panoptic state dict without their `detr.` prefix, beside
  bbox_attention.* and mask_head.*; other state dicts are returned as they are."""
  return {k[len(PANOPTIC_PREFIX):] if k.startswith(PANOPTIC_PREFIX) else k: v for k, v in state_dict.items()}


def count_indices(keys, prefix) -> int:
  """How many `prefix<i>.` entries (0, 1, ...) the keys have: max index + 1, or 0."""
  indices = {int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
  return max(indices) + 1 if indices else 0


def infer_resnet_depth(state_dict) -> int:
  blocks = tuple(count_indices(state_dict, f"backbone.0.body.layer{i}.") for i in range(1, 5))
  kind = "bottleneck" if "backbone.0.body.layer1.0.conv3.weight" in state_dict else "basic"
  depths = [d for d, layout in backbone_lib.RESNET_LAYOUTS.items() if layout == (kind, blocks)]
  if not depths:
    raise checkpoints.CheckpointMismatchError(f"Backbone with {kind} blocks per stage {blocks} is not a supported ResNet.")
  return depths[0]


def infer_model_config(state_dict: Mapping[str, np.ndarray], dilation: bool = False,
                       num_heads: int = 8) -> dict[str, Any]:
  """Reads the DETR architecture from official-layout keys and shapes.

  Depth, num_classes, queries, layer counts, widths, pre-norm and the position encoding are
  read; DC5 (`dilation`) and `num_heads` cannot be, so they are arguments.
  Raises:
    checkpoints.CheckpointMismatchError: the keys do not describe a supported DETR.
  """
  keys = list(state_dict)
  required = ["class_embed.weight", "query_embed.weight", "transformer.encoder.layers.0.linear1.weight"]
  absent = [k for k in required if k not in state_dict]
  if absent:
    raise checkpoints.CheckpointMismatchError(f"Not a DETR state dict: missing {absent}.")
  num_queries, hidden_dim = state_dict["query_embed.weight"].shape
  return {
      "num_classes": state_dict["class_embed.weight"].shape[0] - 1,
      "num_queries": int(num_queries),
      "hidden_dim": int(hidden_dim),
      "num_heads": num_heads,
      "num_encoder_layers": count_indices(keys, "transformer.encoder.layers."),
      "num_decoder_layers": count_indices(keys, "transformer.decoder.layers."),
      "dim_feedforward": int(state_dict["transformer.encoder.layers.0.linear1.weight"].shape[0]),
      "pre_norm": "transformer.encoder.norm.weight" in state_dict,
      "backbone_depth": infer_resnet_depth(state_dict),
      "dilation": dilation,
      "position_embedding": "learned" if "backbone.1.row_embed.weight" in state_dict else "sine",
      "masks": "mask_head.out_lay.weight" in state_dict,
  }


def variable_shapes(model, init_variables=detr_lib.init_variables) -> dict[tuple[str, ...], tuple[int, ...]]:
  """{(collection, *path): shape} of the variables `init_variables(model, key)` makes, without computing them."""
  shapes = jax.eval_shape(lambda: init_variables(model, jax.random.PRNGKey(0)))
  return {path: leaf.shape for path, leaf in flax.traverse_util.flatten_dict(flax.core.unfreeze(shapes)).items()}


def fill(shapes, state_dict, what: str, keys_of=None, copies: str = "a module", copies_hint: str = ""):
  """Official-layout `state_dict` strictly mapped onto Flax leaves {(collection, *path): shape}
  -> {(collection, *path): array in Flax's layout}.

  `keys_of(path)` lists every key that stores the leaf at `path` (collection excluded), its own
  first; by default the one `official_key`. A module the official model registers under several
  names is stored once per name: all copies must be present and equal.
  Raises:
    checkpoints.CheckpointMismatchError: see `checkpoints.check_fit`; or copies that differ
      ("it stores {copies} under several keys, but N of them differ between copies", then `copies_hint`).
  """
  keys = {path: keys_of(path[1:]) if keys_of else [official_key(path[1:])] for path in shapes}
  checkpoints.check_fit({key: to_torch_layout(path, np.empty(shapes[path], np.float32)).shape
                         for path, path_keys in keys.items() for key in path_keys},
                        {key: np.shape(value) for key, value in state_dict.items()}, what)
  unequal = [path_keys for path_keys in keys.values()
             if any(not np.array_equal(state_dict[path_keys[0]], state_dict[k]) for k in path_keys[1:])]
  if unequal:
    raise checkpoints.CheckpointMismatchError(
        f"The checkpoint does not fit {what}: it stores {copies} under several keys, but {len(unequal)} of them "
        f"differ between copies, e.g. {unequal[0]}.{copies_hint}")
  return {path: from_torch_layout(path, state_dict[path_keys[0]]) for path, path_keys in keys.items()}


def load_state_dict(state_dict: Mapping[str, np.ndarray], dilation: bool = False, num_heads: int = 8,
                    **overrides):
  """An official-layout DETR state dict (panoptic ones without their `detr.` prefix) as a Flax DETR.

  Args:
    state_dict: {official key: float32 numpy array in PyTorch's layout}.
    dilation: True for DC5 checkpoints (it cannot be read from the keys).
    num_heads: attention heads (8 in every published model; not readable from shapes).
    **overrides: DETR attributes to force (e.g. `backbone_depth=50`, `dtype="bfloat16"`,
      `aux_loss=False`); architecture fields that disagree with the checkpoint raise.
  Returns:
    (model, variables): a `detr.DETR` and {"params", "batch_stats"} of float32 arrays.
  Raises:
    checkpoints.CheckpointMismatchError: missing, unexpected or shape-mismatched keys, all listed.
  """
  config = {**infer_model_config(state_dict, dilation, num_heads), **overrides}
  model = detr_lib.from_config(config)
  filled = fill(variable_shapes(model), state_dict, detr_lib.describe(config))
  variables = flax.traverse_util.unflatten_dict({p: jax.numpy.asarray(v) for p, v in filled.items()})
  return model, variables


def to_pytorch_state_dict(variables) -> dict[str, np.ndarray]:
  """Exports {"params", "batch_stats"} to the official key layout as float32 numpy arrays.

  The result loads into the official `DETR` (or, with a mask head, `DETRsegm`, whose detector
  keys start with `detr.`) with `load_state_dict(strict=True)` after `torch.from_numpy`; for an
  imported checkpoint it equals the original exactly.
  """
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables))
  panoptic = any(path[1] in segmentation.MODULE_NAMES for path in flat)
  prefix = lambda path: PANOPTIC_PREFIX if panoptic and path[1] not in segmentation.MODULE_NAMES else ""
  return {prefix(path) + official_key(path[1:]): np.asarray(to_torch_layout(path, np.asarray(value, np.float32)))
          for path, value in flat.items()}
