"""Checkpoint porting: official and Hugging Face layouts, strictness, CLI round trips.

The official layout is checked against the reference key list and against
`conftest.hf_to_official_by_hand` (a renamer written from the official module names, independent
of `porting`'s rules); the Hugging Face rules by the outputs of the transformers models they feed.
Output tolerances as in test_model_parity: logits 1e-5, boxes 1e-6 (measured ~2e-6 and 1.2e-7).
"""

import copy
import re

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from detr_jax import families, porting
from detr_jax.models import detr
from detr_jax.porting import cli
from references.transformers_detr import hf_detr, hf_to_official_by_hand
from tests.helpers import assert_same_state_dict, random_state_dict

LOGITS_TOLERANCE, BOXES_TOLERANCE = 1e-5, 1e-6


@pytest.mark.parametrize("name,dilation,depth", [("detr-r50", False, 50), ("detr-r50-dc5", True, 50),
                                                 ("detr-r101", False, 101)])
def test_official_layout_round_trip(official_shapes, name, dilation, depth):
  state_dict = random_state_dict(official_shapes[name])
  model, variables = porting.load_pytorch_checkpoint(state_dict, dilation=dilation)
  assert (model.backbone_depth, model.dilation, model.num_classes, model.num_queries) == (depth, dilation, 91, 100)
  assert_same_state_dict(porting.to_pytorch_state_dict(variables), state_dict)


@pytest.mark.parametrize("name,depth,segmentation", [("detr-r50", 50, False), ("detr-r101", 101, False),
                                                      ("detr-r50-panoptic", 50, True)])
def test_hand_renamed_transformers_model_has_the_official_keys(official_shapes, name, depth, segmentation):
  """The test's own renamer gives exactly the official key list, so it can serve as a reference."""
  reference = hf_detr(depth, segmentation=segmentation, num_labels=250 if segmentation else 91)
  official = hf_to_official_by_hand(reference.state_dict())
  assert {k: list(v.shape) for k, v in official.items()} == {k: list(v) for k, v in official_shapes[name].items()}


def test_official_keys_land_on_the_right_variables(official_shapes):
  """Values placed by hand: official key -> the Flax variable that must hold it, in Flax's layout."""
  state_dict = random_state_dict(official_shapes["detr-r50"], seed=8)
  _, variables = porting.load_pytorch_checkpoint(state_dict)
  params, stats = variables["params"], variables["batch_stats"]
  decoder_layer, encoder_layer = params["transformer"]["decoder_layers_2"], params["transformer"]["encoder_layers_4"]
  pairs = [
      ("transformer.decoder.layers.2.norm2.weight", decoder_layer["norm2"]["scale"]),
      ("transformer.decoder.layers.2.norm3.bias", decoder_layer["norm3"]["bias"]),
      ("transformer.encoder.layers.4.norm2.weight", encoder_layer["norm2"]["scale"]),
      ("transformer.decoder.layers.2.linear1.weight", decoder_layer["ffn"]["linear1"]["kernel"].T),
      ("transformer.decoder.layers.2.multihead_attn.out_proj.weight", decoder_layer["multihead_attn"]["out_proj"]["kernel"].T),
      ("transformer.decoder.norm.bias", params["transformer"]["decoder_norm"]["bias"]),
      ("query_embed.weight", params["query_embed"]),
      ("class_embed.weight", params["class_embed"]["kernel"].T),
      ("bbox_embed.layers.2.bias", params["bbox_embed"]["layers_2"]["bias"]),
      ("input_proj.weight", np.asarray(params["input_proj"]["kernel"]).transpose(3, 2, 0, 1)),
      ("backbone.0.body.layer3.1.conv2.weight", np.asarray(params["backbone"]["layer3_1"]["conv2"]["kernel"]).transpose(3, 2, 0, 1)),
      ("backbone.0.body.layer2.0.downsample.1.running_var", stats["backbone"]["layer2_0"]["downsample_1"]["var"]),
      ("backbone.0.body.bn1.running_mean", stats["backbone"]["bn1"]["mean"]),
  ]
  for key, variable in pairs:
    np.testing.assert_array_equal(np.asarray(variable), state_dict[key], err_msg=key)
  # nn.MultiheadAttention stacks the q, k and v projections as rows of in_proj_weight.
  fused = state_dict["transformer.encoder.layers.4.self_attn.in_proj_weight"]
  np.testing.assert_array_equal(np.asarray(encoder_layer["self_attn"]["in_proj_kernel"]).T, fused)


