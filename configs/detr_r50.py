"""DETR-R50, the official COCO model (detr-r50-e632da11.pth: 42.0 AP after 500 epochs)."""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict(dict(
      name="detr",               # the model family (detr_jax/families.py)
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
      mask_loss_coef=1.0, dice_loss_coef=1.0,         # focal and Dice, when model.masks
      solver="host",   # "host": scipy via callback (9x the official matcher on CPU); "device": optax
  ))
  config.data = ml_collections.ConfigDict(dict(
      source="coco_folder",      # "tfds" (coco/2017 in a TFDS data dir / GCS bucket) or "generated"
      data_dir="",               # COCO folder: annotations/instances_{split}.json + {split}/
      train_split="train2017",   # tfds: "train"
      eval_split="val2017",      # tfds: "validation"
      train_max_images=0,        # > 0: train on the first N images by id only
      scale=1.0,                 # multiplies every image size of the recipe (800/1333)
      augment=True,              # the official training augmentation; False: eval resize
      max_boxes=100,
      pad_multiple=128,          # batches padded to multiples of this: a handful of XLA programs
      fixed_size=None,           # or (H, W): one program
      keep_empty_train=True,
  ))
  config.optimizer = ml_collections.ConfigDict(dict(
      lr=1e-4,
      lr_backbone=1e-5,          # layer2..layer4; the stem, layer1 and all BatchNorm are frozen
      weight_decay=1e-4,
      clip_max_norm=0.1,
      lr_drop_epochs=200,        # lr x0.1 after this many epochs
      train_mask_head_only=False,  # panoptic recipe: train bbox_attention + mask head on a frozen detector
  ))
  config.init = ml_collections.ConfigDict(dict(
      checkpoint="",             # DETR .pth / .safetensors (official or HF) or orbax dir: the whole model
      backbone_checkpoint="",    # torchvision ResNet .pth: the backbone only (ImageNet weights)
      reset_class_head=False,    # fine-tuning on other classes: fresh class_embed for model.num_classes
  ))
  config.batch_size = 64         # images per step over all devices (official: 2 per GPU on 32 V100s)
  config.num_epochs = 300
  config.num_train_steps = 0     # > 0 overrides num_epochs
  config.per_device_eval_batch_size = 2   # images per device in evaluation (official: 2 per GPU)
  config.eval_every_steps = 0    # 0: evaluate only when training ends
  config.eval_max_images = 0     # > 0: evaluate on the first N images only
  config.log_every_steps = 100
  config.checkpoint_every_steps = 1000
  config.checkpoints_to_keep = 3
  config.seed = 42
  return config
