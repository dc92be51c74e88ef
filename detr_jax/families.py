"""Detector families: what training, evaluation and porting need from a detector, in one place.

A family is chosen by name: `config.model.name` in a config, "name" in a checkpoint
directory's model_config.json (absent in directories written before families existed: "detr").
train.py, eval.py and the porting CLI ask the family; they never branch on it.

DETR (Carion et al. 2020) and Deformable DETR (Zhu et al. 2021) are the members;
docs/architecture.md says how to add one.
"""

import dataclasses
import json
import os
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
from jax.sharding import Mesh

from detr_jax import checkpoints, porting, sharding
from detr_jax.porting import deformable_huggingface, deformable_official, torch_files
from detr_jax.data import coco_categories
from detr_jax.losses import focal_criterion, matcher, set_criterion
from detr_jax.models import deformable_detr, detr, postprocess, segmentation


@dataclasses.dataclass(frozen=True)
class Family:
  """The interface of a detector family.

  Attributes:
    name: the value of `config.model.name`.
    model_type: the Flax module class of the family's detector.
    from_config: config.model mapping (without "name") -> model.
    model_config: model -> plain dict of its attributes (the inverse of `from_config`).
    describe: model config mapping -> one-line name for logs and errors, e.g. "DETR-R50 (91 classes, 100 queries)".
    init_variables: (model, PRNG key) -> {"params", "batch_stats"} with the official initialisers.
    criterion: (config, mesh or None) -> a callable (outputs, batch) -> (loss, terms): matching and set loss.
    loss_term_names: model -> the names of the logged terms of `criterion`.
    detections: (outputs, original sizes [B, 2]) -> (scores [B, N], labels [B, N], boxes [B, N, 4] xyxy pixels),
      the family's official post-processing for COCO box evaluation.
    detection_queries: outputs -> [B, N] int32, the object query behind each of `detections`' N entries.
    to_pytorch_state_dict: variables -> the official state dict (numpy).
    save_hf_pretrained: (model, variables, directory, categories=None, scale=1.0) -> None: a transformers
      `from_pretrained` directory that `pipeline("object-detection")` runs, its id2label from `categories`
      ([{"id", "name"}], unnamed slots "N/A") and its image processor the family's with the eval resize of
      `data.scale` = `scale`.
    fresh_modules: (model, loaded variables, reset_class_head) -> module-path prefixes that keep their
      fresh initial values when training starts from a checkpoint (`training.state.initial_variables`).
    score_threshold: the score from which a detection is shown to a person (pictures, predictions):
      0.7 for DETR's softmax scores, as the official demo notebook; 0.3 for sigmoid scores.
  """

  name: str
  model_type: type
  from_config: Callable[[Mapping[str, Any]], nn.Module]
  model_config: Callable[[nn.Module], dict]
  describe: Callable[[Mapping[str, Any]], str]
  init_variables: Callable[..., Any]
  criterion: Callable[[Any, Optional[Mesh]], Callable]
  loss_term_names: Callable[[Any], list]
  detections: Callable
  detection_queries: Callable
  to_pytorch_state_dict: Callable
  save_hf_pretrained: Callable
  fresh_modules: Callable[..., tuple]
  score_threshold: float


def _detr_criterion(config, mesh: Optional[Mesh]) -> set_criterion.SetCriterion:
  loss = config.loss
  return set_criterion.SetCriterion(
      num_classes=config.model.num_classes, eos_coef=loss.eos_coef,
      cost_weights=matcher.CostWeights(loss.class_cost, loss.bbox_cost, loss.giou_cost),
      bbox_loss_coef=loss.bbox_loss_coef, giou_loss_coef=loss.giou_loss_coef, solver=loss.solver, mesh=mesh,
      mask_loss_coef=loss.mask_loss_coef, dice_loss_coef=loss.dice_loss_coef)


def _detr_loss_term_names(model: detr.DETR) -> list:
  layers = model.num_decoder_layers if model.aux_loss else 1
  return [*set_criterion.term_names(layers), *(("loss_mask", "loss_dice") if model.masks else ())]


