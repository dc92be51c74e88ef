"""The package's optional dependencies (the extras of pyproject.toml): PyTorch for `.pth` files,
transformers for the export to transformers' layout, tensorflow-datasets for the tfds source.

Each is imported where it is used, through `require`, so that a missing one is named with the
command that installs it instead of surfacing as a bare ModuleNotFoundError.
"""

import importlib


class MissingExtraError(ImportError):
  """An optional dependency is not installed; the message says what needed it and how to install it."""


def require(module: str, purpose: str, extra: str):
  """Imports and returns the top-level module `module`.

  Args:
    module: e.g. "torch".
    purpose: what needs it, as the user asked for it: "reading model.pth", "--hf".
    extra: the extra of pyproject.toml that installs it: "torch", "hf", "tfds".
  Raises:
    MissingExtraError: `module` is not installed ("reading model.pth needs torch: pip install
      'detr_jax[torch]'"). An ImportError from inside an installed `module` is not translated.
  """
  try:
    return importlib.import_module(module)
  except ModuleNotFoundError as error:
    if error.name != module:
      raise
    raise MissingExtraError(f"{purpose} needs {module}: pip install 'detr_jax[{extra}]'") from None
