r"""Plots a training run's loss terms from its TensorBoard summaries to a PNG.

  python docs/plot_losses.py WORKDIR OUT.png [--title TEXT]
"""

import argparse
import os
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from detr_jax import summaries  # noqa: E402

PANELS = (("loss", "total loss (all decoder layers)"), ("loss_ce", "loss_ce (last layer)"),
          ("loss_bbox", "loss_bbox (L1, last layer)"), ("loss_giou", "loss_giou (last layer)"),
          ("class_error", "class_error % (last layer)"), ("cardinality_error", "cardinality_error (last layer)"))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("workdir")
  parser.add_argument("output")
  parser.add_argument("--title", default="")
  args = parser.parse_args()
  scalars = summaries.read_scalars(args.workdir)
  figure, axes = plt.subplots(2, 3, figsize=(13, 6.5))
  for ax, (tag, label) in zip(axes.flat, PANELS):
    steps = sorted(scalars[tag])
    ax.plot(steps, [scalars[tag][s] for s in steps])
    ax.set_title(label, fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  figure.suptitle(args.title)
  figure.tight_layout()
  figure.savefig(args.output, dpi=90)
  print(f"wrote {args.output}")


if __name__ == "__main__":
  main()
