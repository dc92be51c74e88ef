"""Unit tests of the building blocks against PyTorch (float32, max |diff| <= 1e-5 unless stated)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.detr import modeling_detr

from detr_jax.models import backbone, position_encoding, transformer


def test_frozen_batchnorm_matches_hf():
  rng = np.random.default_rng(0)
  reference = modeling_detr.DetrFrozenBatchNorm2d(16)
  stats = {name: rng.uniform(0.5, 1.5, 16).astype(np.float32) for name in ("weight", "bias", "running_mean")}
  stats["running_var"] = rng.uniform(1e-4, 1e-2, 16).astype(np.float32)   # small enough for the eps to matter
  for name, value in stats.items():
    getattr(reference, name).copy_(torch.from_numpy(value))
  x = rng.normal(size=(2, 16, 5, 7)).astype(np.float32)
  expected = reference(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
  variables = {"batch_stats": {"scale": stats["weight"], "bias": stats["bias"],
                               "mean": stats["running_mean"], "var": stats["running_var"]}}
  actual = backbone.FrozenBatchNorm().apply(variables, x.transpose(0, 2, 3, 1))
  np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=0)


def test_frozen_batchnorm_has_no_trainable_params():
  variables = backbone.FrozenBatchNorm().init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 2, 4)))
  assert set(variables) == {"batch_stats"}


@pytest.mark.parametrize("in_size,out_size", [((483, 480), (16, 15)), ((100, 64), (7, 2)), ((32, 48), (64, 96)),
                                              ((800, 1066), (25, 34)), ((37, 23), (37, 23))])
def test_mask_downsampling_matches_torch_legacy_nearest(in_size, out_size):
  rng = np.random.default_rng(1)
  mask = rng.random((2, *in_size)) > 0.5
  expected = torch.nn.functional.interpolate(torch.from_numpy(mask)[None].float(), size=out_size).bool()[0].numpy()
  np.testing.assert_array_equal(backbone.downsample_mask(jnp.asarray(mask), out_size), expected)


def _padding_mask(batch_shapes, height, width):
  mask = np.ones((len(batch_shapes), height, width), bool)
  for i, (h, w) in enumerate(batch_shapes):
    mask[i, :h, :w] = False
  return mask


def test_sine_encoding_matches_hf():
  padding_mask = _padding_mask([(13, 20), (17, 11)], 17, 20)
  reference = modeling_detr.DetrSinePositionEmbedding(128, normalize=True)
  expected = reference((2, 256, 17, 20), "cpu", torch.float32, mask=torch.from_numpy(~padding_mask))
  actual = position_encoding.sine_position_encoding(jnp.asarray(padding_mask), 128)
  np.testing.assert_allclose(actual, expected.numpy().transpose(0, 2, 3, 1), atol=1e-5, rtol=0)


def test_learned_encoding_matches_hf():
  torch.manual_seed(0)
  reference = modeling_detr.DetrLearnedPositionEmbedding(128)
  expected = reference((2, 256, 9, 14), "cpu", torch.float32).detach().numpy().transpose(0, 2, 3, 1)
  params = {"params": {"row_embed": {"embedding": reference.row_embeddings.weight.detach().numpy()},
                       "col_embed": {"embedding": reference.column_embeddings.weight.detach().numpy()}}}
  actual = position_encoding.LearnedPositionEncoding(128).apply(params, jnp.zeros((2, 9, 14), bool))
  np.testing.assert_allclose(actual, expected, atol=1e-6, rtol=0)


def test_learned_encoding_rejects_large_maps():
  module = position_encoding.LearnedPositionEncoding(8)
  with pytest.raises(ValueError, match="up to 50x50"):
    module.init(jax.random.PRNGKey(0), jnp.zeros((1, 51, 10), bool))


def test_attention_matches_torch_multihead_attention():
  torch.manual_seed(0)
  reference = torch.nn.MultiheadAttention(32, 4, batch_first=True).eval()
  with torch.no_grad():
    reference.in_proj_bias.uniform_(-0.5, 0.5)
    reference.out_proj.bias.uniform_(-0.5, 0.5)
  rng = np.random.default_rng(2)
  query, key, value = (rng.normal(size=(2, n, 32)).astype(np.float32) for n in (5, 9, 9))
  key_padding_mask = np.zeros((2, 9), bool)
  key_padding_mask[1, 6:] = True
  expected, _ = reference(*(torch.from_numpy(a) for a in (query, key, value)),
                          key_padding_mask=torch.from_numpy(key_padding_mask))
  params = {"params": {
      "in_proj_kernel": reference.in_proj_weight.detach().numpy().T,
      "in_proj_bias": reference.in_proj_bias.detach().numpy(),
      "out_proj": {"kernel": reference.out_proj.weight.detach().numpy().T,
                   "bias": reference.out_proj.bias.detach().numpy()}}}
  actual = transformer.MultiheadAttention(4).apply(params, query, key, value, key_padding_mask)
  np.testing.assert_allclose(actual, expected.detach().numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_dropout_keeps_values_at_the_configured_rate_and_preserves_the_mean(rate):
  shape = (4, 300, 257)   # odd width: half of the last 32-bit draw of a row goes unused
  y = transformer.Dropout(rate).apply({}, jnp.ones(shape), deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)})
  kept = np.asarray(y) != 0
  # Binomial counts: 5 standard deviations, plus the 2**-17 quantisation of the 16-bit threshold.
  tolerance = lambda p: 5 * np.sqrt(p * (1 - p) / kept[..., :128].size) + 2**-17
  assert abs(kept.mean() - (1 - rate)) < tolerance(1 - rate)
  np.testing.assert_allclose(np.asarray(y)[kept], 1 / (1 - rate), rtol=2**-15)
  assert abs(np.asarray(y).mean() - 1) < 5 * np.sqrt(rate / (1 - rate) / kept.size)
  # Columns j and 129 + j come from the two halves of one 32-bit draw; they must be independent.
  both = (kept[..., :128] & kept[..., 129:257]).mean()
  assert abs(both - (1 - rate)**2) < tolerance((1 - rate)**2)
  other_key = transformer.Dropout(rate).apply({}, jnp.ones(shape), deterministic=False,
                                              rngs={"dropout": jax.random.PRNGKey(1)})
  assert not np.array_equal(np.asarray(other_key) != 0, kept)


def test_dropout_is_the_identity_when_deterministic_and_zero_at_rate_one():
  x = jnp.arange(12.0).reshape(3, 4)
  np.testing.assert_array_equal(transformer.Dropout(0.1).apply({}, x, deterministic=True), x)
  np.testing.assert_array_equal(transformer.Dropout(1.0).apply({}, x, deterministic=False), np.zeros((3, 4)))
