"""Hungarian matching of object queries to targets (paper Sec. 3.1, official `models/matcher.py`).

The cost of assigning query q to target t is
    class_cost * (-p_q(label_t)) + bbox_cost * L1(box_q, box_t) + giou_cost * (-GIoU(box_q, box_t))
with cxcywh boxes for L1 and xyxy for GIoU, p the softmax probability (DETR). With a focal alpha
(Deformable DETR's official `models/matcher.py`) the class term is the focal cost of the sigmoid
probability instead: alpha (1 - p)^2 (-log p) - (1 - alpha) p^2 (-log(1 - p)). Costs for every decoder layer and image are computed
in one jitted computation; each [queries x valid targets] block is then solved exactly, either
host-side with scipy's `linear_sum_assignment` (one `jax.pure_callback` per step) or on device
with `optax.assignment.hungarian_algorithm` under `vmap`.

Shapes: L decoder layers, B images, Q queries, T padded targets per image.
"""

from concurrent import futures
import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, PartitionSpec as P
import scipy.optimize

from detr_jax import box_ops
from detr_jax.sharding import BATCH_AXIS

SOLVERS = ("host", "device")


class CostWeights(NamedTuple):
  """Weights of the matching cost terms (official DETR 1, 5, 2; Deformable DETR 2, 5, 2), and the
  focal alpha of a sigmoid classifier (Deformable DETR 0.25; None: softmax, DETR)."""
  class_cost: float = 1.0
  bbox_cost: float = 5.0
  giou_cost: float = 2.0
  focal_alpha: Optional[float] = None


def focal_class_cost(pred_logits, alpha: float, gamma: float = 2.0):
  """The focal classification cost of every class (official Deformable DETR `HungarianMatcher`):
  [..., K] sigmoid logits -> [..., K] float32, the positive focal term minus the negative one."""
  prob = jax.nn.sigmoid(pred_logits.astype(jnp.float32))
  negative = (1 - alpha) * prob**gamma * -jnp.log(1 - prob + 1e-8)
  positive = alpha * (1 - prob)**gamma * -jnp.log(prob + 1e-8)
  return positive - negative


def matching_cost(pred_logits, pred_boxes, labels, boxes, weights: CostWeights = CostWeights()):
  """Pairwise matching costs.

  Args:
    pred_logits: [..., Q, K + 1] class logits ("no object" last), or [..., Q, K] sigmoid logits
      when `weights.focal_alpha` is set.
    pred_boxes: [..., Q, 4] cxcywh, normalised.
    labels: [..., T] int class indices; boxes: [..., T, 4] cxcywh normalised. Leading axes
      broadcast against the predictions' (e.g. targets [B, T] with predictions [L, B, Q]).
    weights: the three cost weights and the focal alpha.
  Returns:
    [..., Q, T] float32 costs (entries of padded targets are meaningless; mask them).
  """
  if weights.focal_alpha is None:
    per_class = -jax.nn.softmax(pred_logits.astype(jnp.float32), axis=-1)
  else:
    per_class = focal_class_cost(pred_logits, weights.focal_alpha)
  labels = jnp.broadcast_to(labels, per_class.shape[:-2] + labels.shape[-1:])
  class_cost = jnp.take_along_axis(per_class, labels[..., None, :], axis=-1)
  bbox_cost = jnp.abs(pred_boxes[..., :, None, :] - boxes[..., None, :, :]).sum(-1)
  giou = box_ops.pairwise_generalized_box_iou(box_ops.cxcywh_to_xyxy(pred_boxes), box_ops.cxcywh_to_xyxy(boxes))
  return weights.bbox_cost * bbox_cost + weights.class_cost * class_cost - weights.giou_cost * giou


def _assign_block(cost, valid):
  """One image's optimal assignment: [Q, T] costs, [T] validity -> [T] query index or -1."""
  columns = np.flatnonzero(valid)
  matched = np.full(valid.shape, -1, np.int32)
  if columns.size:
    block = np.nan_to_num(cost[:, columns], nan=np.finfo(np.float32).max,
                          posinf=np.finfo(np.float32).max, neginf=np.finfo(np.float32).max)
    rows, cols = scipy.optimize.linear_sum_assignment(block)
    matched[columns[cols]] = rows
  return matched


def _assign_all(cost, valid, num_threads):
  cost, valid = np.asarray(cost), np.asarray(valid)
  layers, batch = cost.shape[:2]
  jobs = [(l, b) for l in range(layers) for b in range(batch)]
  solve = lambda job: _assign_block(cost[job], valid[job[1]])
  if num_threads > 1:
    with futures.ThreadPoolExecutor(num_threads) as pool:
      results = list(pool.map(solve, jobs))
  else:
    results = [solve(job) for job in jobs]
  return np.stack(results).reshape(layers, batch, -1)


