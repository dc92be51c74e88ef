r"""Speed of the multi-scale deformable sampling alone: ours, the pure-JAX gather path and (on the
CPU, when built) the CPU kernel `sampling_kernel` that the CPU lowering uses, against the PyTorch
grid_sample path (official `ms_deform_attn_core_pytorch`, which transformers runs on CPU).

The encoder's shapes at 800x1066: 4 levels (100x134, 50x67, 25x34, 13x17), every position a
query (S = Q = 17821), 8 heads of 32 channels, 4 points. Forward, and forward + backward with
respect to value, locations and weights; calls alternate between the sides in one process.
Prints ms per call and the ratio PyTorch / ours (above 1: ours is faster).

  python benchmarks/deformable_attention.py [--batch 1] [--iters 5] [--height 800 --width 1066] [--channels 32]
"""

import argparse
import contextlib
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks.timing import interleaved_median_seconds  # noqa: E402
from detr_jax import system  # noqa: E402
from detr_jax.models import sampling_kernel  # noqa: E402
from detr_jax.models.deformable_attention import deformable_sampling  # noqa: E402
from references.deformable_sampling import grid_sample_deformable  # noqa: E402


def level_shapes(height, width, levels=4):
  """(H, W) of layer2..4 (strides 8, 16, 32, each a stride-2 conv with padding) and the extra stride-2 conv."""
  shapes, h, w = [], math.ceil(height / 4), math.ceil(width / 4)
  for _ in range(levels):
    h, w = math.ceil(h / 2), math.ceil(w / 2)
    shapes.append((h, w))
  return tuple(shapes)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument("--height", type=int, default=800)
  parser.add_argument("--width", type=int, default=1066)
  parser.add_argument("--channels", type=int, default=32, help="per head: 32 at width 256, 16 at 128")
  args = parser.parse_args()
  system.retain_freed_host_memory()

  shapes = level_shapes(args.height, args.width)
  total = sum(h * w for h, w in shapes)
  heads, channels, points = 8, args.channels, 4
  rng = np.random.default_rng(0)
  value = rng.normal(size=(args.batch, total, heads, channels)).astype(np.float32)
  locations = rng.uniform(-0.05, 1.05, size=(args.batch, total, heads, len(shapes), points, 2)).astype(np.float32)
  weights = rng.uniform(size=(args.batch, total, heads, len(shapes), points)).astype(np.float32)
  cotangent = rng.normal(size=(args.batch, total, heads * channels)).astype(np.float32)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  print(f"levels {shapes}, S = Q = {total}, batch {args.batch}, {heads} heads of {channels} channels; JAX {jax.__version__} on {jax.devices()[0].device_kind}; "
        f"torch {torch.__version__} on {device}, {torch.get_num_threads()} threads")

  torch_inputs = [torch.from_numpy(a).to(device) for a in (value, locations, weights)]
  torch_cotangent = torch.from_numpy(cotangent).to(device)
  jax_inputs = [jax.device_put(a) for a in (value, locations, weights)]

  def sync():
    if device == "cuda":
      torch.cuda.synchronize()

  def torch_forward():
    with torch.no_grad():
      grid_sample_deformable(torch_inputs[0], shapes, torch_inputs[1], torch_inputs[2])
    sync()

  def torch_backward():
    tensors = [t.clone().requires_grad_() for t in torch_inputs]
    (grid_sample_deformable(tensors[0], shapes, tensors[1], tensors[2]) * torch_cotangent).sum().backward()
    sync()

  def jitted(portable):
    """(forward, forward + backward) of deformable_sampling, lowered under portable() (pure JAX) or not."""
    with sampling_kernel.portable() if portable else contextlib.nullcontext():
      forward = jax.jit(lambda v, l, w: deformable_sampling(v, shapes, l, w)).lower(*jax_inputs).compile()
      gradient = jax.jit(jax.grad(lambda v, l, w: jnp.sum(deformable_sampling(v, shapes, l, w) * cotangent),
                                  argnums=(0, 1, 2))).lower(*jax_inputs).compile()
    return (lambda: jax.block_until_ready(forward(*jax_inputs)),
            lambda: jax.block_until_ready(gradient(*jax_inputs)))

  ours = {"pure JAX": jitted(portable=True)}
  if jax.default_backend() == "cpu" and sampling_kernel.available():
    ours["CPU kernel"] = jitted(portable=False)
  print(f"{'pass':>18} {'torch ms':>9} " + " ".join(f"{name + ' ms':>15} {'torch/' + name:>17}" for name in ours))
  for index, (name, torch_fn) in enumerate((("forward", torch_forward), ("forward+backward", torch_backward))):
    seconds = interleaved_median_seconds([torch_fn] + [fns[index] for fns in ours.values()], args.iters)
    print(f"{name:>18} {seconds[0] * 1000:>9.1f} "
          + " ".join(f"{s * 1000:>15.1f} {seconds[0] / s:>17.2f}" for s in seconds[1:]))

if __name__ == "__main__":
  main()