def _detr_fresh_modules(model: detr.DETR, loaded, reset_class_head: bool) -> tuple:
  """class_embed for fine-tuning on other classes; the mask head when a box model starts a panoptic one."""
  fresh = (("class_embed",),) if reset_class_head else ()
  if model.masks and "mask_head" not in loaded["params"]:
    fresh += tuple((name,) for name in segmentation.MODULE_NAMES)
  return fresh


DETR = Family(
    name="detr", model_type=detr.DETR, from_config=detr.from_config, model_config=detr.model_config,
    describe=detr.describe, init_variables=detr.init_variables, criterion=_detr_criterion,
    loss_term_names=_detr_loss_term_names, detections=postprocess.detections,
    detection_queries=postprocess.detection_queries,
    to_pytorch_state_dict=porting.to_pytorch_state_dict, save_hf_pretrained=porting.save_hf_pretrained,
    fresh_modules=_detr_fresh_modules, score_threshold=0.7)

def _deformable_criterion(config, mesh: Optional[Mesh]) -> focal_criterion.FocalSetCriterion:
  loss = config.loss
  return focal_criterion.FocalSetCriterion(
      num_classes=config.model.num_classes,
      cost_weights=matcher.CostWeights(loss.class_cost, loss.bbox_cost, loss.giou_cost, loss.focal_alpha),
      cls_loss_coef=loss.cls_loss_coef, bbox_loss_coef=loss.bbox_loss_coef, giou_loss_coef=loss.giou_loss_coef,
      focal_alpha=loss.focal_alpha, solver=loss.solver, mesh=mesh)


def _deformable_loss_term_names(model: deformable_detr.DeformableDETR) -> list:
  return focal_criterion.focal_term_names(model.num_decoder_layers if model.aux_loss else 1, model.two_stage)


def _deformable_fresh_modules(model: deformable_detr.DeformableDETR, loaded, reset_class_head: bool) -> tuple:
  """Every class head, for fine-tuning on other classes."""
  if not reset_class_head:
    return ()
  return tuple((name,) for name in loaded["params"] if name.startswith("class_embed"))


DEFORMABLE_DETR = Family(
    name="deformable_detr", model_type=deformable_detr.DeformableDETR, from_config=deformable_detr.from_config,
    model_config=deformable_detr.model_config, describe=deformable_detr.describe,
    init_variables=deformable_detr.init_variables, criterion=_deformable_criterion,
    loss_term_names=_deformable_loss_term_names,
    detections=postprocess.top_k_sigmoid_detections, detection_queries=postprocess.top_k_sigmoid_queries,
    to_pytorch_state_dict=deformable_official.to_pytorch_state_dict,
    save_hf_pretrained=deformable_huggingface.save_hf_pretrained, fresh_modules=_deformable_fresh_modules,
    score_threshold=0.3)

FAMILIES = {family.name: family for family in (DETR, DEFORMABLE_DETR)}
DEFAULT = DETR.name


def get(name: str) -> Family:
  """The family called `name`.

  Raises:
    ValueError: no such family (the known names are listed).
  """
  if name not in FAMILIES:
    raise ValueError(f"Unknown model family {name!r}; set config.model.name to one of {sorted(FAMILIES)}.")
  return FAMILIES[name]


def of_config(model_config: Mapping[str, Any]) -> Family:
  """The family of a config.model mapping or a model_config.json dict ("name", default "detr")."""
  return get(dict(model_config).get("name", DEFAULT))


def of_model(model: nn.Module) -> Family:
  """The family whose detector `model` is."""
  return next(family for family in FAMILIES.values() if isinstance(model, family.model_type))


def build_model(model_config: Mapping[str, Any]) -> nn.Module:
  """The detector of a config.model mapping or a model_config.json dict.

  Raises:
    ValueError: unknown family. TypeError: a key that is not an attribute of the family's model.
  """
  attributes = {k: v for k, v in dict(model_config).items() if k != "name"}
  return of_config(model_config).from_config(attributes)


