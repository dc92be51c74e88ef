r"""One training step of DETR-R50 or Deformable DETR-R50 (+ box refinement), JAX against
transformers' PyTorch model, side by side in one process.

A step is forward, Hungarian matching, the set loss with auxiliary decoder layers, backward,
the 0.1 global-norm clip and AdamW with the official groups (DETR: lr 1e-4, backbone 1e-5;
Deformable DETR: lr 2e-4, backbone 2e-5, sampling offsets and reference points 2e-5; stem and
layer1 frozen). Both sides start from the same random weights on the same images and real
coco-mini targets. JAX: `training.make_train_step` with the family's criterion (one jit, host
matcher). PyTorch: `DetrForObjectDetection(labels=...)` / `DeformableDetrForObjectDetection` with
their losses (focal matching and loss for Deformable DETR), `clip_grad_norm_` and `torch.optim.AdamW`.
Prints s/step for each, the ratio PyTorch / JAX (above 1: JAX is faster), each side's page
faults in one more step, and on the CPU each side's GFLOP/s against this machine's float32
matmul rate (the fastest square matmul of either library, timed in the same alternating rounds). The step's
operations are counted by XLA's cost analysis of the lowered JAX step (a multiply-add counts 2;
the same arithmetic on both sides), so `GFLOP / matmul rate` is about the least time any float32
implementation of the step can take here.

  python benchmarks/train_step.py [--model detr|deformable-refine] [--batch 2] [--size 512] [--iters 5]
      [--dtype float32] [--default_allocator]

On a GPU, PyTorch runs on CUDA in float32 and JAX on the default device in --dtype.
"""

import argparse
import os
import sys

import jax
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks.timing import interleaved_seconds, matmul_calls, matmul_peak, minor_page_faults  # noqa: E402
from configs import deformable_detr_r50_refine, detr_r50  # noqa: E402
from detr_jax import families, porting, sharding, system, training  # noqa: E402
from detr_jax.training import optim  # noqa: E402
from references.coco_mini import COCO_MINI, coco_targets, coco_train_image_ids  # noqa: E402
from references.transformers_deformable_detr import hf_deformable_detr  # noqa: E402
from references.transformers_detr import hf_detr  # noqa: E402

DROPOUT = dict(dropout=0.1, attention_dropout=0.1, activation_dropout=0.1)   # the official model's dropouts


# name -> (reference model, config of the recipe, {parameter-name keyword: lr} of the official groups)
MODELS = {
    "detr": (lambda: hf_detr(50, auxiliary_loss=True, **DROPOUT), detr_r50.get_config,
             {"backbone": 1e-5, "": 1e-4}),
    "deformable-refine": (lambda: hf_deformable_detr(with_box_refine=True, auxiliary_loss=True, class_cost=2,
                                                     **DROPOUT),
                          deformable_detr_r50_refine.get_config,
                          {"backbone": 2e-5, "sampling_offsets": 2e-5, "reference_points": 2e-5, "": 2e-4}),
}


def torch_step_fn(model, pixels, pixel_mask, labels, device, group_lrs):
  # transformers' DetrConvEncoder means to freeze only the stem and stage 0, but it looks for
  # "stage.1" in names spelled "stages.1", so it freezes the whole HF-ResNet backbone. The
  # official recipe trains layer2..layer4, so set the flags explicitly.
  trained_backbone = ("stages.1.", "stages.2.", "stages.3.")
  for name, param in model.named_parameters():
    if "backbone" in name:
      param.requires_grad_(any(stage in name for stage in trained_backbone))
  groups = {keyword: [] for keyword in group_lrs}
  for name, param in model.named_parameters():
    if param.requires_grad:
      groups[next(keyword for keyword in group_lrs if keyword in name)].append(param)
  optimizer = torch.optim.AdamW([{"params": params, "lr": group_lrs[k]} for k, params in groups.items()],
                                weight_decay=1e-4)
  model.train()

  def step():
    loss = model(pixel_values=pixels, pixel_mask=pixel_mask, labels=labels).loss
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    optimizer.step()
    if device == "cuda":
      torch.cuda.synchronize()
    return float(loss)
  return step


