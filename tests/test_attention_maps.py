"""Attention pictures (the official DETR notebook's): the maps DETR sows against transformers'
`output_attentions` on real images, and `Predictor.attention` / `detr-predict --attention` on them."""

import jax
import numpy as np
import pytest
import torch

from detr_jax import inference, porting, predict_cli
from detr_jax.data import pipeline
from references.transformers_detr import hf_detr

# Softmax probabilities over ~100-300 positions, float32: measured max difference 2e-8 to 6e-8.
ATTENTION_TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def small_reference():
  """transformers' DETR-R18 with 2 + 2 layers of width 64, random non-trivial weights, eager attention."""
  return hf_detr(18, d_model=64, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=128, decoder_ffn_dim=128,
                 num_queries=10, attn_implementation="eager")


def test_sown_attention_equals_transformers(small_reference, two_real_images):
  """The last encoder layer's self-attention and the last decoder layer's cross-attention, heads averaged."""
  images, mask = two_real_images
  with torch.no_grad():
    out = small_reference(pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2),
                          pixel_mask=torch.from_numpy(mask).long(), output_attentions=True)
  model, variables = porting.load_pytorch_checkpoint(small_reference.state_dict())
  _, state = jax.jit(lambda v, x, m: model.apply(v, x, m, mutable=["intermediates"]))(variables, images, mask)
  transformer = state["intermediates"]["transformer"]
  encoder = transformer["encoder_layers_1"]["self_attn"]["attention_weights"][0]
  decoder = transformer["decoder_layers_1"]["multihead_attn"]["attention_weights"][0]
  np.testing.assert_allclose(encoder, out.encoder_attentions[-1].mean(1).numpy(), atol=ATTENTION_TOLERANCE, rtol=0)
  np.testing.assert_allclose(decoder, out.cross_attentions[-1].mean(1).numpy(), atol=ATTENTION_TOLERANCE, rtol=0)


def test_predictor_attention_maps_and_pictures(small_reference, coco_mini, tmp_path):
  model, variables = porting.load_pytorch_checkpoint(small_reference.state_dict())
  options = pipeline.PipelineOptions(scale=0.25, pad_multiple=64)
  predictor = inference.Predictor(model, variables, threshold=0.0, options=options)
  path = coco_mini / "val2017" / "000000000802.jpg"   # 640 x 424, portrait
  maps = predictor.attention(str(path))
  detections = maps["detections"]
  assert [d["score"] for d in detections] == [d["score"] for d in predictor.predict([str(path)])[0]]
  assert sorted(d["query"] for d in detections) == list(range(10))
  assert maps["decoder"].shape == (10, 640, 424) and maps["encoder"].shape == (4, 640, 424)
  assert maps["points"] == [((d["box"][0] + d["box"][2]) / 2, (d["box"][1] + d["box"][3]) / 2) for d in detections[:4]]
  assert (maps["decoder"] >= 0).all() and maps["decoder"].max() <= 1
  # Each map is one query's distribution: the queries' maps differ.
  assert np.abs(maps["decoder"][0] - maps["decoder"][1]).max() > 0

  checkpoint = tmp_path / "checkpoint"
  from detr_jax import families
  families.save_model_dir(str(checkpoint), model, variables)
  out = tmp_path / "out"
  assert predict_cli.main(["--checkpoint", str(checkpoint), str(path), "--output_dir", str(out), "--threshold", "0",
                           "--attention"]) == 0
  assert sorted(p.name for p in (out / "attention").iterdir()) == ["000000000802_decoder.jpg",
                                                                  "000000000802_encoder.jpg"]
