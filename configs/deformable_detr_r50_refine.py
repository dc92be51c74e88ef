"""Deformable DETR-R50 + iterative box refinement: one class and box head per decoder layer, each
layer refining the previous layer's boxes (official `--with_box_refine`: 46.2 AP after 50 epochs)."""

from configs import deformable_detr_r50


def get_config():
  config = deformable_detr_r50.get_config()
  config.model.with_box_refine = True
  return config