def jax_step_fn(config, state_dict, images, mask, targets, dtype):
  model, variables = porting.load_pytorch_checkpoint(state_dict, dtype=dtype)
  family = families.of_model(model)
  mesh = sharding.create_mesh()
  tx = optim.create(config.optimizer, steps_per_epoch=1000)
  criterion = family.criterion(config, mesh)
  metrics_class = training.metric_collection(family.loss_term_names(model))
  train_step = training.make_train_step(model, criterion, tx, mesh, metrics_class)
  # Replicated on the mesh as train.py places it; an unplaced state would compile the step twice.
  state = jax.device_put(training.create_train_state(variables, tx, seed=0), NamedSharding(mesh, PartitionSpec()))
  # On the device before timing, as the PyTorch tensors are and as train.py's prefetched batches are.
  batch = jax.device_put({"image": images, "pixel_mask": mask, **targets})
  box = {"state": state}

  def step():
    box["state"], _, loss = train_step(box["state"], batch)
    return float(loss)
  return step, train_step.lower(state, batch).cost_analysis()["flops"]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="detr", choices=sorted(MODELS))
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--size", type=int, default=512)
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--default_allocator", action="store_true",
                      help="leave glibc's malloc as it is, to measure what retain_freed_host_memory gains")
  args = parser.parse_args()

  if not args.default_allocator:
    system.retain_freed_host_memory()   # as train.py does; PyTorch's side gains from it too
  device = "cuda" if torch.cuda.is_available() else "cpu"
  make_reference, make_config, group_lrs = MODELS[args.model]
  reference = make_reference()
  state_dict = {k: v.clone() for k, v in reference.state_dict().items()}
  rng = np.random.default_rng(0)
  images = rng.normal(size=(args.batch, args.size, args.size, 3)).astype(np.float32)
  mask = np.ones((args.batch, args.size, args.size), bool)
  targets, per_image = coco_targets(COCO_MINI, coco_train_image_ids(COCO_MINI, args.batch), max_boxes=100)
  labels = [{"class_labels": torch.from_numpy(l).long().to(device), "boxes": torch.from_numpy(b).to(device)}
            for l, b in per_image]
  pixels = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)
  torch_step = torch_step_fn(reference.to(device), pixels, torch.from_numpy(mask).long().to(device), labels, device,
                             group_lrs)
  jax_step, step_flops = jax_step_fn(make_config(), state_dict, images, mask, targets, args.dtype)

  print(f"{args.model} (R50) training step, batch {args.batch}, {args.size}x{args.size}, {sum(len(l) for l, _ in per_image)} "
        f"targets; JAX {jax.__version__} on {jax.devices()[0].device_kind} ({args.dtype}); torch {torch.__version__} "
        f"on {device} (float32, {torch.get_num_threads()} threads); median of {args.iters} alternating steps "
        f"after a warm-up")
  matmuls, matmul_flops = matmul_calls() if device == "cpu" else ([], 0.0)
  torch_times, jax_times, *matmul_times = interleaved_seconds([torch_step, jax_step, *matmuls], args.iters)
  torch_seconds, jax_seconds = float(np.median(torch_times)), float(np.median(jax_times))
  print(f"{'PyTorch s/step':>15} {'JAX s/step':>11} {'PyTorch/JAX':>12} {'JAX images/s':>13}")
  print(f"{torch_seconds:>15.3f} {jax_seconds:>11.3f} {torch_seconds / jax_seconds:>12.2f} "
        f"{args.batch / jax_seconds:>13.2f}")
  print(f"minor page faults per step: PyTorch {minor_page_faults(torch_step)}, JAX {minor_page_faults(jax_step)}")
  if device == "cpu":
    matmul_rate = matmul_peak(matmul_times, matmul_flops)
    print(f"step: {step_flops / 1e9:.0f} GFLOP; float32 matmul {matmul_rate / 1e9:.0f} GFLOP/s, so at least "
          f"{step_flops / matmul_rate:.2f} s/step; PyTorch {step_flops / torch_seconds / 1e9:.0f} GFLOP/s "
          f"({step_flops / torch_seconds / matmul_rate:.2f} of matmul), JAX {step_flops / jax_seconds / 1e9:.0f} "
          f"GFLOP/s ({step_flops / jax_seconds / matmul_rate:.2f})")


if __name__ == "__main__":
  main()
