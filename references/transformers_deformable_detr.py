"""transformers' PyTorch Deformable DETR as the reference implementation: built from config with
random, non-trivial weights (no hub), heads shared or distinct as in the official model."""

import numpy as np

from references.transformers_detr import dilate_last_stage, randomise_parameters


def hf_deformable_detr(num_feature_levels=4, with_box_refine=False, two_stage=False, dilation=False,
                       num_labels=91, seed=0, **config_overrides):
  """transformers' DeformableDetrForObjectDetection with random weights, eval mode.

  Every parameter is non-trivial (`randomise_parameters`), and the sampling offsets get biases of
  up to 4 pixels so that sampling points fall outside the maps too. The heads follow the official
  model: one shared head without refinement (transformers' tying), distinct heads with it
  (`tie_word_embeddings=False`), and the decoder's copies (`model.decoder.bbox_embed`, two-stage
  `model.decoder.class_embed`) equal to the detector's, as the official model registers one
  module under both names. DC5 as in `dilate_last_stage` (transformers builds it only with timm).
  Two-stage: the `enc_output` bias is set so that the proposal score of padded and invalid
  positions (all one value) ranks below every real position.
  """
  import torch
  from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, ResNetConfig
  torch.manual_seed(seed)
  stages = ["stage2", "stage3", "stage4"] if num_feature_levels > 1 else ["stage4"]
  config = DeformableDetrConfig(
      use_timm_backbone=False, use_pretrained_backbone=False, backbone=None, num_labels=num_labels,
      backbone_config=ResNetConfig(out_features=stages), num_feature_levels=num_feature_levels,
      with_box_refine=with_box_refine, two_stage=two_stage, tie_word_embeddings=not with_box_refine,
      **config_overrides)
  model = DeformableDetrForObjectDetection(config)
  if dilation:
    dilate_last_stage(model.model.backbone.model)
  randomise_parameters(model)
  with torch.no_grad():
    model.model.level_embed.normal_()
    for module in model.modules():
      if hasattr(module, "sampling_offsets"):
        module.sampling_offsets.bias.uniform_(-4.0, 4.0)
    if with_box_refine:
      model.model.decoder.bbox_embed.load_state_dict(model.bbox_embed.state_dict())
    if two_stage:
      model.model.decoder.class_embed.load_state_dict(model.class_embed.state_dict())
      _rank_invalid_proposals_last(model)
  return model.eval()


def _rank_invalid_proposals_last(model) -> None:
  """Padded and invalid positions all reach the proposal class head as LayerNorm(enc_output.bias):
  point that bias against the direction that raises the class-0 logit."""
  head = model.class_embed[model.config.decoder_layers]
  direction = model.model.enc_output_norm.weight * head.weight[0]
  bias = -direction / direction.norm() * 3.0
  model.model.enc_output.bias.copy_(bias)
  normed = model.model.enc_output_norm(bias[None])
  assert float(head(normed)[0, 0]) < -5.0, "invalid proposals would not rank last"


def hf_state_dict(model) -> dict:
  """The reference's state dict as float32 numpy arrays."""
  return {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}


_LAYER_MODULES = {
    # transformers module of a layer -> official module (models/deformable_transformer.py).
    "encoder": {"self_attn_layer_norm": "norm1", "final_layer_norm": "norm2", "mlp.fc1": "linear1",
                "mlp.fc2": "linear2"},
    "decoder": {"self_attn.o_proj": "self_attn.out_proj", "self_attn_layer_norm": "norm2",
                "encoder_attn_layer_norm": "norm1", "final_layer_norm": "norm3", "mlp.fc1": "linear1",
                "mlp.fc2": "linear2"},
}
_TRANSFORMER_MODULES = ("level_embed", "reference_points", "enc_output", "enc_output_norm", "pos_trans", "pos_trans_norm")


def hf_deformable_to_official_by_hand(state_dict) -> dict[str, np.ndarray]:
  """transformers' DeformableDetrForObjectDetection state dict renamed to the official keys, written
  from the official module names independently of `detr_jax.porting` (decoder q/k/v stacked into
  `in_proj`, `num_batches_tracked` dropped)."""
  from references.transformers_detr import _official_resnet_key
  official, projections = {}, {}
  for key, value in state_dict.items():
    value = value.detach().numpy() if hasattr(value, "detach") else np.asarray(value)
    if key.endswith("num_batches_tracked"):
      continue
    parts = key.split(".")
    if parts[:3] == ["model", "backbone", "model"]:
      name = "backbone.0.body." + _official_resnet_key(parts[3:])
    elif parts[0] in ("class_embed", "bbox_embed"):
      name = key
    elif parts[1] in ("encoder", "decoder") and parts[2] == "layers":
      kind, layer, module, leaf = parts[1], parts[3], ".".join(parts[4:-1]), parts[-1]
      base = f"transformer.{kind}.layers.{layer}."
      if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        projections.setdefault(f"{base}self_attn.in_proj_{leaf}", {})[module[-6]] = value
        continue
      if module.startswith("encoder_attn."):
        module = "cross_attn." + module[len("encoder_attn."):]
      name = base + _LAYER_MODULES[kind].get(module, module) + "." + leaf
    elif parts[1] == "decoder" and parts[2] in ("bbox_embed", "class_embed"):
      name = "transformer." + ".".join(parts[1:])
    elif parts[1] in _TRANSFORMER_MODULES:
      name = "transformer." + ".".join(parts[1:])
    elif parts[1] == "input_proj":
      name = ".".join(parts[1:])
    elif parts[1] == "query_position_embeddings":
      name = "query_embed." + parts[-1]
    else:
      raise KeyError(f"no official name for {key}")
    official[name] = value
  for name, qkv in projections.items():
    official[name] = np.concatenate([qkv["q"], qkv["k"], qkv["v"]])
  return official
