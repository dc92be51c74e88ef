"""Deformable DETR checkpoints: the official layout of all five variants (from the reference key
lists), transformers' layout, the strict errors, the CLI and transformers export."""

import argparse
import json

import jax
import numpy as np
import pytest
import torch

from detr_jax import checkpoints, families, porting
from detr_jax.porting import cli, deformable_huggingface, deformable_official
from references.transformers_deformable_detr import hf_deformable_detr, hf_deformable_to_official_by_hand
from tests.helpers import SHARED_REFERENCE, assert_same_state_dict, random_state_dict, require_shared_file

VARIANTS = {"deformable-detr-single-scale": False, "deformable-detr-single-scale-dc5": True, "deformable-detr": False,
            "deformable-detr-refine": False, "deformable-detr-refine-two-stage": False}


@pytest.fixture(scope="module")
def deformable_shapes():
  """Every key and shape of the five official Deformable DETR variants (91 classes)."""
  path = SHARED_REFERENCE / "deformable-detr-state-dict-keys.json"
  require_shared_file(path, "the reference key lists live in ../shared/reference (env DETR_JAX_REFERENCE)")
  return json.loads(path.read_text())


def official_state_dict(shapes, seed=0):
  """A random state dict with exactly the official keys and shapes, the official model's shared
  modules stored as equal copies: the one head of a model without refinement under class_embed.0..5
  and bbox_embed.0..5, the decoder's bbox_embed (and two-stage class_embed) equal to the detector's."""
  state = random_state_dict(shapes, seed)
  refine = "transformer.decoder.bbox_embed.0.layers.0.weight" in state
  for key in state:
    parts = key.split(".")
    if not refine and parts[0] in ("class_embed", "bbox_embed"):
      state[key] = state[".".join([parts[0], "0", *parts[2:]])]
    if key.startswith(deformable_official.DECODER_PREFIX + "bbox_embed.") or key.startswith(
        deformable_official.DECODER_PREFIX + "class_embed."):
      state[key] = state[key[len(deformable_official.DECODER_PREFIX):]]
  return state


@pytest.mark.parametrize("name", VARIANTS)
def test_official_layout_round_trip(deformable_shapes, name):
  state = official_state_dict(deformable_shapes[name])
  model, variables = porting.load_pytorch_checkpoint(state, dilation=VARIANTS[name])
  assert model.dilation == VARIANTS[name]
  assert (model.num_feature_levels, model.with_box_refine, model.two_stage) == (
      1 if "single-scale" in name else 4, "refine" in name, "two-stage" in name)
  assert model.num_classes == 91 and model.num_queries == 300
  assert_same_state_dict(families.of_model(model).to_pytorch_state_dict(variables), state)


