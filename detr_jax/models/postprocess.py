"""Post-processing: detections for COCO box evaluation (official `PostProcess` of DETR and of
Deformable DETR, models/detr.py and models/deformable_detr.py),
their instance masks (`PostProcessSegm`) and panoptic segments (`PostProcessPanoptic`,
models/segmentation.py)."""

import collections

import jax
import jax.numpy as jnp
import numpy as np

from detr_jax import box_ops
from detr_jax.models import backbone, deformable_transformer


def detections(outputs, original_sizes):
  """Turns model outputs into scored detections, one per object query (no threshold, no NMS).

  Args:
    outputs: the model's dict with "pred_logits" [B, Q, K + 1] and "pred_boxes" [B, Q, 4]
      (cxcywh normalised to the unpadded image).
    original_sizes: [B, 2] (height, width) in pixels of the original images.
  Returns:
    scores [B, Q] float32 (softmax probability of the best real class), labels [B, Q] int32
    (class index = COCO category id), boxes [B, Q, 4] float32 xyxy in original-image pixels.
  """
  probs = jax.nn.softmax(outputs["pred_logits"], axis=-1)[..., :-1]
  scores = probs.max(axis=-1)
  labels = probs.argmax(axis=-1).astype(jnp.int32)
  height, width = original_sizes[:, 0], original_sizes[:, 1]
  scale = jnp.stack([width, height, width, height], axis=-1).astype(jnp.float32)[:, None, :]
  return scores, labels, box_ops.cxcywh_to_xyxy(outputs["pred_boxes"]) * scale


def detection_queries(outputs):
  """The object query of each of `detections`' entries: [B, Q] int32, 0..Q-1 (one detection per query)."""
  logits = outputs["pred_logits"]
  return jnp.broadcast_to(jnp.arange(logits.shape[1], dtype=jnp.int32), logits.shape[:2])


def _top_k_pairs(logits, num_detections: int):
  flat_scores = jax.nn.sigmoid(logits.reshape(logits.shape[0], -1))
  return deformable_transformer.top_k(flat_scores, min(num_detections, flat_scores.shape[-1]))


def top_k_sigmoid_detections(outputs, original_sizes, num_detections: int = 100):
  """Deformable DETR's post-processing (official `PostProcess`, models/deformable_detr.py): the
  `num_detections` best (query, class) pairs by sigmoid probability; a query may appear once per class.

  Args:
    outputs: the model's dict with "pred_logits" [B, Q, K] sigmoid logits (no "no object"
      column) and "pred_boxes" [B, Q, 4] (cxcywh normalised to the unpadded image).
    original_sizes: [B, 2] (height, width) in pixels of the original images.
    num_detections: how many pairs to keep per image (official 100); a model with fewer
      pairs (Q * K < num_detections) keeps all of them.
  Returns:
    scores [B, N] float32 in descending order, labels [B, N] int32 (class index = COCO category
    id), boxes [B, N, 4] float32 xyxy in original-image pixels, N = min(num_detections, Q * K).
  """
  num_classes = outputs["pred_logits"].shape[-1]
  scores, flat_index = _top_k_pairs(outputs["pred_logits"], num_detections)
  queries = flat_index // num_classes
  boxes = jnp.take_along_axis(box_ops.cxcywh_to_xyxy(outputs["pred_boxes"]), queries[..., None], axis=1)
  height, width = original_sizes[:, 0], original_sizes[:, 1]
  scale = jnp.stack([width, height, width, height], axis=-1).astype(jnp.float32)[:, None, :]
  return scores, (flat_index % num_classes).astype(jnp.int32), boxes * scale


