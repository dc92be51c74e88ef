"""The optimiser against the official recipe in torch: AdamW groups, frozen layers, clip, StepLR."""

import jax
import numpy as np
import optax
import pytest
import torch

from detr_jax.training import optim

RECIPE = {"lr": 1e-4, "lr_backbone": 1e-5, "weight_decay": 1e-4, "clip_max_norm": 0.1, "lr_drop_epochs": 2}
# Larger rates and decay than the recipe, so that each part of the update moves parameters far
# beyond float32 rounding (a missed weight decay would change them by lr * wd * p = 1e-3 * p).
LOUD_RECIPE = {**RECIPE, "lr": 1e-2, "lr_backbone": 1e-3, "weight_decay": 0.1}


def _params(rng):
  shape = lambda *s: rng.normal(size=s).astype(np.float32)
  return {"backbone": {"conv1": {"kernel": shape(3, 3, 2, 4)}, "layer1_0": {"conv1": {"kernel": shape(3, 3, 4, 4)}},
                       "layer2_0": {"conv1": {"kernel": shape(3, 3, 4, 8)}}},
          "transformer": {"linear": {"kernel": shape(8, 6), "bias": shape(6)}},
          "query_embed": shape(5, 8)}


def test_parameter_groups_follow_the_official_freezing():
  groups = optim.parameter_groups(_params(np.random.default_rng(0)))
  assert groups["backbone"]["conv1"]["kernel"] == optim.FROZEN
  assert groups["backbone"]["layer1_0"]["conv1"]["kernel"] == optim.FROZEN
  assert groups["backbone"]["layer2_0"]["conv1"]["kernel"] == optim.BACKBONE
  assert groups["transformer"]["linear"]["bias"] == optim.NON_BACKBONE
  assert groups["query_embed"] == optim.NON_BACKBONE


def test_four_steps_equal_torch_adamw_with_clip_and_step_lr():
  """Steps per epoch 1, lr drop after 2 epochs: steps 3 and 4 use lr x0.1 (official StepLR)."""
  rng = np.random.default_rng(1)
  params = _params(rng)
  grads_per_step = [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32) * 3, params) for _ in range(4)]
  paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  names = ["/".join(k.key for k in path) for path in paths]
  groups = {name: group for name, group in zip(names, jax.tree.leaves(optim.parameter_groups(params)))}

  torch_params = {name: torch.nn.Parameter(torch.from_numpy(np.array(leaf)))
                  for name, leaf in zip(names, jax.tree.leaves(params))}
  for name, param in torch_params.items():
    param.requires_grad_(groups[name] != optim.FROZEN)
  trained = lambda group: [p for n, p in torch_params.items() if groups[n] == group]
  optimizer = torch.optim.AdamW([{"params": trained(optim.NON_BACKBONE)},
                                 {"params": trained(optim.BACKBONE), "lr": LOUD_RECIPE["lr_backbone"]}],
                                lr=LOUD_RECIPE["lr"], weight_decay=LOUD_RECIPE["weight_decay"])
  scheduler = torch.optim.lr_scheduler.StepLR(optimizer, LOUD_RECIPE["lr_drop_epochs"])

  tx = optim.create(LOUD_RECIPE, steps_per_epoch=1)
  state = tx.init(params)
  jax_params = params
  for grads in grads_per_step:
    for name, grad in zip(names, jax.tree.leaves(grads)):
      if torch_params[name].requires_grad:
        torch_params[name].grad = torch.from_numpy(np.array(grad))
    torch_norm = torch.nn.utils.clip_grad_norm_([p for p in torch_params.values() if p.requires_grad],
                                                LOUD_RECIPE["clip_max_norm"])
    optimizer.step()
    scheduler.step()
    np.testing.assert_allclose(float(optim.trained_gradient_norm(grads)), float(torch_norm), rtol=1e-6)
    updates, state = tx.update(grads, state, jax_params)
    jax_params = optax.apply_updates(jax_params, updates)

  for name, leaf, original in zip(names, jax.tree.leaves(jax_params), jax.tree.leaves(params)):
    expected = torch_params[name].detach().numpy()
    assert np.array_equal(leaf, original) == (groups[name] == optim.FROZEN), name
    # float32 rounding of the different operation orders: a few ulp of |p| < 4.
    np.testing.assert_allclose(np.asarray(leaf), expected, rtol=0, atol=1e-6, err_msg=name)


def test_schedules_drop_tenfold_at_the_configured_epoch():
  schedules = optim.learning_rate_schedules(RECIPE, steps_per_epoch=10)
  assert [float(schedules["lr"](s)) for s in (0, 19, 20)] == pytest.approx([1e-4, 1e-4, 1e-5], rel=1e-6)
  assert float(schedules["lr_backbone"](20)) == pytest.approx(1e-6, rel=1e-6)
