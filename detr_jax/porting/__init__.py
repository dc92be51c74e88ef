"""Lossless checkpoint porting between detr_jax and PyTorch DETR and Deformable DETR checkpoints.

Sources accepted by `load_pytorch_checkpoint`, recognised by their keys:
  * the official DETR `.pth` (facebookresearch/detr model zoo): `{"model": state_dict}` or a bare
    state dict, keys as in official `models/detr.py` (`official.py`);
  * Hugging Face `DetrForObjectDetection` / `DetrForSegmentation` state dicts or
    `model.safetensors`, in the hub files' and the installed transformers' layouts (`huggingface.py`);
  * the official Deformable DETR `.pth` files of all five variants (`deformable_official.py`) and
    transformers' `DeformableDetrForObjectDetection` state dicts (`deformable_huggingface.py`).
`load_torchvision_backbone` takes a torchvision ResNet ImageNet checkpoint (`torchvision.py`).
Exports: the official layout (`to_pytorch_state_dict`, `save_pytorch_checkpoint`) and the installed
transformers' layout (`to_hf_state_dict`, `save_hf_pretrained`: a `from_pretrained` directory), for
DETR here and for Deformable DETR in its two modules; `families` picks the right one.
Loading is strict: every source key must be used and every Flax leaf filled, or
`CheckpointMismatchError` lists what is wrong and nothing is returned or written.

CLI (`cli.py`):
  python -m detr_jax.porting import SRC.pth OUT_DIR [--dilation]   # writes a detr_jax checkpoint directory
  python -m detr_jax.porting export CKPT_DIR DST.pth                # official layout (CKPT_DIR may be a train.py workdir)
  python -m detr_jax.porting export CKPT_DIR HF_DIR --hf            # transformers' DetrForObjectDetection / DetrForSegmentation
"""

from detr_jax.checkpoints import CheckpointMismatchError
from detr_jax.porting import deformable_huggingface, deformable_official, huggingface, official, torch_files
from detr_jax.porting.huggingface import hf_model, hf_to_official, is_hf_layout, save_hf_pretrained, to_hf_state_dict
from detr_jax.porting.official import infer_model_config, official_key, to_pytorch_state_dict
from detr_jax.porting.torch_files import read_state_dict, save_pytorch_checkpoint
from detr_jax.porting.torchvision import load_torchvision_backbone


def load_pytorch_checkpoint(source, dilation: bool = False, num_heads: int = 8, **overrides):
  """Loads an official or Hugging Face DETR or Deformable DETR checkpoint into a Flax model.

  The family and its variant are read from the keys and shapes (Deformable DETR: levels,
  refinement, two-stage, classes, queries).
  Args:
    source: a file path (`.pth`, `.bin`, `.safetensors`) or a state dict of tensors/arrays.
    dilation: True for DC5 checkpoints (it cannot be read from the keys).
    num_heads: attention heads (8 in every published model; not readable from shapes).
    **overrides: model attributes to force (e.g. `dtype="bfloat16"`, `aux_loss=False`);
      architecture fields that disagree with the checkpoint raise.
  Returns:
    (model, variables): a `models.detr.DETR` or `models.deformable_detr.DeformableDETR` and
    {"params", "batch_stats"} of float32 arrays.
  Raises:
    FileNotFoundError: no such file.
    CheckpointMismatchError: missing, unexpected or shape-mismatched keys, all listed; for
      Deformable DETR also copies of a shared head that differ.
  """
  state_dict = torch_files.read_state_dict(source)
  if deformable_huggingface.is_hf_layout(state_dict):
    state_dict = deformable_huggingface.hf_to_official(state_dict)
  if deformable_official.is_official_layout(state_dict):
    return deformable_official.load_state_dict(state_dict, dilation, num_heads, **overrides)
  state_dict = official.without_panoptic_prefix(state_dict)
  if huggingface.is_hf_layout(state_dict):
    state_dict = huggingface.hf_to_official(state_dict)
  return official.load_state_dict(state_dict, dilation, num_heads, **overrides)


__all__ = ["CheckpointMismatchError", "hf_model", "hf_to_official", "infer_model_config", "is_hf_layout",
           "load_pytorch_checkpoint", "load_torchvision_backbone", "official_key", "read_state_dict",
           "save_hf_pretrained", "save_pytorch_checkpoint", "to_hf_state_dict", "to_pytorch_state_dict"]
