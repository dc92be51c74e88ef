"""Input pipeline: COCO-format folders and tfds coco/2017 through tf.data."""
