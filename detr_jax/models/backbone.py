"""ResNet backbone in torchvision's layout with FrozenBatchNorm, and padding-mask downsampling.

Follows official DETR `models/backbone.py` and torchvision `models/resnet.py` ("v1.5": the
stride of a bottleneck sits on its 3x3 conv). All tensors are NHWC. Padding is explicit and
symmetric, because Flax's 'SAME' pads stride-2 convolutions asymmetrically.
"""

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from detr_jax.models import initializers

# (block type, blocks per stage) for each supported depth.
RESNET_LAYOUTS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}
STAGE_WIDTHS = (64, 128, 256, 512)
EXPANSION = {"basic": 1, "bottleneck": 4}


def num_output_channels(depth: int) -> int:
  """Channels of the last stage: 2048 for ResNet-50/101, 512 for ResNet-18/34."""
  return STAGE_WIDTHS[-1] * EXPANSION[RESNET_LAYOUTS[depth][0]]


class FrozenBatchNorm(nn.Module):
  """BatchNorm with fixed statistics and affine parameters (official `FrozenBatchNorm2d`).

  y = x * scale + (bias - mean * scale), scale = weight * rsqrt(var + 1e-5). The four arrays
  live in the "batch_stats" collection, which no optimiser sees and no step updates; they
  port to the official `weight, bias, running_mean, running_var` buffers.

  Input and output: [..., C] in the module's compute dtype.
  """

  dtype: Any = jnp.float32
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    weight = self.variable("batch_stats", "scale", jnp.ones, (features,), jnp.float32).value
    bias = self.variable("batch_stats", "bias", jnp.zeros, (features,), jnp.float32).value
    mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32).value
    var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32).value
    scale = weight * jnp.reciprocal(jnp.sqrt(var + self.epsilon))
    shift = bias - mean * scale
    return x * scale.astype(self.dtype) + shift.astype(self.dtype)


class PointwiseConv(nn.Module):
  """A 1x1 convolution written as a matmul over channels; same "kernel" [1, 1, in, out] (and
  "bias" [out]) as nn.Conv. XLA:CPU computes the kernel gradient of a 1x1 nn.Conv several times
  slower than that of the equivalent matmul, and these convolutions carry most of a bottleneck's
  work. The matmul is 2-D over flattened pixels: for a 4-D einsum, XLA:CPU copied the gradient
  into a transposed layout before the kernel-gradient dot (~0.5 s of a DETR-R50 training step).

  Input [B, H, W, C_in] -> [B, ceil(H / stride), ceil(W / stride), features].
  """

  features: int
  stride: int = 1
  dtype: Any = jnp.float32
  use_bias: bool = False
  kernel_init: Callable = initializers.resnet_conv_kernel
  bias_init: Callable = jax.nn.initializers.zeros

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", self.kernel_init, (1, 1, x.shape[-1], self.features))
    x = x[:, ::self.stride, ::self.stride].astype(self.dtype)
    flat = x.reshape(-1, x.shape[-1]) @ kernel[0, 0].astype(self.dtype)
    if self.use_bias:
      flat = flat + self.param("bias", self.bias_init, (self.features,)).astype(self.dtype)
    return flat.reshape(*x.shape[:-1], self.features)


def _conv(features, kernel, stride, padding, dilation, dtype, name):
  if kernel == 1:
    return PointwiseConv(features, stride, dtype, name=name)
  return nn.Conv(
      features,
      (kernel, kernel),
      strides=(stride, stride),
      padding=((padding, padding), (padding, padding)),
      kernel_dilation=(dilation, dilation),
      use_bias=False,
      dtype=dtype,
      kernel_init=initializers.resnet_conv_kernel,
      name=name,
  )


