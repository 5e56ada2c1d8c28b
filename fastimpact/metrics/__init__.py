"""Intensity similarity metrics: value to minimise and its derivative w.r.t. moving samples.

>>> from fastimpact.metrics import make_metric
>>> metric = make_metric("mi", bins=32)
>>> metric.prepare(fixed_array, moving_array, fixed_mask, moving_mask)   # once per level
>>> value, dvalue_dm = metric.value_and_derivative(f, m)                 # f, m: (N,)

Registry: ``mse`` (:class:`MeanSquares`), ``ncc`` (:class:`NormalizedCorrelation`),
``mi`` (:class:`MattesMutualInformation`). See :mod:`fastimpact.metrics.base` for the
interface.
"""

from __future__ import annotations

import inspect

from ..errors import ConfigError
from .base import BaseIntensityMetric, IntensityMetric
from .mi import MattesMutualInformation
from .mse import MeanSquares
from .ncc import NormalizedCorrelation

__all__ = ["METRICS", "make_metric", "IntensityMetric", "BaseIntensityMetric", "MeanSquares",
           "NormalizedCorrelation", "MattesMutualInformation"]

METRICS = {
    "mse": MeanSquares,
    "ncc": NormalizedCorrelation,
    "mi": MattesMutualInformation,
}


def _option_names(cls) -> list[str]:
    params = inspect.signature(cls.__init__).parameters.values()
    return [p.name for p in params
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def make_metric(name: str, **options):
    """Build the metric registered as ``name`` with keyword ``options``.

    Raises :class:`~fastimpact.errors.ConfigError` for an unknown name (listing the valid
    ones), an option the metric does not take (listing those it takes), or an invalid
    option value.
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in METRICS:
        raise ConfigError(
            f"unknown metric {name!r}; valid metrics: {', '.join(METRICS)}; "
            "choose one of them (e.g. 'mse' for same-modality images, 'mi' otherwise)")
    cls = METRICS[key]
    allowed = _option_names(cls)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        takes = f"it takes: {', '.join(allowed)}" if allowed else "it takes no options"
        raise ConfigError(
            f"metric {key!r} has no option {', '.join(map(repr, unknown))}; {takes}; "
            "remove or rename the option")
    return cls(**options)
