"""Generated images with known boxes: a built-in input that needs no download."""

import numpy as np

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def generated_batch(seed: int, sizes, max_objects: int = 5):
  """Noisy backgrounds with solid rectangles, normalised and zero-padded like a DETR batch.

  Args:
    seed: numpy seed; the same seed gives the same batch.
    sizes: (height, width) in pixels of each image.
    max_objects: rectangles per image are drawn from 1..max_objects.
  Returns:
    images [B, H, W, 3] float32 (ImageNet-normalised, zero padding), pixel_mask [B, H, W] bool
    (True on real pixels), and per image a list of xyxy pixel boxes of the rectangles.
  """
  rng = np.random.default_rng(seed)
  height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
  images = np.zeros((len(sizes), height, width, 3), np.float32)
  mask = np.zeros((len(sizes), height, width), bool)
  boxes = []
  for i, (h, w) in enumerate(sizes):
    rgb = rng.uniform(0.3, 0.7, (h, w, 3)).astype(np.float32)
    image_boxes = []
    for _ in range(rng.integers(1, max_objects + 1)):
      x0, y0 = rng.integers(0, w - w // 8), rng.integers(0, h - h // 8)
      x1, y1 = rng.integers(x0 + w // 16, w + 1), rng.integers(y0 + h // 16, h + 1)
      rgb[y0:y1, x0:x1] = rng.uniform(0, 1, 3)
      image_boxes.append((x0, y0, x1, y1))
    images[i, :h, :w] = (rgb - IMAGENET_MEAN) / IMAGENET_STD
    mask[i, :h, :w] = True
    boxes.append(image_boxes)
  return images, mask, boxes
