"""PyTorch checkpoint files: reading `.pth` / `.bin` / `.safetensors` state dicts, writing `.pth`."""

import argparse
import os
from typing import Mapping

import numpy as np


def read_state_dict(source) -> dict[str, np.ndarray]:
  """Reads a `.pth`/`.pt`/`.bin` (torch) or `.safetensors` file, or takes a mapping.

  Returns a flat {key: float32 numpy array} dict. A `{"model": ...}` wrapper is unwrapped.
  Raises:
    FileNotFoundError: the path does not exist.
    ValueError: the file holds no state dict.
  """
  if isinstance(source, Mapping):
    state = source
  else:
    path = os.fspath(source)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"No checkpoint file at {path!r}.")
    if path.endswith(".safetensors"):
      from safetensors.numpy import load_file
      state = load_file(path)
    else:
      import torch
      # The official training checkpoints (the released Deformable DETR files among them) also
      # pickle their argparse.Namespace of arguments; nothing else beyond tensors is allowed.
      with torch.serialization.safe_globals([argparse.Namespace]):
        state = torch.load(path, map_location="cpu", weights_only=True)
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
  torch.save, atomically (temp file + rename), as the official `.pth` files hold it."""
  import torch
  state_dict = {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}
  tmp_path = f"{path}.tmp"
  torch.save({"model": state_dict}, tmp_path)
  os.replace(tmp_path, path)
