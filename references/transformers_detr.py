"""transformers' PyTorch DETR as the reference implementation: models built from config with
random, non-trivial weights (no hub), and an independent renamer of their keys to the official ones."""

import numpy as np


def hf_detr(depth=50, dilation=False, num_labels=91, seed=0, segmentation=False, **config_overrides):
  """transformers' DetrForObjectDetection (or DetrForSegmentation) with random weights, built from
  config (no hub), eval mode.

  transformers ignores `dilation` for non-timm backbones, so DC5 is applied by hand as torchvision's
  `replace_stride_with_dilation` does: layer4's strides become 1 and the 3x3 convs of its later
  blocks get dilation 2 and padding 2.
  """
  import torch
  from transformers import DetrConfig, DetrForObjectDetection, DetrForSegmentation, ResNetConfig
  torch.manual_seed(seed)
  layouts = {18: ("basic", [2, 2, 2, 2], [64, 128, 256, 512]), 34: ("basic", [3, 4, 6, 3], [64, 128, 256, 512]),
             50: ("bottleneck", [3, 4, 6, 3], [256, 512, 1024, 2048]),
             101: ("bottleneck", [3, 4, 23, 3], [256, 512, 1024, 2048])}
  layer_type, depths, hidden_sizes = layouts[depth]
  stages = ["stage1", "stage2", "stage3", "stage4"] if segmentation else ["stage4"]
  config = DetrConfig(
      use_timm_backbone=False, use_pretrained_backbone=False, backbone=None, num_labels=num_labels,
      backbone_config=ResNetConfig(layer_type=layer_type, depths=depths, hidden_sizes=hidden_sizes,
                                   out_features=stages), **config_overrides)
  model = (DetrForSegmentation if segmentation else DetrForObjectDetection)(config)
  detector = model.detr if segmentation else model
  if dilation:
    dilate_last_stage(detector.model.backbone.model)
  randomise_parameters(model)
  return model.eval()


def dilate_last_stage(resnet) -> None:
  """torchvision's `replace_stride_with_dilation=[False, False, True]` (DC5) applied to an HF
  ResNet in place: layer4's strides become 1, the 3x3 convs of its later blocks get dilation 2
  and padding 2."""
  stage = resnet.encoder.stages[3]
  stage.layers[0].shortcut.convolution.stride = (1, 1)
  stage.layers[0].layer[1].convolution.stride = (1, 1)
  for block in stage.layers[1:]:
    block.layer[1].convolution.dilation = (2, 2)
    block.layer[1].convolution.padding = (2, 2)


def randomise_parameters(model) -> None:
  """Gives every parameter and statistic of a transformers DETR a non-trivial value, in place.

  HF initialises every Linear with std 0.02 (all boxes nearly equal), biases at 0, LayerNorm and
  GroupNorm at 1 / 0 and frozen-BN statistics at 0 / 1: a model built that way cannot tell norm2
  from norm3, or a bias from its absence. PyTorch default inits (as in the official model) for
  Linear and Embedding, norm weights in [0.7, 1.3], biases N(0, 0.05) and random BN statistics
  make every parameter visible in the outputs.
  Raises AssertionError if a 1-D parameter is still all 0 or all 1.
  """
  import torch
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
        module.reset_parameters()
      if hasattr(module, "running_var") and hasattr(module, "running_mean"):
        module.running_mean.uniform_(-0.1, 0.1)
        module.running_var.uniform_(0.5, 1.5)
        module.weight.uniform_(0.5, 1.5)
        module.bias.uniform_(-0.1, 0.1)
      elif isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm)):
        module.weight.uniform_(0.7, 1.3)
        module.bias.normal_(0, 0.05)
      elif isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and module.bias is not None:
        module.bias.normal_(0, 0.05)
  trivial = [name for name, value in model.state_dict().items()
             if value.ndim == 1 and value.numel() > 1 and bool((value == value[0]).all()) and float(value[0]) in (0, 1)]
  assert not trivial, f"parameters left at 0 or 1: {trivial}"


