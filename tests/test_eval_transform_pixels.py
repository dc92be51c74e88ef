"""The eval preprocessing on real coco-mini images against the official torchvision path: PIL
decode, `T.Resize` (PIL bilinear, antialiased when shrinking), `ToTensor` and `Normalize`."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
from PIL import Image

from detr_jax.data import coco, pipeline
from references.official_preprocessing import official_size

IMAGENET_MEAN = np.array((0.485, 0.456, 0.406), np.float32)   # written out, not taken from detr_jax
IMAGENET_STD = np.array((0.229, 0.224, 0.225), np.float32)


@pytest.fixture(scope="module")
def first_val_images(coco_mini):
  """coco-mini's first three val images: 139 (426 x 640), 802 (640 x 424, portrait), 5001 (480 x 640)."""
  records = coco.load_coco_folder(str(coco_mini), "val2017").first(3)
  assert list(records.image_ids) == [139, 802, 5001]
  return records


def _official_normalize(image: Image.Image) -> np.ndarray:
  """ToTensor (/255) and Normalize with the ImageNet mean and std, channels last."""
  return (np.asarray(image, np.float32) / 255 - IMAGENET_MEAN) / IMAGENET_STD


@pytest.mark.parametrize("scale", [0.25, 0.5, 1.0])
def test_eval_batch_matches_pil_resize_and_normalize(first_val_images, scale):
  """Sizes, pixels and padding of one eval batch of three real images (padded together).

  Processed sizes: exactly the official get_size_with_aspect_ratio(800, 1333), both times `scale`.
  Pixels: the reference decodes with PIL (`Image.open(path).convert("RGB")`, as the official
  dataset does), resizes with PIL bilinear, then normalises. PIL resizes in two passes, rounding to uint8 after
  each, so it differs from TF's float antialiased triangle filter by at most 0.5 + 0.5 grey levels;
  measured: max 1.000, mean 0.21-0.29 grey levels (0.0175 and 0.005 normalised), 10-17% of the
  values above 0.5. Tolerance: max 1.05 and mean 0.35 grey levels, i.e. |diff| x std x 255
  per channel. Padding: zero pixels, pixel_mask False; True on every real pixel.
  """
  batch = next(pipeline.eval_dataset(first_val_images, 3, pipeline.PipelineOptions(scale=scale, pad_multiple=32),
                                     process=(0, 1)).as_numpy_iterator())
  assert batch["image"].shape[1] % 32 == 0 and batch["image"].shape[2] % 32 == 0
  for i, path in enumerate(first_val_images.paths):
    height, width = (int(s) for s in first_val_images.sizes[i])
    size = official_size(width, height, int(round(800 * scale)), int(round(1333 * scale)))
    assert tuple(batch["size"][i]) == size and tuple(batch["orig_size"][i]) == (height, width)
    expected = _official_normalize(Image.open(path).convert("RGB").resize((size[1], size[0]), Image.BILINEAR))
    grey_levels = np.abs(batch["image"][i, :size[0], :size[1]] - expected) * IMAGENET_STD * 255
    assert grey_levels.max() <= 1.05 and grey_levels.mean() <= 0.35, (grey_levels.max(), grey_levels.mean())
    real = np.zeros(batch["pixel_mask"].shape[1:], bool)
    real[:size[0], :size[1]] = True
    np.testing.assert_array_equal(batch["pixel_mask"][i], real)
    assert not batch["image"][i][~real].any()


def test_jpeg_decoding_matches_pil(first_val_images):
  """The pipeline's decoded pixels equal PIL's (the official `Image.open(path).convert("RGB")`), exactly.

  Both use libjpeg-turbo; tf.io.decode_jpeg with dct_method="INTEGER_ACCURATE" (PIL's IDCT) gives
  PIL's pixels on all 158 coco-mini val images, while TF's default fast IDCT differs by up to 23
  grey levels (1.2 on average).
  """
  for path in first_val_images.paths:
    decoded = pipeline.decode_image(path).numpy()
    np.testing.assert_array_equal(decoded, np.asarray(Image.open(path).convert("RGB"), np.float32), err_msg=path)