def transformers_outputs(reference, images, mask, float64=False):
  """The transformers model's outputs; with `float64`, of a float64 copy: the exact value that float32 JAX
  is compared with (on an AMD EPYC host, 2026-12-03, transformers' own float32 logits for seed 1 were
  9.5e-6 from it and JAX's 4.9e-6, so float32 against float32 could differ by 1.4e-5)."""
  if float64:
    reference = copy.deepcopy(reference).double()
  with torch.no_grad():
    return reference(pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2).to(next(reference.parameters()).dtype),
                     pixel_mask=torch.from_numpy(mask).long())


def assert_same_detections(out, expected):
  np.testing.assert_allclose(out["pred_logits"], expected.logits.numpy().astype(np.float32), atol=LOGITS_TOLERANCE,
                             rtol=0)
  np.testing.assert_allclose(out["pred_boxes"], expected.pred_boxes.numpy().astype(np.float32), atol=BOXES_TOLERANCE,
                             rtol=0)


def test_official_layout_of_hf_model_gives_hf_outputs(two_real_images):
  images, mask = two_real_images
  reference = hf_detr(50, seed=1)
  official = hf_to_official_by_hand(reference.state_dict())
  model, variables = porting.load_pytorch_checkpoint(official)
  assert_same_detections(jax.jit(model.apply)(variables, images, mask),
                         transformers_outputs(reference, images, mask, float64=True))
  assert_same_state_dict(porting.to_pytorch_state_dict(variables), official)


def hub_layout(official):
  """The official state dict renamed to the layout of the HF hub files (timm backbone names).

  Written independently of the importer's rules, from the hub's facebook/detr-resnet-50 key names.
  """
  hub = {}
  for key, value in official.items():
    attn = re.match(r"transformer\.(encoder|decoder)\.layers\.(\d+)\.(self_attn|multihead_attn)\.in_proj_(weight|bias)", key)
    if attn:
      part, index, kind, leaf = attn.groups()
      name = "self_attn" if kind == "self_attn" else "encoder_attn"
      for proj, chunk in zip("qkv", np.split(value, 3)):
        hub[f"model.{part}.layers.{index}.{name}.{proj}_proj.{leaf}"] = chunk
      continue
    layer = re.match(r"transformer\.(encoder|decoder)\.layers\.(\d+)\.(\w+)\.(.*)", key)
    if layer:
      part, index, module, rest = layer.groups()
      names = {"linear1": "fc1", "linear2": "fc2", "norm1": "self_attn_layer_norm", "self_attn": "self_attn",
               "multihead_attn": "encoder_attn",
               "norm2": "final_layer_norm" if part == "encoder" else "encoder_attn_layer_norm",
               "norm3": "final_layer_norm"}
      hub[f"model.{part}.layers.{index}.{names[module]}.{rest}"] = value
      continue
    for old, new in (("backbone.0.body.", "model.backbone.conv_encoder.model."), ("transformer.decoder.norm.",
                     "model.decoder.layernorm."), ("input_proj.", "model.input_projection."),
                     ("query_embed.", "model.query_position_embeddings."), ("class_embed.", "class_labels_classifier."),
                     ("bbox_embed.", "bbox_predictor.")):
      if key.startswith(old):
        hub[new + key[len(old):]] = value
        break
    else:
      raise AssertionError(f"unmapped {key}")
  hub["model.backbone.conv_encoder.model.layer1.0.downsample.1.num_batches_tracked"] = np.zeros((), np.float32)
  return hub


def test_hub_safetensors_layout(official_shapes, tmp_path):
  official = random_state_dict(official_shapes["detr-r50"], seed=3)
  path = tmp_path / "model.safetensors"
  save_file(hub_layout(official), str(path))
  _, variables = porting.load_pytorch_checkpoint(path)
  assert_same_state_dict(porting.to_pytorch_state_dict(variables), official)


