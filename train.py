"""`python train.py ...` in the repository = the `detr-train` command (detr_jax/train_cli.py)."""

from detr_jax import train_cli

if __name__ == "__main__":
  train_cli.run()
