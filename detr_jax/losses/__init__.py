"""Matching and the set loss: `matcher.py` (costs and Hungarian assignment, host or device) and
`set_criterion.py` (the official loss terms)."""

from detr_jax.losses.set_criterion import SetCriterion, term_names

__all__ = ["SetCriterion", "term_names"]
