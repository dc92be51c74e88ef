"""Deformable DETR at CPU size for a COCO folder the size of coco-mini: the model, data and budget
class of configs/coco_mini_cpu.py (ResNet-18, 3 + 3 layers of width 128, 100 queries, a quarter
of the image size, batch 8), with Deformable DETR's 4 feature levels, focal loss and optimiser.

    python train.py --config configs/deformable_coco_mini_cpu.py --workdir DIR --config.data.data_dir=../shared/coco-mini

With no ImageNet backbone available here, the backbone trains from scratch at the full learning rate.
"""

from configs import coco_mini_cpu, deformable_detr_r50


def get_config():
  config = deformable_detr_r50.get_config()
  cpu = coco_mini_cpu.get_config()
  config.model.update(hidden_dim=128, num_encoder_layers=3, num_decoder_layers=3, dim_feedforward=512,
                      num_queries=100, backbone_depth=18)
  config.data = cpu.data
  config.optimizer.update(lr_backbone=config.optimizer.lr, lr_drop_epochs=1000)
  for name in ("batch_size", "per_device_eval_batch_size", "num_epochs", "log_every_steps", "checkpoint_every_steps"):
    config[name] = cpu[name]
  return config
