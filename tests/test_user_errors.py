"""User mistakes at the commands: one line `error: ...` on stderr naming the file, split, key or
flag and the fix, exit status 1, no traceback, and nothing written.

In-process where the command's body is a function (`train_cli.train`, `eval_cli.evaluate_checkpoint`,
`porting.cli.main`, `entry.check_config_flags`); as subprocesses for the few cases that show what
reaches a terminal (no traceback, no TensorFlow notice).
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from configs import coco_mini_cpu, generated
from detr_jax import entry, eval_cli, train_cli
from detr_jax.porting import cli as porting_cli
from tests.helpers import REPO_ROOT


def _error_line(capsys, command, *args) -> str:
  """The one stderr line of `command(*args)`, which must exit with status 1."""
  with pytest.raises(SystemExit) as exit_info:
    command(*args)
  assert exit_info.value.code == 1
  lines = capsys.readouterr().err.splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), lines
  return lines[0]


def _coco_mini_config(coco_mini):
  config = coco_mini_cpu.get_config()
  config.data.data_dir = str(coco_mini)
  return config


@pytest.mark.parametrize("case, expected", [
    ("no data_dir", ["No data folder is set", "pass --config.data.data_dir=DIR"]),
    ("missing data_dir", ["/nonexistent' does not exist", "pass --config.data.data_dir=DIR"]),
    ("missing train split", ["has no split 'train2018'", "its splits are train2017, val2017",
                             "pass --config.data.train_split=SPLIT"]),
    ("missing eval split", ["has no split 'val'", "its splits are train2017, val2017",
                            "pass --config.data.eval_split=SPLIT"]),
    ("unknown source", ["Unknown config.data.source='coco'", "choose one of coco_folder"]),
    ("missing init checkpoint", ["config.init.checkpoint: No checkpoint at", "absent.pth",
                                 "expected a train.py workdir"]),
    ("init .pth without torch", ["reading", "init.pth needs torch: pip install 'detr_jax[torch]'"]),
    ("tfds without tensorflow-datasets", ["config.data.source='tfds' needs tensorflow_datasets",
                                          "pip install 'detr_jax[tfds]'"]),
])
def test_training_refuses_bad_inputs_before_making_the_workdir(case, expected, coco_mini, tmp_path, capsys,
                                                              monkeypatch):
  from detr_jax import training

  def train_and_evaluate(*args):
    raise AssertionError("the mistake reached train_and_evaluate, which makes the workdir")

  monkeypatch.setattr(training, "train_and_evaluate", train_and_evaluate)
  config = _coco_mini_config(coco_mini)
  if case == "no data_dir":
    config.data.data_dir = ""
  elif case == "missing data_dir":
    config.data.data_dir = "/nonexistent"
  elif case == "missing train split":
    config.data.train_split = "train2018"
  elif case == "missing eval split":
    config.data.eval_split = "val"
  elif case == "unknown source":
    config.data.source = "coco"
  elif case == "missing init checkpoint":
    config.init.checkpoint = str(tmp_path / "absent.pth")
  elif case == "init .pth without torch":
    (tmp_path / "init.pth").write_bytes(b"")
    config.init.checkpoint = str(tmp_path / "init.pth")
    monkeypatch.setitem(sys.modules, "torch", None)   # not installed
  else:
    config.data.source = "tfds"
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)   # not installed
  workdir = tmp_path / "workdir"
  line = _error_line(capsys, train_cli.train, config, str(workdir))
  assert all(part in line for part in expected), line
  assert not workdir.exists()


def _out_of_memory(*args, **kwargs):
  """What XLA:CPU raises for jnp.ones((1 << 22, 1 << 22)). Raised, not provoked: a failed 64 TiB
  malloc changes glibc's state for the rest of the process (tests/test_system.py measures it)."""
  raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 70368744177664 bytes.")


def _non_finite_loss(*args):
  from detr_jax import training
  raise training.NonFiniteLossError("Loss is nan at step 3; training stopped before this update was saved.")


@pytest.mark.parametrize("failure, expected", [
    (_out_of_memory, ["out of memory (RESOURCE_EXHAUSTED", "lower --config.batch_size."]),
    (_non_finite_loss, ["Loss is nan at step 3"]),
])
def test_training_failures_the_user_can_act_on(failure, expected, tmp_path, capsys, monkeypatch):
  from detr_jax import training
  monkeypatch.setattr(training, "train_and_evaluate", failure)
  line = _error_line(capsys, train_cli.train, generated.get_config(), str(tmp_path / "workdir"))
  assert all(part in line for part in expected), line


