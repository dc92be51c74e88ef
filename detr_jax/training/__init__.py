"""Training: the state (`state.py`), the jitted step (`step.py`), the official optimiser
(`optim.py`) and the loop with checkpoints, metrics and evaluation (`loop.py`)."""

from detr_jax.training.loop import NonFiniteLossError, train_and_evaluate
from detr_jax.training.state import TrainState, abstract_train_state, create_train_state, initial_variables
from detr_jax.training.step import make_train_step, metric_collection

__all__ = ["NonFiniteLossError", "TrainState", "abstract_train_state", "create_train_state", "initial_variables",
           "make_train_step", "metric_collection", "train_and_evaluate"]
