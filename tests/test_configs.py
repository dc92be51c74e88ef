"""Every config in configs/ builds a model of the architecture its name promises.

Configs are discovered with a glob, so a new file is built (abstractly: `jax.eval_shape`, no
real initialisation) without touching this test. The official recipes are also checked against
the official numbers: depth, DC5, masks, classes and the trainable parameter count.
"""

import importlib

import flax
import jax
import jax.numpy as jnp
import pytest

from detr_jax import families
from detr_jax.data import generated, pipeline
from detr_jax.losses import matcher
from detr_jax.models import segmentation
from detr_jax.training import optim
from tests.helpers import REPO_ROOT

CONFIG_NAMES = sorted(path.stem for path in (REPO_ROOT / "configs").glob("*.py") if path.stem != "__init__")
# What `data.sources` reads; any other value would silently be
# read as a COCO folder.
DATA_SOURCES = ("coco_folder", "coco_panoptic", "generated", "tfds")

# The official recipes (detr/main.py and the model zoo): (backbone_depth, dilation, masks, num_classes).
OFFICIAL = {
    "detr_r50": (50, False, False, 91),
    "detr_r50_dc5": (50, True, False, 91),
    "detr_r101": (101, False, False, 91),
    "detr_r101_dc5": (101, True, False, 91),
    "detr_r50_panoptic": (50, False, True, 250),
}

# Parameters the optimiser trains, as the official main.py counts them ("number of params":
# requires_grad parameters; FrozenBatchNorm holds buffers; the stem and layer1 are frozen).
R50_TRAINABLE = 41_302_368   # printed by the official main.py for DETR-R50
# ResNet-101 has 23 instead of 6 bottleneck blocks (width 256, 1024 out, no downsample) in layer3,
# each 1024*256 + 256*256*9 + 256*1024 conv weights (no biases; BN frozen): 17 more blocks.
R101_TRAINABLE = R50_TRAINABLE + 17 * (1024 * 256 + 256 * 256 * 9 + 256 * 1024)   # 60_242_272
# Panoptic (official --frozen_weights): only bbox_attention (q and k Linear 256->256) and
# MaskHeadSmallConv(264, [1024, 512, 256], 256) train: 3x3 convs 264->264->128->64->32->16->1,
# GroupNorm(8) after the first five, 1x1 adapters 1024->128, 512->64, 256->32, all with biases.
PANOPTIC_TRAINABLE = (2 * (256 * 256 + 256)
                      + sum(i * o * 9 + o + (2 * o if o > 1 else 0)
                            for i, o in ((264, 264), (264, 128), (128, 64), (64, 32), (32, 16), (16, 1)))
                      + sum(i * o + o for i, o in ((1024, 128), (512, 64), (256, 32))))   # 1_333_657
TRAINABLE = {"detr_r50": R50_TRAINABLE, "detr_r50_dc5": R50_TRAINABLE, "detr_r101": R101_TRAINABLE,
             "detr_r101_dc5": R101_TRAINABLE, "detr_r50_panoptic": PANOPTIC_TRAINABLE}


def load_config(name):
  return importlib.import_module(f"configs.{name}").get_config()


@pytest.fixture(scope="module")
def built():
  """{config name: (config, model, abstract variables)}, each built once."""
  cache = {}

  def build(name):
    if name not in cache:
      config = load_config(name)
      model = families.build_model(config.model)
      init = families.of_config(config.model).init_variables
      cache[name] = config, model, jax.eval_shape(lambda: init(model, jax.random.PRNGKey(0)))
    return cache[name]
  return build


def test_configs_are_discovered():
  assert len(CONFIG_NAMES) >= 7
  assert set(OFFICIAL) | {"generated", "coco_mini_cpu"} <= set(CONFIG_NAMES)


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_config_builds(name, built):
  config, model, variables = built(name)
  assert set(variables) == {"params", "batch_stats"}
  params = flax.traverse_util.flatten_dict(variables["params"])
  hidden, classes, queries = config.model.hidden_dim, config.model.num_classes, config.model.num_queries
  if config.model.name == "detr":
    assert params[("class_embed", "kernel")].shape == (hidden, classes + 1)   # + "no object"
    assert params[("query_embed",)].shape == (queries, hidden)
  else:
    refine = config.model.with_box_refine
    assert params[("class_embed_0" if refine else "class_embed", "kernel")].shape == (hidden, classes)   # sigmoid
    if not config.model.two_stage:
      assert params[("query_embed",)].shape == (queries, 2 * hidden)
  assert any(path[0] in segmentation.MODULE_NAMES for path in params) == bool(config.model.get("masks", False))
  # What the training code needs besides the model.
  for name_ in ("batch_size", "per_device_eval_batch_size"):
    assert isinstance(config[name_], int) and config[name_] > 0, name_
  assert config.data.source in DATA_SOURCES
  assert config.loss.solver in matcher.SOLVERS
  pipeline.PipelineOptions.from_config(config.data)
  optim.create(config.optimizer, steps_per_epoch=1)
  assert config.num_train_steps > 0 or config.num_epochs > 0
  assert config.checkpoint_every_steps > 0 and config.log_every_steps > 0