def test_installed_transformers_layout():
  reference = hf_detr(50, seed=2)
  _, variables = porting.load_pytorch_checkpoint(reference.state_dict())
  assert_same_state_dict(porting.to_pytorch_state_dict(variables), hf_to_official_by_hand(reference.state_dict()))


def test_learned_position_and_resnet18_match_hf(two_real_images):
  """Basic blocks (R18) and the learned encoding port from HF's layout and give its outputs."""
  images, mask = two_real_images
  reference = hf_detr(18, num_labels=20, num_queries=30, position_embedding_type="learned")
  model, variables = porting.load_pytorch_checkpoint(reference.state_dict())
  assert (model.backbone_depth, model.position_embedding, model.num_classes, model.num_queries) == (18, "learned", 20, 30)
  assert_same_detections(jax.jit(model.apply)(variables, images, mask), transformers_outputs(reference, images, mask))


def test_torchvision_backbone(official_shapes):
  official = random_state_dict(official_shapes["detr-r50"], seed=4)
  torchvision = {k[len("backbone.0.body."):]: v for k, v in official.items() if k.startswith("backbone.0.body.")}
  torchvision["fc.weight"] = np.zeros((1000, 2048), np.float32)
  torchvision["fc.bias"] = np.zeros((1000,), np.float32)
  torchvision["bn1.num_batches_tracked"] = np.zeros((), np.float32)
  backbone = porting.load_torchvision_backbone(torchvision)
  exported = porting.to_pytorch_state_dict(backbone)
  assert_same_state_dict(exported, {k: v for k, v in official.items() if k.startswith("backbone.0.body.")})


@pytest.mark.parametrize("corruption,message", [
    ("missing", r"1 missing keys:\n  transformer.decoder.layers.3.norm2.bias"),
    ("extra", r"1 unexpected keys:\n  backbone.0.body.fc.weight"),
    ("shape", r"class_embed.bias: checkpoint \(81,\), model \(92,\)"),
])
def test_strict_errors(official_shapes, corruption, message):
  state_dict = random_state_dict(official_shapes["detr-r50"])
  if corruption == "missing":
    del state_dict["transformer.decoder.layers.3.norm2.bias"]
  elif corruption == "extra":
    state_dict["backbone.0.body.fc.weight"] = np.zeros((1000, 2048), np.float32)
  else:
    state_dict["class_embed.bias"] = np.zeros(81, np.float32)
  with pytest.raises(porting.CheckpointMismatchError, match=message):
    porting.load_pytorch_checkpoint(state_dict)


def test_r101_weights_with_r50_flags(official_shapes):
  state_dict = random_state_dict(official_shapes["detr-r101"])
  with pytest.raises(porting.CheckpointMismatchError, match=r"does not fit DETR-R50.*\n255 unexpected keys:\n  backbone.0.body.layer3.10."):
    porting.load_pytorch_checkpoint(state_dict, backbone_depth=50)


def test_cli_round_trip(official_shapes, tmp_path):
  official = random_state_dict(official_shapes["detr-r50"], seed=5)
  source = tmp_path / "detr-r50.pth"
  torch.save({"model": {k: torch.from_numpy(v) for k, v in official.items()}}, source)
  assert cli.main(["import", str(source), str(tmp_path / "ckpt"), "--dilation"]) == 0
  model, _ = families.load_model(str(tmp_path / "ckpt"))
  assert model.dilation and model.backbone_depth == 50
  assert cli.main(["export", str(tmp_path / "ckpt"), str(tmp_path / "back.pth")]) == 0
  exported = torch.load(tmp_path / "back.pth", weights_only=True)["model"]
  assert_same_state_dict({k: v.numpy() for k, v in exported.items()}, official)


