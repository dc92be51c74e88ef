"""The training state and where it starts: from scratch, a whole checkpoint, or a torchvision backbone."""

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from detr_jax import checkpoints, families, porting, sharding


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the data position (which is `step`).

  step: int32 scalar, optimiser steps taken. params / batch_stats: the model's variables.
  opt_state: optax state of `optim.create`. rng: uint32[2] key; step s uses fold_in(rng, s) for dropout.
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array

  @property
  def variables(self):
    return {"params": self.params, "batch_stats": self.batch_stats}


def initial_variables(config: ml_collections.ConfigDict, model: nn.Module):
  """Variables to start training from, per `config.init`.

  From scratch: the family's official initialisers with `config.seed`. `init.checkpoint`
  (anything `families.load_model` reads) replaces every variable, except the modules that the
  family keeps fresh (`Family.fresh_modules`: DETR's class_embed with `init.reset_class_head`,
  its mask head when a box model initialises a panoptic one); `init.backbone_checkpoint`
  (torchvision ResNet) replaces the backbone.
  Raises:
    checkpoints.CheckpointMismatchError: a checkpoint does not fit config.model.
  """
  family = families.of_model(model)
  variables = family.init_variables(model, jax.random.PRNGKey(config.seed))
  if config.init.checkpoint:
    _, loaded = families.load_model(config.init.checkpoint, config.model.dilation)
    keep_fresh = family.fresh_modules(model, loaded, config.init.reset_class_head)
    variables = checkpoints.merge_variables(variables, loaded, config.init.checkpoint, keep_fresh)
  if config.init.backbone_checkpoint:
    backbone = porting.load_torchvision_backbone(config.init.backbone_checkpoint, depth=config.model.backbone_depth)
    merged = {collection: {**variables[collection], **backbone[collection]} for collection in variables}
    variables = checkpoints.merge_variables(variables, merged, config.init.backbone_checkpoint)
  return variables


def create_train_state(variables, tx, seed: int) -> TrainState:
  """Step 0 of training from `variables`, with `tx`'s fresh optimiser state and the dropout key of `seed`."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"], batch_stats=variables["batch_stats"],
                    opt_state=tx.init(variables["params"]), rng=jax.random.key_data(jax.random.PRNGKey(seed)))


def abstract_train_state(model: nn.Module, tx, mesh: Mesh):
  """ShapeDtypeStructs (replicated on `mesh`) of a TrainState, the target for restoring."""
  init = families.of_model(model).init_variables
  shapes = jax.eval_shape(lambda: create_train_state(init(model, jax.random.PRNGKey(0)), tx, 0))
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.replicated(mesh)), shapes)
