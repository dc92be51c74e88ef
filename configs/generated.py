"""The built-in default: a small Deformable DETR that learns generated data in a few CPU minutes.

The data (`detr_jax.data.generated`: coloured rectangles on noise, 4 classes) is written to
`workdir/generated_data` in COCO format and read by the same pipeline as COCO; its validation
images are never seen in training. Deformable DETR, because it converges far faster than DETR
(docs/results.md): the model of `deformable_coco_mini_cpu` (ResNet-18 from scratch, width 128,
4 feature levels) with 2 encoder and 2 decoder layers and 20 queries, on images of 45..126 px,
for 300 steps (docs/results.md run 10: AP50 0.69 on the unseen validation images, 4 minutes on 2 cores).
"""

from configs import deformable_coco_mini_cpu


def get_config():
  config = deformable_coco_mini_cpu.get_config()
  config.model.update(num_classes=5, num_queries=20, num_encoder_layers=2, num_decoder_layers=2)
  # Shorter sides 45..76 px, longer at most 126: one padded shape, one XLA program.
  config.data.update(source="generated", train_split="train", eval_split="val", scale=0.095, fixed_size=(128, 128),
                     max_boxes=8)
  config.batch_size = 4
  config.num_train_steps = 300
  config.optimizer.lr_drop_epochs = 2   # 128 steps per epoch: the drop at step 256, near the official 4/5
  config.log_every_steps = 25
  return config
