r"""Matching time per training step: the official matcher against ours.

Setting: batch 64, 100 queries, 6 decoder layers, 92 logits, per-image target counts drawn from
coco-mini's train annotations, targets padded to --max_boxes. Three ways, same inputs, one run:
  (a) official: per layer, one flattened [B*Q, sum T] cost matrix (transformers' HungarianMatcher,
      a copy of official models/matcher.py), split per image, scipy per image;
  (b) ours, host: costs for all layers in one jitted computation, scipy per block via
      pure_callback (with 1 thread and with a thread pool);
  (c) ours, device: optax's Hungarian algorithm under vmap.
Prints ms/step (median) and the ratios against (a).

  python benchmarks/matcher.py [--coco_mini ../shared/coco-mini] [--iters 5]
"""

import argparse
import json
import os
import sys

import jax
import numpy as np
import torch
from transformers.loss.loss_for_object_detection import HungarianMatcher

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks.timing import median_seconds  # noqa: E402
from detr_jax import system  # noqa: E402
from detr_jax.losses import matcher  # noqa: E402
from references.coco_mini import COCO_MINI  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--coco_mini", default=str(COCO_MINI))
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--max_boxes", type=int, default=100)
  parser.add_argument("--iters", type=int, default=5)
  args = parser.parse_args()

  with open(os.path.join(args.coco_mini, "annotations", "instances_train2017.json")) as f:
    annotations = json.load(f)["annotations"]
  counts_by_image = {}
  for ann in annotations:
    if not ann["iscrowd"]:
      counts_by_image[ann["image_id"]] = counts_by_image.get(ann["image_id"], 0) + 1
  rng = np.random.default_rng(0)
  counts = rng.choice(list(counts_by_image.values()), args.batch)
  layers, queries, classes = 6, 100, 92
  logits = rng.normal(0, 2, (layers, args.batch, queries, classes)).astype(np.float32)
  boxes = rng.uniform(0.05, 0.95, (layers, args.batch, queries, 4)).astype(np.float32)
  boxes[..., 2:] *= 0.3
  labels = np.zeros((args.batch, args.max_boxes), np.int32)
  target_boxes = np.full((args.batch, args.max_boxes, 4), 0.5, np.float32)
  valid = np.zeros((args.batch, args.max_boxes), bool)
  targets = []
  for b, n in enumerate(counts):
    labels[b, :n] = rng.integers(1, 91, n)
    target_boxes[b, :n, :2] = rng.uniform(0.1, 0.9, (n, 2))
    target_boxes[b, :n, 2:] = rng.uniform(0.02, 0.3, (n, 2))
    valid[b, :n] = True
    targets.append({"class_labels": torch.from_numpy(labels[b, :n]).long(), "boxes": torch.from_numpy(target_boxes[b, :n])})

  official = HungarianMatcher(class_cost=1, bbox_cost=5, giou_cost=2)
  logits_t, boxes_t = torch.from_numpy(logits), torch.from_numpy(boxes)
  def run_official():
    for layer in range(layers):
      official({"logits": logits_t[layer], "pred_boxes": boxes_t[layer]}, targets)

  inputs = jax.device_put((logits, boxes, labels, target_boxes, valid))
  def ours(solver, threads):
    fn = jax.jit(lambda *a: matcher.match(*a, solver=solver, num_threads=threads))
    return lambda: jax.block_until_ready(fn(*inputs))

  print(f"batch {args.batch}, {queries} queries, {layers} layers, targets per image: mean {counts.mean():.1f}, "
        f"max {counts.max()} (padded to {args.max_boxes}); JAX on {jax.devices()[0].device_kind}, "
        f"torch threads {torch.get_num_threads()}, host threads available {system.available_cores()}")
  reference = median_seconds(run_official, args.iters)
  rows = [("(a) official, per layer and image", reference)]
  rows.append(("(b) ours, host, 1 thread", median_seconds(ours("host", 1), args.iters)))
  rows.append((f"(b) ours, host, {system.available_cores()} threads",
               median_seconds(ours("host", system.available_cores()), args.iters)))
  rows.append(("(c) ours, device (optax)", median_seconds(ours("device", 1), max(1, args.iters // 2))))
  print(f"{'way':<38} {'ms/step':>9} {'vs (a)':>8}")
  for name, seconds in rows:
    print(f"{name:<38} {seconds * 1000:>9.1f} {reference / seconds:>7.2f}x")


if __name__ == "__main__":
  main()
