"""DETR-R50 panoptic (detr-r50-panoptic-00ce5173.pth: PQ 43.4): the mask head on a frozen detector.

The official recipe trains the box model first, then bbox_attention and the mask head for 25
epochs (lr drop at 15) with every detector weight frozen:

    python train.py --config configs/detr_r50_panoptic.py --workdir DIR \
        --config.data.data_dir=/data/coco --config.init.checkpoint=BOX_MODEL.pth

init.checkpoint may be a box model (the mask head then starts from its initialisers) or a
panoptic checkpoint. Evaluation (here and in eval.py with this config) runs on the images of
`annotations/panoptic_val2017.json`: PQ/SQ/RQ, plus box and mask AP against
`annotations/instances_val2017.json`, as the official code does.
"""

from configs import detr_r50


def get_config():
  config = detr_r50.get_config()
  config.model.update(num_classes=250, masks=True)
  config.data.update(source="coco_panoptic")
  config.optimizer.update(train_mask_head_only=True, lr_drop_epochs=15)
  config.num_epochs = 25
  return config
