"""Box ops against transformers' PyTorch box utilities; matchers against scipy's optimum."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
import torch
from transformers.loss import loss_for_object_detection as hf_ops

from detr_jax import box_ops
from detr_jax.losses import matcher
from references.coco_mini import coco_targets, coco_train_image_ids
from tests.helpers import run_on_cpu_devices


def test_box_ops_match_transformers(coco_mini):
  padded, _ = coco_targets(coco_mini, coco_train_image_ids(coco_mini, 3))
  real = padded["boxes"][padded["target_valid"]]
  rng = np.random.default_rng(0)
  shifted = np.clip(real + rng.normal(0, 0.05, real.shape), 0.01, 1).astype(np.float32)
  xyxy1 = box_ops.cxcywh_to_xyxy(jnp.asarray(real))
  xyxy2 = box_ops.cxcywh_to_xyxy(jnp.asarray(shifted))
  ref1 = hf_ops.center_to_corners_format(torch.from_numpy(real))
  ref2 = hf_ops.center_to_corners_format(torch.from_numpy(shifted))
  np.testing.assert_allclose(xyxy1, ref1.numpy(), atol=1e-6)
  np.testing.assert_allclose(box_ops.xyxy_to_cxcywh(xyxy1), real, atol=1e-6)
  np.testing.assert_allclose(box_ops.pairwise_iou(xyxy1, xyxy2), hf_ops.box_iou(ref1, ref2)[0].numpy(), atol=1e-6)
  np.testing.assert_allclose(box_ops.pairwise_generalized_box_iou(xyxy1, xyxy2),
                             hf_ops.generalized_box_iou(ref1, ref2).numpy(), atol=1e-6)
  np.testing.assert_allclose(box_ops.area(xyxy1), hf_ops.box_area(ref1).numpy(), atol=1e-7)


def test_degenerate_boxes_stay_finite():
  boxes = jnp.array([[0.5, 0.5, 0.0, 0.0], [0.5, 0.5, 0.0, 0.2], [0.2, 0.2, 0.1, 0.1], [0.5, 0.5, 0.0, 0.0]])
  xyxy = box_ops.cxcywh_to_xyxy(boxes)
  giou = box_ops.pairwise_generalized_box_iou(xyxy, xyxy)
  assert np.isfinite(giou).all() and (giou >= -1).all() and (giou <= 1).all()
  grads = jax.grad(lambda b: box_ops.generalized_box_iou(box_ops.cxcywh_to_xyxy(b), xyxy[::-1]).sum())(boxes)
  assert np.isfinite(grads).all()
  assert float(giou[2, 2]) == 1.0  # a proper box with itself


def scipy_total(cost, valid):
  total = 0.0
  for b in range(cost.shape[0]):
    block = cost[b][:, valid[b]]
    rows, cols = scipy.optimize.linear_sum_assignment(block)
    total += block[rows, cols].sum()
  return total


def assignment_total(cost, valid, query_index):
  total = 0.0
  for b in range(cost.shape[0]):
    targets = np.flatnonzero(valid[b] & (query_index[b] >= 0))
    queries = query_index[b][targets]
    assert len(set(queries.tolist())) == len(queries), "a query matched twice"
    total += cost[b][queries, targets].sum()
  return total


@pytest.mark.parametrize("queries,targets,counts", [(100, 100, [7, 0, 45, 100]), (30, 12, [12, 1, 0, 5]),
                                                    (10, 10, [0, 0, 0, 0]), (8, 20, [20, 3, 8, 9])])
def test_matchers_reach_scipy_optimum(queries, targets, counts):
  """Random costs; square, rectangular, zero-target and more-targets-than-queries problems."""
  rng = np.random.default_rng(queries + targets)
  cost = rng.normal(size=(2, len(counts), queries, targets)).astype(np.float32)
  valid = np.zeros((len(counts), targets), bool)
  for b, n in enumerate(counts):
    valid[b, rng.choice(targets, n, replace=False)] = True  # valid targets need not be a prefix
  host = np.asarray(jax.jit(matcher.assign_on_host)(cost, valid))
  device = np.asarray(jax.jit(matcher.assign_on_device)(cost, valid))
  for layer in range(2):
    optimum = scipy_total(cost[layer], valid)
    for result in (host, device):
      assert ((result[layer] >= 0).sum(axis=1) == np.minimum(valid.sum(1), queries)).all()
      assert (result[layer][~valid] == -1).all()
      np.testing.assert_allclose(assignment_total(cost[layer], valid, result[layer]), optimum, rtol=1e-5, atol=1e-4)


def test_threaded_host_solver_gives_same_assignment():
  rng = np.random.default_rng(5)
  cost = rng.normal(size=(6, 4, 100, 30)).astype(np.float32)
  valid = rng.random((4, 30)) > 0.3
  np.testing.assert_array_equal(matcher.assign_on_host(cost, valid, num_threads=1),
                                matcher.assign_on_host(cost, valid, num_threads=4))


def test_unknown_solver():
  with pytest.raises(ValueError, match="Unknown matcher solver 'gpu'"):
    matcher.match(jnp.zeros((1, 1, 5, 3)), jnp.zeros((1, 1, 5, 4)), jnp.zeros((1, 2), jnp.int32),
                  jnp.zeros((1, 2, 4)), jnp.ones((1, 2), bool), solver="gpu")


SHARDED_SCRIPT = """
import json, sys
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from detr_jax import losses
from references.coco_mini import coco_targets, coco_train_image_ids
from tests.helpers import as_model_outputs, random_outputs
import pathlib
padded, _ = coco_targets(pathlib.Path(sys.argv[1]), coco_train_image_ids(pathlib.Path(sys.argv[1]), 8), max_boxes=64)
logits, boxes = random_outputs(8, seed=4)
results = {"devices": jax.device_count()}
mesh = Mesh(np.array(jax.devices()), ("data",))
try:
  losses.SetCriterion(num_classes=91, solver="host", mesh=mesh)(as_model_outputs(logits, boxes), padded)
