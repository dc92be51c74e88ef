"""Lossless checkpoint porting between detr_jax and PyTorch DETR checkpoints.

Sources accepted by `load_pytorch_checkpoint`:
  * the official `.pth` (facebookresearch/detr model zoo): `{"model": state_dict}` or a bare
    state dict, keys as in official `models/detr.py`;
  * Hugging Face `DetrForObjectDetection` state dicts or `model.safetensors`, in the hub files'
    layout (timm backbone names, `self_attn.out_proj`, `fc1`) and in the layout of the installed
    transformers (HF ResNet backbone names, `o_proj`, `mlp.fc1`).
`load_torchvision_backbone` takes a torchvision ResNet ImageNet checkpoint to initialise training.
Exports: the official layout (`to_pytorch_state_dict`, `save_pytorch_checkpoint`) and the installed
transformers' layout (`to_hf_state_dict`, `save_hf_pretrained`: a `from_pretrained` directory).

Every Flax leaf has exactly one official key (`official_key`); loading is strict: every source
key must be used and every Flax leaf filled, or `CheckpointMismatchError` lists what is wrong
and nothing is returned or written.

CLI:
  python -m detr_jax.porting import SRC.pth OUT_DIR [--dilation]   # writes an orbax checkpoint
  python -m detr_jax.porting export OUT_DIR DST.pth                 # official layout for torch (OUT_DIR may be a train.py workdir)
  python -m detr_jax.porting export OUT_DIR HF_DIR --hf             # transformers' DetrForObjectDetection / DetrForSegmentation
"""

import argparse
import json
import os
import re
import sys
from typing import Any, Mapping, Optional

import flax
import jax
import numpy as np

from detr_jax import backbone as backbone_lib
from detr_jax import detr as detr_lib
from detr_jax import segmentation

MODEL_CONFIG_FILE = "model_config.json"
VARIABLES_DIR = "variables"


class CheckpointMismatchError(ValueError):
  """The checkpoint's keys or shapes do not fit the model; the message lists each offending key."""


# Flax module path (joined with ".") -> official module path. Applied in order.
_MODULE_RULES = [
    (r"^backbone\.", "backbone.0.body."),
    (r"^position_embedding\.", "backbone.1."),
    (r"\.encoder_layers_(\d+)\.", r".encoder.layers.\1."),
    (r"\.decoder_layers_(\d+)\.", r".decoder.layers.\1."),
    (r"\.encoder_norm\.", ".encoder.norm."),
    (r"\.decoder_norm\.", ".decoder.norm."),
    (r"\.ffn\.", "."),
    (r"_(\d+)\.", r".\1."),
]
_LEAF_NAMES = {"kernel": "weight", "in_proj_kernel": "in_proj_weight", "scale": "weight",
               "embedding": "weight", "mean": "running_mean", "var": "running_var"}


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


def _to_torch_layout(path, value):
  if path[-1].endswith("kernel"):
    return value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
  return value


def _from_torch_layout(path, value):
  if path[-1].endswith("kernel"):
    return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
  return value


# ---------------------------------------------------------------------------------------------
# Reading state dicts and renaming Hugging Face layouts.

def read_state_dict(source) -> dict[str, np.ndarray]:
  """Reads a `.pth`/`.pt`/`.bin` (torch) or `.safetensors` file, or takes a mapping.

  Returns a flat {key: float32 numpy array} dict. A `{"model": ...}` wrapper is unwrapped.
  Raises:
    FileNotFoundError: the path does not exist.
    ValueError: the file holds no state dict.
  """
  if isinstance(source, Mapping):
    state = source
  else:
    path = os.fspath(source)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"No checkpoint file at {path!r}.")
    if path.endswith(".safetensors"):
      from safetensors.numpy import load_file
      state = load_file(path)
    else:
      import torch
      state = torch.load(path, map_location="cpu", weights_only=True)
  if isinstance(state.get("model"), Mapping):
    state = state["model"]
  arrays = {}
  for key, value in state.items():
    if hasattr(value, "detach"):
      value = value.detach().cpu().float().numpy()
    if not isinstance(value, np.ndarray):
      raise ValueError(f"Checkpoint entry {key!r} is a {type(value).__name__}, not a tensor.")
    arrays[key] = value.astype(np.float32)
  return arrays


