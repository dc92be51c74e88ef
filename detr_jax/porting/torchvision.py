"""torchvision ResNet ImageNet checkpoints as the DETR backbone (the official initialisation)."""

import flax
import jax

from detr_jax.models import detr as detr_lib
from detr_jax.porting import official, torch_files


def load_torchvision_backbone(source, depth: int | None = None):
  """Reads a torchvision ResNet ImageNet checkpoint as the DETR backbone.

  The classifier (`fc.*`) and `num_batches_tracked` are dropped; everything else must fit.
  Returns:
    {"params": {"backbone": ...}, "batch_stats": {"backbone": ...}} to merge into DETR variables.
  Raises:
    checkpoints.CheckpointMismatchError: the keys are not a torchvision ResNet of a supported depth.
  """
  state_dict = {f"backbone.0.body.{k}": v for k, v in torch_files.read_state_dict(source).items()
                if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
  depth = depth or official.infer_resnet_depth(state_dict)
  shapes = {p: s for p, s in official.variable_shapes(detr_lib.DETR(backbone_depth=depth)).items() if p[1] == "backbone"}
  filled = official.fill(shapes, state_dict, f"a torchvision ResNet-{depth}")
  return flax.traverse_util.unflatten_dict({p: jax.numpy.asarray(v) for p, v in filled.items()})
