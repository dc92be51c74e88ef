"""`python eval.py ...` in the repository = the `detr-eval` command (detr_jax/eval_cli.py)."""

from detr_jax import eval_cli

if __name__ == "__main__":
  eval_cli.run()
