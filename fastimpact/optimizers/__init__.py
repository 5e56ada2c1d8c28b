"""Optimisers. ``OPTIMIZERS`` maps config names to classes; only ASGD (elastix's default) so far."""

from .asgd import (
    ASGD,
    ASGDParameters,
    ASGDSettings,
    JacobianTerms,
    SparseJacobian,
    default_max_step_length,
    default_n_jacobian_measurements,
    estimate_parameters,
    grid_sample_points,
    jacobian_terms,
    manual_parameters,
)

OPTIMIZERS = {"asgd": ASGD}

__all__ = [
    "OPTIMIZERS",
    "ASGD",
    "ASGDParameters",
    "ASGDSettings",
    "JacobianTerms",
    "SparseJacobian",
    "default_max_step_length",
    "default_n_jacobian_measurements",
    "estimate_parameters",
    "grid_sample_points",
    "jacobian_terms",
    "manual_parameters",
]
