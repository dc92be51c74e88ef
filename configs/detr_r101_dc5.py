"""DETR-DC5-R101 (detr-r101-dc5-a2e86def.pth: 44.9 AP)."""

from configs import detr_r101


def get_config():
  config = detr_r101.get_config()
  config.model.dilation = True
  return config
