"""Mean squared intensity difference (elastix: AdvancedMeanSquares)."""

from __future__ import annotations

import numpy as np

from .base import BaseIntensityMetric, as_samples
from .term import DeviceContribution

__all__ = ["MeanSquares"]


class MeanSquares(BaseIntensityMetric):
    """Mean squares: for samples ``f`` (N,), ``m`` (N,)::

        value        = (1/N) sum_n (m_n - f_n)^2          (intensity units squared)
        dvalue/dm_n  = (2/N) (m_n - f_n)

    Minimum 0 when the images agree. Suited to images of the same modality and intensity
    scale. No options; :meth:`prepare` does nothing.
    """

    name = "mse"

    def value_and_derivative(self, f, m) -> tuple[float, np.ndarray]:
        """``(value, dvalue/dm)`` with ``dvalue/dm`` (N,) float64."""
        f, m = as_samples(f, m)
        diff = m - f
        n = diff.size
        return float(np.dot(diff, diff) / n), diff * (2.0 / n)

    def value(self, f, m) -> float:
        """``(1/N) sum (m - f)^2``."""
        f, m = as_samples(f, m)
        diff = m - f
        return float(np.dot(diff, diff) / diff.size)

    def device_form(self):
        """From the GPU moments: ``ssd / K`` and ``d/dm_k = (2 / K) (m_k - f_k)``."""

        def form(samples) -> DeviceContribution:
            k = samples.n
            ssd = samples.moments()[5]
            return DeviceContribution(ssd / k, cm=2.0 / k, cf=-2.0 / k)

        return form
