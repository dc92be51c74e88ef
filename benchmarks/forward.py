r"""Forward-pass speed of DETR-R50 and Deformable DETR: jit-compiled JAX against transformers' PyTorch models.

Both run the same random weights (ported from the PyTorch model) on the same 800x1066 input,
in one process on the same machine, with calls alternating between the two. Prints ms/image for
each and the ratio PyTorch / JAX (above 1: JAX is faster).

  python benchmarks/forward.py [--models detr,deformable,deformable-refine,deformable-two-stage]
      [--batch_sizes 1,2] [--iters 5] [--dtypes float32,bfloat16] [--default_allocator]

Models: detr (DETR-R50), detr-panoptic (mask head, 250 classes, against DetrForSegmentation),
deformable (multi-scale), deformable-refine (+ iterative box refinement), deformable-two-stage.

On a GPU, PyTorch runs on CUDA in float32 and JAX on the default device in each dtype.
"""

import argparse
import functools
import os
import sys

import jax
import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks.timing import interleaved_median_seconds  # noqa: E402
from detr_jax import porting, system  # noqa: E402
from references.transformers_deformable_detr import hf_deformable_detr  # noqa: E402
from references.transformers_detr import hf_detr  # noqa: E402

REFERENCES = {
    "detr": lambda: hf_detr(50),
    "detr-panoptic": lambda: hf_detr(50, segmentation=True, num_labels=250),
    "deformable": lambda: hf_deformable_detr(),
    "deformable-refine": lambda: hf_deformable_detr(with_box_refine=True),
    "deformable-two-stage": lambda: hf_deformable_detr(with_box_refine=True, two_stage=True),
}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default="detr", help=f"comma-separated, of {sorted(REFERENCES)}")
  parser.add_argument("--batch_sizes", default="1,2")
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument("--dtypes", default="float32")
  parser.add_argument("--height", type=int, default=800)
  parser.add_argument("--width", type=int, default=1066)
  parser.add_argument("--default_allocator", action="store_true",
                      help="leave glibc's malloc as it is, to measure what retain_freed_host_memory gains")
  args = parser.parse_args()
  if not args.default_allocator:
    system.retain_freed_host_memory()   # as eval.py does; PyTorch's side gains from it too

  device = "cuda" if torch.cuda.is_available() else "cpu"
  print(f"JAX {jax.__version__} on {jax.devices()[0].device_kind}; torch {torch.__version__} on {device}; "
        f"torch threads {torch.get_num_threads()}; input {args.height}x{args.width}")
  print(f"{'model':>21} {'batch':>5} {'dtype':>9} {'torch ms/img':>13} {'jax ms/img':>11} {'torch/jax':>10}")
  for name in args.models.split(","):
    reference = REFERENCES[name]().to(device)
    for batch in map(int, args.batch_sizes.split(",")):
      time_batch(name, reference, batch, args, device)


def time_batch(name, reference, batch, args, device):
  """Times one model at one batch size, PyTorch against each JAX dtype, and prints a row per dtype."""
  state_dict = reference.state_dict()
  rng = np.random.default_rng(0)
  images = rng.normal(size=(batch, args.height, args.width, 3)).astype(np.float32)
  mask = np.ones((batch, args.height, args.width), bool)
  mask[-1, :, args.width * 3 // 4:] = False  # one padded image, as in a real batch
  pixels = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)
  pixel_mask = torch.from_numpy(mask).long().to(device)

  def torch_forward():
    with torch.no_grad():
      out = reference(pixel_values=pixels, pixel_mask=pixel_mask)
    if device == "cuda":
      torch.cuda.synchronize()
    return out

  jax_forwards = {}
  for dtype in args.dtypes.split(","):
    model, variables = porting.load_pytorch_checkpoint(state_dict, dtype=dtype)
    jax_forwards[dtype] = functools.partial(jax_forward, jax.jit(model.apply), jax.device_put(variables),
                                            jax.device_put(images), jax.device_put(mask))
  torch_seconds, *jax_seconds = interleaved_median_seconds([torch_forward, *jax_forwards.values()], args.iters)
  for dtype, seconds in zip(jax_forwards, jax_seconds):
    print(f"{name:>21} {batch:>5} {dtype:>9} {torch_seconds * 1000 / batch:>13.1f} {seconds * 1000 / batch:>11.1f} "
          f"{torch_seconds / seconds:>10.2f}")


def jax_forward(forward, variables, images, mask):
  return jax.block_until_ready(forward(variables, images, mask))


if __name__ == "__main__":
  main()
