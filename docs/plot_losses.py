r"""Plots training runs' loss terms from their TensorBoard summaries to a PNG, runs overlaid.

  python docs/plot_losses.py WORKDIR [WORKDIR ...] OUT.png [--labels A,B] [--title TEXT]

The total loss of different families sums different weighted terms (DETR's cross-entropy,
Deformable DETR's focal loss x2); the box terms and errors compare directly.
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
  parser.add_argument("paths", nargs="+", help="the workdirs, then the output PNG")
  parser.add_argument("--labels", default="", help="comma-separated legend entries, one per workdir")
  parser.add_argument("--title", default="")
  args = parser.parse_args()
  *workdirs, output = args.paths
  labels = args.labels.split(",") if args.labels else [os.path.basename(w.rstrip("/")) for w in workdirs]
  runs = [summaries.read_scalars(workdir) for workdir in workdirs]
  figure, axes = plt.subplots(2, 3, figsize=(13, 6.5))
  for ax, (tag, title) in zip(axes.flat, PANELS):
    for scalars, label in zip(runs, labels):
      steps = sorted(scalars[tag])
      ax.plot(steps, [scalars[tag][s] for s in steps], label=label)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  if len(runs) > 1:
    axes.flat[0].legend(fontsize=9)
  figure.suptitle(args.title)
  figure.tight_layout()
  figure.savefig(output, dpi=90)
  print(f"wrote {output}")


if __name__ == "__main__":
  main()
