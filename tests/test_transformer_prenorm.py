"""The pre-norm transformer against official DETR's `forward_pre` written with torch modules.

transformers' DETR has no pre-norm variant, so the reference below transcribes
`TransformerEncoderLayer.forward_pre`, `TransformerDecoderLayer.forward_pre` and the encoder's
final norm of official `models/transformer.py`, on torch's `nn.MultiheadAttention`.
Tolerance 1e-5 (float32).
"""

import flax
import jax
import numpy as np
import torch
from torch import nn

from detr_jax.models import transformer
from detr_jax.porting import official

D, HEADS, FFN, LAYERS = 32, 4, 64, 2


class TorchEncoderLayer(nn.Module):
  def __init__(self):
    super().__init__()
    self.self_attn = nn.MultiheadAttention(D, HEADS)
    self.linear1, self.linear2 = nn.Linear(D, FFN), nn.Linear(FFN, D)
    self.norm1, self.norm2 = nn.LayerNorm(D), nn.LayerNorm(D)

  def forward(self, src, pos, padding_mask):
    x = self.norm1(src)
    src = src + self.self_attn(x + pos, x + pos, x, key_padding_mask=padding_mask)[0]
    return src + self.linear2(torch.relu(self.linear1(self.norm2(src))))


class TorchDecoderLayer(nn.Module):
  def __init__(self):
    super().__init__()
    self.self_attn, self.multihead_attn = nn.MultiheadAttention(D, HEADS), nn.MultiheadAttention(D, HEADS)
    self.linear1, self.linear2 = nn.Linear(D, FFN), nn.Linear(FFN, D)
    self.norm1, self.norm2, self.norm3 = nn.LayerNorm(D), nn.LayerNorm(D), nn.LayerNorm(D)

  def forward(self, tgt, memory, pos, query_pos, padding_mask):
    x = self.norm1(tgt)
    tgt = tgt + self.self_attn(x + query_pos, x + query_pos, x)[0]
    x = self.norm2(tgt)
    tgt = tgt + self.multihead_attn(x + query_pos, memory + pos, memory, key_padding_mask=padding_mask)[0]
    return tgt + self.linear2(torch.relu(self.linear1(self.norm3(tgt))))


class TorchTransformer(nn.Module):
  def __init__(self):
    super().__init__()
    self.encoder = nn.Module()
    self.encoder.layers = nn.ModuleList(TorchEncoderLayer() for _ in range(LAYERS))
    self.encoder.norm = nn.LayerNorm(D)
    self.decoder = nn.Module()
    self.decoder.layers = nn.ModuleList(TorchDecoderLayer() for _ in range(LAYERS))
    self.decoder.norm = nn.LayerNorm(D)

  def forward(self, src, padding_mask, pos, query_pos):  # sequence-first, as in the official code
    memory = src
    for layer in self.encoder.layers:
      memory = layer(memory, pos, padding_mask)
    memory = self.encoder.norm(memory)
    tgt, outputs = torch.zeros_like(query_pos), []
    for layer in self.decoder.layers:
      tgt = layer(tgt, memory, pos, query_pos, padding_mask)
      outputs.append(self.decoder.norm(tgt))
    return torch.stack(outputs), memory


def test_pre_norm_transformer_matches_official_forward_pre():
  torch.manual_seed(0)
  reference = TorchTransformer().eval()
  with torch.no_grad():
    for name, param in reference.named_parameters():
      if "norm" in name or name.endswith("bias"):
        param.uniform_(-0.5, 1.5)  # LayerNorm 1/0 and zero attention biases would hide mistakes
  rng = np.random.default_rng(0)
  batch, seq, queries = 2, 12, 5
  src, pos = (rng.normal(size=(batch, seq, D)).astype(np.float32) for _ in range(2))
  query_pos = rng.normal(size=(queries, D)).astype(np.float32)
  padding_mask = np.zeros((batch, seq), bool)
  padding_mask[1, 8:] = True
  with torch.no_grad():
    ref_hs, ref_memory = reference(torch.from_numpy(src).transpose(0, 1), torch.from_numpy(padding_mask),
                                   torch.from_numpy(pos).transpose(0, 1),
                                   torch.from_numpy(query_pos)[:, None].repeat(1, batch, 1))

  module = transformer.Transformer(HEADS, LAYERS, LAYERS, FFN, dropout=0.1, pre_norm=True)
  shapes = flax.traverse_util.flatten_dict(
      jax.eval_shape(module.init, jax.random.PRNGKey(0), src, padding_mask, pos, query_pos))
  # Fill the Flax tree through the porter's key map, as a checkpoint import does.
  torch_state = {f"transformer.{k}": v.numpy() for k, v in reference.state_dict().items()}
  as_submodule = {("params", "transformer", *path[1:]): leaf.shape for path, leaf in shapes.items()}
  filled = official.fill(as_submodule, torch_state, "the pre-norm transformer")
  params = flax.traverse_util.unflatten_dict({path[:1] + path[2:]: value for path, value in filled.items()})
  hs, memory = module.apply(params, src, padding_mask, pos, query_pos)
  np.testing.assert_allclose(memory, ref_memory.transpose(0, 1).numpy(), atol=1e-5, rtol=0)
  np.testing.assert_allclose(hs, ref_hs.transpose(1, 2).numpy(), atol=1e-5, rtol=0)