def assign_on_host(cost, valid, num_threads: int = 1):
  """Optimal assignment with scipy, called from jitted code through `jax.pure_callback`.

  Args:
    cost: [L, B, Q, T] float32 matching costs.
    valid: [B, T] bool target mask; only valid columns enter each solve.
    num_threads: threads solving the L * B blocks (1 solves them in the calling thread).
  Returns:
    [L, B, T] int32: the query matched to each target, -1 for padded or unmatched targets
    (unmatched only when a valid target count exceeds Q).
  """
  result = jax.ShapeDtypeStruct(cost.shape[:2] + cost.shape[3:], jnp.int32)
  return jax.pure_callback(lambda c, v: _assign_all(c, v, num_threads), result,
                           jax.lax.stop_gradient(cost), valid, vmap_method="sequential")


def assign_on_device(cost, valid):
  """Optimal assignment with optax's Hungarian algorithm, vmapped over layers and images.

  Targets are the rows. Padded targets cost (largest valid cost + 1) against every query, so an
  optimal solution always prefers real targets and their assignment is unaffected.
  Args and returns as `assign_on_host`.
  """
  cost = jax.lax.stop_gradient(cost)
  rows_valid = valid[None, :, :, None]
  by_target = jnp.swapaxes(cost, -1, -2)
  finite = jnp.where(rows_valid & jnp.isfinite(by_target), by_target, -jnp.inf)
  filler = jnp.maximum(finite.max(axis=(-1, -2), keepdims=True), 0.0) + 1.0
  by_target = jnp.where(rows_valid, jnp.nan_to_num(by_target, nan=filler, posinf=filler, neginf=filler), filler)

  def solve(block):
    rows, cols = optax.assignment.hungarian_algorithm(block)
    return jnp.full(block.shape[0], -1, jnp.int32).at[rows].set(cols.astype(jnp.int32))

  layers, batch, targets, queries = by_target.shape
  matched = jax.vmap(solve)(by_target.reshape(layers * batch, targets, queries)).reshape(layers, batch, targets)
  return jnp.where(valid[None], matched, -1)


def match(pred_logits, pred_boxes, labels, boxes, valid, weights: CostWeights = CostWeights(),
          solver: str = "host", num_threads: int = 1, mesh: Optional[Mesh] = None):
  """Matches every decoder layer's predictions to the targets, with no gradient.

  Args:
    pred_logits: [L, B, Q, K + 1] (or [L, B, Q, K] with a focal alpha); pred_boxes: [L, B, Q, 4]
      cxcywh normalised.
    labels: [B, T] int32; boxes: [B, T, 4] cxcywh normalised; valid: [B, T] bool.
    solver: "host" (scipy) or "device" (optax).
    mesh: the device mesh when the batch is sharded over `sharding.BATCH_AXIS`. The host solver then runs
      under `shard_map`, each device passing its own images to its own host; without it, XLA
      would gather the whole batch to one device for the callback (and deadlock on CPU meshes).
  Returns:
    [L, B, T] int32 matched query per target, -1 where none.
  Raises:
    ValueError: unknown solver, or the host solver on a multi-device CPU mesh. There, XLA:CPU
      (jaxlib 0.10.2) hangs when a host callback's per-device operand exceeds ~100 KB while the
      other devices wait in a collective; use the device solver on simulated CPU meshes.
  """
  if solver not in SOLVERS:
    raise ValueError(f"Unknown matcher solver {solver!r}; choose one of {SOLVERS}.")
  if solver == "host" and mesh is not None and mesh.size > 1 and mesh.devices.flat[0].platform == "cpu":
    raise ValueError(f"The host matcher cannot run on a {mesh.size}-device CPU mesh (XLA:CPU deadlocks on "
                     "host callbacks beside collectives); set the matcher solver to 'device'.")
  cost = matching_cost(jax.lax.stop_gradient(pred_logits), jax.lax.stop_gradient(pred_boxes), labels, boxes, weights)
  if solver == "device":
    return assign_on_device(cost, valid)
  assign = functools.partial(assign_on_host, num_threads=num_threads)
  if mesh is not None:
    assign = jax.shard_map(assign, mesh=mesh, in_specs=(P(None, BATCH_AXIS), P(BATCH_AXIS)),
                           out_specs=P(None, BATCH_AXIS))
  return assign(cost, valid)

