"""DETR-DC5-R50: layer4 dilated, output stride 16 (detr-r50-dc5-f0fb7ef5.pth: 43.3 AP)."""

from configs import detr_r50


def get_config():
  config = detr_r50.get_config()
  config.model.dilation = True
  return config
