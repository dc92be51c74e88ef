"""PyTorch's default initialisers, so that training from scratch starts where the official code does.

Flax's defaults (lecun-normal kernels, zero biases) differ from PyTorch's, and DETR's
convergence is sensitive to them. Sources: `torch.nn.Linear.reset_parameters`,
`torch.nn.Conv2d.reset_parameters`, torchvision `resnet.py` and official DETR `transformer.py`.
"""

import jax
import jax.numpy as jnp

# kaiming_uniform_(a=sqrt(5)) as used by nn.Linear / nn.Conv2d: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_default_kernel = jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

# torchvision ResNet convolutions: kaiming_normal_(mode="fan_out", nonlinearity="relu").
# ("normal" is untruncated in jax.nn.initializers; "truncated_normal" is the other one.)
resnet_conv_kernel = jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# Official DETR Transformer._reset_parameters: xavier_uniform_ on every matrix, fused in_proj included.
xavier_uniform = jax.nn.initializers.glorot_uniform()


def torch_default_bias(fan_in: int):
  """Bias initialiser of nn.Linear / nn.Conv2d: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

  Args:
    fan_in: input features of the layer (in_channels * kh * kw for a conv).
  """
  bound = 1.0 / fan_in**0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init
