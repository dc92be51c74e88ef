"""Parity of the Flax DETR with transformers' PyTorch DetrForObjectDetection on real images.

Tolerance: max |diff| <= 1e-4 on logits and boxes of the last and of every earlier decoder
layer (float32 on CPU; the observed differences are ~1e-6).
"""

import jax
import numpy as np
import pytest
import torch

from detr_jax import porting
from tests.conftest import hf_detr

TOLERANCE = 1e-4


def hf_outputs(model, images, mask):
  """Last-layer and per-layer (logits, boxes) from the HF model, the official aux outputs included."""
  with torch.no_grad():
    out = model(pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2),
                pixel_mask=torch.from_numpy(mask).long(), output_hidden_states=True)
    per_layer = []
    for hidden in out.decoder_hidden_states[1:]:
      normed = model.model.decoder.layernorm(hidden)
      per_layer.append((model.class_labels_classifier(normed).numpy(),
                        model.bbox_predictor(normed).sigmoid().numpy()))
  return out.logits.numpy(), out.pred_boxes.numpy(), per_layer


@pytest.mark.parametrize("depth,dilation", [(50, False), (50, True), (101, False)],
                         ids=["r50", "r50-dc5", "r101"])
def test_matches_transformers(two_real_images, depth, dilation):
  images, mask = two_real_images
  reference = hf_detr(depth, dilation)
  ref_logits, ref_boxes, ref_layers = hf_outputs(reference, images, mask)

  model, variables = porting.load_pytorch_checkpoint(reference.state_dict(), dilation=dilation)
  assert model.backbone_depth == depth
  out = jax.jit(model.apply)(variables, images, mask)

  np.testing.assert_allclose(out["pred_logits"], ref_logits, atol=TOLERANCE, rtol=0)
  np.testing.assert_allclose(out["pred_boxes"], ref_boxes, atol=TOLERANCE, rtol=0)
  assert len(out["aux_outputs"]) == len(ref_layers) - 1 == 5
  for aux, (layer_logits, layer_boxes) in zip(out["aux_outputs"], ref_layers[:-1]):
    np.testing.assert_allclose(aux["pred_logits"], layer_logits, atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(aux["pred_boxes"], layer_boxes, atol=TOLERANCE, rtol=0)
  # The last entry of the per-layer list is the final output itself.
  np.testing.assert_allclose(ref_layers[-1][0], ref_logits, atol=1e-6, rtol=0)
