"""Inference on your own images: any checkpoint, any image sizes, detections in original pixels.

    predictor = Predictor.from_checkpoint("WORKDIR_OR_FILE")   # or Predictor.from_pretrained("detr-r50")
    per_image = predictor.predict(["a.jpg", pil_image, uint8_array])
    per_image[0] == [{"label": "dog", "category_id": 18, "score": 0.98, "box": [x0, y0, x1, y1]}, ...]

The preprocessing is eval.py's (official `make_coco_transforms("val")`: shorter side 800, longer at
most 1333, times the checkpoint's `data.scale`; ImageNet normalisation; JPEGs decoded as PIL does),
and the outputs go through the family's official post-processing (`Family.detections`), so an image
gets eval.py's numbers when it is padded as eval.py pads it (see `Predictor.padded_shape`). Images
are grouped by padded shape into batches of a fixed size, so a folder of mixed sizes compiles one
program per padding bucket (a handful at pad_multiple 128), each sharded over the mesh as in eval.py.
"""

import os
from typing import Iterable, Iterator, Optional, Sequence, Union

import jax
import numpy as np
import tensorflow as tf
from PIL import Image

from detr_jax import checkpoints, evaluation, families, pretrained, sharding
from detr_jax.data import image_sizes, pipeline, transforms
from detr_jax.models import backbone, postprocess

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]


def _pixels(image: ImageInput, name: str) -> tf.Tensor:
  """[H, W, 3] float32 in [0, 255] of a file path, a PIL image or a uint8 [H, W, 3] / [H, W] array.

  Raises:
    FileNotFoundError: a path that does not exist. ValueError: a file that is not an image, or an
    array of another shape or dtype (`name` says which input).
  """
  if isinstance(image, (str, os.PathLike)):
    path = os.fspath(image)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"No image file {path!r}.")
    try:
      return pipeline.decode_image(path)
    except tf.errors.InvalidArgumentError as error:
      raise ValueError(f"{path} is not a JPEG, PNG, GIF or BMP image ({error.message.splitlines()[0]}).") from None
  if isinstance(image, Image.Image):
    image = np.asarray(image.convert("RGB"))
  array = np.asarray(image)
  if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
    raise ValueError(f"{name}: expected a uint8 image array of shape [H, W, 3] or [H, W], got {array.dtype} "
                     f"{list(array.shape)}.")
  if array.ndim == 2:
    array = np.repeat(array[..., None], 3, axis=2)
  return tf.convert_to_tensor(array, tf.float32)


def _source_name(image: ImageInput, index: int) -> str:
  return os.fspath(image) if isinstance(image, (str, os.PathLike)) else f"image {index}"


def _splat(locations: np.ndarray, weights: np.ndarray, shape: tuple) -> np.ndarray:
  """Deformable attention as a map: `weights` [...] at `locations` [..., 2] ((x, y) normalised to the padded
  map, as `MSDeformAttn` samples them) added bilinearly into a [H, W] = `shape` grid (pixel centres at
  half-integers, as grid_sample's align_corners=False); returns it flattened, [H * W] float32."""
  height, width = shape
  x = locations[..., 0].ravel() * width - 0.5
  y = locations[..., 1].ravel() * height - 0.5
  weights = weights.ravel()
  grid = np.zeros(shape, np.float32)
  for column in (np.floor(x), np.floor(x) + 1):
    for row in (np.floor(y), np.floor(y) + 1):
      share = weights * (1 - np.abs(x - column)) * (1 - np.abs(y - row))
      inside = (column >= 0) & (column < width) & (row >= 0) & (row < height)
      np.add.at(grid, (row[inside].astype(int), column[inside].astype(int)), share[inside])
  return grid.ravel()


