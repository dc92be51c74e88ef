"""PyTorch checkpoint files: reading `.pth` / `.bin` / `.safetensors` state dicts, writing `.pth`."""

import argparse
import os
import pickle
from typing import Mapping

import numpy as np

from detr_jax import extras


def needs_torch(path: str) -> bool:
  """Whether reading the checkpoint file `path` needs PyTorch: every kind but `.safetensors`."""
  return not path.endswith(".safetensors")


def torch_to_read(path: str):
  """The torch module, to read the PyTorch file `path`.

  Raises:
    extras.MissingExtraError: PyTorch is not installed (the message names `path` and the `torch` extra).
  """
  return extras.require("torch", f"reading {path}", "torch")


def read_state_dict(source) -> dict[str, np.ndarray]:
  """Reads a `.pth`/`.pt`/`.bin` (torch) or `.safetensors` file, or takes a mapping.

  Returns a flat {key: float32 numpy array} dict. A `{"model": ...}` wrapper is unwrapped.
  Raises:
    FileNotFoundError: the path does not exist.
    ValueError: the file is corrupt or not of its kind, or holds no state dict.
    extras.MissingExtraError: a torch file without PyTorch installed.
  """
  if isinstance(source, Mapping):
    state = source
  else:
    path = os.fspath(source)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"No checkpoint file at {path!r}: expected a .pth, .pt, .bin or .safetensors file.")
    if not needs_torch(path):
      import safetensors
      from safetensors.numpy import load_file
      try:
        state = load_file(path)
      except safetensors.SafetensorError as error:
        raise ValueError(f"{path} is not a readable .safetensors file ({error}); is it truncated?") from error
    else:
      torch = torch_to_read(path)
      # The official training checkpoints (the released Deformable DETR files among them) also
      # pickle their argparse.Namespace of arguments; nothing else beyond tensors is allowed.
      try:
        with torch.serialization.safe_globals([argparse.Namespace]):
          state = torch.load(path, map_location="cpu", weights_only=True)
      except (RuntimeError, pickle.UnpicklingError, EOFError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"{path} is not a PyTorch checkpoint that torch.load can read ({reason}).") from error
  if isinstance(state.get("model"), Mapping):
    state = state["model"]
  arrays = {}
  for key, value in state.items():
    if hasattr(value, "detach"):
      value = value.detach().cpu().float().numpy()
    if not isinstance(value, np.ndarray):
      raise ValueError(f"Checkpoint entry {key!r} is a {type(value).__name__}, not a tensor.")
    arrays[key] = value.astype(np.float32)
  return arrays


def save_pytorch_checkpoint(state_dict: Mapping[str, np.ndarray], path: str) -> None:
  """Writes `{"model": state_dict}` (e.g. `official.to_pytorch_state_dict(variables)`) with
  torch.save, atomically (temp file + rename), as the official `.pth` files hold it.

  Raises:
    extras.MissingExtraError: PyTorch is not installed.
  """
  torch = extras.require("torch", f"writing {path}", "torch")
  state_dict = {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}
  tmp_path = f"{path}.tmp"
  torch.save({"model": state_dict}, tmp_path)
  os.replace(tmp_path, path)
