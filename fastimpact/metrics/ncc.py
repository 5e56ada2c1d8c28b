"""Normalised cross-correlation (elastix: AdvancedNormalizedCorrelation)."""

from __future__ import annotations

import math

import numpy as np

from .base import BaseIntensityMetric, as_samples
from .term import DeviceContribution

__all__ = ["NormalizedCorrelation"]

#: A sample set whose standard deviation is at most this fraction of its largest absolute
#: value counts as constant (rounding alone leaves ~1e-16 of spread in a constant set).
CONSTANT_RTOL = 1e-12


def is_constant(centred_ss: float, n: int, scale: float) -> bool:
    """Whether n samples with centred sum of squares ``centred_ss`` and largest magnitude
    ``scale`` count as constant."""
    return centred_ss <= n * (CONSTANT_RTOL * scale) ** 2


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
        if is_constant(sff, f.size, float(np.max(np.abs(f)))) or is_constant(smm, m.size, float(np.max(np.abs(m)))):
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

    def device_form(self):
        """The same value and derivative from the GPU moments (sums, centred sums, maxima)."""

        def form(samples) -> DeviceContribution:
            k = samples.n
            sum_f, sum_m, cff, cmm, cfm, _, max_f, max_m = samples.moments()
            if is_constant(cff, k, max_f) or is_constant(cmm, k, max_m):
                return DeviceContribution(0.0)  # value 0, derivative 0 (as on the host)
            denom = math.sqrt(cff * cmm)
            ncc = cfm / denom
            # d(-NCC)/dm_i = -(f_i - mean f) / denom + (NCC / cmm) (m_i - mean m)
            return DeviceContribution(-ncc, cm=ncc / cmm, cf=-1.0 / denom,
                                      c0=(sum_f / k) / denom - (ncc / cmm) * (sum_m / k))

        return form