def _jax_value_error(*args):
  """A bug in a jitted detr_jax function: JAX cuts its own frames from the traceback, which then
  ends in a detr_jax line that raises nothing itself."""
  from detr_jax import box_ops
  jax.jit(box_ops.cxcywh_to_xyxy)(jnp.zeros((3, 5)))   # 5 values to unpack into 4


def _raiser(error):
  def failure(*args):
    raise error
  return failure


@pytest.mark.parametrize("failure, error_type", [
    (_jax_value_error, ValueError), (_raiser(ValueError("from numpy")), ValueError),
    (_raiser(RuntimeError("RESOURCE_EXHAUSTED, but not XLA's")), RuntimeError), (_raiser(KeyError("x")), KeyError),
], ids=["ValueError under jax.jit", "ValueError in a dependency", "RuntimeError", "KeyError"])
def test_other_exceptions_keep_their_traceback(failure, error_type, tmp_path, monkeypatch):
  """A bug is not a user mistake: it passes through with its traceback."""
  from detr_jax import training
  monkeypatch.setattr(training, "train_and_evaluate", failure)
  with pytest.raises(error_type):
    train_cli.train(generated.get_config(), str(tmp_path / "workdir"))


def _non_coco_folder(tmp_path):
  folder = tmp_path / "data"
  (folder / "annotations").mkdir(parents=True)
  (folder / "val2017").mkdir()
  (folder / "annotations" / "instances_val2017.json").write_text('{"shapes": []}')   # e.g. a labelme file
  return folder


def test_training_on_a_non_coco_json_leaves_no_workdir(tmp_path, capsys):
  """The json parses but is not COCO: found by train_and_evaluate itself, before its writer and checkpoint
  manager make the workdir."""
  folder = _non_coco_folder(tmp_path)
  (folder / "annotations" / "instances_val2017.json").rename(folder / "annotations" / "instances_train2017.json")
  (folder / "val2017").rename(folder / "train2017")
  config = _coco_mini_config(folder)
  config.data.eval_split = ""
  workdir = tmp_path / "workdir"
  line = _error_line(capsys, train_cli.train, config, str(workdir))
  assert "instances_train2017.json is not a COCO instances file" in line, line
  assert not workdir.exists()


@pytest.mark.parametrize("case, expected", [
    ("missing checkpoint", ["No checkpoint at", "absent.pth", "expected a train.py workdir, a `detr-port import` "
                            "directory, or a .pth / .safetensors file"]),
    ("missing split", ["has no split 'val2018'", "its splits are train2017, val2017", "pass --split=SPLIT"]),
    ("no data folder", ["No data folder is set", "pass --data_dir=DIR"]),
    ("non-COCO json", ["instances_val2017.json is not a COCO instances file"]),
    ("out of memory", ["out of memory (RESOURCE_EXHAUSTED", "lower --config.per_device_eval_batch_size."]),
])
def test_evaluation_refuses_bad_inputs(case, expected, coco_mini, tmp_path, capsys, monkeypatch):
  from detr_jax import families
  config = _coco_mini_config(coco_mini)
  checkpoint, data_dir, split = str(tmp_path), str(coco_mini), "val2017"   # checked only for existence first
  if case == "missing checkpoint":
    checkpoint = str(tmp_path / "absent.pth")
  elif case == "missing split":
    split = "val2018"
  elif case == "no data folder":
    config.data.data_dir, data_dir = "", None
  elif case == "non-COCO json":
    data_dir = str(_non_coco_folder(tmp_path))
  else:
    monkeypatch.setattr(families, "load_model", _out_of_memory)
  output_dir = tmp_path / "out"
  line = _error_line(capsys, eval_cli.evaluate_checkpoint, config, checkpoint, data_dir, split, str(output_dir))
  assert all(part in line for part in expected), line
  assert not output_dir.exists()