def _shift_stage(match):
  return f"body.layer{int(match.group(1)) + 1}.{match.group(2)}."


# Hugging Face key -> official key, applied in order. Covers the hub files (timm backbone) and
# the installed transformers (HF ResNet backbone, o_proj, mlp.fc1).
_HF_RULES = [
    (r"^model\.backbone\.(conv_encoder\.)?model\.", "backbone.0.body."),
    (r"^model\.(backbone\.)?position_embedding\.row_embeddings\.", "backbone.1.row_embed."),
    (r"^model\.(backbone\.)?position_embedding\.column_embeddings\.", "backbone.1.col_embed."),
    (r"body\.embedder\.embedder\.convolution\.", "body.conv1."),
    (r"body\.embedder\.embedder\.normalization\.", "body.bn1."),
    (r"body\.encoder\.stages\.(\d+)\.layers\.(\d+)\.", _shift_stage),
    (r"\.shortcut\.convolution\.", ".downsample.0."),
    (r"\.shortcut\.normalization\.", ".downsample.1."),
    (r"\.layer\.(\d+)\.convolution\.", lambda m: f".conv{int(m.group(1)) + 1}."),
    (r"\.layer\.(\d+)\.normalization\.", lambda m: f".bn{int(m.group(1)) + 1}."),
    (r"^model\.(encoder|decoder)\.layers\.", r"transformer.\1.layers."),
    (r"^model\.decoder\.layernorm\.", "transformer.decoder.norm."),
    (r"\.encoder_attn\.", ".multihead_attn."),
    (r"\.o_proj\.", ".out_proj."),
    (r"\.(mlp\.)?fc1\.", ".linear1."),
    (r"\.(mlp\.)?fc2\.", ".linear2."),
    (r"\.self_attn_layer_norm\.", ".norm1."),
    (r"\.encoder_attn_layer_norm\.", ".norm2."),
    (r"(encoder\.layers\.\d+)\.final_layer_norm\.", r"\1.norm2."),
    (r"(decoder\.layers\.\d+)\.final_layer_norm\.", r"\1.norm3."),
    (r"^model\.input_projection\.", "input_proj."),
    (r"^model\.query_position_embeddings\.", "query_embed."),
    (r"^class_labels_classifier\.", "class_embed."),
    (r"^bbox_predictor\.", "bbox_embed."),
    (r"^bbox_attention\.([qk])_proj\.", r"bbox_attention.\1_linear."),
    (r"^mask_head\.conv(\d)\.conv\.", r"mask_head.lay\1."),
    (r"^mask_head\.conv(\d)\.norm\.", r"mask_head.gn\1."),
    (r"^mask_head\.fpn_stages\.(\d)\.fpn_adapter\.", lambda m: f"mask_head.adapter{int(m.group(1)) + 1}."),
    (r"^mask_head\.fpn_stages\.(\d)\.refine\.conv\.", lambda m: f"mask_head.lay{int(m.group(1)) + 3}."),
    (r"^mask_head\.fpn_stages\.(\d)\.refine\.norm\.", lambda m: f"mask_head.gn{int(m.group(1)) + 3}."),
    (r"^mask_head\.output_conv\.", "mask_head.out_lay."),
]


def is_hf_layout(state_dict: Mapping[str, Any]) -> bool:
  """True for Hugging Face `DetrForObjectDetection` keys ("model." / "class_labels_classifier.")."""
  return any(k.startswith(("model.", "class_labels_classifier.")) for k in state_dict)


