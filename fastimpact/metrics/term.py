"""The one cost-term interface: every similarity metric (MSE, NCC, MI, the three IMPACT modes), the
bending penalty and their weighted sum.

The cost function draws fixed voxels, maps them through the current transform and hands every term
the same :class:`SampleBatch`; a term returns a :class:`TermValue`::

    value                      the term's value at the batch (to minimise)
    dvalue_dm   (K,)           d value / d moving intensity m_k (intensity terms; the cost function
                               multiplies it by the batch's dm/dy)
    dvalue_dy   (K, 3)         d value / d moving point y_k (world mm)
    points, point_gradient     (M, 3) world points and d value / d moving point there, beyond the
                               batch points (IMPACT's exact patch chain, the dense mode's voxels)
    parameter_gradient         d value / d theta directly (penalties on the parameters)

A term declares what the cost function must provide and respect (class attributes, or properties):

    needs_pairs     the sampled fixed / moving intensities and dm/dy (``sample_pairs``)
    needs_points    the world points x and T(x) of the kept samples
    support         :class:`Support`: where around a sample the images must be defined
    exact_gradient_samples(n, default)   ASGD's exact-gradient sample count for the estimation
    start_stage()   called when a stage starts on a level (e.g. the loss normalisation restarts)
    device_form()   the term on GPU-resident samples (see :class:`DeviceSamples`), or None

Adding a metric: subclass :class:`Term` (or :class:`~fastimpact.metrics.base.BaseIntensityMetric`
for one that compares intensities), set the declarations, implement ``evaluate``, and add its name
to the term factory (:mod:`fastimpact.engine.terms`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import RegistrationError
from ..transforms.parameterisation import TransformView

__all__ = ["SampleBatch", "TermValue", "Support", "Term", "WeightedSum", "BendingPenalty", "DeviceSamples",
           "DeviceContribution", "TransformView"]


@dataclass
class SampleBatch:
    """The kept samples of one evaluation (K points that map inside the moving image and masks).

    flat: (K,) flat indices of the fixed voxels of the level. x, y: (K, 3) world fixed points and
    their moving points T(x) (None unless a term needs points). f, m: (K,) fixed and moving
    intensities, dm_dy: (K, 3) d m / d y world (None unless a term needs pairs). transform: the
    current transform (read only). gradient: whether gradients are wanted.
    """

    flat: np.ndarray
    x: np.ndarray | None
    y: np.ndarray | None
    f: np.ndarray | None
    m: np.ndarray | None
    dm_dy: np.ndarray | None
    transform: TransformView
    gradient: bool = True


@dataclass
class TermValue:
    """What a term returns (see the module docstring); unset gradients are None."""

    value: float
    dvalue_dm: np.ndarray | None = None
    dvalue_dy: np.ndarray | None = None
    points: np.ndarray | None = None
    point_gradient: np.ndarray | None = None
    parameter_gradient: np.ndarray | None = None


@dataclass(frozen=True)
class Support:
    """Where around a sample x the images must be defined for the term's value to be valid.

    patch_offsets: (M, 3) world mm offsets o; every x + o must lie in the fixed mask and every
        T(x + o) in the moving image and its mask (IMPACT Jacobian mode's patches).
    receptive_radius_mm: the fixed image (and mask) around x and the moving image (and mask)
        around T(x) must hold a ball of this radius (static features' receptive fields).
    overlap_sampling: draw the samples only where the current transform reaches the moving
        image's support (a moving image that covers less than the fixed one keeps enough samples).
    """

    patch_offsets: np.ndarray | None = None
    receptive_radius_mm: float = 0.0
    overlap_sampling: bool = False


class Term:
    """Base of the cost terms: a point-free term with no support and no device form."""

    name = ""
    needs_pairs = False
    needs_points = False
    support = Support()

    def exact_gradient_samples(self, n_iteration: int, default: int) -> int:
        """ASGD's exact-gradient sample count (``default``: elastix's 100k)."""
        return default

    def start_stage(self) -> None:
        """A stage starts on this level."""

    def evaluate(self, batch: SampleBatch) -> TermValue:  # pragma: no cover - interface
        raise NotImplementedError

    def device_form(self):
        """The term on GPU-resident samples: a callable ``DeviceSamples -> DeviceContribution``, or
        None (then the level runs the host loop)."""
        return None


@dataclass
class DeviceContribution:
    """A term's value and derivative on the GPU, as ``d value / d m_k = cm m_k + cf f_k + c0 +
    dmi_weight dmi_k`` (``dmi``: a device vector, or None)."""

    value: float
    cm: float = 0.0
    cf: float = 0.0
    c0: float = 0.0
    dmi: object = None
    dmi_weight: float = 0.0


class DeviceSamples:
    """The kept samples of one GPU iteration (device arrays f, m) and their moments, reduced once
    per iteration for every term that needs them."""

    def __init__(self, f, m, k_moments, buffer=None):
        self.f, self.m = f, m
        self.n = int(f.shape[0])
        self._k_moments = k_moments
        self.buffer = buffer
        self._moments = None

    def moments(self) -> tuple:
        """(sum_f, sum_m, cff, cmm, cfm, ssd, max_f, max_m) as floats (see kernels ``moments``)."""
        if self._moments is None:
            self.buffer = self._k_moments(self.f, self.m, self.buffer)
            self._moments = tuple(float(v) for v in self.buffer.copy_to_host())
        return self._moments


class WeightedSum(Term):
    """``sum_i w_i term_i``: itself a term (the union of the needs and supports; the smallest
    exact-gradient hint)."""

    name = "sum"

    def __init__(self, terms):
        self.terms = [(float(w), t) for w, t in terms]
        if not self.terms:
            raise ValueError("a weighted sum needs at least one term")
        self.needs_pairs = any(t.needs_pairs for _, t in self.terms)
        self.needs_points = any(t.needs_points for _, t in self.terms)
        offsets = [t.support.patch_offsets for _, t in self.terms if t.support.patch_offsets is not None]
        self.support = Support(
            patch_offsets=np.concatenate(offsets) if offsets else None,
            receptive_radius_mm=max(t.support.receptive_radius_mm for _, t in self.terms),
            overlap_sampling=any(t.support.overlap_sampling for _, t in self.terms))

    def exact_gradient_samples(self, n_iteration, default):
        return min(t.exact_gradient_samples(n_iteration, default) for _, t in self.terms)

    def start_stage(self):
        for _, t in self.terms:
            t.start_stage()

    def evaluate(self, batch: SampleBatch) -> TermValue:
        out = TermValue(0.0)
        pts, pgs = [], []
        for w, t in self.terms:
            r = t.evaluate(batch)
            out.value += w * r.value
            if not batch.gradient:
                continue
            if r.dvalue_dm is not None:
                out.dvalue_dm = w * r.dvalue_dm if out.dvalue_dm is None else out.dvalue_dm + w * r.dvalue_dm
            if r.dvalue_dy is not None:
                out.dvalue_dy = w * r.dvalue_dy if out.dvalue_dy is None else out.dvalue_dy + w * r.dvalue_dy
            if r.points is not None:
                pts.append(r.points)
                pgs.append(w * r.point_gradient)
            if r.parameter_gradient is not None:
                g = w * r.parameter_gradient
                out.parameter_gradient = g if out.parameter_gradient is None else out.parameter_gradient + g
        if pts:
            out.points = pts[0] if len(pts) == 1 else np.concatenate(pts)
            out.point_gradient = pgs[0] if len(pgs) == 1 else np.concatenate(pgs)
        return out

    def device_form(self):
        forms = [t.device_form() for _, t in self.terms]
        if any(f is None for f in forms):
            return None
        weights = [w for w, _ in self.terms]

        def combined(samples: DeviceSamples) -> DeviceContribution:
            total = DeviceContribution(0.0)
            for w, form in zip(weights, forms):
                c = form(samples)
                total.value += w * c.value
                total.cm += w * c.cm
                total.cf += w * c.cf
                total.c0 += w * c.c0
                if c.dmi is not None:
                    if total.dmi is not None:
                        raise RegistrationError("two MI terms in one metric are not supported on the GPU; combine them")
                    total.dmi, total.dmi_weight = c.dmi, w * c.dmi_weight
            return total

        return combined


class BendingPenalty(Term):
    """The B-spline bending energy of the coefficients (a penalty on the parameters)."""

    name = "bending"

    def __init__(self, energy):
        self.energy = energy

    def evaluate(self, batch: SampleBatch) -> TermValue:
        value, grad = self.energy.value_and_gradient(batch.transform.coef)
        return TermValue(value, parameter_gradient=grad.ravel() if batch.gradient else None)


def chain_at_points(out: TermValue, dm_dy, n_points: int):
    """d value / d moving point at the batch points from a term's output (``dm_dy`` is scaled in
    place by dvalue_dm when given); zeros when the term has no gradient there."""
    g = None
    if out.dvalue_dm is not None:
        dm_dy *= out.dvalue_dm[:, None]
        g = dm_dy
    if out.dvalue_dy is not None:
        g = out.dvalue_dy if g is None else g + out.dvalue_dy
    return np.zeros((n_points, 3)) if g is None else g

