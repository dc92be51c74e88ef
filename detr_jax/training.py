"""Training: one jit-compiled step over a device mesh, orbax checkpoints, clu metrics, evaluation.

Follows the official `main.py` and `engine.train_one_epoch`: AdamW with a backbone learning
rate (`optim.py`), matching and the set loss inside the step, a gradient clip at 0.1, and a
stop on a non-finite loss. The flow of `train_and_evaluate(config, workdir)`:

  data -> global batches sharded on the mesh's "data" axis -> train_step (params replicated,
  state donated) -> metrics averaged on device -> clu writers; orbax saves every N steps
  (asynchronously) and on SIGTERM; a restart in the same workdir resumes the model, optimiser,
  step, data position and dropout RNG exactly.
"""

import json
import logging as logging_lib
import os
import signal
import time
from typing import Any, Optional

from absl import logging
from clu import metric_writers, metrics as clu_metrics, parameter_overview, periodic_actions
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from detr_jax import detr, evaluation, losses, matcher, optim, porting, segmentation
from detr_jax.data import coco, coco_panoptic, generated, pipeline

BATCH_AXIS = "data"
CHECKPOINT_DIR = "checkpoints"
QUIET_LIBRARY_DIRS = tuple(os.path.dirname(module.__file__) for module in (ocp, jax))


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or Inf; training stopped before the bad update could be saved."""


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


class _LibraryInfoFilter(logging_lib.Filter):
  def filter(self, record):
    return record.levelno >= logging_lib.WARNING or not record.pathname.startswith(QUIET_LIBRARY_DIRS)


def quiet_library_logs():
  """Drops INFO logs of libraries that report every step (orbax logs each save in ~30 lines)."""
  logging.get_absl_handler().addFilter(_LibraryInfoFilter())


def create_mesh() -> Mesh:
  """A 1-D data-parallel mesh over every device of every process."""
  return Mesh(np.array(jax.devices()), (BATCH_AXIS,))


def data_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The COCO folder to read; for source "generated" it is written first (default workdir/generated_data)."""
  if config.data.source == "generated":
    return generated.write_coco_folder(config.data.data_dir or os.path.join(workdir, "generated_data"))
  return config.data.data_dir


def load_model(path: str, dilation: bool = False, mesh: Optional[Mesh] = None):
  """(model, variables) from any checkpoint the project reads.

  path: a train.py workdir (its latest checkpoint), an orbax directory written by
  `porting.save_checkpoint`, or an official / Hugging Face `.pth` / `.safetensors` file, ported
  on the fly (`dilation` says whether it is DC5, which keys cannot show).
  Raises:
    FileNotFoundError: nothing readable at `path`.
    porting.CheckpointMismatchError: a PyTorch file that is not a DETR this model can hold.
  """
  if os.path.isdir(os.path.join(path, CHECKPOINT_DIR)):
    return restore_variables(path, mesh)
  if os.path.isdir(path):
    return porting.load_checkpoint(path)
  return porting.load_pytorch_checkpoint(path, dilation=dilation)


def _overwrite(fresh, loaded, what: str, keep_fresh=()):
  """`loaded` placed into `fresh`: the same keys and shapes are required, except under the
  `keep_fresh` module prefixes, which keep their fresh values."""
  fresh_flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(fresh))
  loaded_flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(loaded))
  kept = lambda path: any(path[1:1 + len(prefix)] == prefix for prefix in keep_fresh)
  missing = [path for path in fresh_flat if path not in loaded_flat and not kept(path)]
  unexpected = [path for path in loaded_flat if path not in fresh_flat]
  mismatched = [f"{'/'.join(path)} {np.shape(loaded_flat[path])} vs {np.shape(value)}"
                for path, value in fresh_flat.items()
                if path in loaded_flat and not kept(path) and np.shape(loaded_flat[path]) != np.shape(value)]
  if missing or unexpected or mismatched:
    hint = " (another number of classes? set init.reset_class_head)" if any("class_embed" in m for m in mismatched) else ""
    raise porting.CheckpointMismatchError(
        f"{what} does not fit config.model{hint}: missing {['/'.join(p) for p in missing][:5]}, "
        f"unexpected {['/'.join(p) for p in unexpected][:5]}, shape mismatches (checkpoint vs config) {mismatched[:5]}")
  return flax.traverse_util.unflatten_dict(
      {path: value if kept(path) or path not in loaded_flat else jnp.asarray(loaded_flat[path])
       for path, value in fresh_flat.items()})


