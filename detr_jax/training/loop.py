"""Training: one jit-compiled step over a device mesh, orbax checkpoints, clu metrics, evaluation.

Follows the official `main.py` and `engine.train_one_epoch`: AdamW with a backbone learning
rate (`optim.py`), matching and the set loss inside the step (`step.py`), a gradient clip at
0.1, and a stop on a non-finite loss. The flow of `train_and_evaluate(config, workdir)`:

  data (`data/sources.py`) -> global batches sharded on the mesh's batch axis -> train_step
  (the family's model and criterion; params replicated,
  state donated) -> metrics averaged on device -> clu writers; orbax saves every N steps
  (asynchronously) and on SIGTERM; a restart in the same workdir resumes the model, optimiser,
  step, data position and dropout RNG exactly.
"""

import os
import signal
import time

from absl import logging
from clu import metric_writers, parameter_overview, periodic_actions
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from detr_jax import checkpoints, evaluation, families, sharding, visualize
from detr_jax.data import pipeline, sources
from detr_jax.training import optim
from detr_jax.training.state import TrainState, abstract_train_state, create_train_state, initial_variables
from detr_jax.training.step import make_train_step, metric_collection


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or Inf; training stopped before the bad update could be saved."""


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


def _check_batch_sizes(config, mesh: Mesh):
  if config.batch_size % mesh.devices.size:
    raise ValueError(f"config.batch_size={config.batch_size} is not a multiple of the {mesh.devices.size} devices.")


def _resume_record(config, step: int) -> dict:
  """The checkpoint's "run" item: the data position, and what a resumed run must match (the
  batch size and seed that fix the data order, the optimiser mode that shapes its state)."""
  return {"step": step, "global_batch_size": config.batch_size, "seed": config.seed,
          "examples_seen": step * config.batch_size,
          "train_mask_head_only": bool(config.optimizer.train_mask_head_only)}


def _check_resumable(saved: dict, config, workdir: str):
  expected = _resume_record(config, 0)
  for key in ("global_batch_size", "seed", "train_mask_head_only"):
    if saved[key] != expected[key]:
      raise ValueError(f"{workdir} was trained with {key}={saved[key]}; resuming with {expected[key]} would not "
                       "continue the same run. Use a new workdir or the original setting.")


def flat_hparams(config: ml_collections.ConfigDict) -> dict:
  """`config` as TensorBoard hparams: nested keys joined by "." ("model.hidden_dim", "optimizer.lr"); bool, int,
  float and str values as they are, any other (tuples, lists, None) as its str()."""
  def flatten(mapping, prefix):
    for key, value in mapping.items():
      if isinstance(value, dict):
        yield from flatten(value, f"{prefix}{key}.")
      else:
        yield prefix + key, value if isinstance(value, (bool, int, float, str)) else str(value)
  return dict(flatten(config.to_dict(), ""))


def _evaluate(config, model, state, directory, options, mesh, predict_fn, writer, step, output_dir):
  metrics = evaluation.evaluate(model, state.variables, directory, config.data.eval_split,
                                config.per_device_eval_batch_size * mesh.devices.size,
                                options, mesh, output_dir=output_dir, max_images=config.eval_max_images or None,
                                predict_fn=predict_fn, panoptic=sources.is_panoptic(config.data))
  writer.write_scalars(step, {f"eval/{k}": v for k, v in metrics.items()})
  logging.info("Evaluation at step %d on %s/%s (%d images):\n%s", step, directory, config.data.eval_split,
               metrics["num_images"], evaluation.metrics_table(metrics))
  if jax.process_index() == 0 and "AP" in metrics:   # box AP was scored: the split has an instances json
    pictures = evaluation.write_validation_pictures(model, directory, config.data.eval_split, output_dir)
    writer.write_images(step, {f"eval/picture_{image_id}": np.asarray(picture)[None]
                               for image_id, picture in pictures.items()})
  return metrics


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains per `config` in `workdir` (resuming from its latest checkpoint), then evaluates.

  Writes workdir/config.json (the whole `config`, process 0, at every start), workdir/model_config.json and
  categories.json (the training split's categories, for `inference.Predictor`),
  workdir/checkpoints/<step>/ and TensorBoard summaries (with `flat_hparams(config)` as hparams), and
  workdir/eval_<step>/ after evaluations (the files of `evaluation.evaluate`'s output_dir, and
  pictures/<image id>.jpg: predictions beside the ground truth), and workdir/losses.png at the end.
  Returns:
    the final TrainState (on preemption, the state that was saved).
  Raises:
    NonFiniteLossError: the loss became NaN or Inf (the step is named; checkpoints stay intact).
    ValueError: batch sizes that do not divide over devices, num_classes below the dataset's
      category ids, or a workdir trained with another batch size or seed.
  """
  workdir = os.path.abspath(workdir)
  mesh = sharding.create_mesh()
  _check_batch_sizes(config, mesh)
  model = families.build_model(config.model)
  family = families.of_model(model)
  directory = sources.data_dir(config.data, workdir)
  options = pipeline.PipelineOptions.from_config(config.data)
  records = sources.training_records(config, directory)   # before the writer and the manager make the workdir
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)

  manager = checkpoints.manager(workdir, max_to_keep=config.checkpoints_to_keep,
                                save_interval_steps=config.checkpoint_every_steps)
  start_step = manager.latest_step() or 0
  dataset, steps_per_epoch, categories = sources.training_dataset(
      config, directory, records, options, config.batch_size // jax.process_count(), start_step)
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
                           sharding.replicated(mesh))
    if jax.process_index() == 0:
      os.makedirs(workdir, exist_ok=True)
    checkpoints.write_model_config(workdir, families.model_config(model))
    checkpoints.write_categories(workdir, categories)
    parameter_overview.log_parameter_overview(state.params)
    writer.write_hparams(flat_hparams(config))
  if jax.process_index() == 0:   # rewritten on resume, which may change settings such as num_train_steps
    with open(os.path.join(workdir, checkpoints.TRAINING_CONFIG_FILE), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  metrics_class = metric_collection(family.loss_term_names(model))
  train_step = make_train_step(model, family.criterion(config, mesh), tx, mesh, metrics_class,
                               config.optimizer.train_mask_head_only)
  evaluates = sources.can_evaluate(config.data)
  predict_fn = evaluation.make_predict_fn(model, masks=families.has_masks(model),
                                          panoptic=sources.is_panoptic(config.data))
  schedules = optim.learning_rate_schedules(config.optimizer, steps_per_epoch)
  report_progress = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer,
                                                    every_steps=config.log_every_steps)
  preemption = _PreemptionFlag()
  batches = pipeline.prefetch_to_mesh(dataset, sharding.batch_sharding(mesh))
  logging.info("Training %s from step %d to %d: %d steps per epoch, global batch %d on %d devices.",
               families.describe(model), start_step, num_steps, steps_per_epoch,
               config.batch_size, mesh.devices.size)

  def save(step, force=False):
    return manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      run=ocp.args.JsonSave(_resume_record(config, step))),
                        force=force)

  # The losses of the steps since the last check stay on the device: reading each one would stop
  # JAX from dispatching the next step while the device works. The step skips a non-finite
  # update itself; the host stops the run at the next log, evaluation or save.
  unchecked_losses = []

  def check_losses():
    for (step, _), value in zip(unchecked_losses, jax.device_get([loss for _, loss in unchecked_losses])):
      if not np.isfinite(value):
        manager.wait_until_finished()
        raise NonFiniteLossError(
            f"Loss is {value} at step {step}; training stopped and that update was skipped. "
            f"The last checkpoint (step {manager.latest_step()}) in {manager.directory} is intact.")
    unchecked_losses.clear()

  accumulated, last_log_time, last_log_step = None, time.perf_counter(), start_step
  try:
    for step in range(start_step + 1, num_steps + 1):
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, step_metrics, loss = train_step(state, next(batches))
      unchecked_losses.append((step, loss))
      accumulated = step_metrics if accumulated is None else accumulated.merge(step_metrics)
      report_progress(step)
      logs = step % config.log_every_steps == 0 or step == num_steps
      evaluates_now = evaluates and config.eval_every_steps and step % config.eval_every_steps == 0 and step < num_steps
      preempted = preemption.requested or manager.reached_preemption(step)
      if logs or evaluates_now or preempted or manager.should_save(step):
        check_losses()
      if logs:
        now = time.perf_counter()
        scalars = {k: float(v) for k, v in accumulated.compute().items()}
        scalars.update({name: float(schedule(step - 1)) for name, schedule in schedules.items()})
        scalars["images_per_sec"] = (step - last_log_step) * config.batch_size / (now - last_log_time)
        writer.write_scalars(step, scalars)
        accumulated, last_log_time, last_log_step = None, now, step
      if evaluates_now:
        _evaluate(config, model, state, directory, options, mesh, predict_fn, writer, step,
                  os.path.join(workdir, f"eval_{step}"))
      saved = save(step, force=step == num_steps)
      if preempted:
        if not saved:
          save(step, force=True)
        manager.wait_until_finished()
        logging.warning("Preempted: saved step %d in %s; rerun the same command to resume.", step, manager.directory)
        return state
  finally:
    batches.close()   # stops the tf.data threads now, not at some later garbage collection
    preemption.close()
    manager.close()
    writer.flush()
  outputs = []
  if evaluates:
    eval_dir = os.path.join(workdir, f"eval_{num_steps}")
    _evaluate(config, model, state, directory, options, mesh, predict_fn, writer, num_steps, eval_dir)
    writer.flush()
    outputs.append(f"validation pictures in {os.path.join(eval_dir, 'pictures')}")
  if jax.process_index() == 0:
    outputs.insert(0, f"loss plot {visualize.plot_losses([workdir], os.path.join(workdir, 'losses.png'))}")
  logging.info("Done: workdir %s; %s.", workdir, "; ".join(outputs))
  return state
