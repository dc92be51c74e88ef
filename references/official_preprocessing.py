"""The official preprocessing, transcribed for tests and benchmarks (facebookresearch/detr
`datasets/coco.py` and `datasets/transforms.py`), independent of detr_jax's TF implementation."""

import numpy as np

# The official normalisation, written here rather than imported from the code under test.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def official_size(w, h, size, max_size=None):
  """Transcription of official `get_size_with_aspect_ratio` (datasets/transforms.py)."""
  if max_size is not None:
    min_original, max_original = float(min((w, h))), float(max((w, h)))
    if max_original / min_original * size > max_size:
      size = int(round(max_size * min_original / max_original))
  if (w <= h and w == size) or (h <= w and h == size):
    return (h, w)
  if w < h:
    return (int(size * h / w), size)
  return (size, int(size * w / h))


def padded_batch(paths, shorter_side):
  """Real images resized (PIL bilinear) to `shorter_side`, normalised, zero-padded together.

  Returns images [B, H, W, 3] float32 and pixel_mask [B, H, W] bool (True on real pixels).
  """
  from PIL import Image
  arrays = []
  for path in paths:
    image = Image.open(path).convert("RGB")
    scale = shorter_side / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
    arrays.append((np.asarray(image, np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD)
  height = max(a.shape[0] for a in arrays)
  width = max(a.shape[1] for a in arrays)
  images = np.zeros((len(arrays), height, width, 3), np.float32)
  mask = np.zeros((len(arrays), height, width), bool)
  for i, a in enumerate(arrays):
    images[i, :a.shape[0], :a.shape[1]] = a
    mask[i, :a.shape[0], :a.shape[1]] = True
  return images, mask
