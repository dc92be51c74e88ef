"""Deformable DETR against transformers' PyTorch DeformableDetrForObjectDetection on real images,
and the official initialisation.

The reference has random, non-trivial weights (`hf_deformable_detr`: norms, biases and BN
statistics random, sampling offsets and attention weights non-zero, offsets up to 4 pixels so
points fall outside the maps). Two real coco-mini images of different aspect ratios are padded
together with their mask. Each variant is loaded twice, from the transformers state dict
(porting's renamer) and from the same weights renamed by hand to the official keys; both must
give identical variables.

Tolerances (float32 CPU), on the last decoder layer, on every earlier layer and on the
two-stage proposals: logits 3e-5, boxes 1e-5 (the issue asks for 1e-4). Measured 2026-11-22:
logits 1.4e-6 to 2.1e-6, boxes 1.8e-7 to 4.8e-7, proposal logits 5.1e-6.

Mutations that this test was run against and failed on (2026-11-22): sampling with no half-pixel
shift, with align_corners=True, with border instead of zero padding, values not zeroed at padded
pixels, the sine encoding without its -0.5, decoder references without the valid ratios,
two-stage top-k by the best class instead of class 0, and the decoder's norm1/norm2 swapped in
the transformers renamer.
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from detr_jax import porting
from detr_jax.models import deformable_attention, deformable_detr, postprocess
from references.transformers_deformable_detr import hf_deformable_detr, hf_deformable_to_official_by_hand

LOGITS_TOLERANCE = 3e-5
BOXES_TOLERANCE = 1e-5

VARIANTS = {
    "single-scale": dict(num_feature_levels=1),
    "single-scale-dc5": dict(num_feature_levels=1, dilation=True),
    "multi-scale": dict(),
    "refine": dict(with_box_refine=True),
    "two-stage": dict(with_box_refine=True, two_stage=True),
}


def hf_layers(model, images, mask):
  """transformers' outputs of every decoder layer [(logits, boxes)], computed from its intermediate
  states as its own forward does for the last one, and the two-stage proposals."""
  with torch.no_grad():
    out = model(pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
                pixel_mask=torch.from_numpy(mask).long())
    layers = []
    for level in range(model.config.decoder_layers):
      reference = out.init_reference_points if level == 0 else out.intermediate_reference_points[:, level - 1]
      logit_offset = torch.log(reference.clamp(0, 1).clamp(min=1e-5) / (1 - reference.clamp(0, 1)).clamp(min=1e-5))
      delta = model.bbox_embed[level](out.intermediate_hidden_states[:, level])
      if reference.shape[-1] == 4:
        delta = delta + logit_offset
      else:
        delta[..., :2] += logit_offset
      layers.append((model.class_embed[level](out.intermediate_hidden_states[:, level]).numpy(),
                     delta.sigmoid().numpy()))
    np.testing.assert_array_equal(layers[-1][0], out.logits.numpy())
    proposals = None
    if model.config.two_stage:
      proposals = (out.enc_outputs_class.numpy(), out.enc_outputs_coord_logits.sigmoid().numpy())
  return layers, proposals


def match_queries(ours, reference):
  """For each reference query, our query with the nearest (logits, box) outputs; two-stage ports may
  rank proposals whose scores differ by ~1e-6 in another order. Asserts a permutation."""
  ours_flat = np.concatenate([ours[0], ours[1]], -1)
  ref_flat = np.concatenate([reference[0], reference[1]], -1)
  order = np.stack([np.argmin(np.abs(ours_flat[b][None] - ref_flat[b][:, None]).max(-1), axis=1)
                    for b in range(ref_flat.shape[0])])
  for b in range(order.shape[0]):
    assert len(set(order[b])) == order.shape[1], "queries do not pair one to one"
  return order


@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_transformers(two_real_images, variant):
  images, mask = two_real_images
  options = VARIANTS[variant]
  reference = hf_deformable_detr(**options)
  ref_layers, ref_proposals = hf_layers(reference, images, mask)

  model, variables = porting.load_pytorch_checkpoint(reference.state_dict(), dilation=options.get("dilation", False))
  by_hand, hand_variables = porting.load_pytorch_checkpoint(hf_deformable_to_official_by_hand(reference.state_dict()),
                                                            dilation=options.get("dilation", False))
  assert by_hand == model
  jax.tree.map(np.testing.assert_array_equal, hand_variables, variables)
  assert (model.num_feature_levels, model.with_box_refine, model.two_stage) == (
      options.get("num_feature_levels", 4), options.get("with_box_refine", False), options.get("two_stage", False))

  out = jax.jit(model.apply)(variables, images, mask)
  ours = [(a["pred_logits"], a["pred_boxes"]) for a in out["aux_outputs"]] + [(out["pred_logits"], out["pred_boxes"])]
  assert len(ours) == len(ref_layers) == 6
  order = np.arange(ours[-1][0].shape[1])[None].repeat(images.shape[0], 0)
  if model.two_stage:
    order = match_queries(ours[-1], ref_layers[-1])
  for layer, ((logits, boxes), (ref_logits, ref_boxes)) in enumerate(zip(ours, ref_layers)):
    logits, boxes = (np.take_along_axis(np.asarray(a), order[..., None], axis=1) for a in (logits, boxes))
    np.testing.assert_allclose(logits, ref_logits, atol=LOGITS_TOLERANCE, rtol=0, err_msg=f"layer {layer}")
    np.testing.assert_allclose(boxes, ref_boxes, atol=BOXES_TOLERANCE, rtol=0, err_msg=f"layer {layer}")
  if model.two_stage:
    enc = out["enc_outputs"]
    np.testing.assert_allclose(enc["pred_logits"], ref_proposals[0], atol=LOGITS_TOLERANCE, rtol=0)
    np.testing.assert_allclose(enc["pred_boxes"], ref_proposals[1], atol=BOXES_TOLERANCE, rtol=0)
  else:
    assert "enc_outputs" not in out


def test_bfloat16_compute_stays_close(two_real_images):
  images, mask = two_real_images
  model, variables = porting.load_pytorch_checkpoint(hf_deformable_detr(with_box_refine=True).state_dict())
  full = jax.jit(model.apply)(variables, images, mask)
  half = jax.jit(model.clone(dtype="bfloat16").apply)(variables, images, mask)
  assert half["pred_logits"].dtype == half["pred_boxes"].dtype == jnp.float32
  # bfloat16 keeps 8 bits of mantissa; through a ResNet-50 and 12 layers boxes drift by a few percent.
  assert np.abs(half["pred_boxes"] - full["pred_boxes"]).mean() < 0.02
  assert np.corrcoef(np.ravel(half["pred_logits"]), np.ravel(full["pred_logits"]))[0, 1] > 0.95


# Trainable parameters of the official model classes (requires_grad: stem and layer1 frozen, a
# shared head counted once), from the reference sheet.
OFFICIAL_TRAINABLE = {"single-scale": 33_844_193, "single-scale-dc5": 33_844_193, "multi-scale": 39_847_265,
                      "refine": 40_627_260, "two-stage": 40_959_129}


@pytest.mark.parametrize("variant", VARIANTS)
def test_parameter_count_equals_the_official_model(variant):
  model = deformable_detr.DeformableDETR(**VARIANTS[variant])
  shapes = jax.eval_shape(lambda: deformable_detr.init_variables(model, jax.random.PRNGKey(0)))
  flat = flax.traverse_util.flatten_dict(shapes["params"])
  frozen = lambda path: path[0] == "backbone" and (path[1] == "conv1" or path[1].startswith("layer1"))
  assert sum(v.size for p, v in flat.items() if not frozen(p)) == OFFICIAL_TRAINABLE[variant]


@pytest.mark.parametrize("variant", ["multi-scale", "refine", "two-stage"])
def test_initialisation_is_the_official_one(variant):
  # Every layer is initialised alike, so 1 encoder and 2 decoder layers (2 or 3 heads) show it at less cost.
  model = deformable_detr.DeformableDETR(backbone_depth=18, num_encoder_layers=1, num_decoder_layers=2,
                                         **VARIANTS[variant])
  params = deformable_detr.init_variables(model, jax.random.PRNGKey(0))["params"]
  heads = model.num_heads_per_output
  names = [f"_{i}" for i in range(heads)] if model.with_box_refine else [""]
  prior = -np.log(0.99 / 0.01)
  for suffix in names:
    np.testing.assert_allclose(params[f"class_embed{suffix}"]["bias"], prior, rtol=1e-6)
    np.testing.assert_array_equal(params[f"bbox_embed{suffix}"]["layers_2"]["kernel"], 0.0)
    np.testing.assert_array_equal(params[f"class_embed{suffix}"]["kernel"], params[f"class_embed{names[0]}"]["kernel"])
    np.testing.assert_array_equal(params[f"bbox_embed{suffix}"]["layers_0"]["kernel"],
                                  params[f"bbox_embed{names[0]}"]["layers_0"]["kernel"])
  size_bias = [np.asarray(params[f"bbox_embed{s}"]["layers_2"]["bias"]) for s in names]
  expected_first = [0, 0, 0, 0] if model.two_stage else [0, 0, -2, -2]
  np.testing.assert_array_equal(size_bias[0], expected_first)
  for bias in size_bias[1:]:
    np.testing.assert_array_equal(bias, 0.0)

  attention = params["transformer"]["encoder_layers_0"]["self_attn"]
  np.testing.assert_array_equal(attention["sampling_offsets"]["kernel"], 0.0)
  np.testing.assert_array_equal(attention["attention_weights"]["kernel"], 0.0)
  np.testing.assert_array_equal(attention["attention_weights"]["bias"], 0.0)
  np.testing.assert_array_equal(attention["sampling_offsets"]["bias"],
                                deformable_attention.sampling_offsets_bias(8, 4, 4)(None, (256,)))
  np.testing.assert_array_equal(attention["value_proj"]["bias"], 0.0)
  np.testing.assert_array_equal(params["input_proj_0_conv"]["bias"], 0.0)
  # Xavier-uniform: bound sqrt(6 / (fan_in + fan_out)).
  value_kernel = np.asarray(attention["value_proj"]["kernel"])
  assert np.sqrt(6 / 512) * 0.9 < np.abs(value_kernel).max() <= np.sqrt(6 / 512)


def official_postprocess(logits, boxes, sizes):
  """Transcription of the official Deformable DETR `PostProcess` (models/deformable_detr.py)."""
  logits, boxes, sizes = (torch.from_numpy(np.asarray(a)) for a in (logits, boxes, sizes))
  prob = logits.sigmoid()
  values, indexes = torch.topk(prob.view(logits.shape[0], -1), 100, dim=1)
  queries = indexes // logits.shape[2]
  cx, cy, w, h = boxes.unbind(-1)
  xyxy = torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1)
  xyxy = torch.gather(xyxy, 1, queries.unsqueeze(-1).repeat(1, 1, 4))
  height, width = sizes.unbind(1)
  xyxy = xyxy * torch.stack([width, height, width, height], 1)[:, None, :]
  return values.numpy(), (indexes % logits.shape[2]).numpy(), xyxy.numpy()


def test_postprocess_matches_the_official_one():
  rng = np.random.default_rng(0)
  logits = rng.normal(-3, 2, (2, 300, 91)).astype(np.float32)
  boxes = rng.uniform(0.05, 0.95, (2, 300, 4)).astype(np.float32)
  sizes = np.array([[480, 640], [427, 640]], np.float32)
  scores, labels, xyxy = postprocess.top_k_sigmoid_detections(
      {"pred_logits": logits, "pred_boxes": boxes}, jnp.asarray(sizes))
  ref_scores, ref_labels, ref_boxes = official_postprocess(logits, boxes, sizes)
  np.testing.assert_allclose(scores, ref_scores, rtol=1e-6)
  np.testing.assert_array_equal(labels, ref_labels)
  np.testing.assert_allclose(xyxy, ref_boxes, rtol=1e-6, atol=1e-3)
  assert scores.shape == (2, 100)


def test_postprocess_keeps_every_pair_of_a_small_model():
  """12 queries x 5 classes = 60 pairs, fewer than the official 100: all of them, best first."""
  rng = np.random.default_rng(1)
  logits = rng.normal(-1, 2, (2, 12, 5)).astype(np.float32)
  boxes = rng.uniform(0.05, 0.95, (2, 12, 4)).astype(np.float32)
  scores, labels, xyxy = postprocess.top_k_sigmoid_detections(
      {"pred_logits": logits, "pred_boxes": boxes}, jnp.asarray([[100, 200], [50, 80]], jnp.float32))
  assert scores.shape == labels.shape == (2, 60) and xyxy.shape == (2, 60, 4)
  expected = np.sort(1 / (1 + np.exp(-logits.reshape(2, -1))), axis=1)[:, ::-1]
  np.testing.assert_allclose(scores, expected, rtol=1e-6)