def has_masks(model: nn.Module) -> bool:
  """Whether `model` predicts segment masks (DETR's panoptic model)."""
  return bool(getattr(model, "masks", False))


def model_config(model: nn.Module) -> dict:
  """What model_config.json records of `model`: its family's name and its attributes."""
  family = of_model(model)
  return {"name": family.name, **family.model_config(model)}


def describe(model: nn.Module) -> str:
  """`model`'s one-line name from its family, e.g. "DETR-R50 (91 classes, 100 queries)"."""
  family = of_model(model)
  return family.describe(family.model_config(model))


def save_model_dir(directory: str, model: nn.Module, variables, categories=None) -> None:
  """Writes `model` and `variables` (and the class names `categories`, [{"id", "name", "isthing"}]) as a
  detr_jax checkpoint directory (`checkpoints.save_model_dir`)."""
  checkpoints.save_model_dir(directory, model_config(model), variables, categories)


def _hf_pretrained_file(path: str) -> Optional[str]:
  """The weights of a transformers `save_pretrained` directory (config.json + model.safetensors), else None."""
  weights = os.path.join(path, "model.safetensors")
  if os.path.isdir(path) and not checkpoints.is_model_dir(path) and os.path.isfile(weights):
    return weights
  return None


def _hf_categories(path: str) -> Optional[list[dict]]:
  """The id2label of a transformers directory's config.json as categories, unless it holds only the
  default "LABEL_<id>" names."""
  with open(os.path.join(path, "config.json")) as f:
    id2label = {int(k): v for k, v in json.load(f).get("id2label", {}).items()}
  if all(name == f"LABEL_{i}" for i, name in id2label.items()):
    return None
  # "N/A" marks the slots without a category (COCO's unused ids), as the hub's DETR configs and our export write.
  return [{"id": i, "name": name, "isthing": True} for i, name in sorted(id2label.items()) if name != "N/A"]


def load_categories(path: str, model: nn.Module) -> Optional[list[dict]]:
  """The names of `model`'s class indices, [{"id", "name", "isthing"}] in id order, from the checkpoint at `path`.

  What the checkpoint records (a train.py workdir: its training split's categories; a transformers
  directory: its id2label), else COCO's for a model with COCO's slot count (the official checkpoints:
  `coco_categories.coco_categories`), else None (callers name classes by id).
  """
  recorded = None
  if checkpoints.is_model_dir(path):
    recorded = checkpoints.read_categories(path)
  elif _hf_pretrained_file(path):
    recorded = _hf_categories(path)
  return recorded or coco_categories.coco_categories(model.num_classes)


def check_checkpoint(path: str) -> None:
  """Raises what `load_model(path)` would before reading anything.

  Raises:
    FileNotFoundError: nothing at `path` (the kinds of checkpoint it may be are named).
    extras.MissingExtraError: a PyTorch file without PyTorch installed.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"No checkpoint at {path!r}: expected a train.py workdir, a `detr-port import` directory, "
                            "or a .pth / .safetensors file.")
  if not os.path.isdir(path) and torch_files.needs_torch(path):
    torch_files.torch_to_read(path)


def load_model(path: str, dilation: bool = False, mesh: Optional[Mesh] = None):
  """(model, variables) from any checkpoint the project reads.

  path: a detr_jax checkpoint directory (a train.py workdir, whose latest step is read, or what
  `porting import` wrote, old layout included), an official / Hugging Face `.pth` / `.safetensors`
  file or a transformers `save_pretrained` directory, ported on the fly (`dilation` says whether it
  is DC5, which keys cannot show).
  Raises:
    FileNotFoundError: nothing readable at `path`.
    checkpoints.CheckpointMismatchError: a PyTorch file that is not a checkpoint of a known family.
    ValueError: a corrupt file. extras.MissingExtraError: see `check_checkpoint`.
  """
  check_checkpoint(path)
  path = _hf_pretrained_file(path) or path
  if os.path.isdir(path):
    config, variables = checkpoints.read_model_dir(path, mesh or sharding.create_mesh())
    return build_model(config), variables
  return porting.load_pytorch_checkpoint(path, dilation=dilation)
