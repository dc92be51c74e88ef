"""`python predict.py ...` in the repository = the `detr-predict` command (detr_jax/predict_cli.py)."""

import sys

from detr_jax import predict_cli

if __name__ == "__main__":
  sys.exit(predict_cli.main())
