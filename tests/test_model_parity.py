"""Parity of the Flax DETR with transformers' PyTorch DetrForObjectDetection on real images.

Every parameter of the reference is non-trivial (`conftest.randomise_parameters`: norms, biases
and BN statistics random), so a swapped norm or a wrong eps shows in the outputs.

Tolerances (float32 on CPU), on the last and on every earlier decoder layer: logits 1e-5, boxes
1e-6. Measured on these images (2026-11-22): logits 1.5e-6 to 2.3e-6, boxes 1.2e-7 for every
depth. For scale: swapping norm2 and norm3 of the decoder moves logits by ~0.2, a FrozenBatchNorm
eps of 1e-6 by ~4.5e-5.
"""

import jax
import numpy as np
import pytest
import torch

from detr_jax import porting
from references.transformers_detr import hf_detr

LOGITS_TOLERANCE = 1e-5
BOXES_TOLERANCE = 1e-6


def hf_outputs(model, images, mask):
  """Last-layer (logits, boxes) and those of the earlier decoder layers (the official aux outputs)
  from the HF model. HF records the query embeddings, then each layer's output with the last one
  already through `decoder.layernorm`; the earlier ones are normed here, as the official decoder does."""
  with torch.no_grad():
    out = model(pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2),
                pixel_mask=torch.from_numpy(mask).long(), output_hidden_states=True)
    hidden = out.decoder_hidden_states
    assert len(hidden) == model.config.decoder_layers + 1
    np.testing.assert_array_equal(hidden[-1].numpy(), out.last_hidden_state.numpy())
    earlier = []
    for state in hidden[1:-1]:
      normed = model.model.decoder.layernorm(state)
      earlier.append((model.class_labels_classifier(normed).numpy(), model.bbox_predictor(normed).sigmoid().numpy()))
  return out.logits.numpy(), out.pred_boxes.numpy(), earlier


@pytest.mark.parametrize("depth,dilation", [(50, False), (50, True), (101, False), (18, False), (34, False)],
                         ids=["r50", "r50-dc5", "r101", "r18", "r34"])
def test_matches_transformers(two_real_images, depth, dilation):
  images, mask = two_real_images
  reference = hf_detr(depth, dilation)
  ref_logits, ref_boxes, ref_layers = hf_outputs(reference, images, mask)

  model, variables = porting.load_pytorch_checkpoint(reference.state_dict(), dilation=dilation)
  assert model.backbone_depth == depth
  out = jax.jit(model.apply)(variables, images, mask)

  np.testing.assert_allclose(out["pred_logits"], ref_logits, atol=LOGITS_TOLERANCE, rtol=0)
  np.testing.assert_allclose(out["pred_boxes"], ref_boxes, atol=BOXES_TOLERANCE, rtol=0)
  assert len(out["aux_outputs"]) == len(ref_layers) == 5
  for aux, (layer_logits, layer_boxes) in zip(out["aux_outputs"], ref_layers):
    np.testing.assert_allclose(aux["pred_logits"], layer_logits, atol=LOGITS_TOLERANCE, rtol=0)
    np.testing.assert_allclose(aux["pred_boxes"], layer_boxes, atol=BOXES_TOLERANCE, rtol=0)
