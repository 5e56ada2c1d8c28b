"""The intensity-metric interface shared by MSE, NCC and Mattes MI.

A metric compares fixed intensities ``f`` (N,) and moving intensities ``m`` (N,) at the same
N sample points (the moving image already interpolated at the transformed points T(x)). It
returns the value to MINIMISE and its derivative with respect to each ``m[n]``; the
registration driver chains that with the moving-image gradient and dT/dtheta:

    dvalue/dtheta = sum_n dvalue/dm_n * grad M(T(x_n)) . dT(x_n)/dtheta

All computation is float64; float32 inputs are accepted (and converted). Values do not
depend on the order of the samples (up to floating-point rounding of the sums).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from ..errors import RegistrationError
from .term import SampleBatch, Term, TermValue

__all__ = ["IntensityMetric", "BaseIntensityMetric", "as_samples"]


@runtime_checkable
class IntensityMetric(Protocol):
    """What the registration driver needs from an intensity metric."""

    name: str

    def prepare(self, fixed: np.ndarray, moving: np.ndarray, fixed_mask=None,
                moving_mask=None) -> None:
        """Called once per pyramid level with that level's full images (any shape) and
        optional masks (same shapes, nonzero = inside)."""

    def value_and_derivative(self, f: np.ndarray, m: np.ndarray) -> tuple[float, np.ndarray]:
        """(value, dvalue/dm) with dvalue/dm of shape (N,), float64."""

    def value(self, f: np.ndarray, m: np.ndarray) -> float:
        """The value alone (may be cheaper than :meth:`value_and_derivative`)."""


def as_samples(f, m, *, keep_float32: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Validate a pair of sample vectors and return them as float64 1-D arrays.

    With ``keep_float32`` a float32 array is returned unchanged (for kernels that read
    float32 and compute in float64, saving a copy); other dtypes become float64.

    Raises ``ValueError`` for arrays that are not 1-D of equal length (a programming error
    in the caller) and :class:`~fastimpact.errors.RegistrationError` when there are no
    samples at all (typically masks that do not overlap the image).
    """
    f = np.asarray(f)
    m = np.asarray(m)
    if not (keep_float32 and f.dtype == np.float32):
        f = np.asarray(f, dtype=np.float64)
    if not (keep_float32 and m.dtype == np.float32):
        m = np.asarray(m, dtype=np.float64)
    if f.ndim != 1 or m.shape != f.shape:
        raise ValueError(
            f"metric samples must be two 1-D arrays of equal length, got shapes {f.shape} "
            f"and {m.shape}")
    if f.size == 0:
        raise RegistrationError(
            "the metric got 0 samples; the sampler found no points inside the fixed mask "
            "that map inside the moving image; check the masks and the initial transform")
    return f, m


class BaseIntensityMetric(Term):
    """Common plumbing: the cost-term interface (:class:`~fastimpact.metrics.term.Term`: the
    batch's sampled intensities in, ``dvalue_dm`` out), a no-op :meth:`prepare`, :meth:`value`
    from :meth:`value_and_derivative`, and a readable ``repr``."""

    name: str = ""
    needs_pairs = True

    def evaluate(self, batch: SampleBatch) -> TermValue:
        if batch.gradient:
            value, dm = self.value_and_derivative(batch.f, batch.m)
            return TermValue(value, dvalue_dm=dm)
        return TermValue(self.value(batch.f, batch.m))

    def prepare(self, fixed, moving, fixed_mask=None, moving_mask=None) -> None:
        """Nothing to precompute for this metric."""

    def value_and_derivative(self, f, m) -> tuple[float, np.ndarray]:  # pragma: no cover
        raise NotImplementedError

    def value(self, f, m) -> float:
        """The metric value (float) for samples ``f`` (N,), ``m`` (N,)."""
        return self.value_and_derivative(f, m)[0]

    def _options(self) -> dict:
        return {}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self._options().items())
        return f"{type(self).__name__}({opts})"
