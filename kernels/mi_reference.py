"""NumPy reference (the specification) of the Mattes mutual information kernel.

This module is deliberately plain: dense Parzen weight matrices and matrix products, no
loops over samples. :mod:`fastimpact.kernels.mi_cpu` implements the same numbers with
Numba and is tested against this file.

Summation order: the matrix products here leave it to BLAS, so this file agrees with the
kernels to rounding (~1e-15 relative), not bit for bit. The Numba kernel fixes the order
(chunks of samples laid out from N and the bin counts only, see
:func:`fastimpact.kernels.mi_cpu.chunk_layout`), so its result does not depend on the
thread count.

Notation (shared with :mod:`fastimpact.kernels.mi_cpu` and
:mod:`fastimpact.metrics.mi`):

* ``f`` (N,), ``m`` (N,): fixed and moving intensities at N sample points (any float dtype;
  computed in float64).
* Continuous bin coordinates ``xi = f * f_scale + f_offset`` and
  ``eta = m * m_scale + m_offset``, clamped to ``[f_lo, f_hi]`` and ``[m_lo, m_hi]``.
  ``m_scale = 1 / moving bin width`` (bins per intensity unit). The clamp intervals keep
  every Parzen window inside the ``(Bf, Bm)`` histogram; a clamped moving sample has a
  zero derivative (the value does not change when it moves further out).
* Fixed Parzen window ``beta_f``: B-spline of order 0, 1 or 3; moving window ``beta_3``:
  cubic B-spline. The weight sample n gives to bin (i, k) is
  ``beta_f(i - xi_n) * beta_3(k - eta_n)``.
* Joint histogram ``h(i, k) = sum_n beta_f(i - xi_n) beta_3(k - eta_n)`` and
  ``p = h / sum(h)``; marginals ``p_f(i) = sum_k p(i, k)``, ``p_m(k) = sum_i p(i, k)``.
* ``MI = sum_{i,k} p log(p / (p_f p_m))`` (terms with ``p = 0`` are 0).
* Derivative w.r.t. m_n (see :func:`mattes_mi_reference` for the derivation)::

      dMI/dm_n = -(m_scale / S) sum_{i,k} beta_f(i - xi_n) beta_3'(k - eta_n) L(i, k),
      L(i, k) = log(p(i, k) / (p_f(i) p_m(k)))   (0 where p = 0),  S = sum(h) = N.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "bspline_weights",
    "bspline_derivative_weights",
    "parzen_weight_matrix",
    "joint_histogram_reference",
    "mattes_mi_reference",
]


def bspline_weights(x: np.ndarray, order: int) -> np.ndarray:
    """Centred B-spline of ``order`` (0, 1 or 3) evaluated at ``x`` (any shape, float64).

    order 0: 1 on (-1/2, 1/2] (half-open so that every x lands in exactly one bin);
    order 1: max(0, 1 - |x|);
    order 3: 2/3 - x^2 + |x|^3/2 for |x| < 1, (2 - |x|)^3 / 6 for 1 <= |x| < 2, else 0.
    """
    x = np.asarray(x, dtype=np.float64)
    if order == 0:
        return ((x > -0.5) & (x <= 0.5)).astype(np.float64)
    a = np.abs(x)
    if order == 1:
        return np.maximum(0.0, 1.0 - a)
    if order == 3:
        inner = 2.0 / 3.0 - a**2 + 0.5 * a**3
        outer = (2.0 - a) ** 3 / 6.0
        return np.where(a < 1.0, inner, np.where(a < 2.0, outer, 0.0))
    raise ValueError(f"B-spline order {order} not supported (0, 1, 3)")


def bspline_derivative_weights(x: np.ndarray) -> np.ndarray:
    """Derivative d beta_3(x) / dx of the cubic B-spline at ``x`` (any shape, float64)."""
    x = np.asarray(x, dtype=np.float64)
    a = np.abs(x)
    inner = -2.0 * x + 1.5 * x * a
    outer = -0.5 * np.sign(x) * (2.0 - a) ** 2
    return np.where(a < 1.0, inner, np.where(a < 2.0, outer, 0.0))


def parzen_weight_matrix(coord: np.ndarray, nbins: int, order: int) -> np.ndarray:
    """Dense (N, nbins) matrix ``W[n, i] = beta_order(i - coord[n])``."""
    bins = np.arange(nbins, dtype=np.float64)
    return bspline_weights(bins[None, :] - coord[:, None], order)


def _coordinates(values, scale, offset, lo, hi):
    """Continuous bin coordinates and a mask of samples strictly inside the clamp interval."""
    raw = np.asarray(values, dtype=np.float64) * scale + offset
    coord = np.clip(raw, lo, hi)
    inside = (raw > lo) & (raw < hi)
    return coord, inside


def joint_histogram_reference(f, m, *, nbins_f, nbins_m, f_scale, f_offset, f_lo, f_hi,
                              m_scale, m_offset, m_lo, m_hi, fixed_order) -> np.ndarray:
    """Unnormalised Parzen joint histogram ``h`` (nbins_f, nbins_m), float64.

    ``h[i, k] = sum_n beta_f(i - xi_n) * beta_3(k - eta_n)``; ``h.sum() == N`` because
    each window is a partition of unity and stays inside the histogram.
    """
    xi, _ = _coordinates(f, f_scale, f_offset, f_lo, f_hi)
    eta, _ = _coordinates(m, m_scale, m_offset, m_lo, m_hi)
    wf = parzen_weight_matrix(xi, nbins_f, fixed_order)
    wm = parzen_weight_matrix(eta, nbins_m, 3)
    return wf.T @ wm


def mattes_mi_reference(f, m, *, nbins_f, nbins_m, f_scale, f_offset, f_lo, f_hi,
                        m_scale, m_offset, m_lo, m_hi, fixed_order,
                        derivative: bool = True):
    """Mattes mutual information and its derivative w.r.t. each moving sample.

    Returns ``(mi, dmi_dm)`` with ``mi`` a float (nats, >= 0) and ``dmi_dm`` (N,) float64
    (``None`` when ``derivative`` is False). Note: this is +MI; the metric minimises -MI.

    Derivation. With ``S = sum(h)`` (constant in m: the cubic window is a partition of
    unity) and ``dp(i,k)/dm_n = -(m_scale/S) beta_f(i - xi_n) beta_3'(k - eta_n)``::

        dMI = sum dp * [log(p / (p_f p_m)) + 1] - sum p * dp_f / p_f - sum p * dp_m / p_m
            = sum dp * L + sum dp - 0 - sum_k dp_m(k)
            = sum dp * L

    because ``p_f`` does not depend on m and ``sum_{i,k} dp = sum_k dp_m(k) = 0``.
    (Mattes et al. 2003 write ``sum dp * log(p / p_m)``; the extra ``-log p_f(i)`` term
    sums to zero against ``dp`` for the same reason, so both forms are the same number.)
    Where ``p(i, k) = 0`` every sample has zero fixed or zero moving weight there, and as
    the cubic B-spline is C^2 its derivative is zero too, so such bins contribute 0.
    """
    xi, _ = _coordinates(f, f_scale, f_offset, f_lo, f_hi)
    eta, inside = _coordinates(m, m_scale, m_offset, m_lo, m_hi)
    bins_m = np.arange(nbins_m, dtype=np.float64)
    wf = parzen_weight_matrix(xi, nbins_f, fixed_order)              # (N, Bf)
    wm = bspline_weights(bins_m[None, :] - eta[:, None], 3)          # (N, Bm)
    h = wf.T @ wm                                                    # (Bf, Bm)
    total = h.sum()
    p = h / total
    pf = p.sum(axis=1)
    pm = p.sum(axis=0)
    positive = p > 0
    log_ratio = np.zeros_like(p)
    denom = pf[:, None] * pm[None, :]
    log_ratio[positive] = np.log(p[positive] / denom[positive])
    mi = float(np.sum(p * log_ratio))
    if not derivative:
        return mi, None
    dwm = bspline_derivative_weights(bins_m[None, :] - eta[:, None])  # (N, Bm)
    per_sample = np.sum((wf @ log_ratio) * dwm, axis=1)              # (N,)
    dmi_dm = -(m_scale / total) * per_sample
    dmi_dm = np.where(inside, dmi_dm, 0.0)
    return mi, dmi_dm