except ValueError as error:
  results["host_on_cpu_mesh"] = str(error)
def loss_and_grads(criterion):
  return jax.jit(jax.value_and_grad(lambda l, b, t: criterion(as_model_outputs(l, b), t), argnums=(0, 1), has_aux=True))
single = loss_and_grads(losses.SetCriterion(num_classes=91, solver="device"))(
    *jax.device_put((logits, boxes, padded), jax.devices()[0]))
shard = lambda x, axis: jax.device_put(x, NamedSharding(mesh, P(*([None] * axis + ["data"]))))
sharded = loss_and_grads(losses.SetCriterion(num_classes=91, solver="device", mesh=mesh))(
    shard(logits, 1), shard(boxes, 1), {k: shard(v, 0) for k, v in padded.items()})
(loss1, terms1), grads1 = single
(loss8, terms8), grads8 = sharded
results.update({
    "loss": [float(loss1), float(loss8)],
    "max_term_diff": max(abs(float(terms1[k]) - float(terms8[k])) for k in terms1),
    "max_grad_diff": max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(grads1, grads8)),
    "grad_sharding": str(grads8[0].sharding.spec),
})
print(json.dumps(results))
"""


def test_loss_on_8_device_mesh_equals_single_device(coco_mini):
  """num_boxes normalisation stays correct when the batch is sharded over 8 CPU devices.

  The device solver runs on the mesh; the host solver refuses a multi-device CPU mesh with a
  clear error (XLA:CPU deadlock, see `matcher.match`).
  """
  results = run_on_cpu_devices(SHARDED_SCRIPT, str(coco_mini))
  assert results["devices"] == 8
  assert "cannot run on a 8-device CPU mesh" in results["host_on_cpu_mesh"]
  loss1, loss8 = results["loss"]
  assert abs(loss1 - loss8) <= 1e-5 * max(1.0, abs(loss1)), results
  assert results["max_term_diff"] <= 1e-5, results
  assert results["max_grad_diff"] <= 1e-6, results
  assert "data" in results["grad_sharding"], results  # the batch really was sharded
