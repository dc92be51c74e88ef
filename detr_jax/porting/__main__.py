"""`python -m detr_jax.porting`: see `cli.py`."""

import sys

from detr_jax.porting import cli

sys.exit(cli.main())