_HF_TO_OFFICIAL_LAYER_MODULES = {
    # HF module of an encoder / decoder layer -> official module (models/transformer.py).
    "encoder": {"self_attn": "self_attn", "self_attn_layer_norm": "norm1", "final_layer_norm": "norm2",
                "mlp.fc1": "linear1", "mlp.fc2": "linear2"},
    "decoder": {"self_attn": "self_attn", "encoder_attn": "multihead_attn", "self_attn_layer_norm": "norm1",
                "encoder_attn_layer_norm": "norm2", "final_layer_norm": "norm3", "mlp.fc1": "linear1",
                "mlp.fc2": "linear2"},
}
_HF_TO_OFFICIAL_MODULES = {
    "model.input_projection": "input_proj", "model.query_position_embeddings": "query_embed",
    "model.decoder.layernorm": "transformer.decoder.norm", "class_labels_classifier": "class_embed",
    "bbox_predictor": "bbox_embed", "bbox_attention.q_proj": "bbox_attention.q_linear",
    "bbox_attention.k_proj": "bbox_attention.k_linear", "mask_head.output_conv": "mask_head.out_lay",
    "mask_head.conv1.conv": "mask_head.lay1", "mask_head.conv1.norm": "mask_head.gn1",
    "mask_head.conv2.conv": "mask_head.lay2", "mask_head.conv2.norm": "mask_head.gn2",
    "model.backbone.position_embedding.row_embeddings": "backbone.1.row_embed",
    "model.backbone.position_embedding.column_embeddings": "backbone.1.col_embed",
    "model.position_embedding.row_embeddings": "backbone.1.row_embed",
    "model.position_embedding.column_embeddings": "backbone.1.col_embed",
}


def _official_resnet_key(path: list[str]) -> str:
  """torchvision's name of an HF-ResNet parameter, from the parts after `...backbone[.conv_encoder].model.`."""
  if path[:2] == ["embedder", "embedder"]:
    return {"convolution": "conv1", "normalization": "bn1"}[path[2]] + "." + path[3]
  stage, block = int(path[2]) + 1, path[4]
  if path[5] == "shortcut":
    return f"layer{stage}.{block}.downsample.{ {'convolution': 0, 'normalization': 1}[path[6]]}.{path[7]}"
  conv = int(path[6]) + 1
  return f"layer{stage}.{block}.{ {'convolution': 'conv', 'normalization': 'bn'}[path[7]]}{conv}.{path[8]}"


def hf_to_official_by_hand(state_dict) -> dict[str, np.ndarray]:
  """A transformers DETR state dict (the installed layout; DetrForSegmentation too) renamed to the
  official keys, written from the official module names independently of `detr_jax.porting`.

  q/k/v projections are stacked into `in_proj_weight` / `in_proj_bias` (rows q, k, v, as in
  `nn.MultiheadAttention`); `num_batches_tracked` is dropped; DetrForSegmentation's detector keys
  get the official `detr.` prefix.
  """
  official, projections = {}, {}
  for key, value in state_dict.items():
    value = value.numpy() if hasattr(value, "numpy") else np.asarray(value)
    if key.endswith("num_batches_tracked"):
      continue
    prefix = "detr." if key.startswith("detr.") else ""
    parts = key[len(prefix):].split(".")
    module, leaf = ".".join(parts[:-1]), parts[-1]
    if parts[:2] == ["model", "backbone"] and "model" in parts[2:4]:
      name = "backbone.0.body." + _official_resnet_key(parts[parts.index("model", 2) + 1:])
    elif parts[0] == "model" and parts[1] in ("encoder", "decoder") and parts[2] == "layers":
      layer_module = ".".join(parts[4:-1])
      base = f"transformer.{parts[1]}.layers.{parts[3]}."
      if layer_module.endswith(("q_proj", "k_proj", "v_proj")):
        attention = _HF_TO_OFFICIAL_LAYER_MODULES[parts[1]][parts[4]]
        projections.setdefault(f"{prefix}{base}{attention}.in_proj_{leaf}", {})[parts[5][0]] = value
        continue
      if layer_module.endswith("o_proj"):
        name = f"{base}{_HF_TO_OFFICIAL_LAYER_MODULES[parts[1]][parts[4]]}.out_proj.{leaf}"
      else:
        name = f"{base}{_HF_TO_OFFICIAL_LAYER_MODULES[parts[1]][layer_module]}.{leaf}"
    elif parts[:2] == ["mask_head", "fpn_stages"]:
      stage = int(parts[2])
      name = {"fpn_adapter": f"mask_head.adapter{stage + 1}", "refine.conv": f"mask_head.lay{stage + 3}",
              "refine.norm": f"mask_head.gn{stage + 3}"}[".".join(parts[3:-1])] + "." + leaf
    elif parts[0] == "bbox_predictor":
      name = f"bbox_embed.layers.{parts[2]}.{leaf}"
    else:
      name = f"{_HF_TO_OFFICIAL_MODULES[module]}.{leaf}"
    official[(prefix if not name.startswith(("bbox_attention", "mask_head")) else "") + name] = value
  for name, qkv in projections.items():
    official[name] = np.concatenate([qkv["q"], qkv["k"], qkv["v"]])
  return official
