r"""DETR inference with a ported checkpoint.

Usage:
  python eval.py --config configs/detr_r50.py [--checkpoint CKPT] [--num_images 2]

CKPT is an orbax checkpoint directory written by `python -m detr_jax.porting import`, or a
PyTorch `.pth` / `.safetensors` file (official or Hugging Face), ported on the fly. Without
--checkpoint, a model initialised from the config with the official initialisers is exported to
the official `.pth` layout, ported back, and checked to be identical: the porter's round trip.
Inference is jit-compiled on generated images; COCO evaluation arrives with the training issue.
"""

import os
import tempfile
import time

from absl import app
from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

from detr_jax import detr, porting, postprocess, synthetic

_CONFIG = config_flags.DEFINE_config_file("config", "configs/detr_r50.py", "Model config file.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "orbax directory, .pth or .safetensors file.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 2, "Generated images to run.")
_SHORTER_SIDE = flags.DEFINE_integer("shorter_side", 512, "Shorter side of the generated images, in pixels.")


def load_model(config, checkpoint):
  """(model, variables) from a checkpoint, or a random init ported through the official layout."""
  if checkpoint is None:
    model = detr.from_config(config.model)
    variables = detr.init_variables(model, jax.random.PRNGKey(config.seed))
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "detr.pth")
      porting.save_pytorch_checkpoint(variables, path)
      model, ported = porting.load_pytorch_checkpoint(path, dilation=config.model.dilation)
    original, round_trip = porting.to_pytorch_state_dict(variables), porting.to_pytorch_state_dict(ported)
    changed = [k for k in original if not np.array_equal(original[k], round_trip[k])]
    if changed:
      raise RuntimeError(f"The port round trip changed {len(changed)} tensors, e.g. {changed[:3]}.")
    print(f"Random-init {porting.describe(porting.model_config(model))}: exported to the official "
          f"layout ({len(original)} tensors) and ported back bit-exactly.")
    return model, ported
  if os.path.isdir(checkpoint):
    return porting.load_checkpoint(checkpoint)
  return porting.load_pytorch_checkpoint(checkpoint, dilation=config.model.dilation)


def main(argv):
  del argv
  config = _CONFIG.value
  model, variables = load_model(config, _CHECKPOINT.value)
  side = _SHORTER_SIDE.value
  sizes = [(side, side * 4 // 3) if i % 2 == 0 else (side * 4 // 3, side) for i in range(_NUM_IMAGES.value)]
  images, mask, _ = synthetic.generated_batch(config.seed, sizes)
  forward = jax.jit(model.apply)
  start = time.perf_counter()
  outputs = jax.block_until_ready(forward(variables, images, mask))
  compile_and_run = time.perf_counter() - start
  start = time.perf_counter()
  outputs = jax.block_until_ready(forward(variables, images, mask))
  run = time.perf_counter() - start
  scores, labels, boxes = postprocess.detections(outputs, np.array(sizes))
  print(f"Forward on {len(sizes)} generated images padded to {images.shape[1]}x{images.shape[2]}: "
        f"{compile_and_run:.1f} s with compilation, {run * 1000 / len(sizes):.0f} ms/image after.")
  for i, size in enumerate(sizes):
    top = np.argsort(-np.asarray(scores[i]))[:3]
    listed = ", ".join(f"class {int(labels[i, q])} {float(scores[i, q]):.3f} "
                       f"[{', '.join(f'{c:.0f}' for c in np.asarray(boxes[i, q]))}]" for q in top)
    print(f"  image {i} ({size[0]}x{size[1]}): top queries {listed}")


if __name__ == "__main__":
  app.run(main)