def hf_to_official(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renames a Hugging Face DETR state dict into the official layout.

  Separate q/k/v projections are concatenated into `in_proj_weight` [3d, d] / `in_proj_bias`
  (rows q, k, v, as in `nn.MultiheadAttention`); `num_batches_tracked` entries are dropped.
  Raises:
    CheckpointMismatchError: an attention block lacks one of its q/k/v projections.
  """
  renamed, qkv = {}, {}
  for key, value in state_dict.items():
    if key.endswith("num_batches_tracked"):
      continue
    official, projection = _official_source(key)
    if projection:
      qkv.setdefault(official, {})[projection] = value
    else:
      renamed[official] = value
  for official, parts in qkv.items():
    if set(parts) != {"q", "k", "v"}:
      raise CheckpointMismatchError(f"{official}: found projections {sorted(parts)}, expected q, k and v.")
    renamed[official] = np.concatenate([parts["q"], parts["k"], parts["v"]])
  return renamed


def _official_source(hf_key: str) -> tuple[str, Optional[str]]:
  """(official key, projection) of a Hugging Face key (without the `detr.` prefix): for a separate
  q/k/v projection, the fused `in_proj_weight` / `in_proj_bias` key and "q", "k" or "v"."""
  key = hf_key
  for pattern, replacement in _HF_RULES:
    key = re.sub(pattern, replacement, key)
  match = re.match(r"^(.*)\.([qkv])_proj\.(weight|bias)$", key)
  if match:
    return f"{match.group(1)}.in_proj_{match.group(3)}", match.group(2)
  return key, None


def _without_panoptic_prefix(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Panoptic checkpoints (official DETRsegm, HF DetrForSegmentation) nest the detector under
  `detr.`; removing it gives the detection keys, next to bbox_attention.* and mask_head.*."""
  return {k[len(PANOPTIC_PREFIX):] if k.startswith(PANOPTIC_PREFIX) else k: v for k, v in state_dict.items()}


def to_official_layout(source) -> dict[str, np.ndarray]:
  """Reads `source` (see `read_state_dict`) and returns it in the official detection layout.

  Panoptic checkpoints come back without their `detr.` prefix (see `to_pytorch_state_dict`).
  """
  state_dict = _without_panoptic_prefix(read_state_dict(source))
  return hf_to_official(state_dict) if is_hf_layout(state_dict) else state_dict


# ---------------------------------------------------------------------------------------------
# Architecture inference and strict filling.

def _count_indices(keys, prefix):
  indices = {int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
  return max(indices) + 1 if indices else 0


def _infer_resnet_depth(state_dict) -> int:
  blocks = tuple(_count_indices(state_dict, f"backbone.0.body.layer{i}.") for i in range(1, 5))
  kind = "bottleneck" if "backbone.0.body.layer1.0.conv3.weight" in state_dict else "basic"
  depths = [d for d, layout in backbone_lib.RESNET_LAYOUTS.items() if layout == (kind, blocks)]
  if not depths:
    raise CheckpointMismatchError(f"Backbone with {kind} blocks per stage {blocks} is not a supported ResNet.")
  return depths[0]


def infer_model_config(state_dict: Mapping[str, np.ndarray], dilation: bool = False,
                       num_heads: int = 8) -> dict[str, Any]:
  """Reads the DETR architecture from official-layout keys and shapes.

  Depth, num_classes, queries, layer counts, widths, pre-norm and the position encoding are
  read; DC5 (`dilation`) and `num_heads` cannot be, so they are arguments.
  Raises:
    CheckpointMismatchError: the keys do not describe a supported DETR.
  """
  keys = list(state_dict)
  required = ["class_embed.weight", "query_embed.weight", "transformer.encoder.layers.0.linear1.weight"]
  absent = [k for k in required if k not in state_dict]
  if absent:
    raise CheckpointMismatchError(f"Not a DETR state dict: missing {absent}.")
  num_queries, hidden_dim = state_dict["query_embed.weight"].shape
  return {
      "num_classes": state_dict["class_embed.weight"].shape[0] - 1,
      "num_queries": int(num_queries),
      "hidden_dim": int(hidden_dim),
      "num_heads": num_heads,
      "num_encoder_layers": _count_indices(keys, "transformer.encoder.layers."),
      "num_decoder_layers": _count_indices(keys, "transformer.decoder.layers."),
      "dim_feedforward": int(state_dict["transformer.encoder.layers.0.linear1.weight"].shape[0]),
      "pre_norm": "transformer.encoder.norm.weight" in state_dict,
      "backbone_depth": _infer_resnet_depth(state_dict),
      "dilation": dilation,
      "position_embedding": "learned" if "backbone.1.row_embed.weight" in state_dict else "sine",
      "masks": "mask_head.out_lay.weight" in state_dict,
  }


def _variable_shapes(model) -> dict[tuple[str, ...], tuple[int, ...]]:
  shapes = jax.eval_shape(lambda: detr_lib.init_variables(model, jax.random.PRNGKey(0)))
  return {path: leaf.shape for path, leaf in flax.traverse_util.flatten_dict(flax.core.unfreeze(shapes)).items()}


def _fill(shapes, state_dict, what: str):
  """Strictly maps official keys onto Flax leaves {(collection, *path): shape}."""
  by_key = {official_key(path[1:]): path for path in shapes}
  missing = sorted(set(by_key) - set(state_dict))
  unexpected = sorted(set(state_dict) - set(by_key))
  filled, mismatched = {}, []
  for key in sorted(set(by_key) & set(state_dict)):
    path = by_key[key]
    value = _from_torch_layout(path, state_dict[key])
    if value.shape != tuple(shapes[path]):
      expected = _to_torch_layout(path, np.empty(shapes[path], np.float32)).shape
      mismatched.append(f"{key}: checkpoint {tuple(state_dict[key].shape)}, model {tuple(expected)}")
    filled[path] = value
  if missing or unexpected or mismatched:
    lines = [f"The checkpoint does not fit {what}."]
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("shape mismatches", mismatched)):
      if items:
        lines.append(f"{len(items)} {title}:")
        lines.extend(f"  {item}" for item in items)
    raise CheckpointMismatchError("\n".join(lines))
  return filled


def model_config(model: detr_lib.DETR) -> dict[str, Any]:
  """The DETR attributes of `model` as a plain dict (inverse of `detr.from_config`)."""
  return {field: getattr(model, field) for field in detr_lib.DETR.__dataclass_fields__
          if field not in ("parent", "name")}


def describe(config) -> str:
  """A one-line name such as "DETR-R50-DC5 (91 classes, 100 queries)" for a model config dict."""
  return (f"DETR-R{config['backbone_depth']}{'-DC5' if config['dilation'] else ''}"
          f"{'-panoptic' if config.get('masks') else ''} ({config['num_classes']} classes, {config['num_queries']} queries)")


def load_pytorch_checkpoint(source, dilation: bool = False, num_heads: int = 8, **overrides):
  """Loads an official or Hugging Face DETR checkpoint into a Flax DETR.

  Args:
    source: a file path (`.pth`, `.bin`, `.safetensors`) or a state dict of tensors/arrays.
    dilation: True for DC5 checkpoints (it cannot be read from the keys).
    num_heads: attention heads (8 in every published model; not readable from shapes).
    **overrides: DETR attributes to force (e.g. `backbone_depth=50`, `dtype="bfloat16"`,
      `aux_loss=False`); architecture fields that disagree with the checkpoint raise.
  Returns:
    (model, variables): a `detr.DETR` and {"params", "batch_stats"} of float32 arrays.
  Raises:
    FileNotFoundError: no such file.
    CheckpointMismatchError: missing, unexpected or shape-mismatched keys, all listed.
  """
  state_dict = to_official_layout(source)
  config = {**infer_model_config(state_dict, dilation, num_heads), **overrides}
  model = detr_lib.from_config(config)
  filled = _fill(_variable_shapes(model), state_dict, describe(config))
  variables = flax.traverse_util.unflatten_dict({p: jax.numpy.asarray(v) for p, v in filled.items()})
  return model, variables


def load_torchvision_backbone(source, depth: int | None = None):
  """Reads a torchvision ResNet ImageNet checkpoint as the DETR backbone.

  The classifier (`fc.*`) and `num_batches_tracked` are dropped; everything else must fit.
  Returns:
    {"params": {"backbone": ...}, "batch_stats": {"backbone": ...}} to merge into DETR variables.
  Raises:
    CheckpointMismatchError: the keys are not a torchvision ResNet of a supported depth.
  """
  state_dict = {f"backbone.0.body.{k}": v for k, v in read_state_dict(source).items()
                if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
  depth = depth or _infer_resnet_depth(state_dict)
  shapes = {p: s for p, s in _variable_shapes(detr_lib.DETR(backbone_depth=depth)).items() if p[1] == "backbone"}
  filled = _fill(shapes, state_dict, f"a torchvision ResNet-{depth}")
  return flax.traverse_util.unflatten_dict({p: jax.numpy.asarray(v) for p, v in filled.items()})


def to_pytorch_state_dict(variables) -> dict[str, np.ndarray]:
  """Exports {"params", "batch_stats"} to the official key layout as float32 numpy arrays.

  The result loads into the official `DETR` (or, with a mask head, `DETRsegm`, whose detector
  keys start with `detr.`) with `load_state_dict(strict=True)` after `torch.from_numpy`; for an
  imported checkpoint it equals the original exactly.
  """
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables))
  panoptic = any(path[1] in segmentation.MODULE_NAMES for path in flat)
  prefix = lambda path: PANOPTIC_PREFIX if panoptic and path[1] not in segmentation.MODULE_NAMES else ""
  return {prefix(path) + official_key(path[1:]): np.asarray(_to_torch_layout(path, np.asarray(value, np.float32)))
          for path, value in flat.items()}


