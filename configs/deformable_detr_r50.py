"""Deformable DETR-R50, multi-scale (official r50_deformable_detr-checkpoint.pth: 44.5 AP after 50 epochs).

The official `main.py` recipe: 4 feature levels (layer2..4 and a stride-2 conv), 300 queries, FFN
1024, 4 sampling points; AdamW lr 2e-4, backbone 2e-5, sampling offsets and reference points at
lr x 0.1; 50 epochs with the drop at 40; batch 32 (2 per GPU on 16 GPUs); focal matching and loss.
The other variants change `model` only: deformable_detr_r50_single_scale.py, ..._single_scale_dc5.py,
..._refine.py (iterative box refinement) and ..._two_stage.py.
"""

import ml_collections

from configs import detr_r50


def get_config():
  config = detr_r50.get_config()   # the data pipeline, checkpoints and logging are DETR's
  config.model = ml_collections.ConfigDict(dict(
      name="deformable_detr",    # the model family (detr_jax/families.py)
      num_classes=91,            # sigmoid classes, category id = class index; no "no object" column
      num_queries=300,
      hidden_dim=256,
      num_heads=8,
      num_encoder_layers=6,
      num_decoder_layers=6,
      dim_feedforward=1024,
      dropout=0.1,
      num_feature_levels=4,      # 1: layer4 only (single-scale)
      enc_n_points=4,
      dec_n_points=4,
      backbone_depth=50,
      dilation=False,
      with_box_refine=False,
      two_stage=False,           # needs with_box_refine
      aux_loss=True,
      dtype="float32",
  ))
  config.loss = ml_collections.ConfigDict(dict(
      class_cost=2.0, bbox_cost=5.0, giou_cost=2.0,   # matching: focal class cost, L1, -GIoU
      focal_alpha=0.25,
      cls_loss_coef=2.0, bbox_loss_coef=5.0, giou_loss_coef=2.0,
      solver="host",
  ))
  # lr_linear_proj_mult: sampling_offsets and reference_points train at lr x 0.1.
  config.optimizer.update(dict(lr=2e-4, lr_backbone=2e-5, lr_linear_proj_mult=0.1, lr_drop_epochs=40))
  config.batch_size = 32
  config.num_epochs = 50
  return config
