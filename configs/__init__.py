"""The recipes: one `get_config()` per file, passed as `--config configs/NAME.py`.

A package so that config files can build on each other (`from configs import detr_r50`) wherever
a command runs: it is installed with detr_jax.
"""
