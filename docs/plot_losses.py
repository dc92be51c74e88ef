r"""Plots training runs' loss terms from their TensorBoard summaries to a PNG, runs overlaid.

  python docs/plot_losses.py WORKDIR [WORKDIR ...] OUT.png [--labels A,B] [--title TEXT]

The total loss of different families sums different weighted terms (DETR's cross-entropy,
Deformable DETR's focal loss x2); the box terms and errors compare directly.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from detr_jax import visualize  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("paths", nargs="+", help="the workdirs, then the output PNG")
  parser.add_argument("--labels", default="", help="comma-separated legend entries, one per workdir")
  parser.add_argument("--title", default="")
  args = parser.parse_args()
  *workdirs, output = args.paths
  print(f"wrote {visualize.plot_losses(workdirs, output, args.labels.split(',') if args.labels else None, args.title)}")


if __name__ == "__main__":
  main()