def to_hf_state_dict(variables, hf_keys) -> dict[str, np.ndarray]:
  """Exports {"params", "batch_stats"} to a Hugging Face DETR layout, key for key.

  `hf_keys` are the keys of the target model's `state_dict()` (see `hf_model`); each is mapped to
  its official key by the import rules, and fused `in_proj` rows are split into q/k/v. For an
  imported HF checkpoint the result equals the original exactly.
  Raises:
    CheckpointMismatchError: a target key has no source, or a variable has no target.
  """
  official = _without_panoptic_prefix(to_pytorch_state_dict(variables))
  exported, used, missing = {}, set(), []
  for hf_key in hf_keys:
    source, projection = _official_source(hf_key[len(PANOPTIC_PREFIX):] if hf_key.startswith(PANOPTIC_PREFIX)
                                          else hf_key)
    if source not in official:
      missing.append(f"{hf_key} (official {source})")
      continue
    value = official[source]
    if projection:
      width, row = value.shape[0] // 3, "qkv".index(projection)
      value = value[row * width:(row + 1) * width]
    exported[hf_key] = value
    used.add(source)
  unused = sorted(set(official) - used)
  if missing or unused:
    raise CheckpointMismatchError("The model does not fit the Hugging Face layout.\n"
                                  f"{len(missing)} target keys without a source: {missing}\n"
                                  f"{len(unused)} variables without a target: {unused}")
  return exported


