"""The official PyTorch path of multi-scale deformable sampling, transcribed for tests and benchmarks
(fundamentalvision/Deformable-DETR `models/ops/functions/ms_deform_attn_func.py`,
`ms_deform_attn_core_pytorch`; transformers' `multi_scale_deformable_attention` is the same code)."""


def grid_sample_deformable(value, spatial_shapes, locations, weights):
  """torch: value [B, S, M, D], spatial_shapes [(H, W)], locations [B, Q, M, L, P, 2] in [0, 1],
  weights [B, Q, M, L, P] -> [B, Q, M * D], one `F.grid_sample(align_corners=False, zeros)` per level."""
  import torch
  import torch.nn.functional as F
  batch, _, heads, channels = value.shape
  _, queries, _, levels, points, _ = locations.shape
  value_list = value.split([h * w for h, w in spatial_shapes], dim=1)
  grids = 2 * locations - 1
  sampled = []
  for level, (h, w) in enumerate(spatial_shapes):
    value_l = value_list[level].flatten(2).transpose(1, 2).reshape(batch * heads, channels, h, w)
    grid_l = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
    sampled.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False))
  weights = weights.transpose(1, 2).reshape(batch * heads, 1, queries, levels * points)
  out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1).view(batch, heads * channels, queries)
  return out.transpose(1, 2).contiguous()
