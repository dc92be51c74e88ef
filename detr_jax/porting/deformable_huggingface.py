"""Hugging Face transformers' Deformable DETR layouts (`DeformableDetrForObjectDetection`): reading
them through the official layout, and writing `from_pretrained` directories.

Two layouts are read: the installed transformers' module names (`state_dict()`: HF-ResNet backbone
under `model.backbone.model`, `o_proj`, `mlp.fc1`) and the names its `save_pretrained` writes and
the hub files use (`model.backbone.conv_encoder.model`, timm or HF-ResNet backbone names,
`out_proj`, `fc1`).

Mind the decoder's norms: transformers' `self_attn_layer_norm` is the official `norm2` and
`encoder_attn_layer_norm` is `norm1` (the official decoder names them in another order).
"""

from typing import Any, Mapping, Optional, Sequence

import numpy as np

from detr_jax.models import backbone as backbone_lib
from detr_jax.models import deformable_detr
from detr_jax.porting import deformable_official, huggingface

# Hugging Face key -> official key, applied in order (after the shared backbone rules).
_RULES = huggingface.BACKBONE_RULES + [
    (r"^model\.level_embed$", "transformer.level_embed"),
    (r"^model\.input_proj\.", "input_proj."),
    (r"^model\.query_position_embeddings\.", "query_embed."),
    (r"^model\.(encoder|decoder)\.layers\.", r"transformer.\1.layers."),
    (r"^model\.decoder\.(bbox_embed|class_embed)\.", r"transformer.decoder.\1."),
    (r"^model\.(reference_points|enc_output|enc_output_norm|pos_trans|pos_trans_norm)\.", r"transformer.\1."),
    (r"(encoder\.layers\.\d+)\.self_attn_layer_norm\.", r"\1.norm1."),
    (r"(encoder\.layers\.\d+)\.final_layer_norm\.", r"\1.norm2."),
    (r"(decoder\.layers\.\d+)\.self_attn_layer_norm\.", r"\1.norm2."),
    (r"(decoder\.layers\.\d+)\.encoder_attn_layer_norm\.", r"\1.norm1."),
    (r"(decoder\.layers\.\d+)\.final_layer_norm\.", r"\1.norm3."),
    (r"(decoder\.layers\.\d+)\.encoder_attn\.", r"\1.cross_attn."),
    (r"\.o_proj\.", ".out_proj."),
    (r"\.(mlp\.)?fc1\.", ".linear1."),
    (r"\.(mlp\.)?fc2\.", ".linear2."),
]


def is_hf_layout(state_dict: Mapping[str, Any]) -> bool:
  """True for transformers' Deformable DETR keys (`model.level_embed`)."""
  return "model.level_embed" in state_dict


def hf_to_official(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renames a transformers Deformable DETR state dict into the official layout (q/k/v fused into
  `in_proj`, `num_batches_tracked` dropped).

  Raises:
    checkpoints.CheckpointMismatchError: an attention block lacks one of its q/k/v projections.
  """
  return huggingface.hf_to_official(state_dict, _RULES)


def hf_model(config: Mapping[str, Any]):
  """transformers' DeformableDetrForObjectDetection of the architecture `config` (a
  `model_config` dict), HF-ResNet backbone, random weights: the export target. Heads are tied
  (one shared head) without refinement and distinct with it, as in the official model.

  Raises:
    ValueError: DC5, which transformers builds only with a timm backbone.
    extras.MissingExtraError: see `huggingface.export_libraries`.
  """
  transformers, _ = huggingface.export_libraries()
  if config["dilation"]:
    raise ValueError(f"{deformable_detr.describe(config)}: transformers' Deformable DETR has no DC5 with an "
                     "HF-ResNet backbone.")
  kind, blocks = backbone_lib.RESNET_LAYOUTS[config["backbone_depth"]]
  widths = [w * backbone_lib.EXPANSION[kind] for w in backbone_lib.STAGE_WIDTHS]
  stages = ["stage2", "stage3", "stage4"] if config["num_feature_levels"] > 1 else ["stage4"]
  resnet = transformers.ResNetConfig(layer_type=kind, depths=list(blocks), hidden_sizes=widths, out_features=stages)
  hf_config = transformers.DeformableDetrConfig(
      use_timm_backbone=False, use_pretrained_backbone=False, backbone=None, backbone_config=resnet,
      num_labels=config["num_classes"], num_queries=config["num_queries"], d_model=config["hidden_dim"],
      encoder_layers=config["num_encoder_layers"], decoder_layers=config["num_decoder_layers"],
      encoder_attention_heads=config["num_heads"], decoder_attention_heads=config["num_heads"],
      encoder_ffn_dim=config["dim_feedforward"], decoder_ffn_dim=config["dim_feedforward"],
      dropout=config["dropout"], attention_dropout=0.0, activation_dropout=0.0,
      num_feature_levels=config["num_feature_levels"], encoder_n_points=config["enc_n_points"],
      decoder_n_points=config["dec_n_points"], with_box_refine=config["with_box_refine"],
      two_stage=config["two_stage"], two_stage_num_proposals=config["num_queries"],
      tie_word_embeddings=not config["with_box_refine"], auxiliary_loss=False)
  return transformers.DeformableDetrForObjectDetection(hf_config)


def to_hf_state_dict(variables, hf_keys) -> dict[str, np.ndarray]:
  """Exports Deformable DETR variables to transformers' keys `hf_keys` (a target model's
  `state_dict()` keys), key for key.

  Raises:
    checkpoints.CheckpointMismatchError: a target key has no source, or a variable has no target.
  """
  official_state = deformable_official.to_pytorch_state_dict(variables)
  return huggingface.official_to_hf(official_state, hf_keys, lambda key: huggingface.official_source(key, _RULES))


def save_hf_pretrained(model: deformable_detr.DeformableDETR, variables, directory: str,
                       categories: Optional[Sequence[Mapping]] = None, scale: float = 1.0) -> None:
  """Writes a transformers `from_pretrained` directory that `pipeline("object-detection", model=directory)`
  runs: config.json (with `id2label` / `label2id` from `categories`), model.safetensors and
  preprocessor_config.json (DeformableDetrImageProcessor, whose post-processing is the official top-100
  sigmoid one, with the official eval preprocessing times `scale`). See `huggingface.save_hf_pretrained`.

  Raises:
    ValueError: see `hf_model` and `huggingface.label_maps`. checkpoints.CheckpointMismatchError: see
      `to_hf_state_dict`.
  """
  target = hf_model(deformable_detr.model_config(model))
  huggingface.write_pretrained(target, to_hf_state_dict(variables, target.state_dict().keys()), directory,
                               huggingface.eval_image_processor("DeformableDetrImageProcessorPil", scale), categories)