def hf_model(config: Mapping[str, Any]):
  """transformers' DetrForObjectDetection (DetrForSegmentation with `masks`) of the architecture
  `config` (a `model_config` dict), with an HF-ResNet backbone and random weights: the export target.

  Raises:
    ValueError: DC5 or pre-norm, which transformers' DETR lacks for its own ResNet backbone.
  """
  from transformers import DetrConfig, DetrForObjectDetection, DetrForSegmentation, ResNetConfig
  if config["dilation"] or config["pre_norm"]:
    raise ValueError(f"{describe(config)}: transformers' DETR has no DC5 or pre-norm with an HF-ResNet backbone.")
  kind, blocks = backbone_lib.RESNET_LAYOUTS[config["backbone_depth"]]
  stages = ["stage1", "stage2", "stage3", "stage4"] if config["masks"] else ["stage4"]
  resnet = ResNetConfig(layer_type=kind, depths=list(blocks), out_features=stages,
                        hidden_sizes=[w * backbone_lib.EXPANSION[kind] for w in backbone_lib.STAGE_WIDTHS])
  hf_config = DetrConfig(
      use_timm_backbone=False, use_pretrained_backbone=False, backbone=None, backbone_config=resnet,
      num_labels=config["num_classes"], num_queries=config["num_queries"], d_model=config["hidden_dim"],
      encoder_layers=config["num_encoder_layers"], decoder_layers=config["num_decoder_layers"],
      encoder_attention_heads=config["num_heads"], decoder_attention_heads=config["num_heads"],
      encoder_ffn_dim=config["dim_feedforward"], decoder_ffn_dim=config["dim_feedforward"],
      dropout=config["dropout"], attention_dropout=config["dropout"], activation_dropout=config["dropout"],
      # Off whatever the model's aux_loss: transformers' auxiliary mode feeds each layer's normed output to the next
      # layer (the official decoder feeds the un-normed one), which would change the exported model's outputs.
      position_embedding_type=config["position_embedding"], auxiliary_loss=False)
  return (DetrForSegmentation if config["masks"] else DetrForObjectDetection)(hf_config)