def top_k_sigmoid_queries(outputs, num_detections: int = 100):
  """The object query of each of `top_k_sigmoid_detections`' pairs, in its order: [B, N] int32."""
  _, flat_index = _top_k_pairs(outputs["pred_logits"], num_detections)
  return (flat_index // outputs["pred_logits"].shape[-1]).astype(jnp.int32)


def instance_masks(pred_masks, processed_sizes, padded_size):
  """Device half of the official `PostProcessSegm`: mask logits to binary masks at input resolution.

  As in the official code, each [h, w] logit map (1/4 of the padded input) is resized bilinearly
  (align_corners=False) to the largest processed size of the batch, then thresholded at
  sigmoid > 0.5. Shapes stay static under jit: the result is placed on a `padded_size` canvas
  whose pixels beyond that largest size are meaningless; `original_instance_masks` crops them.

  Args:
    pred_masks: [B, Q, h, w] mask logits.
    processed_sizes: [B, 2] int (height, width) in pixels of the resized, unpadded inputs.
    padded_size: (H, W) of the padded input, at least the largest processed size.
  Returns:
    [B, Q, H, W] bool.
  """
  batch, queries, height, width = pred_masks.shape
  scale = processed_sizes.max(axis=0).astype(jnp.float32) / jnp.array([height, width], jnp.float32)
  resized = jax.image.scale_and_translate(pred_masks.astype(jnp.float32), (batch, queries, *padded_size), (2, 3),
                                          scale, jnp.zeros(2, jnp.float32), "linear", antialias=False)
  return jax.nn.sigmoid(resized) > 0.5


def original_instance_masks(masks: np.ndarray, processed_size, original_size) -> np.ndarray:
  """Host half of `PostProcessSegm`: one image's [Q, H, W] bool masks from `instance_masks`, cropped
  to its processed (height, width) and resized to its original (height, width) with PyTorch's
  nearest interpolation -> [Q, *original_size] bool."""
  rows = backbone.legacy_nearest_indices(int(processed_size[0]), int(original_size[0]))
  cols = backbone.legacy_nearest_indices(int(processed_size[1]), int(original_size[1]))
  return masks[:, rows][:, :, cols]


def _bilinear_resize(masks: np.ndarray, size) -> np.ndarray:
  """[n, h, w] -> [n, *size]: `F.interpolate(mode="bilinear", align_corners=False)` (half-pixel, no antialias)."""
  return np.asarray(jax.image.resize(masks, (masks.shape[0], *size), "bilinear", antialias=False))


def _nearest_resize(ids: np.ndarray, size) -> np.ndarray:
  """[h, w] int segment map -> size (height, width) with PIL's Image.resize(NEAREST), as the official
  code resizes its id2rgb image (PIL's own source-pixel arithmetic, exactly)."""
  from PIL import Image
  resized = Image.fromarray(ids.astype(np.int32)).resize((size[1], size[0]), Image.NEAREST)
  return np.asarray(resized, np.int64)


def panoptic(pred_logits, pred_masks, processed_size, target_size, thing_ids, threshold: float = 0.85):
  """One image's panoptic segmentation (official `PostProcessPanoptic`, models/segmentation.py).

  Queries whose best real class scores above `threshold` are kept; their mask logits are
  resized (bilinear) to `processed_size`, each pixel goes to its highest-logit query, masks of the
  same stuff class are merged, the map is resized (nearest) to `target_size`, and segments of 4
  pixels or fewer are dropped (repeatedly, recomputing the map; as in the official code the stuff
  merge applies to the first map only).

  Args:
    pred_logits: [Q, K + 1]; pred_masks: [Q, h, w] logits at 1/4 of the padded input (numpy).
    processed_size: (height, width) of the resized, unpadded input in pixels.
    target_size: (height, width) of the output (the original image).
    thing_ids: the category ids that are things; other ids are stuff.
  Returns:
    segment_ids [H, W] int32 (segment index i, as in the official PNG) and segments_info, a list
    of {"id": i, "isthing", "category_id", "area"} in pixels of the output.
  """
  logits = np.asarray(pred_logits, np.float64)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  scores, labels = probs[:, :-1].max(-1), probs.argmax(-1)
  keep = (labels != logits.shape[-1] - 1) & (scores > threshold)
  labels = labels[keep]
  masks = _bilinear_resize(np.asarray(pred_masks, np.float32)[keep], tuple(processed_size))
  stuff_groups = collections.defaultdict(list)
  for k, label in enumerate(labels):
    if int(label) not in thing_ids:
      stuff_groups[int(label)].append(k)

  def segment_map(masks, merge_stuff):
    ids = masks.argmax(0) if len(masks) else np.zeros(masks.shape[1:], np.int64)
    if merge_stuff:
      for group in stuff_groups.values():
        ids[np.isin(ids, group)] = group[0]
    ids = _nearest_resize(ids, tuple(target_size))
    return ids, np.bincount(ids.ravel(), minlength=len(masks))[:len(masks)].tolist()

  ids, areas = segment_map(masks, merge_stuff=True)
  while len(labels):
    small = np.array([area <= 4 for area in areas])
    if not small.any():
      break
    labels, masks = labels[~small], masks[~small]
    ids, areas = segment_map(masks, merge_stuff=False)
  segments = [{"id": i, "isthing": int(label) in thing_ids, "category_id": int(label), "area": area}
              for i, (label, area) in enumerate(zip(labels, areas))]
  return ids.astype(np.int32), segments