@pytest.mark.parametrize("case, expected", [
    ("missing file", ["No checkpoint file at", "absent.pth", "expected a .pth, .pt, .bin or .safetensors file"]),
    ("corrupt safetensors", ["model.safetensors is not a readable .safetensors file", "is it truncated?"]),
    ("pth without torch", ["reading", "model.pth needs torch: pip install 'detr_jax[torch]'"]),
    ("--hf without transformers", ["--hf needs transformers: pip install 'detr_jax[hf]'"]),
])
def test_porting_refuses_bad_inputs(case, expected, tmp_path, capsys, monkeypatch):
  out = tmp_path / "out"
  if case == "missing file":
    argv = ["import", str(tmp_path / "absent.pth"), str(out)]
  elif case == "corrupt safetensors":
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":")   # cut short
    argv = ["import", str(tmp_path / "model.safetensors"), str(out)]
  elif case == "pth without torch":
    (tmp_path / "model.pth").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "torch", None)
    argv = ["import", str(tmp_path / "model.pth"), str(out)]
  else:
    monkeypatch.setitem(sys.modules, "transformers", None)
    argv = ["export", str(tmp_path), str(out), "--hf"]
  line = _error_line(capsys, porting_cli.main, argv)
  assert all(part in line for part in expected), line
  assert not out.exists()


@pytest.mark.parametrize("flags, expected", [
    (["--config.modle.x=1"],
     "unknown config key --config.modle.x: config has no 'modle'; did you mean --config.model?"),
    (["--config.model.hiden_dim", "3"], "config.model has no 'hiden_dim'; did you mean --config.model.hidden_dim?"),
    (["--noconfig.zzz"], "config has no 'zzz'; its keys are batch_size, checkpoint_every_steps,"),
])
def test_unknown_config_keys_are_named_with_the_nearest_key(flags, expected, capsys):
  argv = ["train.py", "--config", "configs/generated.py", "--workdir", "w", *flags]
  assert expected in _error_line(capsys, entry.check_config_flags, argv)


def test_known_config_keys_and_a_missing_config_file(capsys, tmp_path):
  entry.check_config_flags(["train.py", "--config=configs/generated.py", "--config.model.hidden_dim=3",
                            "--noconfig.data.keep_empty_train", "--config.data.fixed_size=(8,8)"])
  entry.check_config_flags(["eval.py", "--config.per_device_eval_batch_size=1"], eval_cli.DEFAULT_CONFIG)
  line = _error_line(capsys, entry.check_config_flags, ["train.py", "--config", str(tmp_path / "x.py")])
  assert f"--config: no config file '{tmp_path / 'x.py'}'" in line and "the built-in configs are " in line
  assert os.path.isfile(eval_cli.DEFAULT_CONFIG)


def _run(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT))
  return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, expected", [
    (("train.py", "--config", "configs/generated.py", "--workdir", "{workdir}", "--config.modle.x=1"),
     "error: unknown config key --config.modle.x: config has no 'modle'; did you mean --config.model?"),
    (("train.py", "--config", "configs/generated.py"),
     "error: flag --workdir=None: Flag --workdir must have a value other than None. (see --help)"),
    (("train.py", "--config", "configs/generated.py", "--workdir", "{workdir}", "configs/generated.py"),
     "error: unexpected arguments configs/generated.py; flags are --name=value (see --help)."),
    (("eval.py", "--checkpoint", "{workdir}", "--config.per_device_eval_batch_size=two"),   # the default config
     "error: flag --config.per_device_eval_batch_size=two: invalid literal for int() with base 10: 'two' (see --help)"),
    (("train.py", "--config", "configs/coco_mini_cpu.py", "--workdir", "{workdir}"),
     "error: No data folder is set (config.data.source='coco_folder'): pass --config.data.data_dir=DIR."),
    (("eval.py", "--checkpoint", "{workdir}", "--data_dir", "{workdir}"),
     "error: No checkpoint at '{workdir}': expected a train.py workdir, a `detr-port import` directory, or a "
     ".pth / .safetensors file."),
], ids=["unknown key", "missing flag", "positional argument", "bad value", "train: no data_dir", "eval: no checkpoint"])
def test_the_terminal_sees_one_line(args, expected, tmp_path):
  """The whole stderr of the command is the error line: no traceback, no TensorFlow loading notice."""
  workdir = tmp_path / "workdir"
  run = _run(*(arg.format(workdir=workdir) for arg in args))
  assert run.returncode == 1
  assert run.stderr == expected.format(workdir=workdir) + "\n"
  assert not workdir.exists()