def save_hf_pretrained(model: detr_lib.DETR, variables, directory: str) -> None:
  """Writes a transformers `from_pretrained` directory (config.json, model.safetensors).

  Raises:
    ValueError: see `hf_model`. CheckpointMismatchError: see `to_hf_state_dict`.
  """
  import torch
  target = hf_model(model_config(model))
  state_dict = to_hf_state_dict(variables, target.state_dict().keys())
  target.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, strict=True)
  target.save_pretrained(directory)


# ---------------------------------------------------------------------------------------------
# Orbax checkpoints of a ported model.

def save_checkpoint(directory: str, model: detr_lib.DETR, variables) -> None:
  """Writes `variables` (orbax) and the model's attributes (JSON) under `directory`.

  Raises:
    FileExistsError: `directory` already holds a checkpoint.
  """
  import orbax.checkpoint as ocp
  directory = os.path.abspath(directory)
  if os.path.exists(os.path.join(directory, VARIABLES_DIR)):
    raise FileExistsError(f"{directory} already holds a checkpoint; choose an empty directory.")
  os.makedirs(directory, exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(directory, VARIABLES_DIR), variables)
  with open(os.path.join(directory, MODEL_CONFIG_FILE), "w") as f:
    json.dump(model_config(model), f, indent=2)


def load_checkpoint(directory: str):
  """Reads a checkpoint written by `save_checkpoint`. Returns (model, variables).

  Raises:
    FileNotFoundError: `directory` has no model_config.json or variables.
  """
  import orbax.checkpoint as ocp
  directory = os.path.abspath(directory)
  config_path = os.path.join(directory, MODEL_CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{directory} is not a detr_jax checkpoint (no {MODEL_CONFIG_FILE}).")
  with open(config_path) as f:
    model = detr_lib.from_config(json.load(f))
  with ocp.StandardCheckpointer() as checkpointer:
    variables = checkpointer.restore(os.path.join(directory, VARIABLES_DIR))
  return model, variables


def save_pytorch_checkpoint(variables, path: str) -> None:
  """Writes `{"model": official state dict}` with torch.save, atomically (temp file + rename)."""
  import torch
  state_dict = {k: torch.from_numpy(np.array(v)) for k, v in to_pytorch_state_dict(variables).items()}
  tmp_path = f"{path}.tmp"
  torch.save({"model": state_dict}, tmp_path)
  os.replace(tmp_path, path)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m detr_jax.porting", description=__doc__.split("\n")[0])
  commands = parser.add_subparsers(dest="command", required=True)
  import_cmd = commands.add_parser("import", help="PyTorch/HF checkpoint -> orbax checkpoint directory")
  import_cmd.add_argument("source")
  import_cmd.add_argument("out_dir")
  import_cmd.add_argument("--dilation", action="store_true", help="the checkpoint is DC5")
  import_cmd.add_argument("--num_heads", type=int, default=8)
  export_cmd = commands.add_parser("export", help="orbax checkpoint directory or train.py workdir -> official .pth "
                                                  "(or, with --hf, a transformers from_pretrained directory)")
  export_cmd.add_argument("checkpoint_dir")
  export_cmd.add_argument("destination")
  export_cmd.add_argument("--hf", action="store_true", help="write transformers' layout (HF-ResNet backbone)")
  args = parser.parse_args(argv)
  try:
    if args.command == "import":
      model, variables = load_pytorch_checkpoint(args.source, dilation=args.dilation, num_heads=args.num_heads)
      save_checkpoint(args.out_dir, model, variables)
      print(f"Imported {describe(model_config(model))} into {args.out_dir}")
    else:
      from detr_jax import training   # training imports this module
      model, variables = training.load_model(args.checkpoint_dir)
      if args.hf:
        save_hf_pretrained(model, variables, args.destination)
      else:
        save_pytorch_checkpoint(variables, args.destination)
      print(f"Exported {args.checkpoint_dir} to {args.destination} ({'Hugging Face' if args.hf else 'official'} layout)")
  except (CheckpointMismatchError, FileNotFoundError, FileExistsError, ValueError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
