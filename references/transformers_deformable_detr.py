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
  import torch
  head = model.class_embed[model.config.decoder_layers]
  direction = model.model.enc_output_norm.weight * head.weight[0]
  bias = -direction / direction.norm() * 3.0
  model.model.enc_output.bias.copy_(bias)
  normed = model.model.enc_output_norm(bias[None])
  assert float(head(normed)[0, 0]) < -5.0, "invalid proposals would not rank last"


def hf_state_dict(model) -> dict:
  """The reference's state dict as float32 numpy arrays."""
  return {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