def _input_proj_and_outputs(model, variables, size=128):
  """Abstract forward pass on a size x size image: (input_proj's output shape, the outputs' shapes)."""
  images, mask = jnp.zeros((1, size, size, 3)), jnp.ones((1, size, size), bool)
  outputs, state = jax.eval_shape(lambda v: model.apply(
      v, images, mask, capture_intermediates=lambda module, method: module.name == "input_proj",
      mutable=["intermediates"]), variables)
  return state["intermediates"]["input_proj"]["__call__"][0].shape, outputs


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_recipe(name, built):
  depth, dilation, masks, num_classes = OFFICIAL[name]
  config, model, variables = built(name)
  assert (model.backbone_depth, model.dilation, model.masks, model.num_classes) == OFFICIAL[name]
  assert (model.num_queries, model.hidden_dim, model.num_heads, model.num_encoder_layers, model.num_decoder_layers,
          model.dim_feedforward, model.dropout, model.pre_norm, model.aux_loss) == (100, 256, 8, 6, 6, 2048, 0.1,
                                                                                   False, True)
  params = flax.traverse_util.flatten_dict(variables["params"])
  layer3_blocks = {path[1] for path in params if path[0] == "backbone" and path[1].startswith("layer3_")}
  assert len(layer3_blocks) == {50: 6, 101: 23}[depth]
  # DC5: output stride 16 instead of 32, so a 128 px image gives an 8x8 instead of a 4x4 feature map.
  feature_shape, outputs = _input_proj_and_outputs(model, variables)
  assert feature_shape == ((1, 8, 8, 256) if dilation else (1, 4, 4, 256))
  assert ("pred_masks" in outputs) == masks
  trainable = sum(x.size for path, x in params.items()
                  if optim.parameter_group(path, config.optimizer.train_mask_head_only) != optim.FROZEN)
  assert trainable == TRAINABLE[name]
  assert config.optimizer.train_mask_head_only == masks   # the official panoptic recipe freezes the detector
  assert config.data.source == ("coco_panoptic" if masks else "coco_folder")
  assert (config.optimizer.lr, config.optimizer.lr_backbone, config.optimizer.weight_decay,
          config.optimizer.clip_max_norm) == (1e-4, 1e-5, 1e-4, 0.1)
  assert (config.num_epochs, config.optimizer.lr_drop_epochs) == ((25, 15) if masks else (300, 200))


# The official Deformable DETR variants (README table; trainable counts from the reference sheet):
# (num_feature_levels, dilation, with_box_refine, two_stage, trainable parameters).
OFFICIAL_DEFORMABLE = {
    "deformable_detr_r50_single_scale": (1, False, False, False, 33_844_193),
    "deformable_detr_r50_single_scale_dc5": (1, True, False, False, 33_844_193),
    "deformable_detr_r50": (4, False, False, False, 39_847_265),
    "deformable_detr_r50_refine": (4, False, True, False, 40_627_260),
    "deformable_detr_r50_two_stage": (4, False, True, True, 40_959_129),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL_DEFORMABLE))
def test_official_deformable_recipe(name, built):
  levels, dilation, refine, two_stage, trainable = OFFICIAL_DEFORMABLE[name]
  config, model, variables = built(name)
  assert (model.num_feature_levels, model.dilation, model.with_box_refine, model.two_stage) == (
      levels, dilation, refine, two_stage)
  assert (model.num_classes, model.num_queries, model.hidden_dim, model.num_heads, model.num_encoder_layers,
          model.num_decoder_layers, model.dim_feedforward, model.dropout, model.enc_n_points, model.dec_n_points,
          model.backbone_depth, model.aux_loss) == (91, 300, 256, 8, 6, 6, 1024, 0.1, 4, 4, 50, True)
  params = flax.traverse_util.flatten_dict(variables["params"])
  assert sum(x.size for path, x in params.items() if optim.parameter_group(path) != optim.FROZEN) == trainable
  optimizer = config.optimizer
  assert (optimizer.lr, optimizer.lr_backbone, optimizer.lr_linear_proj_mult, optimizer.weight_decay,
          optimizer.clip_max_norm, optimizer.lr_drop_epochs) == (2e-4, 2e-5, 0.1, 1e-4, 0.1, 40)
  assert (config.num_epochs, config.batch_size) == (50, 32)
  loss = config.loss
  assert (loss.class_cost, loss.bbox_cost, loss.giou_cost, loss.focal_alpha, loss.cls_loss_coef, loss.bbox_loss_coef,
          loss.giou_loss_coef) == (2.0, 5.0, 2.0, 0.25, 2.0, 5.0, 2.0)


def test_trainable_counts():
  """The counts derived above, pinned (R101's also equals this port's ResNet-101 count, see test_official_recipe)."""
  assert (R101_TRAINABLE, PANOPTIC_TRAINABLE) == (60_242_272, 1_333_657)


@pytest.mark.parametrize("name", ["generated", "coco_mini_cpu"])
def test_cpu_configs(name, built):
  config, model, variables = built(name)
  assert model.backbone_depth == 18 and not model.dilation and model.hidden_dim == 128
  assert config.data.fixed_size is not None   # one padded shape: one XLA program
  if name == "coco_mini_cpu":
    feature_shape, _ = _input_proj_and_outputs(model, variables)
    assert feature_shape == (1, 4, 4, 128)
  else:
    # The README's main job: Deformable DETR, which learns the generated data in minutes (docs/results.md run 10).
    assert families.of_model(model) is families.DEFORMABLE_DETR and model.num_feature_levels == 4
    # The generated dataset's category ids are 1..len(CATEGORIES), each the index of a sigmoid class.
    assert config.model.num_classes == len(generated.CATEGORIES) + 1
    assert (config.data.source, config.data.train_split, config.data.eval_split) == ("generated", "train", "val")
    assert config.num_train_steps == 300 and config.batch_size == 4
    # The longest resized side (1333 x scale) fits the padded shape.
    assert round(1333 * config.data.scale) <= min(config.data.fixed_size)
