"""DETR-R101 (detr-r101-2c7b67e5.pth: 43.5 AP)."""

from configs import detr_r50


def get_config():
  config = detr_r50.get_config()
  config.model.backbone_depth = 101
  return config
