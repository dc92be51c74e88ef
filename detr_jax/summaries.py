"""Reads back the scalars that clu's writers stored as TensorBoard event files."""

import collections
import glob
import os

import tensorflow as tf


def read_scalars(logdir: str) -> dict[str, dict[int, float]]:
  """{tag: {step: value}} from every event file directly in `logdir` (later files win on a step).

  Raises:
    FileNotFoundError: `logdir` holds no event file.
  """
  paths = sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*")), key=os.path.getmtime)
  if not paths:
    raise FileNotFoundError(f"No TensorBoard event files in {logdir}.")
  scalars = collections.defaultdict(dict)
  for path in paths:
    for record in tf.data.TFRecordDataset(path):
      event = tf.compat.v1.Event.FromString(record.numpy())
      for value in event.summary.value:
        if value.metadata.plugin_data.plugin_name == "scalars":
          scalars[value.tag][event.step] = float(tf.make_ndarray(value.tensor))
  return dict(scalars)
