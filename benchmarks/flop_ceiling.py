r"""How fast can an exact float32 DETR-R50 forward pass be on this machine? The arithmetic ceiling
behind the serving target.

Counts the forward pass's floating-point operations with XLA's cost analysis of the compiled
program (a multiply-add counts 2), measures this machine's dense float32 matrix-multiply rate (the
fastest call of torch.mm or jnp.dot on square matrices, the best case for either library) and
transformers' model and ours on the same input, all four alternating in the same rounds, so that
the machine's drift falls on the ceiling as on the forward passes. The ceiling is the time the
forward pass would take if every operation ran at the matmul rate, this machine's practical peak:
no float32 implementation of the same arithmetic goes much faster, so `PyTorch time / ceiling`
bounds the speed-up over transformers that any of them can reach here (Winograd or FFT
convolutions, lower precision and sparsity change the arithmetic and are not counted).

  python benchmarks/flop_ceiling.py [--height 800] [--width 1088] [--iters 5] [--matmul_size 2048]

Prints GFLOP per image, each side's ms and GFLOP/s, the matmul rate and the ceiling. Both sides run on
the CPU, also on a host with an accelerator.
"""

import argparse
import os
import sys

import jax
import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks.timing import interleaved_seconds, matmul_calls, matmul_peak  # noqa: E402
from detr_jax import porting, system  # noqa: E402
from references.transformers_detr import hf_detr  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--height", type=int, default=800)
  parser.add_argument("--width", type=int, default=1088)
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument("--matmul_size", type=int, default=2048)
  args = parser.parse_args()
  # The ceiling is the CPU's, and the PyTorch side runs there: on a GPU host, JAX stays on the CPU too.
  jax.config.update("jax_platforms", "cpu")
  system.retain_freed_host_memory()   # as eval.py and the other benchmarks run, for both sides

  reference = hf_detr(50)
  model, variables = porting.load_pytorch_checkpoint(reference.state_dict())
  images = np.random.default_rng(0).normal(size=(1, args.height, args.width, 3)).astype(np.float32)
  mask = np.ones((1, args.height, args.width), bool)
  forward = jax.jit(model.apply)
  compiled = forward.lower(variables, images, mask).compile()
  flops = compiled.cost_analysis()["flops"]
  pixels = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
  pixel_mask = torch.from_numpy(mask).long()

  def torch_forward():
    with torch.no_grad():
      return reference(pixel_values=pixels, pixel_mask=pixel_mask)

  jax_inputs = jax.device_put((variables, images, mask))

  def jax_forward():
    return jax.block_until_ready(compiled(*jax_inputs))

  matmuls, matmul_flops = matmul_calls(args.matmul_size)
  torch_times, jax_times, *matmul_times = interleaved_seconds([torch_forward, jax_forward, *matmuls], args.iters)
  torch_seconds, jax_seconds = float(np.median(torch_times)), float(np.median(jax_times))
  rates = {name: matmul_peak([times], matmul_flops) for name, times in zip(("torch.mm", "jnp.dot"), matmul_times)}
  best_rate = max(rates.values())
  ceiling = flops / best_rate

  print(f"JAX {jax.__version__} on {jax.devices()[0].device_kind}; torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); {os.cpu_count()} cores; DETR-R50 forward, 1 image "
        f"{args.height}x{args.width}, float32; median of {args.iters} alternating calls, "
        f"matmul rate from the fastest call")
  print(f"forward pass: {flops / 1e9:.1f} GFLOP (XLA cost analysis, a multiply-add counts 2)")
  print(f"matmul {args.matmul_size}^2 float32: " + ", ".join(f"{n} {r / 1e9:.1f} GFLOP/s" for n, r in rates.items()))
  print(f"{'side':>12} {'ms':>8} {'GFLOP/s':>8} {'of matmul':>10}")
  for name, seconds in (("transformers", torch_seconds), ("detr_jax", jax_seconds)):
    print(f"{name:>12} {seconds * 1e3:8.1f} {flops / seconds / 1e9:8.1f} {flops / seconds / best_rate:10.2f}")
  print(f"ceiling: {ceiling * 1e3:.1f} ms, every operation at the matmul rate; the most any float32 forward "
        f"of this arithmetic can gain over transformers here: {torch_seconds / ceiling:.2f}x "
        f"(detr_jax now: {torch_seconds / jax_seconds:.2f}x)")


if __name__ == "__main__":
  main()
