"""The official optimiser (`main.py`): AdamW with a backbone learning rate, clipping and a step decay.

- AdamW, betas (0.9, 0.999), eps 1e-8, weight decay 1e-4 on every trained parameter
  (optax's decoupled decay `p -= lr * wd * p` equals torch.optim.AdamW's).
- lr 1e-4 for the transformer and heads, 1e-5 for the trained backbone (layer2..layer4).
- Frozen and never updated: the stem (`conv1`) and `layer1_*`; FrozenBatchNorm lives in the
  `batch_stats` collection, which the optimiser never sees.
- One global-norm clip at 0.1 over the trained parameters' gradients.
- Both learning rates drop x0.1 at `lr_drop_epochs` (official StepLR, stepped per epoch).
- `train_mask_head_only`: the panoptic recipe, which trains bbox_attention and the mask head on
  a frozen detector (official `--frozen_weights`); every other parameter is frozen.
- `lr_linear_proj_mult` (Deformable DETR's `main.py`): parameters under a module named
  `sampling_offsets` or `reference_points` train at lr x this (0.1).
"""

import functools
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import optax

from detr_jax.models import segmentation

# Optimiser groups (official main.py): the backbone at lr_backbone, everything else at lr (Deformable
# DETR's sampling offsets and reference points at lr x lr_linear_proj_mult), or frozen.
FROZEN, BACKBONE, NON_BACKBONE, LINEAR_PROJ = "frozen", "backbone", "non_backbone", "linear_proj"
FROZEN_BACKBONE_PREFIXES = ("conv1", "layer1_")
LINEAR_PROJ_MODULES = ("sampling_offsets", "reference_points")   # official `lr_linear_proj_names`


def parameter_group(path: tuple[str, ...], mask_head_only: bool = False, linear_proj: bool = False) -> str:
  """FROZEN, BACKBONE, NON_BACKBONE (projection, transformer, queries, heads, mask head) or, with
  `linear_proj`, LINEAR_PROJ (under a module named in LINEAR_PROJ_MODULES) for a param path."""
  if mask_head_only:
    return NON_BACKBONE if path[0] in segmentation.MODULE_NAMES else FROZEN
  if path[0] == "backbone":
    return FROZEN if path[1].startswith(FROZEN_BACKBONE_PREFIXES) else BACKBONE
  if linear_proj and any(name in LINEAR_PROJ_MODULES for name in path[:-1]):
    return LINEAR_PROJ
  return NON_BACKBONE


def parameter_groups(params, mask_head_only: bool = False, linear_proj: bool = False) -> Any:
  """The tree of `parameter_group` labels matching `params`."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  return flax.traverse_util.unflatten_dict({path: parameter_group(path, mask_head_only, linear_proj)
                                            for path in flat})


def learning_rate_schedules(optimizer_config: Mapping[str, Any], steps_per_epoch: int) -> dict[str, optax.Schedule]:
  """{"lr": transformer and heads, "lr_backbone"[, "lr_linear_proj": lr x lr_linear_proj_mult]}:
  constant, x0.1 after lr_drop_epochs epochs."""
  lr_drop_step = optimizer_config["lr_drop_epochs"] * steps_per_epoch
  base = {name: optimizer_config[name] for name in ("lr", "lr_backbone")}
  if optimizer_config.get("lr_linear_proj_mult") is not None:
    base["lr_linear_proj"] = optimizer_config["lr"] * optimizer_config["lr_linear_proj_mult"]
  return {name: optax.piecewise_constant_schedule(value, {lr_drop_step: 0.1}) for name, value in base.items()}


def trained_gradient_norm(grads, mask_head_only: bool = False) -> jax.Array:
  """Global L2 norm of the trained parameters' gradients (the official logged `grad_norm`)."""
  groups = parameter_groups(grads, mask_head_only)
  return optax.tree.norm(jax.tree.map(lambda g, group: g if group != FROZEN else jnp.zeros_like(g), grads, groups))


def create(optimizer_config: Mapping[str, Any], steps_per_epoch: int) -> optax.GradientTransformation:
  """The optimiser for `variables["params"]`, from `config.optimizer`.

  Args:
    optimizer_config: lr, lr_backbone, weight_decay, clip_max_norm, lr_drop_epochs and
      optionally train_mask_head_only and lr_linear_proj_mult.
    steps_per_epoch: optimiser steps per epoch, which turns lr_drop_epochs into a step.
  """
  schedules = learning_rate_schedules(optimizer_config, steps_per_epoch)
  groups = functools.partial(parameter_groups, mask_head_only=optimizer_config.get("train_mask_head_only", False),
                             linear_proj="lr_linear_proj" in schedules)

  def adamw(name):
    return optax.adamw(schedules[name], b1=0.9, b2=0.999, eps=1e-8, weight_decay=optimizer_config["weight_decay"])

  # Frozen gradients are zeroed before the clip, so that, as in the official code, only the
  # trained parameters count towards the global norm.
  return optax.chain(
      optax.masked(optax.set_to_zero(), lambda params: jax.tree.map(lambda g: g == FROZEN, groups(params))),
      optax.clip_by_global_norm(optimizer_config["clip_max_norm"]),
      optax.multi_transform({FROZEN: optax.set_to_zero(), BACKBONE: adamw("lr_backbone"), NON_BACKBONE: adamw("lr"),
                             **({LINEAR_PROJ: adamw("lr_linear_proj")} if "lr_linear_proj" in schedules else {})},
                            groups),
  )
