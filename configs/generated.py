"""The built-in default: a small DETR trained for a few minutes on generated data (no download).

The data (`detr_jax.data.generated`: coloured rectangles, 4 classes) is written to
`workdir/generated_data` in COCO format and read by the same pipeline as COCO. The model is
`coco_mini_cpu`'s (ResNet-18, width 128) with 2 encoder and 2 decoder layers and 20 queries.
"""

from configs import coco_mini_cpu


def get_config():
  config = coco_mini_cpu.get_config()
  config.model.update(num_classes=5, num_queries=20, num_encoder_layers=2, num_decoder_layers=2)
  # Sides of 160..256 px become 120..200 (shorter) and at most 320 (longer): one padded shape.
  config.data.update(source="generated", train_split="train", eval_split="val", fixed_size=(320, 320), max_boxes=8)
  config.num_train_steps = 300
  config.log_every_steps = 25
  return config