def test_cli_writes_nothing_on_error(official_shapes, tmp_path, capsys):
  state_dict = {k: torch.from_numpy(v) for k, v in random_state_dict(official_shapes["detr-r50"]).items()}
  del state_dict["input_proj.bias"]
  torch.save(state_dict, tmp_path / "broken.pth")
  for source, message in (("broken.pth", "missing keys:\n  input_proj.bias"), ("absent.pth", "No checkpoint file")):
    with pytest.raises(SystemExit) as exit_info:
      cli.main(["import", str(tmp_path / source), str(tmp_path / "out")])
    assert exit_info.value.code == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("depth, segmentation, position", [(50, False, "sine"), (18, True, "learned")])
def test_hf_export_equals_the_imported_state_dict(depth, segmentation, position):
  """Import a transformers model, export it back into that model's keys: every tensor is equal."""
  reference = hf_detr(depth, segmentation=segmentation, num_labels=250 if segmentation else 91, seed=6,
                      position_embedding_type=position)
  original = {k: v.numpy() for k, v in reference.state_dict().items()}
  model, variables = porting.load_pytorch_checkpoint(reference.state_dict())
  assert sorted(porting.hf_model(detr.model_config(model)).state_dict()) == sorted(original)
  assert_same_state_dict(porting.to_hf_state_dict(variables, original.keys()), original)


def test_hf_export_cli_gives_a_from_pretrained_directory(two_real_images, tmp_path):
  """official .pth -> `import` -> `export --hf` -> DetrForSegmentation.from_pretrained gives the
  outputs of the transformers model the .pth was renamed from (by hand, not by `porting`).

  Import reads official keys and export writes HF keys, so a Hugging Face rule that is wrong the
  same way in both directions cannot cancel out. Tolerance 1e-5 on logits and mask logits, 1e-6 on
  boxes: the exported weights are exact, `from_pretrained` differs by float32 rounding (~1e-6).
  """
  from transformers import DetrForSegmentation
  images, mask = two_real_images
  reference = hf_detr(18, segmentation=True, num_labels=250, seed=7)
  torch.save({"model": {k: torch.from_numpy(v) for k, v in hf_to_official_by_hand(reference.state_dict()).items()}},
             tmp_path / "official.pth")
  assert cli.main(["import", str(tmp_path / "official.pth"), str(tmp_path / "ckpt")]) == 0
  assert cli.main(["export", str(tmp_path / "ckpt"), str(tmp_path / "hf"), "--hf"]) == 0
  exported = DetrForSegmentation.from_pretrained(str(tmp_path / "hf")).eval()
  expected, actual = transformers_outputs(reference, images, mask), transformers_outputs(exported, images, mask)
  for name, tolerance in (("logits", LOGITS_TOLERANCE), ("pred_boxes", BOXES_TOLERANCE), ("pred_masks", 1e-5)):
    np.testing.assert_allclose(getattr(actual, name).numpy(), getattr(expected, name).numpy(), atol=tolerance, rtol=0,
                               err_msg=name)


def test_hf_export_refuses_dc5(official_shapes, capsys):
  model, variables = porting.load_pytorch_checkpoint(random_state_dict(official_shapes["detr-r50"]), dilation=True)
  with pytest.raises(ValueError, match="no DC5 or pre-norm"):
    porting.save_hf_pretrained(model, variables, "/nonexistent")


def test_pre_norm_is_read_from_the_keys():
  """A pre-norm DETR (official --pre_norm: an encoder final norm, `transformer.encoder.norm`) is
  recognised from its keys and ports back to the same model and variables (so the same outputs);
  a post-norm one is not pre-norm."""
  from detr_jax.models import detr
  for pre_norm in (True, False):
    model = detr.DETR(backbone_depth=18, hidden_dim=64, num_encoder_layers=1, num_decoder_layers=2,
                      dim_feedforward=128, num_queries=10, num_classes=20, pre_norm=pre_norm)
    variables = detr.init_variables(model, jax.random.PRNGKey(3))
    state_dict = porting.to_pytorch_state_dict(variables)
    assert ("transformer.encoder.norm.weight" in state_dict) == pre_norm
    ported, ported_variables = porting.load_pytorch_checkpoint(state_dict)
    assert ported.pre_norm == pre_norm and ported == model
    jax.tree.map(np.testing.assert_array_equal, ported_variables, jax.device_get(variables))
