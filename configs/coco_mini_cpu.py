"""DETR at CPU size for a COCO folder the size of coco-mini (a few hundred images, 2 cores).

    python train.py --config configs/coco_mini_cpu.py --workdir DIR --config.data.data_dir=../shared/coco-mini

The recipe is the official one (AdamW, clip 0.1, set loss, augmentation) at a quarter of the
image size, with a ResNet-18 and a narrower, shallower transformer. With no ImageNet backbone
available here, the backbone is trained from scratch at the full learning rate; with one, set
init.backbone_checkpoint and restore lr_backbone to 1e-5.
"""

from configs import detr_r50


def get_config():
  config = detr_r50.get_config()
  config.model.update(hidden_dim=128, num_encoder_layers=3, num_decoder_layers=3, dim_feedforward=512,
                      backbone_depth=18)
  # Shorter side 120..200 px (eval 200), longer at most 333: one padded shape, one XLA program.
  config.data.update(scale=0.25, fixed_size=(336, 336), max_boxes=50)
  config.optimizer.update(lr=2e-4, lr_backbone=2e-4, lr_drop_epochs=1000)
  config.batch_size = 8
  config.per_device_eval_batch_size = 8
  config.num_epochs = 50
  config.log_every_steps = 10
  config.checkpoint_every_steps = 100
  return config