def test_official_keys_land_on_the_right_variables(deformable_shapes):
  state = official_state_dict(deformable_shapes["deformable-detr-refine-two-stage"])
  _, variables = porting.load_pytorch_checkpoint(state)
  params = variables["params"]
  transformer = params["transformer"]
  np.testing.assert_array_equal(transformer["level_embed"], state["transformer.level_embed"])
  np.testing.assert_array_equal(params["input_proj_3_conv"]["kernel"],
                                state["input_proj.3.0.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params["input_proj_1_norm"]["scale"], state["input_proj.1.1.weight"])
  attention = transformer["encoder_layers_2"]["self_attn"]
  np.testing.assert_array_equal(attention["sampling_offsets"]["kernel"],
                                state["transformer.encoder.layers.2.self_attn.sampling_offsets.weight"].T)
  decoder = transformer["decoder_layers_4"]
  np.testing.assert_array_equal(decoder["cross_attn"]["attention_weights"]["bias"],
                                state["transformer.decoder.layers.4.cross_attn.attention_weights.bias"])
  # The decoder's norm names: norm2 follows its self-attention.
  np.testing.assert_array_equal(decoder["norm2"]["scale"], state["transformer.decoder.layers.4.norm2.weight"])
  np.testing.assert_array_equal(decoder["ffn"]["linear1"]["kernel"],
                                state["transformer.decoder.layers.4.linear1.weight"].T)
  np.testing.assert_array_equal(decoder["self_attn"]["in_proj_kernel"],
                                state["transformer.decoder.layers.4.self_attn.in_proj_weight"].T)
  np.testing.assert_array_equal(params["class_embed_6"]["bias"], state["class_embed.6.bias"])
  np.testing.assert_array_equal(params["bbox_embed_3"]["layers_2"]["kernel"], state["bbox_embed.3.layers.2.weight"].T)
  np.testing.assert_array_equal(transformer["pos_trans_norm"]["bias"], state["transformer.pos_trans_norm.bias"])
  np.testing.assert_array_equal(variables["batch_stats"]["backbone"]["layer2_0"]["bn1"]["var"],
                                state["backbone.0.body.layer2.0.bn1.running_var"])


@pytest.mark.parametrize("name,options", [("deformable-detr", {}), ("deformable-detr-refine", {"with_box_refine": True}),
                                          ("deformable-detr-refine-two-stage", {"with_box_refine": True,
                                                                                "two_stage": True})])
def test_transformers_model_renamed_by_hand_has_the_official_keys(deformable_shapes, name, options):
  reference = hf_deformable_detr(**options)
  official = hf_deformable_to_official_by_hand(reference.state_dict())
  assert {k: list(v.shape) for k, v in official.items()} == deformable_shapes[name]
  # porting's own renamer gives the same dict.
  renamed = deformable_huggingface.hf_to_official(
      {k: v.numpy() for k, v in reference.state_dict().items()})
  assert_same_state_dict(renamed, official)


def corrupt(state, how):
  state = dict(state)
  if how == "missing":
    del state["transformer.encoder.layers.3.self_attn.value_proj.bias"]
  elif how == "shape":
    state["transformer.decoder.layers.1.cross_attn.sampling_offsets.weight"] = np.zeros((255, 256), np.float32)
  elif how == "unequal":
    state["class_embed.3.bias"] = state["class_embed.3.bias"] + 1.0
  return state


@pytest.mark.parametrize("how,message", [
    ("missing", r"1 missing keys:\n  transformer.encoder.layers.3.self_attn.value_proj.bias"),
    ("shape", r"transformer.decoder.layers.1.cross_attn.sampling_offsets.weight: checkpoint \(255, 256\), model \(256, 256\)"),
    ("unequal", r"one head shared by every decoder layer .* differ between copies.*class_embed.0.bias.*class_embed.3.bias"),
])
def test_strict_errors(deformable_shapes, how, message):
  state = corrupt(official_state_dict(deformable_shapes["deformable-detr"]), how)
  with pytest.raises(checkpoints.CheckpointMismatchError, match=message):
    porting.load_pytorch_checkpoint(state)


def test_refinement_weights_loaded_as_one_stage_are_refused(deformable_shapes):
  state = official_state_dict(deformable_shapes["deformable-detr-refine"])
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match=r"unexpected keys:\n  transformer.decoder.bbox_embed.0.layers.0.bias"):
    porting.load_pytorch_checkpoint(state, with_box_refine=False)
  # Without the decoder's copies the six distinct heads cannot pass as one shared head either.
  state = {k: v for k, v in state.items() if not k.startswith(deformable_official.DECODER_PREFIX + "bbox_embed")}
  with pytest.raises(checkpoints.CheckpointMismatchError, match="with_box_refine=True"):
    porting.load_pytorch_checkpoint(state)


def test_cli_round_trip_of_a_released_checkpoint_file(deformable_shapes, tmp_path):
  """The released files are training checkpoints: {"model", "optimizer", "epoch", "args": Namespace}."""
  state = official_state_dict(deformable_shapes["deformable-detr-refine"], seed=3)
  source = tmp_path / "r50_deformable_detr_plus_iterative_bbox_refinement-checkpoint.pth"
  torch.save({"model": {k: torch.from_numpy(v) for k, v in state.items()}, "epoch": 49,
              "args": argparse.Namespace(with_box_refine=True, two_stage=False, lr=2e-4)}, source)
  assert cli.main(["import", str(source), str(tmp_path / "imported")]) == 0
  assert cli.main(["export", str(tmp_path / "imported"), str(tmp_path / "exported.pth")]) == 0
  exported = torch.load(tmp_path / "exported.pth", weights_only=True)["model"]
  assert_same_state_dict({k: v.numpy() for k, v in exported.items()}, state)
  model, _ = families.load_model(str(source))
  assert families.describe(model) == "Deformable-DETR-R50 multi-scale + refinement (91 classes, 300 queries)"


@pytest.mark.parametrize("options", [{}, {"with_box_refine": True, "two_stage": True}], ids=["shared-heads", "two-stage"])
def test_hf_export_equals_the_imported_state_dict(options, tmp_path):
  """Export to a transformers directory: shared heads stay tied, distinct heads stay distinct."""
  from transformers import DeformableDetrForObjectDetection
  reference = hf_deformable_detr(**options)
  model, variables = porting.load_pytorch_checkpoint(reference.state_dict())
  families.of_model(model).save_hf_pretrained(model, variables, str(tmp_path / "hf"))
  reloaded = DeformableDetrForObjectDetection.from_pretrained(str(tmp_path / "hf"))
  expected = reference.state_dict()
  actual = reloaded.state_dict()
  assert sorted(actual) == sorted(expected)
  for key in expected:
    np.testing.assert_array_equal(actual[key].numpy(), expected[key].numpy(), err_msg=key)
  if options:
    assert not torch.equal(reloaded.class_embed[0].weight, reloaded.class_embed[1].weight)


def test_hf_export_refuses_dc5(deformable_shapes):
  model, variables = porting.load_pytorch_checkpoint(
      official_state_dict(deformable_shapes["deformable-detr-single-scale-dc5"]), dilation=True)
  with pytest.raises(ValueError, match="no DC5"):
    deformable_huggingface.save_hf_pretrained(model, variables, "unused")


def test_detr_checkpoints_are_not_mistaken_for_deformable(official_shapes):
  state = random_state_dict(official_shapes["detr-r50"])
  model, _ = porting.load_pytorch_checkpoint(state)
  assert families.of_model(model) is families.DETR
  assert model.num_queries == 100


def test_saved_safetensors_layout_gives_the_same_variables(tmp_path):
  """transformers' save_pretrained writes other names than its state_dict() (`conv_encoder`, `fc1`,
  `out_proj`, as the hub files): both load to the same variables."""
  from safetensors.numpy import load_file
  reference = hf_deformable_detr(with_box_refine=True, two_stage=True)
  reference.save_pretrained(tmp_path)
  saved = load_file(str(tmp_path / "model.safetensors"))
  assert any(".conv_encoder." in key for key in saved) and not any(".mlp.fc1." in key for key in saved)
  _, from_file = porting.load_pytorch_checkpoint(str(tmp_path / "model.safetensors"))
  _, from_state_dict = porting.load_pytorch_checkpoint(reference.state_dict())
  jax.tree.map(np.testing.assert_array_equal, from_file, from_state_dict)
