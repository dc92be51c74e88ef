"""Helpers shared by the tests (the fixtures are in conftest.py)."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from configs import coco_mini_cpu
from detr_jax.training import loop

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_REFERENCE = pathlib.Path(os.environ.get("DETR_JAX_REFERENCE", REPO_ROOT.parent / "shared" / "reference"))

# The subprocesses the tests start (train.py, eval.py, multi-device and multi-process scripts) compile
# at XLA's backend optimisation level 0: compilation is most of their time on 2 cores, and this level
# cuts it by a fifth to a third. It changes float rounding (a tiny Deformable DETR's gradients by up to
# 3e-6 relative), so only where results are compared with others computed at the same level: the
# in-process tests, held to PyTorch within 1e-6 and less, run XLA's defaults, as does the main-job test.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"


def xla_flags(devices: int = 1) -> str:
  """XLA_FLAGS for a test subprocess: the subprocesses' optimisation level and `devices` CPU devices."""
  return f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count={devices}"


def require_shared_file(path: pathlib.Path, hint: str) -> None:
  """Skips the test when shared data is absent; DETR_JAX_REQUIRE_DATA=1 (CI and the README's test
  command) fails it instead."""
  if not path.is_file():
    skip_unless_required(f"{path} not found: {hint}")


def skip_unless_required(reason: str) -> None:
  """Skips the test for `reason`, something the environment lacks (shared data, the built CPU kernel);
  under DETR_JAX_REQUIRE_DATA=1 (CI and the README's test command), where it must be there, fails it."""
  if os.environ.get("DETR_JAX_REQUIRE_DATA") == "1":
    pytest.fail(f"required and missing (DETR_JAX_REQUIRE_DATA=1): {reason}")
  pytest.skip(reason)



def run_on_cpu_devices(script: str, *args: str, devices: int = 8) -> dict:
  """Runs `script` in a fresh Python with `devices` simulated CPU devices; returns its last line as JSON.

  XLA_FLAGS must be set before JAX starts, hence the subprocess.
  """
  env = dict(os.environ, XLA_FLAGS=xla_flags(devices), JAX_PLATFORMS="cpu",
             PYTHONPATH=str(REPO_ROOT))
  run = subprocess.run([sys.executable, "-c", script, *args], env=env, cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  return json.loads(run.stdout.strip().splitlines()[-1])


def random_state_dict(shapes, seed=0):
  """{key: N(0, 1) float32 array of that shape} for a {key: shape} list."""
  rng = np.random.default_rng(seed)
  return {key: rng.normal(size=shape).astype(np.float32) for key, shape in shapes.items()}


def assert_same_state_dict(actual, expected):
  """The same keys, shapes and values, exactly."""
  assert sorted(actual) == sorted(expected)
  for key in expected:
    assert actual[key].shape == expected[key].shape, key
    np.testing.assert_array_equal(actual[key], expected[key], err_msg=key)


def random_outputs(batch, seed, layers=6, queries=100, classes=91):
  """Random DETR outputs of every decoder layer: logits [L, B, Q, K + 1], sigmoid boxes [L, B, Q, 4]."""
  rng = np.random.default_rng(seed)
  logits = rng.normal(0, 2, (layers, batch, queries, classes + 1)).astype(np.float32)
  boxes = (1 / (1 + np.exp(-rng.normal(0, 1.5, (layers, batch, queries, 4))))).astype(np.float32)
  return logits, boxes


def as_model_outputs(logits, boxes):
  """`random_outputs` as the model's output dict, aux outputs included."""
  return {"pred_logits": logits[-1], "pred_boxes": boxes[-1],
          "aux_outputs": [{"pred_logits": l, "pred_boxes": b} for l, b in zip(logits[:-1], boxes[:-1])]}


LOSS_TERMS = ("loss", "loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "loss_bbox_0", "loss_giou_0")


def tiny_config(data_dir, **overrides):
  """coco_mini_cpu shrunk: 1 encoder and 2 decoder layers of width 64, 12 queries, 136x136 batches."""
  config = coco_mini_cpu.get_config()
  config.model.update(hidden_dim=64, num_encoder_layers=1, num_decoder_layers=2, dim_feedforward=128, num_queries=12)
  config.data.update(data_dir=str(data_dir), scale=0.1, fixed_size=(136, 136), eval_split="")
  config.loss.solver = "device"
  config.update({**dict(batch_size=8, per_device_eval_batch_size=8, log_every_steps=1, checkpoint_every_steps=2),
                 **overrides})
  return config


def tiny_deformable_config(data_dir, **overrides):
  """`tiny_config` with a Deformable DETR of the same size (ResNet-18, width 64, 1 encoder and 2
  decoder layers, 12 queries, 2 sampling points), 4 feature levels, refinement and two-stage:
  every part trains."""
  from configs import deformable_detr_r50_two_stage
  recipe = deformable_detr_r50_two_stage.get_config()
  config = tiny_config(data_dir, **overrides)
  config.model = recipe.model
  config.model.update(hidden_dim=64, num_encoder_layers=1, num_decoder_layers=2, dim_feedforward=128, num_queries=12,
                      backbone_depth=18, enc_n_points=2, dec_n_points=2)
  config.loss = recipe.loss
  config.loss.solver = "device"
  config.optimizer.lr_linear_proj_mult = recipe.optimizer.lr_linear_proj_mult
  return config


def instrumented_train_step(monkeypatch, on_call):
  """Wraps the loop's make_train_step so that on_call(call_index, batch) -> batch sees each step."""
  original = loop.make_train_step

  def make(*args):
    step_fn = original(*args)
    calls = []

    def wrapped(state, batch):
      calls.append(None)
      return step_fn(state, on_call(len(calls), batch))
    return wrapped
  monkeypatch.setattr(loop, "make_train_step", make)