class Block(nn.Module):
  """A torchvision BasicBlock or Bottleneck; parameter names follow torchvision."""

  kind: str
  width: int
  stride: int
  dilation: int
  downsample: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    out_features = self.width * EXPANSION[self.kind]
    if self.kind == "bottleneck":
      y = nn.relu(FrozenBatchNorm(self.dtype, name="bn1")(
          _conv(self.width, 1, 1, 0, 1, self.dtype, "conv1")(x)))
      y = nn.relu(FrozenBatchNorm(self.dtype, name="bn2")(
          _conv(self.width, 3, self.stride, self.dilation, self.dilation, self.dtype, "conv2")(y)))
      y = FrozenBatchNorm(self.dtype, name="bn3")(_conv(out_features, 1, 1, 0, 1, self.dtype, "conv3")(y))
    else:
      y = nn.relu(FrozenBatchNorm(self.dtype, name="bn1")(
          _conv(self.width, 3, self.stride, 1, 1, self.dtype, "conv1")(x)))
      y = FrozenBatchNorm(self.dtype, name="bn2")(_conv(self.width, 3, 1, 1, 1, self.dtype, "conv2")(y))
    if self.downsample:
      x = _conv(out_features, 1, self.stride, 0, 1, self.dtype, "downsample_0")(x)
      x = FrozenBatchNorm(self.dtype, name="downsample_1")(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """torchvision ResNet-18/34/50/101 without the classifier, optionally DC5.

  With `dilation=True` (DC5, official `replace_stride_with_dilation=[False, False, True]`),
  layer4 keeps stride 1: its first block has dilation 1, the later blocks dilation 2, and
  the output stride is 16 instead of 32.

  Call: images [B, H, W, 3] (normalised RGB) -> list of the four stage outputs
  [B, H/4, W/4, C1], ..., [B, H/32, W/32, C4] (H/16 for layer4 with DC5).

  Raises:
    ValueError: an unsupported depth, or DC5 with basic blocks (torchvision does not allow it).
  """

  depth: int = 50
  dilation: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images) -> Sequence[jnp.ndarray]:
    if self.depth not in RESNET_LAYOUTS:
      raise ValueError(f"Unsupported ResNet depth {self.depth}; choose one of {sorted(RESNET_LAYOUTS)}.")
    kind, blocks_per_stage = RESNET_LAYOUTS[self.depth]
    if self.dilation and kind == "basic":
      raise ValueError(f"DC5 (dilation) needs bottleneck blocks; ResNet-{self.depth} has basic blocks.")

    x = images.astype(self.dtype)
    x = _conv(64, 7, 2, 3, 1, self.dtype, "conv1")(x)
    x = nn.relu(FrozenBatchNorm(self.dtype, name="bn1")(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

    in_features = 64
    features = []
    for stage, (width, num_blocks) in enumerate(zip(STAGE_WIDTHS, blocks_per_stage)):
      dilate_stage = self.dilation and stage == 3
      stride = 1 if stage == 0 or dilate_stage else 2
      for index in range(num_blocks):
        block_dilation = 2 if dilate_stage and index > 0 else 1
        out_features = width * EXPANSION[kind]
        x = Block(
            kind,
            width,
            stride=stride if index == 0 else 1,
            dilation=block_dilation,
            downsample=index == 0 and (stride != 1 or in_features != out_features),
            dtype=self.dtype,
            name=f"layer{stage + 1}_{index}",
        )(x)
        in_features = out_features
      if stage == 0:
        # The stem and layer1 are frozen (official `backbone.py` trains layer2..layer4 only), so
        # no gradient flows below layer2, as with torch's requires_grad=False.
        x = jax.lax.stop_gradient(x)
      features.append(x)
    return features


def downsample_mask(mask: jnp.ndarray, size: tuple[int, int]) -> jnp.ndarray:
  """Brings a [B, H, W] bool mask to [B, h, w] the way official DETR does.

  Official `backbone.py` calls `F.interpolate(mask[None].float(), size=...)`, PyTorch's legacy
  nearest mode: source index = floor(dst * (in / out)) in float32, clamped to in - 1.
  Half-pixel nearest (the default of `jax.image.resize`) picks other pixels.
  """
  return legacy_nearest_resize(mask, size)


def legacy_nearest_resize(x: jnp.ndarray, size: tuple[int, int]) -> jnp.ndarray:
  """PyTorch's `F.interpolate(mode="nearest")` on axes 1 and 2 of [B, H, W, ...] -> [B, h, w, ...]."""
  rows = legacy_nearest_indices(x.shape[1], size[0])
  cols = legacy_nearest_indices(x.shape[2], size[1])
  return x[:, rows][:, :, cols]


def legacy_nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """Source index of each output position of PyTorch's nearest interpolation: floor(dst * in / out), float32."""
  scale = np.float32(in_size) / np.float32(out_size)
  indices = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
  return np.minimum(indices, in_size - 1)
