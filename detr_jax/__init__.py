"""detr_jax: DETR (Carion et al., ECCV 2020) in JAX/Flax, numerically equal to the official PyTorch code."""
