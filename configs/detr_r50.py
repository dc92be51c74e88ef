"""DETR-R50, the official COCO model (detr-r50-e632da11.pth: 42.0 AP after 500 epochs)."""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict(dict(
      num_classes=91,            # COCO category ids 1..90 index the classifier; "no object" is slot 91.
      num_queries=100,
      hidden_dim=256,
      num_heads=8,
      num_encoder_layers=6,
      num_decoder_layers=6,
      dim_feedforward=2048,
      dropout=0.1,
      pre_norm=False,
      backbone_depth=50,
      dilation=False,
      position_embedding="sine",
      aux_loss=True,
      dtype="float32",           # "bfloat16": bf16 matmuls/convs, float32 params, softmax and norms.
  ))
  config.loss = ml_collections.ConfigDict(dict(
      class_cost=1.0, bbox_cost=5.0, giou_cost=2.0,   # matching cost weights
      eos_coef=0.1,                                   # cross-entropy weight of "no object"
      bbox_loss_coef=5.0, giou_loss_coef=2.0,         # loss_ce has weight 1
      solver="host",   # "host": scipy via callback (9x the official matcher on CPU); "device": optax
  ))
  config.data = ml_collections.ConfigDict(dict(
      source="coco_folder",      # or "tfds" (coco/2017 in a TFDS data dir / GCS bucket)
      data_dir="",               # COCO folder: annotations/instances_{split}.json + {split}/
      train_split="train2017",   # tfds: "train"
      eval_split="val2017",      # tfds: "validation"
      scale=1.0,                 # multiplies every image size of the recipe (800/1333)
      max_boxes=100,
      pad_multiple=128,          # batches padded to multiples of this: a handful of XLA programs
      fixed_size=None,           # or (H, W): one program
      keep_empty_train=True,
  ))
  config.seed = 42
  return config
