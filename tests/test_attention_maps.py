"""Attention pictures (the official DETR notebook's): the maps DETR sows against transformers'
`output_attentions` on real images, and `Predictor.attention` / `detr-predict --attention` on them;
Deformable DETR's sampling locations and weights against those transformers' attention module
receives, and their maps (a bilinear splat, checked as the adjoint of torch's `grid_sample`)."""

import json

import jax
import numpy as np
import pytest
import torch

from detr_jax import inference, porting, predict_cli
from detr_jax.data import pipeline
from detr_jax.models import backbone
from references.transformers_deformable_detr import hf_deformable_detr
from references.transformers_detr import hf_detr

# Softmax probabilities over ~100-300 positions, float32: measured max difference 2e-8 to 6e-8.
ATTENTION_TOLERANCE = 1e-6
# Deformable DETR's sampling locations (normalised, in about [-0.1, 1.1]) and weights after 2 layers,
# float32: measured max difference 8e-6 (encoder locations), 4e-7 (decoder).
SAMPLING_TOLERANCE = 2e-5


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


def _portrait_attention(reference, coco_mini):
  """The ported `reference`, a real portrait image (640 x 424) and its `Predictor.attention` maps at
  threshold 0, whose detections are checked to be `predict`'s."""
  model, variables = porting.load_pytorch_checkpoint(reference.state_dict())
  options = pipeline.PipelineOptions(scale=0.25, pad_multiple=64)
  predictor = inference.Predictor(model, variables, threshold=0.0, options=options)
  path = coco_mini / "val2017" / "000000000802.jpg"
  maps = predictor.attention(str(path))
  assert [d["score"] for d in maps["detections"]] == [d["score"] for d in predictor.predict([str(path)])[0]]
  return model, variables, path, maps


def test_predictor_attention_maps_and_pictures(small_reference, coco_mini, tmp_path, monkeypatch):
  model, variables, path, maps = _portrait_attention(small_reference, coco_mini)
  detections = maps["detections"]
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

  def second_forward(*args, **kwargs):
    raise AssertionError("--attention ran the batched predictions too")

  inspected, inspect = [], inference.Predictor.inspect

  def recorded_inspect(*args, **kwargs):
    inspected.append(inspect(*args, **kwargs))
    return inspected[-1]

  monkeypatch.setattr(inference.Predictor, "predict_iter", second_forward)
  monkeypatch.setattr(inference.Predictor, "inspect", recorded_inspect)
  assert predict_cli.main(["--checkpoint", str(checkpoint), str(path), "--output_dir", str(out), "--threshold", "0",
                           "--attention"]) == 0
  assert sorted(p.name for p in (out / "attention").iterdir()) == ["000000000802_decoder.jpg",
                                                                  "000000000802_encoder.jpg"]
  written = json.loads((out / "detections.json").read_text())
  # The CLI resizes to 800 (the test's predictor to a quarter of it): its file holds the detections of its
  # one inspected forward pass, whose equality with `predict`'s `_portrait_attention` checks.
  (cli_maps,) = inspected
  assert [(r["category_id"], r["score"]) for r in written] == [(d["category_id"], d["score"])
                                                               for d in cli_maps["detections"]]


@pytest.fixture(scope="module")
def small_deformable_reference():
  """transformers' Deformable DETR (4 levels, box refinement) with 2 + 2 layers of width 64, random weights."""
  return hf_deformable_detr(with_box_refine=True, d_model=64, encoder_layers=2, decoder_layers=2,
                            encoder_ffn_dim=128, decoder_ffn_dim=128, num_queries=10, num_labels=5)


def _captured_sampling(reference, images, mask):
  """The sampling locations and attention weights that transformers' last encoder and last decoder
  layers hand to their `MultiScaleDeformableAttention` kernel."""
  captured = {}

  def capture(name):
    def hook(module, args):
      captured[name] = (args[4].numpy(), args[5].numpy())   # sampling_locations, attention_weights
    return hook

  handles = [reference.model.encoder.layers[-1].self_attn.attn.register_forward_pre_hook(capture("encoder")),
             reference.model.decoder.layers[-1].encoder_attn.attn.register_forward_pre_hook(capture("decoder"))]
  with torch.no_grad():
    reference(pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2), pixel_mask=torch.from_numpy(mask).long())
  for handle in handles:
    handle.remove()
  return captured