class Predictor:
  """A detector, its variables on a mesh, its class names, a score threshold and eval.py's preprocessing.

  Args:
    model, variables: a detector of any family and its {"params", "batch_stats"}.
    categories: [{"id", "name", ...}] naming the class indices (`families.load_categories`); None names
      each detection by its id.
    threshold: detections scoring below it are dropped; default the family's `score_threshold` (0.7 for
      DETR's softmax scores, 0.3 for Deformable DETR's sigmoid scores).
    options: resize and padding (`pipeline.PipelineOptions`: scale, pad_multiple or fixed_size).
    batch_size: images per compiled call, a multiple of the mesh's devices (default one per device).
    mesh: default `sharding.create_mesh()`, every device.
  Raises:
    ValueError: batch_size is not a multiple of the device count.
  """

  def __init__(self, model, variables, categories: Optional[Sequence[dict]] = None, threshold: Optional[float] = None,
               options: Optional[pipeline.PipelineOptions] = None, batch_size: Optional[int] = None, mesh=None):
    self.model = model
    self.family = families.of_model(model)
    self.mesh = mesh or sharding.create_mesh()
    self.batch_size = batch_size or self.mesh.devices.size
    if self.batch_size % self.mesh.devices.size:
      raise ValueError(f"batch_size={self.batch_size} is not a multiple of the {self.mesh.devices.size} devices.")
    self.threshold = self.family.score_threshold if threshold is None else threshold
    self.options = options or pipeline.PipelineOptions()
    self.names = {int(c["id"]): c["name"] for c in categories or ()}
    self.thing_ids = {int(c["id"]) for c in categories if c.get("isthing", True)} if categories else None
    self.masks = families.has_masks(model)
    self.variables = jax.device_put(variables, sharding.replicated(self.mesh))
    self._predict = evaluation.make_predict_fn(model, masks=self.masks)
    self._predict_inspected = evaluation.make_predict_fn(model, masks=self.masks, panoptic=self.masks,
                                                         intermediates=True)
    self._preprocess = tf.function(self._resize_and_normalize, reduce_retracing=True,
                                   input_signature=[tf.TensorSpec([None, None, 3], tf.float32)])

  @classmethod
  def from_checkpoint(cls, path: str, dilation: bool = False, **kwargs) -> "Predictor":
    """A Predictor of any checkpoint `families.load_model` reads: a train.py workdir, a `detr-port import`
    directory, an official / Hugging Face `.pth` / `.safetensors` file or a transformers `save_pretrained`
    directory (`dilation`: the file is DC5). A workdir's resize and padding (`config.json`'s data section)
    are used unless `options` is given; the class names come from `families.load_categories`.

    Raises:
      FileNotFoundError, ValueError, checkpoints.CheckpointMismatchError: see `families.load_model`.
    """
    mesh = kwargs.pop("mesh", None) or sharding.create_mesh()
    model, variables = families.load_model(path, dilation, mesh)
    kwargs.setdefault("options", workdir_options(path))
    kwargs.setdefault("categories", families.load_categories(path, model))
    return cls(model, variables, mesh=mesh, **kwargs)

  @classmethod
  def from_pretrained(cls, name: str, cache_dir: Optional[str] = None, **kwargs) -> "Predictor":
    """A Predictor of an official checkpoint by name ("detr-r50", ... : `pretrained.names()`), downloaded
    once into `cache_dir` and checked against its sha256 prefix (`pretrained.download`).

    Raises:
      ValueError: an unknown name, a name without a direct download, or a failed download.
    """
    path, dilation = pretrained.download(name, cache_dir)
    return cls.from_checkpoint(path, dilation=dilation, **kwargs)

  def _resize_and_normalize(self, pixels):
    example = transforms.normalize(transforms.eval_resize({"image": pixels}, self.options.scale))
    return example["image"], example["size"]

  def padded_shape(self, size) -> tuple:
    """The (H, W) an image of processed `size` (height, width) is padded to: `options.fixed_size`, or
    each side rounded up to `options.pad_multiple`, as eval.py pads a batch of that image alone.

    Raises:
      ValueError: the image is larger than `options.fixed_size`.
    """
    if self.options.fixed_size is not None:
      if size[0] > self.options.fixed_size[0] or size[1] > self.options.fixed_size[1]:
        raise ValueError(f"A processed image of {tuple(size)} does not fit data.fixed_size={self.options.fixed_size}.")
      return tuple(self.options.fixed_size)
    multiple = self.options.pad_multiple
    return tuple(image_sizes.round_up(int(side), multiple) for side in size)

  def preprocess(self, image: ImageInput, index: int = 0) -> dict:
    """One image as eval.py feeds it: "image" [h, w, 3] float32 normalised (unpadded), "size" [2] int32
    (processed height, width), "orig_size" [2] int32 (original height, width). See `_pixels` for errors."""
    pixels = _pixels(image, _source_name(image, index))
    resized, size = self._preprocess(pixels)
    return {"image": resized.numpy(), "size": size.numpy().astype(np.int32),
            "orig_size": np.array(pixels.shape[:2], np.int32)}

  def _batch(self, examples: Sequence[dict], shape: tuple) -> dict:
    """A padded batch of `batch_size` (the last slots repeat the first example) on the mesh."""
    chosen = list(examples) + [examples[0]] * (self.batch_size - len(examples))
    image = np.zeros((self.batch_size, *shape, 3), np.float32)
    pixel_mask = np.zeros((self.batch_size, *shape), bool)
    for i, example in enumerate(chosen):
      height, width = example["image"].shape[:2]
      image[i, :height, :width] = example["image"]
      pixel_mask[i, :height, :width] = True
    batch = {"image": image, "pixel_mask": pixel_mask, "size": np.stack([e["size"] for e in chosen]),
             "orig_size": np.stack([e["orig_size"] for e in chosen])}
    return pipeline.to_global_batch(batch, sharding.batch_sharding(self.mesh))

  def _kept(self, prediction: dict) -> np.ndarray:
    """Indices of the detections scoring at least the threshold, best first (for DETR, query indices)."""
    keep = np.flatnonzero(prediction["scores"] >= self.threshold)
    return keep[np.argsort(-prediction["scores"][keep], kind="stable")]

  def _detections(self, prediction: dict, example: dict) -> list[dict]:
    keep = self._kept(prediction)
    detections = [{"label": self.names.get(int(label), str(int(label))), "category_id": int(label),
                   "score": float(score), "box": [float(v) for v in box]}
                  for score, label, box in zip(prediction["scores"][keep], prediction["labels"][keep],
                                               prediction["boxes"][keep])]
    if self.masks:
      masks = postprocess.original_instance_masks(np.asarray(prediction["masks"][keep]), example["size"],
                                                  example["orig_size"])
      for detection, mask in zip(detections, masks):
        detection["mask"] = mask
    return detections

  def predict_iter(self, images: Iterable[ImageInput], window: Optional[int] = None) -> Iterator[list[dict]]:
    """Yields each image's detections in input order (see `predict`), reading `window` images at a time
    (default 8 batches), bucketed by padded shape within the window."""
    window = window or 8 * self.batch_size
    iterator, index = iter(images), 0
    while True:
      chunk = [image for _, image in zip(range(window), iterator)]
      if not chunk:
        return
      examples = [self.preprocess(image, index + i) for i, image in enumerate(chunk)]
      index += len(chunk)
      buckets = {}
      for position, example in enumerate(examples):
        buckets.setdefault(self.padded_shape(example["size"]), []).append(position)
      results = [None] * len(examples)
      for shape, positions in buckets.items():
        for start in range(0, len(positions), self.batch_size):
          members = positions[start:start + self.batch_size]
          outputs = self._predict(self.variables, self._batch([examples[p] for p in members], shape))
          # A mask model's [B, Q, H, W] masks stay on the device until the threshold has picked the kept ones.
          outputs = {k: v if k == "masks" else np.asarray(v) for k, v in outputs.items()}
          for slot, position in enumerate(members):
            results[position] = self._detections({k: v[slot] for k, v in outputs.items()}, examples[position])
      yield from results

  def inspect(self, image: ImageInput, attention: bool = True, panoptic: bool = False,
              points: Optional[Sequence[tuple]] = None, panoptic_threshold: float = 0.85) -> dict:
    """One image through the model once, in a batch of its own padded as eval.py pads it alone: its
    detections, with `attention` the pictures' maps of `attention`, with `panoptic` the segments of `panoptic`.

    Returns:
      {"detections": `predict`'s list for the image, each with "query" (its object query's index)};
      with `attention` also "decoder", "points" and "encoder" (see `attention`); with `panoptic` also
      "panoptic" (see `panoptic`).
    Raises:
      ValueError: `panoptic` for a model without a mask head; see `predict` for the input errors.
    """
    if panoptic and not self.masks:
      raise ValueError(f"{families.describe(self.model)} has no mask head; panoptic segments need a panoptic "
                       "checkpoint (e.g. detr-r50-panoptic).")
    example = self.preprocess(image)
    batch = self._batch([example], self.padded_shape(example["size"]))
    prediction = jax.tree.map(lambda x: np.asarray(x[0]), self._predict_inspected(self.variables, batch))
    detections = self._detections(prediction, example)
    for detection, query in zip(detections, prediction["queries"][self._kept(prediction)]):
      detection["query"] = int(query)
    result = {"detections": detections}
    if attention:
      result.update(self._attention_maps(prediction, example, batch, detections, points))
    if panoptic:
      result["panoptic"] = self._panoptic_segments(prediction, example, panoptic_threshold)
    return result

  def _attention_maps(self, prediction: dict, example: dict, batch: dict, detections: list[dict], points) -> dict:
    transformer = prediction["intermediates"]["transformer"]
    dense = self.family.name == families.DETR.name
    if dense or self.model.num_feature_levels == 1:
      stride = 16 if self.model.dilation else 32
    else:
      stride = 8
    feature_shape = tuple(-(-side // stride) for side in batch["image"].shape[1:3])
    valid = ~np.asarray(backbone.downsample_mask(~np.asarray(batch["pixel_mask"])[:1], feature_shape))[0]
    rows, cols = int(valid[:, 0].sum()), int(valid[0].sum())
    height, width = (int(v) for v in example["orig_size"])

    last_encoder = transformer[f"encoder_layers_{self.model.num_encoder_layers - 1}"]["self_attn"]
    last_decoder = transformer[f"decoder_layers_{self.model.num_decoder_layers - 1}"]
    if dense:
      encoder, decoder = last_encoder["attention_weights"][0], last_decoder["multihead_attn"]["attention_weights"][0]
      feature_map = lambda attention, query: attention[query]   # [Q, S] -> [S]
    else:
      encoder, decoder = last_encoder, last_decoder["cross_attn"]
      feature_map = lambda attention, query: _splat(attention["sampling_locations"][0][query],
                                                    attention["sampling_weights"][0][query], feature_shape)

    def on_image(weights):   # [S] over the padded feature map -> [height, width] over the original image
      grid = weights.reshape(feature_shape)[:rows, :cols].astype(np.float32)
      return np.asarray(Image.fromarray(grid).resize((width, height), Image.BILINEAR))   # float32: mode "F"

    if points is None:
      points = [((d["box"][0] + d["box"][2]) / 2, (d["box"][1] + d["box"][3]) / 2) for d in detections[:4]]
      points = points or [(width / 2, height / 2)]
    # The finest level comes first in Deformable DETR's flattened levels, so these index it there too.
    positions = [min(int(y * rows / height), rows - 1) * feature_shape[1] + min(int(x * cols / width), cols - 1)
                 for x, y in points]
    return {"points": [tuple(map(float, p)) for p in points],
            "decoder": np.stack([on_image(feature_map(decoder, d["query"])) for d in detections]) if detections
            else np.zeros((0, height, width), np.float32),
            "encoder": np.stack([on_image(feature_map(encoder, position)) for position in positions])}

  def _panoptic_segments(self, prediction: dict, example: dict, threshold: float) -> dict:
    thing_ids = self.thing_ids if self.thing_ids is not None else set(range(prediction["pred_logits"].shape[-1]))
    segmentation, segments = postprocess.panoptic(prediction["pred_logits"], prediction["pred_masks"],
                                                  tuple(example["size"]), tuple(example["orig_size"]),
                                                  thing_ids, threshold)
    for segment in segments:
      segment["label"] = self.names.get(segment["category_id"], str(segment["category_id"]))
    return {"segmentation": segmentation, "segments": segments}

  def attention(self, image: ImageInput, points: Optional[Sequence[tuple]] = None) -> dict:
    """The attention pictures of the official DETR notebook for one image, at the original size.

    DETR's maps are its dense attention over the feature map (stride 32, 16 with DC5), heads averaged.
    Deformable DETR attends to a few sampling points per head, level and point (Zhu et al. 2021, Fig. 6 of
    the appendix draws them); its map is those points' attention weights, summed over heads, levels and
    points, splatted bilinearly onto the finest feature level's grid (stride 8; single-scale: layer4's).
    Either grid is then bilinearly upsampled to the image.

    Returns:
      {"detections": `predict`'s list for the image, each with "query" (its object query's index);
       "decoder": [n, H, W] float32, per detection the last decoder layer's cross-attention of its query;
       "points": the reference points [(x, y)] in pixels (default: the centres of up to 4 detections' boxes,
       else the image centre); "encoder": [len(points), H, W] float32, the last encoder layer's
       self-attention of the (finest-level) feature position under each point.}
    Raises:
      see `predict` for the input errors.
    """
    return self.inspect(image, attention=True, points=points)

  def panoptic(self, image: ImageInput, threshold: float = 0.85) -> dict:
    """One image's panoptic segmentation at the original size, as eval.py's PQ evaluation makes it (official
    `PostProcessPanoptic`, `postprocess.panoptic`: queries whose best class scores above `threshold`, each
    pixel to its highest mask logit, the masks of one stuff class merged). Categories whose "isthing" is
    False are stuff; without categories every class is a thing.

    Returns:
      {"segmentation": [H, W] int32, each pixel's segment index; "segments": [{"id": that index,
       "category_id", "label": category name, "isthing", "area": pixels}]}.
    Raises:
      ValueError: a model without a mask head; see `predict` for the input errors.
    """
    return self.inspect(image, attention=False, panoptic=True, panoptic_threshold=threshold)["panoptic"]

  def predict(self, images: Iterable[ImageInput]) -> list[list[dict]]:
    """Detections of each image, in input order, best first.

    Args:
      images: file paths (JPEG, PNG, ...), PIL images or uint8 arrays [H, W, 3] (RGB) / [H, W], of any sizes.
    Returns:
      per image a list of {"label": category name (its id as a string where unnamed), "category_id": int,
      "score": float, "box": [x0, y0, x1, y1] float in original-image pixels}, scores >= `threshold`; a mask
      model's also have "mask": [H, W] bool at the original size (official `PostProcessSegm`).
    Raises:
      FileNotFoundError: a missing file. ValueError: a file that is not an image, or an array of the wrong
      shape or dtype (the input is named).
    """
    return list(self.predict_iter(images))


def workdir_options(path: str) -> Optional[pipeline.PipelineOptions]:
  """The resize and padding a train.py workdir's config.json trained and evaluated with; None elsewhere."""
  data = checkpoints.read_data_config(path)
  return pipeline.PipelineOptions.from_config(data) if data else None
