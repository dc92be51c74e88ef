"""COCO evaluation: box AP and mask AP with pycocotools (`coco_evaluation.py`), PQ with panopticapi's
rules (`panoptic_quality.py`). The post-processors they score sit beside the models
(`models/postprocess.py`)."""

from detr_jax.evaluation.coco_evaluation import (MASK_METRIC_NAMES, METRIC_NAMES, PANOPTIC_METRIC_NAMES, category_ap,
                                                 coco_metrics, evaluate, make_predict_fn, metrics_table,
                                                 write_validation_pictures)

__all__ = ["MASK_METRIC_NAMES", "METRIC_NAMES", "PANOPTIC_METRIC_NAMES", "category_ap", "coco_metrics", "evaluate",
           "make_predict_fn", "metrics_table", "write_validation_pictures"]
