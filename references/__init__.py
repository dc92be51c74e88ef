"""Independent references that tests and benchmarks compare detr_jax with: transformers' PyTorch
DETR (`transformers_detr.py`), the official preprocessing (`official_preprocessing.py`) and the
real coco-mini data (`coco_mini.py`)."""
