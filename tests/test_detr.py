"""DETR module: official from-scratch initialisers, the bfloat16 compute option, output format."""

import flax
import jax
import numpy as np
import pytest
import torch

from detr_jax import porting
from detr_jax.models import detr
from references.transformers_detr import hf_detr


@pytest.fixture(scope="module")
def r50_variables():
  return detr.init_variables(detr.DETR(), jax.random.PRNGKey(0))


def torch_std(init, shape):
  tensor = torch.empty(shape)
  init(tensor)
  return tensor.std().item()


def test_initialisers_match_pytorch(r50_variables):
  """Each parameter family has the spread of the official PyTorch initialiser (within 5%).

  Flax's defaults (lecun-normal kernels, e.g. std 0.0625 instead of 0.0442 for the fused
  in_proj) fail this test.
  """
  state = porting.to_pytorch_state_dict(r50_variables)
  linear_default = lambda t: t.copy_(torch.nn.Linear(t.shape[1], t.shape[0]).weight)
  cases = {
      "transformer.encoder.layers.0.self_attn.in_proj_weight": torch.nn.init.xavier_uniform_,
      "transformer.decoder.layers.5.multihead_attn.out_proj.weight": torch.nn.init.xavier_uniform_,
      "transformer.encoder.layers.2.linear1.weight": torch.nn.init.xavier_uniform_,
      "query_embed.weight": torch.nn.init.normal_,
      "class_embed.weight": linear_default,
      "bbox_embed.layers.1.weight": linear_default,
      "backbone.0.body.layer3.0.conv2.weight":
          lambda t: torch.nn.init.kaiming_normal_(t, mode="fan_out", nonlinearity="relu"),
  }
  for key, init in cases.items():
    expected = torch_std(init, state[key].shape)
    assert abs(state[key].std() - expected) < 0.05 * expected, (key, state[key].std(), expected)
  bound = 1 / np.sqrt(2048)  # input_proj: nn.Conv2d default, fan_in = 2048
  assert np.abs(state["input_proj.weight"]).max() <= bound and np.abs(state["input_proj.bias"]).max() <= bound
  for key in ("transformer.encoder.layers.0.self_attn.in_proj_bias", "transformer.decoder.layers.0.self_attn.out_proj.bias"):
    assert not state[key].any(), key
  assert (state["transformer.decoder.norm.weight"] == 1).all() and not state["transformer.decoder.norm.bias"].any()
  assert (state["backbone.0.body.bn1.running_var"] == 1).all() and not state["backbone.0.body.bn1.running_mean"].any()


def test_trainable_and_frozen_collections(r50_variables):
  """FrozenBatchNorm lives outside "params", so no optimiser can touch it."""
  assert set(r50_variables) == {"params", "batch_stats"}
  frozen = flax.traverse_util.flatten_dict(r50_variables["batch_stats"])
  assert all(path[-1] in ("scale", "bias", "mean", "var") for path in frozen)
  assert len(frozen) == 53 * 4  # 53 FrozenBatchNorm layers in ResNet-50
  params = flax.traverse_util.flatten_dict(r50_variables["params"])
  frozen_stages = lambda path: path[0] == "backbone" and (path[1] == "conv1" or path[1].startswith("layer1_"))
  trainable = sum(x.size for path, x in params.items() if not frozen_stages(path))
  assert trainable == 41_302_368  # the official main.py prints "number of params: 41302368" for R50


def test_bfloat16_compute(two_real_images):
  """bfloat16 matmuls/convs keep float32 parameters and outputs, and stay close to float32.

  Tolerances are bf16-sized (8 mantissa bits): probabilities within 5e-3, boxes within 5e-3;
  observed 5e-4 and 9e-4 on these images.
  """
  images, mask = two_real_images
  state_dict = hf_detr(50).state_dict()
  model32, variables = porting.load_pytorch_checkpoint(state_dict)
  model16, _ = porting.load_pytorch_checkpoint(state_dict, dtype="bfloat16")
  out32 = jax.jit(model32.apply)(variables, images, mask)
  out16 = jax.jit(model16.apply)(variables, images, mask)
  assert out16["pred_logits"].dtype == out16["pred_boxes"].dtype == np.float32
  assert all(leaf.dtype == np.float32 for leaf in jax.tree_util.tree_leaves(variables))
  np.testing.assert_allclose(jax.nn.softmax(out16["pred_logits"]), jax.nn.softmax(out32["pred_logits"]), atol=5e-3)
  np.testing.assert_allclose(out16["pred_boxes"], out32["pred_boxes"], atol=5e-3)
  assert np.abs(out16["pred_logits"] - out32["pred_logits"]).max() > 0  # really computed in bf16


def test_dropout_only_in_training(two_real_images):
  images, mask = two_real_images
  model = detr.DETR(backbone_depth=18, num_encoder_layers=1, num_decoder_layers=2)
  variables = detr.init_variables(model, jax.random.PRNGKey(0))
  evaluate = jax.jit(model.apply)
  train = jax.jit(lambda v, rng: model.apply(v, images, mask, train=True, rngs={"dropout": rng}))
  eval_a, eval_b = evaluate(variables, images, mask), evaluate(variables, images, mask)
  train_a, train_b = train(variables, jax.random.PRNGKey(1)), train(variables, jax.random.PRNGKey(2))
  np.testing.assert_array_equal(eval_a["pred_logits"], eval_b["pred_logits"])
  assert np.abs(train_a["pred_logits"] - train_b["pred_logits"]).max() > 1e-3
  assert len(eval_a["aux_outputs"]) == 1


def test_invalid_choices():
  with pytest.raises(ValueError, match="DC5 .* basic blocks"):
    detr.init_variables(detr.DETR(backbone_depth=34, dilation=True), jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="Unsupported ResNet depth 152"):
    detr.init_variables(detr.DETR(backbone_depth=152), jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="compute dtype 'float16'"):
    detr.init_variables(detr.DETR(dtype="float16"), jax.random.PRNGKey(0))
