"""Deformable DETR-R50, single-scale DC5: layer4 dilated, stride 16 (official `--num_feature_levels 1
--dilation`: 41.5 AP after 50 epochs)."""

from configs import deformable_detr_r50_single_scale


def get_config():
  config = deformable_detr_r50_single_scale.get_config()
  config.model.dilation = True
  return config
