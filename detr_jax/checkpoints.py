"""The one checkpoint layout that detr_jax writes, and strict fitting of loaded variables.

A checkpoint directory (a train.py workdir, or what `python -m detr_jax.porting import` writes):

    DIR/model_config.json        the model's family ("name") and attributes
    DIR/categories.json          the class indices' names (training data's categories), where known
    DIR/config.json              a train.py workdir's config (data settings such as the image scale)
    DIR/checkpoints/<step>/      orbax CheckpointManager steps; each holds either
        state/ + run/            training: the TrainState and what a resumed run must match, or
        variables/               a model without optimiser: {"params", "batch_stats"}

`read_model_dir` reads both, and the `DIR/variables/` directories that `porting import` wrote
before this layout. Building the model from `model_config.json` is the family's business
(`families.load_model`).
"""

import json
import os
from typing import Any, Mapping, Optional, Sequence

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from detr_jax import sharding

MODEL_CONFIG_FILE = "model_config.json"
CATEGORIES_FILE = "categories.json"   # the names of the class indices, where the checkpoint knows them
TRAINING_CONFIG_FILE = "config.json"   # a train.py workdir's whole config
CHECKPOINT_DIR = "checkpoints"
LEGACY_VARIABLES_DIR = "variables"   # `porting import` output before the one layout
TRAINING_ITEMS = ("state", "run")
MODEL_ITEM = "variables"


class CheckpointMismatchError(ValueError):
  """The checkpoint's keys or shapes do not fit the model; the message lists each offending key."""


def check_fit(expected: Mapping[str, tuple], found: Mapping[str, tuple], what: str, hint: str = "") -> None:
  """Strict fit of a checkpoint's {key: shape} onto a model's: every key used, every one filled.

  Raises:
    CheckpointMismatchError: "The checkpoint does not fit {what}{hint}." followed by every missing,
      unexpected and shape-mismatched key (shapes as "checkpoint (...), model (...)").
  """
  missing = sorted(set(expected) - set(found))
  unexpected = sorted(set(found) - set(expected))
  mismatched = [f"{key}: checkpoint {tuple(found[key])}, model {tuple(expected[key])}"
                for key in sorted(set(expected) & set(found)) if tuple(found[key]) != tuple(expected[key])]
  if missing or unexpected or mismatched:
    lines = [f"The checkpoint does not fit {what}{hint}."]
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
      if items:
        lines.append(f"{len(items)} {title}:")
        lines.extend(f"  {item}" for item in items)
    raise CheckpointMismatchError("\n".join(lines))


def merge_variables(fresh, loaded, what: str, keep_fresh=()):
  """`loaded` placed into `fresh` ({"params", "batch_stats"} trees), strictly: the same leaves and
  shapes are required, except under the `keep_fresh` module prefixes (tuples of module names
  below the collection), which keep their fresh values.

  Raises:
    CheckpointMismatchError: see `check_fit`; the leaves are named "collection/module/.../leaf".
  """
  fresh_flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(fresh))
  loaded_flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(loaded))
  kept = lambda path: any(path[1:1 + len(prefix)] == prefix for prefix in keep_fresh)
  name = "/".join
  hint = " (another number of classes? set init.reset_class_head)" if any(
      "class_embed" in path and path in loaded_flat and np.shape(loaded_flat[path]) != np.shape(value)
      for path, value in fresh_flat.items()) else ""
  check_fit({name(p): np.shape(v) for p, v in fresh_flat.items() if not kept(p)},
            {name(p): np.shape(v) for p, v in loaded_flat.items() if not kept(p)}, what, hint)
  return flax.traverse_util.unflatten_dict(
      {path: value if kept(path) else jax.numpy.asarray(loaded_flat[path]) for path, value in fresh_flat.items()})


def manager(directory: str, max_to_keep: Optional[int] = None, save_interval_steps: int = 1,
            items=TRAINING_ITEMS) -> ocp.CheckpointManager:
  """The orbax manager of DIR/checkpoints (asynchronous saves) for the given items."""
  handlers = {"state": ocp.StandardCheckpointHandler(), "run": ocp.JsonCheckpointHandler(),
              MODEL_ITEM: ocp.StandardCheckpointHandler()}
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
                                         enable_async_checkpointing=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(directory), CHECKPOINT_DIR), options=options,
                               item_names=tuple(items), item_handlers={k: handlers[k] for k in items})


