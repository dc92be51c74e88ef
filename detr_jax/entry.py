"""What the commands (`detr-train`, `detr-eval`, `detr-port`) share: the process set-up that must
come before TensorFlow and JAX load, absl flags with the config's keys checked, and user mistakes
answered in one line.

A user mistake ends a command with `error: <what is wrong and how to fix it>` on stderr and exit
status 1, without a traceback: a missing file, a value the library refuses (its ValueErrors name
the key or file and the fix), a missing optional package, the device out of memory. Any other
exception is a bug and keeps its traceback.
"""

import contextlib
import difflib
import importlib.util
import linecache
import os
import re
import sys
from typing import Callable, NoReturn, Optional, Sequence

from absl import app
from absl import flags
import ml_collections

import configs
from detr_jax import extras, system

_PACKAGE_DIR = os.path.dirname(os.path.realpath(__file__))
# ml_collections' override syntax: --config.a.b=value, or --noconfig.a.b for a boolean.
_CONFIG_OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=]+)")
_CONFIG_FLAG = re.compile(r"^--?config(?:=(.*))?$")


def fail(message: str) -> NoReturn:
  """Prints `error: message` on stderr and exits with status 1."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(1)


def _raised_by_this_package(error: BaseException) -> bool:
  """Whether the innermost frame of `error`'s traceback is a `raise` statement in detr_jax's code.

  Not just any detr_jax frame: JAX drops its own frames from the traceback of an error raised
  inside it, so that its ValueErrors (bugs: shapes, arguments) end in the detr_jax line that called it.
  """
  traceback = error.__traceback__
  while traceback is not None and traceback.tb_next is not None:
    traceback = traceback.tb_next
  if traceback is None:
    return False
  filename = traceback.tb_frame.f_code.co_filename
  return (os.path.realpath(filename).startswith(_PACKAGE_DIR + os.sep)
          and linecache.getline(filename, traceback.tb_lineno).strip().startswith("raise "))


def _out_of_memory(error: RuntimeError) -> bool:
  """Whether `error` is XLA's out-of-memory error (a jax.errors.JaxRuntimeError)."""
  import jax   # here, not at the top: a failed flag or a missing file needs no JAX
  return isinstance(error, jax.errors.JaxRuntimeError) and any(
      marker in str(error) for marker in ("RESOURCE_EXHAUSTED", "Out of memory"))


@contextlib.contextmanager
def user_errors(oom_setting: Optional[str] = None, also: tuple = ()):
  """Turns the user mistakes raised inside into `fail(message)`; other exceptions pass unchanged.

  User mistakes: FileNotFoundError and FileExistsError (their messages name the path),
  extras.MissingExtraError, a ValueError that detr_jax's own code raises (coco.DatasetError,
  checkpoints.CheckpointMismatchError and the refused settings among them; one from inside a
  dependency, JAX included, is a bug), the exception classes in `also`, and, with `oom_setting` (e.g.
  "--config.batch_size"), XLA's out-of-memory error, answered with the setting to lower.
  """
  try:
    yield
  except (FileNotFoundError, FileExistsError, extras.MissingExtraError, *also) as error:
    fail(str(error))
  except ValueError as error:
    if not _raised_by_this_package(error):
      raise
    fail(str(error))
  except RuntimeError as error:
    if oom_setting is None or not _out_of_memory(error):
      raise
    fail(f"out of memory ({str(error).splitlines()[0]}): lower {oom_setting}.")


def builtin_config(name: str) -> str:
  """The path of a config file that ships with detr_jax (the `configs` package), e.g. "detr_r50.py"."""
  return os.path.join(os.path.dirname(configs.__file__), name)


def _config_flag_value(argv: Sequence[str], default_config: Optional[str]) -> Optional[str]:
  """The value of --config (`--config=FILE[:ARGS]` or `--config FILE[:ARGS]`) in argv, else `default_config`."""
  for index, arg in enumerate(argv):
    match = _CONFIG_FLAG.match(arg)
    if match:
      if match.group(1) is not None:
        return match.group(1)
      return argv[index + 1] if index + 1 < len(argv) else None
  return default_config


def _load_config(path: str, config_args: Sequence[str]) -> ml_collections.ConfigDict:
  """`get_config(*config_args)` of the config file `path`, as ml_collections calls it."""
  spec = importlib.util.spec_from_file_location("detr_jax_checked_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*config_args)


def unknown_key_message(config: ml_collections.ConfigDict, override: str) -> Optional[str]:
  """Why `--config.{override}` names no key of `config`, with the nearest key (difflib); None if it does."""
  node, path = config, "config"
  for name in override.split("."):
    if not isinstance(node, ml_collections.ConfigDict):
      return None   # inside a value: ml_collections' parsing of it reports what is wrong
    if name not in node:
      nearest = difflib.get_close_matches(name, list(node.keys()), n=1)
      hint = f"did you mean --{path}.{nearest[0]}?" if nearest else f"its keys are {', '.join(sorted(node.keys()))}."
      return f"unknown config key --config.{override}: {path} has no {name!r}; {hint}"
    node, path = node[name], f"{path}.{name}"
  return None


def check_config_flags(argv: Sequence[str], default_config: Optional[str] = None) -> None:
  """Fails (one line) on a --config file that does not exist or a `--config.KEY` override whose
  KEY is not in the config. ml_collections would raise them as tracebacks while it defines or
  parses the flag."""
  value = _config_flag_value(argv, default_config)
  if value is None:
    return
  path, *config_args = value.split(":", 1)
  if not os.path.isfile(path):
    fail(f"--config: no config file {path!r} (in {os.getcwd()}); the built-in configs are {builtin_config('*.py')}.")
  overrides = [match.group(1) for match in map(_CONFIG_OVERRIDE.match, argv) if match]
  if not overrides:
    return
  config = _load_config(path, config_args)
  for override in overrides:
    message = unknown_key_message(config, override)
    if message:
      fail(message)


def _parse_flags(argv: list) -> list:
  """absl's flag parsing, with a flag error as one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as error:
    fail(f"{error} (see --help)")


def run(define_flags: Callable[[], None], main: Callable[[], None], default_config: Optional[str] = None) -> NoReturn:
  """Runs an absl command: `define_flags()`, then `main()` once flags.FLAGS holds sys.argv's values.

  First, glibc keeps freed memory mapped where JAX will compute on the CPU
  (`system.jax_backend_will_be_cpu`, `system.retain_freed_host_memory`), before JAX starts its
  threads. The flags: a missing --config file, an unknown config key (`check_config_flags`; eval's
  config flag defaults to `default_config`), a bad flag value and unexpected positional arguments
  fail with one line; `--help` prints the docstring of `main`'s module and its flags. Then
  TensorFlow is imported without its loading notices (`system.import_tensorflow_quietly`), and
  `main()` runs; it imports the heavy modules itself, so that --help and flag errors are quick.
  Call once per process: absl flags are global.
  """
  if system.jax_backend_will_be_cpu():
    system.retain_freed_host_memory()
  check_config_flags(sys.argv, default_config)
  define_flags()
  # absl's --help shows the main module's docstring and key flags; the main module is a thin wrapper.
  command = sys.modules[main.__module__]
  sys.modules["__main__"].__doc__ = command.__doc__
  for flag in flags.FLAGS.get_flags_for_module(command.__name__):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)

  def absl_main(argv):
    if len(argv) > 1:
      fail(f"unexpected arguments {' '.join(argv[1:])}; flags are --name=value (see --help).")
    system.import_tensorflow_quietly()
    main()

  app.run(absl_main, flags_parser=_parse_flags)