def initial_variables(config: ml_collections.ConfigDict, model: detr.DETR):
  """Variables to start training from, per `config.init`.

  From scratch: the official initialisers with `config.seed`. `init.checkpoint` (anything
  `load_model` reads) replaces every variable, except class_embed with
  `init.reset_class_head` and a new mask head when a box model initialises a panoptic one;
  `init.backbone_checkpoint` (torchvision ResNet) replaces the backbone.
  Raises:
    porting.CheckpointMismatchError: a checkpoint does not fit config.model.
  """
  variables = detr.init_variables(model, jax.random.PRNGKey(config.seed))
  if config.init.checkpoint:
    _, loaded = load_model(config.init.checkpoint, config.model.dilation)
    keep_fresh = (("class_embed",),) if config.init.reset_class_head else ()
    if model.masks and "mask_head" not in loaded["params"]:   # a box model under a new mask head
      keep_fresh += tuple((name,) for name in segmentation.MODULE_NAMES)
    variables = _overwrite(variables, loaded, config.init.checkpoint, keep_fresh)
  if config.init.backbone_checkpoint:
    backbone = porting.load_torchvision_backbone(config.init.backbone_checkpoint, depth=config.model.backbone_depth)
    merged = {collection: {**variables[collection], **backbone[collection]} for collection in variables}
    variables = _overwrite(variables, merged, config.init.backbone_checkpoint)
  return variables


def create_train_state(variables, tx, seed: int) -> TrainState:
  """Step 0 of training from `variables`, with `tx`'s fresh optimiser state and the dropout key of `seed`."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"], batch_stats=variables["batch_stats"],
                    opt_state=tx.init(variables["params"]), rng=jax.random.key_data(jax.random.PRNGKey(seed)))


def abstract_train_state(model: detr.DETR, tx, mesh: Mesh):
  """ShapeDtypeStructs (replicated on `mesh`) of a TrainState, the target for restoring."""
  shapes = jax.eval_shape(lambda: create_train_state(detr.init_variables(model, jax.random.PRNGKey(0)), tx, 0))
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), shapes)


def metric_collection(num_decoder_layers: int, masks: bool = False):
  """A clu Collection averaging the loss, every loss term and the gradient norm over steps."""
  names = ["loss", *losses.term_names(num_decoder_layers), *(("loss_mask", "loss_dice") if masks else ()), "grad_norm"]
  return clu_metrics.Collection.create(**{name: clu_metrics.Average.from_output(name) for name in names})


def make_train_step(model: detr.DETR, criterion: losses.SetCriterion, tx, mesh: Mesh, metrics_class,
                    mask_head_only: bool = False):
  """jit(state, batch) -> (state, metrics, loss): one optimiser step on a global batch.

  The batch is sharded on the mesh's data axis and the state replicated; the state's buffers
  are donated. Matching runs inside the step (host callback or on device, per the criterion).
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
    step_metrics = metrics_class.single_from_model_output(
        loss=loss, grad_norm=optim.trained_gradient_norm(grads, mask_head_only), **terms)
    return new_state, step_metrics, loss

  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(train_step, in_shardings=(replicated, NamedSharding(mesh, PartitionSpec(BATCH_AXIS))),
                 out_shardings=replicated, donate_argnums=0)


class _PreemptionFlag:
  """Set by SIGTERM in a single-process run.

  With several processes, jax.distributed's preemption notifier owns SIGTERM and orbax's
  `reached_preemption` makes every process agree on the step to save.
  """

  def __init__(self):
    self.requested = False
    self._previous = None
    if jax.process_count() == 1:
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def close(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _training_batches(config, directory: str, options, start_step: int):
  """(per-process batch iterator as tf.data, steps per epoch)."""
  per_process = config.batch_size // jax.process_count()
  if config.data.source == "tfds":
    import tensorflow_datasets as tfds
    num_images = tfds.builder("coco/2017", data_dir=directory or None).info.splits[config.data.train_split].num_examples
    dataset = pipeline.tfds_dataset(config.data.train_split, per_process, config.seed, options, train=True,
                                    data_dir=directory or None, start_step=start_step)
    return dataset, num_images // config.batch_size
  if config.data.source == "coco_panoptic":
    records = coco_panoptic.load_panoptic_folder(directory, config.data.train_split)
  else:
    records = coco.load_coco_folder(directory, config.data.train_split, keep_empty=config.data.keep_empty_train)
  if config.data.train_max_images:
    records = records.first(config.data.train_max_images)
  if records.num_classes > config.model.num_classes:
    raise ValueError(f"{directory}/{config.data.train_split} has category ids up to {records.num_classes - 1}; "
                     f"set config.model.num_classes to at least {records.num_classes}.")
  dataset = pipeline.train_dataset(records, per_process, config.seed, options, start_step=start_step)
  return dataset, len(records) // config.batch_size


def _check_batch_sizes(config, mesh: Mesh):
  for name in ("batch_size", "eval_batch_size"):
    if config[name] % mesh.devices.size:
      raise ValueError(f"config.{name}={config[name]} is not a multiple of the {mesh.devices.size} devices.")


def _run_record(config, step: int) -> dict:
  """What a checkpoint needs besides the state: the data position, and the optimiser mode that
  shapes the optimiser state."""
  return {"step": step, "global_batch_size": config.batch_size, "seed": config.seed,
          "examples_seen": step * config.batch_size,
          "train_mask_head_only": bool(config.optimizer.train_mask_head_only)}


def _check_resumable(saved: dict, config, workdir: str):
  expected = _run_record(config, 0)
  for key in ("global_batch_size", "seed", "train_mask_head_only"):
    if saved[key] != expected[key]:
      raise ValueError(f"{workdir} was trained with {key}={saved[key]}; resuming with {expected[key]} would not "
                       "continue the same run. Use a new workdir or the original setting.")


def checkpoint_manager(workdir: str, config=None) -> ocp.CheckpointManager:
  """The orbax manager of workdir/checkpoints: items "state" (TrainState) and "run" (`_run_record`).

  With `config`, saves every `checkpoint_every_steps` and keeps `checkpoints_to_keep`; without,
  it is for reading.
  """
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.checkpoints_to_keep if config else None,
      save_interval_steps=config.checkpoint_every_steps if config else 1,
      enable_async_checkpointing=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR), options=options,
                               item_names=("state", "run"))