def write_model_config(directory: str, model_config: Mapping[str, Any]) -> None:
  """DIR/model_config.json (process 0 only; the caller makes DIR)."""
  if jax.process_index() == 0:
    with open(os.path.join(directory, MODEL_CONFIG_FILE), "w") as f:
      json.dump(dict(model_config), f, indent=2)


def write_categories(directory: str, categories: Optional[Sequence[Mapping[str, Any]]]) -> None:
  """DIR/categories.json: {"categories": [{"id", "name", "isthing"}]} (process 0 only; nothing for None).

  The ids are class indices (a detector's class index is the category id); prediction and export name
  detections with them.
  """
  if categories is not None and jax.process_index() == 0:
    with open(os.path.join(directory, CATEGORIES_FILE), "w") as f:
      json.dump({"categories": [dict(c) for c in categories]}, f, indent=1)


def read_categories(directory: str) -> Optional[list[dict]]:
  """The categories `write_categories` wrote in DIR, or None where it wrote none (ported checkpoints,
  directories from before categories were recorded)."""
  path = os.path.join(directory, CATEGORIES_FILE)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)["categories"]


def read_data_config(checkpoint: str) -> Optional[dict]:
  """The data section (image scale, padding) of the config a train.py workdir was trained with
  (DIR/config.json), or None for any other checkpoint path."""
  path = os.path.join(checkpoint, TRAINING_CONFIG_FILE)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f).get("data")


def save_model_dir(directory: str, model_config: Mapping[str, Any], variables,
                   categories: Optional[Sequence[Mapping[str, Any]]] = None) -> None:
  """Writes a model without optimiser: DIR/model_config.json, DIR/checkpoints/0/variables and, with
  `categories`, DIR/categories.json.

  Raises:
    FileExistsError: DIR already holds a checkpoint.
  """
  directory = os.path.abspath(directory)
  if os.path.exists(os.path.join(directory, CHECKPOINT_DIR)) or os.path.exists(
      os.path.join(directory, LEGACY_VARIABLES_DIR)):
    raise FileExistsError(f"{directory} already holds a checkpoint; choose an empty directory.")
  os.makedirs(directory, exist_ok=True)
  with manager(directory, items=(MODEL_ITEM,)) as checkpoints:
    checkpoints.save(0, args=ocp.args.Composite(**{MODEL_ITEM: ocp.args.StandardSave(variables)}))
  write_model_config(directory, model_config)
  write_categories(directory, categories)


def is_model_dir(path: str) -> bool:
  """Whether `path` is a directory with model_config.json (any layout `read_model_dir` reads)."""
  return os.path.isfile(os.path.join(path, MODEL_CONFIG_FILE))


def _replicated_target(tree_metadata, mesh: Mesh):
  replicated = sharding.replicated(mesh)
  return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=replicated), tree_metadata)


def read_model_dir(directory: str, mesh: Mesh):
  """(model_config dict, variables replicated on `mesh`) of a checkpoint directory's latest step:
  a training state's variables, a ported model's, or a legacy DIR/variables/.

  Raises:
    FileNotFoundError: no model_config.json, or no checkpoint in the directory.
  """
  directory = os.path.abspath(directory)
  if not is_model_dir(directory):
    raise FileNotFoundError(f"{directory} is not a detr_jax checkpoint directory (no {MODEL_CONFIG_FILE}).")
  with open(os.path.join(directory, MODEL_CONFIG_FILE)) as f:
    model_config = json.load(f)
  legacy = os.path.join(directory, LEGACY_VARIABLES_DIR)
  if os.path.isdir(legacy):
    with ocp.StandardCheckpointer() as checkpointer:
      return model_config, jax.device_put(checkpointer.restore(legacy), sharding.replicated(mesh))
  items = (MODEL_ITEM,) if os.path.isdir(os.path.join(directory, CHECKPOINT_DIR, "0", MODEL_ITEM)) else ("state",)
  with manager(directory, items=items) as checkpoints:
    step = checkpoints.latest_step()
    if step is None:
      raise FileNotFoundError(f"{directory} has no checkpoint under {CHECKPOINT_DIR}/.")
    item = items[0]
    target = _replicated_target(checkpoints.item_metadata(step)[item].tree, mesh)
    restored = checkpoints.restore(step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(target)}))[item]
  return model_config, {"params": restored["params"], "batch_stats": restored["batch_stats"]}
