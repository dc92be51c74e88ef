"""Hugging Face transformers' DETR layouts: reading them, and writing `from_pretrained` directories.

Read: `DetrForObjectDetection` / `DetrForSegmentation` state dicts and `model.safetensors`, in
the hub files' layout (timm backbone names, `self_attn.out_proj`, `fc1`) and in the installed
transformers' layout (HF ResNet backbone names, `o_proj`, `mlp.fc1`); both are renamed into the
official layout (`official.py`). Written: the installed transformers' layout, key for key, in a
`from_pretrained` directory that transformers' object-detection pipeline runs (class names in
config.json, the image processor in preprocessor_config.json).
"""

import re
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from detr_jax import checkpoints, extras
from detr_jax.data import image_sizes
from detr_jax.models import backbone as backbone_lib
from detr_jax.models import detr as detr_lib
from detr_jax.porting import official


def _shift_stage(match):
  return f"body.layer{int(match.group(1)) + 1}.{match.group(2)}."


# Hugging Face backbone key -> official key (timm names in the hub files, HF ResNet names in the
# installed transformers); shared by every family's Hugging Face layout.
BACKBONE_RULES = [
    (r"^model\.backbone\.(conv_encoder\.)?model\.", "backbone.0.body."),
    (r"body\.embedder\.embedder\.convolution\.", "body.conv1."),
    (r"body\.embedder\.embedder\.normalization\.", "body.bn1."),
    (r"body\.encoder\.stages\.(\d+)\.layers\.(\d+)\.", _shift_stage),
    (r"\.shortcut\.convolution\.", ".downsample.0."),
    (r"\.shortcut\.normalization\.", ".downsample.1."),
    (r"\.layer\.(\d+)\.convolution\.", lambda m: f".conv{int(m.group(1)) + 1}."),
    (r"\.layer\.(\d+)\.normalization\.", lambda m: f".bn{int(m.group(1)) + 1}."),
]