def test_sown_sampling_equals_transformers(small_deformable_reference, two_real_images):
  images, mask = two_real_images
  captured = _captured_sampling(small_deformable_reference, images, mask)
  model, variables = porting.load_pytorch_checkpoint(small_deformable_reference.state_dict())
  _, state = jax.jit(lambda v, x, m: model.apply(v, x, m, mutable=["intermediates"]))(variables, images, mask)
  transformer = state["intermediates"]["transformer"]
  # The encoder's queries at padded positions differ (their values are zeroed, so nothing reads them):
  # compare the real positions of the 4 levels (strides 8 to 64), flattened as the model flattens them.
  real = np.concatenate([~np.asarray(backbone.downsample_mask(~mask, (-(-mask.shape[1] // s), -(-mask.shape[2] // s))))
                         .reshape(len(mask), -1) for s in (8, 16, 32, 64)], axis=1)
  for name, ours, positions in (("encoder", transformer["encoder_layers_1"]["self_attn"], real),
                                ("decoder", transformer["decoder_layers_1"]["cross_attn"], Ellipsis)):
    locations, weights = captured[name]
    np.testing.assert_allclose(np.asarray(ours["sampling_locations"][0])[positions], locations[positions],
                               atol=SAMPLING_TOLERANCE, rtol=0, err_msg=name)
    np.testing.assert_allclose(np.asarray(ours["sampling_weights"][0])[positions], weights[positions],
                               atol=SAMPLING_TOLERANCE, rtol=0, err_msg=name)


def test_splat_is_the_adjoint_of_bilinear_sampling():
  """<splat(locations, weights), V> = sum_k weights_k * V(locations_k) for every map V, with V read as
  grid_sample reads it (align_corners=False, zeros outside): the map puts each weight where the model reads."""
  rng = np.random.default_rng(0)
  height, width = 7, 11
  locations = rng.uniform(-0.15, 1.15, (3, 4, 2)).astype(np.float32)
  locations[0, 0] = (0.5 / width, 0.5 / height)   # exactly on the first pixel centre
  weights = rng.uniform(0, 1, (3, 4)).astype(np.float32)
  grid = inference._splat(locations, weights, (height, width)).reshape(height, width)
  for _ in range(3):
    values = rng.normal(size=(height, width)).astype(np.float32)
    sampled = torch.nn.functional.grid_sample(torch.from_numpy(values)[None, None],
                                              torch.from_numpy(2 * locations - 1).reshape(1, 1, -1, 2),
                                              mode="bilinear", padding_mode="zeros", align_corners=False)
    np.testing.assert_allclose((grid * values).sum(), (sampled.numpy().ravel() * weights.ravel()).sum(),
                               rtol=1e-5, atol=1e-5)


def test_predictor_deformable_attention_maps(small_deformable_reference, coco_mini):
  _, _, _, maps = _portrait_attention(small_deformable_reference, coco_mini)
  detections = maps["detections"]
  assert len(detections) == 10 * 5   # every (query, class) pair of 10 queries and 5 classes
  # A detection's query is the one whose box it carries: each query's box appears once per class.
  queries = np.array([d["query"] for d in detections])
  assert sorted(np.bincount(queries, minlength=10)) == [5] * 10
  for query in range(10):
    boxes = [d["box"] for d in detections if d["query"] == query]
    assert all(box == boxes[0] for box in boxes)
  assert maps["decoder"].shape == (50, 640, 424) and maps["encoder"].shape == (4, 640, 424)
  assert (maps["decoder"] >= 0).all() and (maps["encoder"] >= 0).all()
  # Every query attends somewhere on the image; two queries attend to different places, one query's
  # detections (one per class) to the same.
  assert (maps["decoder"].reshape(50, -1).max(axis=1) > 0).all()
  other = int(np.flatnonzero(queries != queries[0])[0])
  same = int(np.flatnonzero(queries == queries[0])[1])
  assert np.abs(maps["decoder"][0] - maps["decoder"][other]).max() > 0
  np.testing.assert_array_equal(maps["decoder"][0], maps["decoder"][same])
