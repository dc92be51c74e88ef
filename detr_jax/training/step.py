"""One jit-compiled optimiser step over the mesh: forward with dropout, matching and loss, backward, update."""

import jax
import jax.numpy as jnp
import optax
from clu import metrics as clu_metrics
from jax.sharding import Mesh

from detr_jax import sharding
from detr_jax.training import optim
from detr_jax.training.state import TrainState


def metric_collection(loss_term_names):
  """A clu Collection averaging the loss, every term of `loss_term_names` and the gradient norm over steps."""
  names = ["loss", *loss_term_names, "grad_norm"]
  return clu_metrics.Collection.create(**{name: clu_metrics.Average.from_output(name) for name in names})


def make_train_step(model, criterion, tx, mesh: Mesh, metrics_class, mask_head_only: bool = False):
  """jit(state, batch) -> (state, metrics, loss): one optimiser step on a global batch.

  The batch is sharded on the mesh's batch axis and the state replicated; the state's buffers
  are donated. `criterion(outputs, batch) -> (loss, terms)` matches inside the step (host
  callback or on device). Dropout draws from fold_in(state.rng, state.step).
  A step whose loss is NaN or Inf returns the state unchanged (no update, step not counted), so
  that the caller can check the returned losses when it likes rather than after every step.
  `mask_head_only` (the optimiser's panoptic mode) restricts the logged gradient norm to the mask head.
  """
  def train_step(state: TrainState, batch):
    def loss_fn(params):
      outputs = model.apply({"params": params, "batch_stats": state.batch_stats}, batch["image"],
                            batch["pixel_mask"], train=True,
                            rngs={"dropout": jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)})
      return criterion(outputs, batch)

    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              opt_state=opt_state)
    new_state = jax.tree.map(lambda updated, old: jnp.where(jnp.isfinite(loss), updated, old), new_state, state)
    step_metrics = metrics_class.single_from_model_output(
        loss=loss, grad_norm=optim.trained_gradient_norm(grads, mask_head_only), **terms)
    return new_state, step_metrics, loss

  replicated = sharding.replicated(mesh)
  return jax.jit(train_step, in_shardings=(replicated, sharding.batch_sharding(mesh)), out_shardings=replicated,
                 donate_argnums=0)
