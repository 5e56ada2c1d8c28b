"""Normalised cross-correlation (elastix: AdvancedNormalizedCorrelation)."""

from __future__ import annotations

import numpy as np

from .base import BaseIntensityMetric, as_samples

__all__ = ["NormalizedCorrelation"]

#: A sample set whose standard deviation is at most this fraction of its largest absolute
#: value counts as constant (rounding alone leaves ~1e-16 of spread in a constant set).
CONSTANT_RTOL = 1e-12


def _is_constant(centred_ss: float, x: np.ndarray) -> bool:
    scale = float(np.max(np.abs(x)))
    return centred_ss <= x.size * (CONSTANT_RTOL * scale) ** 2


class NormalizedCorrelation(BaseIntensityMetric):
    """Negated normalised cross-correlation of samples ``f`` (N,), ``m`` (N,)::

        NCC   = (Sfm - Sf Sm / N) / sqrt((Sff - Sf^2 / N) (Smm - Sm^2 / N))
        value = -NCC                                  (in [-1, 1]; -1 is best)

    with ``Sf = sum f``, ``Sfm = sum f m``, etc. It is computed in the equivalent centred
    form (``fc = f - mean f``, ``mc = m - mean m``), which avoids cancellation::

        NCC          = <fc, mc> / sqrt(<fc, fc> <mc, mc>)
        dNCC/dm_n    = fc_n / sqrt(<fc, fc> <mc, mc>) - NCC * mc_n / <mc, mc>
        dvalue/dm_n  = -dNCC/dm_n

    Invariant to affine intensity maps ``m -> a m + b`` with ``a > 0`` (value -1 when
    ``m = a f + b``; +1 when ``a < 0``).

    Zero variance: when the fixed or the moving samples are constant (standard deviation
    <= 1e-12 of their largest magnitude), NCC is undefined; the metric then returns
    value 0.0 (no measurable correlation) and a zero derivative, never NaN. No options;
    :meth:`prepare` does nothing.
    """

    name = "ncc"

    def _compute(self, f, m, derivative: bool):
        f, m = as_samples(f, m)
        fc = f - f.mean()
        mc = m - m.mean()
        sff = float(np.dot(fc, fc))
        smm = float(np.dot(mc, mc))
        if _is_constant(sff, f) or _is_constant(smm, m):
            return 0.0, (np.zeros_like(m) if derivative else None)
        sfm = float(np.dot(fc, mc))
        denom = np.sqrt(sff * smm)
        ncc = sfm / denom
        if not derivative:
            return -ncc, None
        dncc = fc / denom - (ncc / smm) * mc
        return -ncc, -dncc

    def value_and_derivative(self, f, m) -> tuple[float, np.ndarray]:
        """``(-NCC, d(-NCC)/dm)`` with the derivative (N,) float64."""
        return self._compute(f, m, True)

    def value(self, f, m) -> float:
        """``-NCC`` (0.0 for constant samples)."""
        return self._compute(f, m, False)[0]