def restore_variables(workdir: str, mesh: Optional[Mesh] = None, step: Optional[int] = None):
  """(model, variables) from a training workdir's latest (or given) checkpoint, for evaluation.

  Raises:
    FileNotFoundError: the workdir has no model_config.json or no checkpoint.
  """
  config_path = os.path.join(workdir, porting.MODEL_CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{workdir} is not a training workdir (no {porting.MODEL_CONFIG_FILE}).")
  with open(config_path) as f:
    model = detr.from_config(json.load(f))
  with checkpoint_manager(workdir) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{workdir} has no checkpoint under {CHECKPOINT_DIR}/.")
    run = manager.restore(step, args=ocp.args.Composite(run=ocp.args.JsonRestore()))["run"]
    # The optimiser's structure, not its rates, shapes the state; only the mode matters here.
    tx = optim.create({"lr": 1.0, "lr_backbone": 1.0, "weight_decay": 0.0, "clip_max_norm": 1.0, "lr_drop_epochs": 1,
                       "train_mask_head_only": run["train_mask_head_only"]}, 1)
    target = abstract_train_state(model, tx, mesh or create_mesh())
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  return model, restored["state"].variables


def evaluates_panoptic(config: ml_collections.ConfigDict) -> bool:
  """Whether evaluation under `config` is panoptic (PQ on a COCO panoptic split, see `evaluation.evaluate`)."""
  return config.data.source == "coco_panoptic"


def _evaluate(config, model, state, directory, options, mesh, predict_fn, writer, step, output_dir):
  metrics = evaluation.evaluate(model, state.variables, directory, config.data.eval_split, config.eval_batch_size,
                                options, mesh, output_dir=output_dir, max_images=config.eval_max_images or None,
                                predict_fn=predict_fn, panoptic=evaluates_panoptic(config))
  writer.write_scalars(step, {f"eval/{k}": v for k, v in metrics.items()})
  logging.info("Evaluation at step %d on %s/%s (%d images):\n%s", step, directory, config.data.eval_split,
               metrics["num_images"], evaluation.metrics_table(metrics))
  return metrics


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains per `config` in `workdir` (resuming from its latest checkpoint), then evaluates.

  Writes workdir/model_config.json, workdir/checkpoints/<step>/ and TensorBoard summaries, and
  workdir/eval_<step>/ after evaluations (the files of `evaluation.evaluate`'s output_dir).
  Returns:
    the final TrainState (on preemption, the state that was saved).
  Raises:
    NonFiniteLossError: the loss became NaN or Inf (the step is named; checkpoints stay intact).
    ValueError: batch sizes that do not divide over devices, num_classes below the dataset's
      category ids, or a workdir trained with another batch size or seed.
  """
  workdir = os.path.abspath(workdir)
  mesh = create_mesh()
  _check_batch_sizes(config, mesh)
  model = detr.from_config(config.model)
  directory = data_dir(config, workdir)
  options = pipeline.PipelineOptions.from_config(config.data)
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)

  manager = checkpoint_manager(workdir, config)
  start_step = manager.latest_step() or 0
  dataset, steps_per_epoch = _training_batches(config, directory, options, start_step)
  num_steps = config.num_train_steps or config.num_epochs * steps_per_epoch
  tx = optim.create(config.optimizer, steps_per_epoch)
  if start_step:
    restored = manager.restore(start_step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_train_state(model, tx, mesh)), run=ocp.args.JsonRestore()))
    _check_resumable(restored["run"], config, workdir)
    state = restored["state"]
    logging.info("Resumed %s at step %d.", workdir, start_step)
  else:
    state = jax.device_put(create_train_state(initial_variables(config, model), tx, config.seed),
                           NamedSharding(mesh, PartitionSpec()))
    if jax.process_index() == 0:
      os.makedirs(workdir, exist_ok=True)
      with open(os.path.join(workdir, porting.MODEL_CONFIG_FILE), "w") as f:
        json.dump(porting.model_config(model), f, indent=2)
    parameter_overview.log_parameter_overview(state.params)
    writer.write_hparams({k: v for k, v in config.to_dict().items() if not isinstance(v, dict)})

  criterion = losses.SetCriterion(
      num_classes=config.model.num_classes, eos_coef=config.loss.eos_coef,
      cost_weights=matcher.CostWeights(config.loss.class_cost, config.loss.bbox_cost, config.loss.giou_cost),
      bbox_loss_coef=config.loss.bbox_loss_coef, giou_loss_coef=config.loss.giou_loss_coef,
      solver=config.loss.solver, mesh=mesh, batch_axis=BATCH_AXIS,
      mask_loss_coef=config.loss.mask_loss_coef, dice_loss_coef=config.loss.dice_loss_coef)
  metrics_class = metric_collection(config.model.num_decoder_layers if config.model.aux_loss else 1, model.masks)
  train_step = make_train_step(model, criterion, tx, mesh, metrics_class, config.optimizer.train_mask_head_only)
  # Evaluation reads the COCO annotation json, which only folder sources have.
  evaluates = bool(config.data.eval_split) and config.data.source in ("coco_folder", "generated", "coco_panoptic")
  predict_fn = evaluation.make_predict_fn(model, masks=model.masks, panoptic=evaluates_panoptic(config))
  schedules = optim.learning_rate_schedules(config.optimizer, steps_per_epoch)
  report_progress = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer,
                                                    every_steps=config.log_every_steps)
  preemption = _PreemptionFlag()
  batches = pipeline.prefetch_to_mesh(dataset, NamedSharding(mesh, PartitionSpec(BATCH_AXIS)))
  logging.info("Training %s from step %d to %d: %d steps per epoch, global batch %d on %d devices.",
               porting.describe(porting.model_config(model)), start_step, num_steps, steps_per_epoch,
               config.batch_size, mesh.devices.size)

  def save(step, force=False):
    return manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      run=ocp.args.JsonSave(_run_record(config, step))),
                        force=force)

  accumulated, last_log_time, last_log_step = None, time.perf_counter(), start_step
  try:
    for step in range(start_step + 1, num_steps + 1):
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, step_metrics, loss = train_step(state, next(batches))
      loss_value = float(loss)
      if not np.isfinite(loss_value):
        manager.wait_until_finished()
        raise NonFiniteLossError(
            f"Loss is {loss_value} at step {step}; training stopped before this update was saved. "
            f"The last checkpoint (step {manager.latest_step()}) in {manager.directory} is intact.")
      accumulated = step_metrics if accumulated is None else accumulated.merge(step_metrics)
      report_progress(step)
      if step % config.log_every_steps == 0 or step == num_steps:
        now = time.perf_counter()
        scalars = {k: float(v) for k, v in accumulated.compute().items()}
        scalars.update({name: float(schedule(step - 1)) for name, schedule in schedules.items()})
        scalars["images_per_sec"] = (step - last_log_step) * config.batch_size / (now - last_log_time)
        writer.write_scalars(step, scalars)
        accumulated, last_log_time, last_log_step = None, now, step
      if evaluates and config.eval_every_steps and step % config.eval_every_steps == 0 and step < num_steps:
        _evaluate(config, model, state, directory, options, mesh, predict_fn, writer, step,
                  os.path.join(workdir, f"eval_{step}"))
      saved = save(step, force=step == num_steps)
      if preemption.requested or manager.reached_preemption(step):
        if not saved:
          save(step, force=True)
        manager.wait_until_finished()
        logging.warning("Preempted: saved step %d in %s; rerun the same command to resume.", step, manager.directory)
        return state
  finally:
    preemption.close()
    manager.close()
    writer.flush()
  if evaluates:
    _evaluate(config, model, state, directory, options, mesh, predict_fn, writer, num_steps,
              os.path.join(workdir, f"eval_{num_steps}"))
    writer.flush()
  return state