# Hugging Face DETR key -> official key, applied in order. Covers the hub files (timm backbone) and
# the installed transformers (HF ResNet backbone, o_proj, mlp.fc1).
_HF_RULES = BACKBONE_RULES + [
    (r"^model\.(backbone\.)?position_embedding\.row_embeddings\.", "backbone.1.row_embed."),
    (r"^model\.(backbone\.)?position_embedding\.column_embeddings\.", "backbone.1.col_embed."),
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


def hf_to_official(state_dict: Mapping[str, np.ndarray], rules=None) -> dict[str, np.ndarray]:
  """Renames a Hugging Face state dict into the official layout (DETR's rules unless `rules`,
  a list of (pattern, replacement) applied in order, is given).

  Separate q/k/v projections are concatenated into `in_proj_weight` [3d, d] / `in_proj_bias`
  (rows q, k, v, as in `nn.MultiheadAttention`); `num_batches_tracked` entries are dropped.
  Raises:
    checkpoints.CheckpointMismatchError: an attention block lacks one of its q/k/v projections.
  """
  renamed, qkv = {}, {}
  for key, value in state_dict.items():
    if key.endswith("num_batches_tracked"):
      continue
    target, projection = official_source(key, rules or _HF_RULES)
    if projection:
      qkv.setdefault(target, {})[projection] = value
    else:
      renamed[target] = value
  for target, parts in qkv.items():
    if set(parts) != {"q", "k", "v"}:
      raise checkpoints.CheckpointMismatchError(f"{target}: found projections {sorted(parts)}, expected q, k and v.")
    renamed[target] = np.concatenate([parts["q"], parts["k"], parts["v"]])
  return renamed


def official_source(hf_key: str, rules=None) -> tuple[str, Optional[str]]:
  """(official key, projection) of a Hugging Face key (without the `detr.` prefix) under `rules`
  (default DETR's): for a separate q/k/v projection, the fused `in_proj_weight` / `in_proj_bias`
  key and "q", "k" or "v"."""
  key = hf_key
  for pattern, replacement in rules or _HF_RULES:
    key = re.sub(pattern, replacement, key)
  match = re.match(r"^(.*)\.([qkv])_proj\.(weight|bias)$", key)
  if match:
    return f"{match.group(1)}.in_proj_{match.group(3)}", match.group(2)
  return key, None


def to_hf_state_dict(variables, hf_keys) -> dict[str, np.ndarray]:
  """Exports {"params", "batch_stats"} to a Hugging Face DETR layout, key for key.

  `hf_keys` are the keys of the target model's `state_dict()` (see `hf_model`); each is mapped to
  its official key by the import rules, and fused `in_proj` rows are split into q/k/v. For an
  imported HF checkpoint the result equals the original exactly.
  Raises:
    checkpoints.CheckpointMismatchError: a target key has no source, or a variable has no target.
  """
  official_state = official.without_panoptic_prefix(official.to_pytorch_state_dict(variables))
  strip = lambda key: key[len(official.PANOPTIC_PREFIX):] if key.startswith(official.PANOPTIC_PREFIX) else key
  return official_to_hf(official_state, hf_keys, lambda key: official_source(strip(key)))


def official_to_hf(official_state: Mapping[str, np.ndarray], hf_keys, source_of) -> dict[str, np.ndarray]:
  """An official-layout state dict rearranged into the Hugging Face keys `hf_keys`, strictly.

  `source_of(hf_key)` gives (official key, projection) as `official_source` does; a
  fused `in_proj` is split into its q/k/v rows.
  Raises:
    checkpoints.CheckpointMismatchError: a target key has no source, or an official key no target.
  """
  exported, used, missing = {}, set(), []
  for hf_key in hf_keys:
    source, projection = source_of(hf_key)
    if source not in official_state:
      missing.append(f"{hf_key} (official {source})")
      continue
    value = official_state[source]
    if projection:
      width, row = value.shape[0] // 3, "qkv".index(projection)
      value = value[row * width:(row + 1) * width]
    exported[hf_key] = value
    used.add(source)
  unused = sorted(set(official_state) - used)
  if missing or unused:
    raise checkpoints.CheckpointMismatchError("The model does not fit the Hugging Face layout.\n"
                                  f"{len(missing)} target keys without a source: {missing}\n"
                                  f"{len(unused)} variables without a target: {unused}")
  return exported


def export_libraries(purpose: str = "exporting to transformers' layout") -> tuple:
  """(transformers, torch), which the export to transformers' layout needs; the `hf` extra installs both.

  Raises:
    extras.MissingExtraError: either is not installed; the message names `purpose` (e.g. "--hf").
  """
  return tuple(extras.require(module, purpose, "hf") for module in ("transformers", "torch"))


def hf_model(config: Mapping[str, Any]):
  """transformers' DetrForObjectDetection (DetrForSegmentation with `masks`) of the architecture
  `config` (a `model_config` dict), with an HF-ResNet backbone and random weights: the export target.

  Raises:
    ValueError: DC5 or pre-norm, which transformers' DETR lacks for its own ResNet backbone.
    extras.MissingExtraError: see `export_libraries`.
  """
  transformers, _ = export_libraries()
  if config["dilation"] or config["pre_norm"]:
    raise ValueError(f"{detr_lib.describe(config)}: transformers' DETR has no DC5 or pre-norm with an HF-ResNet backbone.")
  kind, blocks = backbone_lib.RESNET_LAYOUTS[config["backbone_depth"]]
  stages = ["stage1", "stage2", "stage3", "stage4"] if config["masks"] else ["stage4"]
  resnet = transformers.ResNetConfig(layer_type=kind, depths=list(blocks), out_features=stages,
                                     hidden_sizes=[w * backbone_lib.EXPANSION[kind] for w in backbone_lib.STAGE_WIDTHS])
  hf_config = transformers.DetrConfig(
      use_timm_backbone=False, use_pretrained_backbone=False, backbone=None, backbone_config=resnet,
      num_labels=config["num_classes"], num_queries=config["num_queries"], d_model=config["hidden_dim"],
      encoder_layers=config["num_encoder_layers"], decoder_layers=config["num_decoder_layers"],
      encoder_attention_heads=config["num_heads"], decoder_attention_heads=config["num_heads"],
      encoder_ffn_dim=config["dim_feedforward"], decoder_ffn_dim=config["dim_feedforward"],
      dropout=config["dropout"], attention_dropout=config["dropout"], activation_dropout=config["dropout"],
      # Off whatever the model's aux_loss: transformers' auxiliary mode feeds each layer's normed output to the next
      # layer (the official decoder feeds the un-normed one), which would change the exported model's outputs.
      position_embedding_type=config["position_embedding"], auxiliary_loss=False)
  return (transformers.DetrForSegmentation if config["masks"] else transformers.DetrForObjectDetection)(hf_config)


def save_hf_pretrained(model: detr_lib.DETR, variables, directory: str, categories: Optional[Sequence[Mapping]] = None,
                       scale: float = 1.0) -> None:
  """Writes a transformers `from_pretrained` directory that `pipeline("object-detection", model=directory)`
  runs: config.json (with `id2label` / `label2id` from `categories`), model.safetensors and
  preprocessor_config.json (DetrImageProcessor with the official eval preprocessing times `scale`).

  Args:
    categories: [{"id", "name", ...}] naming the class indices (`families.load_categories`); None keeps
      transformers' "LABEL_<i>" names. See `label_maps`.
    scale: the checkpoint's `data.scale` (1.0 = shorter side 800, longer at most 1333).
  Raises:
    ValueError: see `hf_model` and `label_maps`. checkpoints.CheckpointMismatchError: see `to_hf_state_dict`.
  """
  target = hf_model(detr_lib.model_config(model))
  write_pretrained(target, to_hf_state_dict(variables, target.state_dict().keys()), directory,
                   eval_image_processor("DetrImageProcessorPil", scale), categories)


def label_maps(categories: Sequence[Mapping], num_classes: int) -> tuple[dict[int, str], dict[str, int]]:
  """(id2label, label2id) of a model with `num_classes` class slots whose indices `categories` name.

  id2label has every slot, "N/A" where no category has that id (COCO's unused ids), as the hub's
  facebook/detr-resnet-50 config.json; label2id has the named slots only, so that it is one-to-one.
  Raises:
    ValueError: a category id outside [0, num_classes), which the model cannot predict.
  """
  names = {int(c["id"]): c["name"] for c in categories}
  outside = sorted(i for i in names if not 0 <= i < num_classes)
  if outside:
    raise ValueError(f"Category ids {outside} do not fit the model's {num_classes} class slots.")
  return ({i: names.get(i, "N/A") for i in range(num_classes)}, {name: i for i, name in sorted(names.items())})


def eval_image_processor(class_name: str, scale: float = 1.0):
  """transformers' image processor `class_name` (DETR's or Deformable DETR's PIL class) set to the official
  eval preprocessing (`transforms.eval_resize`, `transforms.normalize`): shorter side round(800 * scale),
  longer at most round(1333 * scale), bilinear; RGB / 255 normalised with ImageNet's mean and std; a batch
  padded to its largest image with a pixel mask (an image alone is not padded).

  The PIL classes (`DetrImageProcessorPil`) run without torchvision, and their `save_pretrained` records
  the base name ("DetrImageProcessor"), from which `AutoImageProcessor` (and so `pipeline`) picks the
  torchvision class where torchvision is installed and the PIL class elsewhere.
  Raises:
    extras.MissingExtraError: see `export_libraries`.
  """
  transformers, _ = export_libraries()
  image_utils = transformers.image_utils
  return getattr(transformers, class_name)(
      size={"shortest_edge": image_sizes.scaled(image_sizes.EVAL_SHORTER_SIDE, scale),
            "longest_edge": image_sizes.scaled(image_sizes.MAX_SIDE, scale)},
      resample=image_utils.PILImageResampling.BILINEAR, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
      image_mean=list(image_utils.IMAGENET_DEFAULT_MEAN), image_std=list(image_utils.IMAGENET_DEFAULT_STD),
      do_pad=True)


def write_pretrained(target, state_dict, directory: str, processor, categories: Optional[Sequence[Mapping]] = None
                     ) -> None:
  """Loads `state_dict` (numpy, every key of `target`) into the transformers model `target` strictly, names
  its class slots after `categories` (`label_maps`; None keeps "LABEL_<i>") and writes it with
  `save_pretrained` (config.json, model.safetensors) next to the image processor `processor`
  (preprocessor_config.json).

  Raises:
    ValueError: see `label_maps`; nothing is written then.
  """
  _, torch = export_libraries()
  if categories is not None:
    target.config.id2label, target.config.label2id = label_maps(categories, target.config.num_labels)
  target.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, strict=True)
  target.save_pretrained(directory)
  processor.save_pretrained(directory)
