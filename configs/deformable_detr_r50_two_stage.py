"""Deformable DETR-R50 ++ two-stage: the encoder proposes the decoder's 300 initial boxes
(official `--with_box_refine --two_stage`: 46.9 AP after 50 epochs)."""

from configs import deformable_detr_r50_refine


def get_config():
  config = deformable_detr_r50_refine.get_config()
  config.model.two_stage = True
  return config
