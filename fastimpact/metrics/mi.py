"""Mattes mutual information (Mattes et al. 2003; elastix: AdvancedMattesMutualInformation)."""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError, ImageError
from .base import BaseIntensityMetric, as_samples
from .term import DeviceContribution

__all__ = ["MattesMutualInformation", "FIXED_KERNEL_ORDERS", "MIN_BINS", "MAX_BINS"]

FIXED_KERNEL_ORDERS = (0, 1, 3)
MOVING_KERNEL_ORDER = 3
MIN_BINS = 4
MAX_BINS = 1024
IMPLEMENTATIONS = ("numba", "numpy", "cuda")
#: Fraction of one (unpadded) bin width added to each end of an intensity range so that the
#: extreme intensities fall strictly inside the histogram (elastix uses the same 0.001).
SMALL_NUMBER_RATIO = 1e-3


def _check_bins(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(
            f"{name} must be an integer number of histogram bins, got {value!r}; use an integer "
            f"in [{MIN_BINS}, {MAX_BINS}], e.g. 32")
    if not MIN_BINS <= int(value) <= MAX_BINS:
        raise ConfigError(
            f"{name} = {value} is out of range; allowed: {MIN_BINS} to {MAX_BINS} bins "
            "(the cubic Parzen window needs at least 4); 32 is the usual choice")
    return int(value)


class _Axis:
    """Map from intensity to continuous bin coordinate for one image (fixed or moving).

    ``coord = v * scale + offset``; the range ``[lo_value, hi_value]`` (the image's
    min/max widened by ``limit_range_ratio``) maps to ``[pad + eps, nbins - 1 - pad - eps]``
    with ``eps = 0.001`` bin; coordinates are clamped to ``[pad, nbins - 1 - pad]`` so the
    B-spline window of order ``2 pad + 1`` (or ``2 pad``) never leaves the histogram.
    """

    def __init__(self, lo_value: float, hi_value: float, nbins: int, order: int):
        pad = order // 2
        width_bins = nbins - 2 * pad - 1
        small = SMALL_NUMBER_RATIO * (hi_value - lo_value) / width_bins
        bin_width = (hi_value - lo_value + 2.0 * small) / width_bins
        self.bin_width = bin_width
        self.scale = 1.0 / bin_width
        self.offset = -(lo_value - small) / bin_width + pad
        self.lo = float(pad)
        self.hi = float(nbins - 1 - pad)


def _masked_range(image, mask, role: str) -> tuple[float, float]:
    data = np.asarray(image)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != data.shape:
            raise ImageError(
                f"{role} mask shape {mask.shape} differs from the {role} image shape "
                f"{data.shape}; resample the mask onto the image grid")
        data = data[mask > 0]
        if data.size == 0:
            raise ImageError(f"{role} mask is empty (no voxel > 0); give a mask that covers "
                             "the region to register")
    if data.size == 0:
        raise ImageError(f"{role} image is empty; give a non-empty image")
    lo = float(np.min(data))
    hi = float(np.max(data))
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ImageError(f"{role} image contains NaN or infinite values (min {lo}, max {hi}); "
                         "replace them (e.g. with np.nan_to_num) before registering")
    if hi <= lo:
        raise ImageError(
            f"{role} image is constant ({lo}){' inside its mask' if mask is not None else ''}; "
            "mutual information needs intensity variation; check the image and the mask")
    return lo, hi


class MattesMutualInformation(BaseIntensityMetric):
    """Negated Mattes mutual information between fixed samples ``f`` (N,) and moving ``m`` (N,).

    Histogram (per pyramid level, set by :meth:`prepare`): ``Bf`` fixed and ``Bm`` moving
    bins. Each intensity range is the image's min/max (fixed: inside the fixed mask;
    moving: inside the moving mask if given), widened by ``limit_range_ratio`` of its
    width on both sides (elastix's Fixed/MovingLimitRangeRatio) to leave room for cubic
    interpolation overshoot. It is mapped linearly onto bin coordinates
    ``[pad, B - 1 - pad]`` (``pad = order // 2``: 1 for the cubic window, 0 for orders
    0 and 1, plus 0.001 bin of margin at each end, as elastix), so every Parzen window
    stays inside the histogram. Intensities beyond the widened range are clamped to its
    ends, where the moving derivative is 0.

    With ``xi_n`` and ``eta_n`` the continuous bin coordinates of ``f_n`` and ``m_n``,
    ``beta_f`` the fixed Parzen window (B-spline of order ``fixed_kernel_order``) and
    ``beta_3`` the cubic B-spline moving window::

        h(i, k)  = sum_n beta_f(i - xi_n) beta_3(k - eta_n)
        p(i, k)  = h(i, k) / sum h           p_f(i) = sum_k p(i, k),  p_m(k) = sum_i p(i, k)
        MI       = sum_{i,k} p log(p / (p_f p_m))          (nats; 0 log 0 = 0)
        value    = -MI

    The derivative is exact (not a finite difference). The weights of one sample add up
    to 1 and ``p_f`` does not depend on ``m``, so the terms from the marginals cancel
    (``sum dp = sum dp_m = 0``) and, with ``dm_n eta_n = 1 / bin_width_m``::

        dvalue/dm_n = (1 / (bin_width_m sum h)) sum_{i,k} beta_f(i - xi_n)
                      beta_3'(k - eta_n) log(p(i, k) / (p_f(i) p_m(k)))

    which is the formula of Mattes et al. (their ``log(p / p_m)`` differs by a
    ``log p_f(i)`` term that sums to zero). See :mod:`fastimpact.kernels.mi_reference`.

    Options
    -------
    bins : int, default 32
        Histogram bins for each image (4 to 1024).
    fixed_bins, moving_bins : int or None
        Override ``bins`` for one image (elastix: NumberOfFixed/MovingHistogramBins).
    fixed_kernel_order : {0, 1, 3}, default 0
        B-spline order of the fixed Parzen window. 0 (a plain histogram of the fixed
        intensities) is the elastix default and the cheapest (1 bin per sample instead of
        4); the fixed samples do not move, so smoothing them is not needed for a smooth
        value. The moving window is always the cubic B-spline (its derivative is needed).
    limit_range_ratio : float, default 0.01
        Widening of each intensity range, as a fraction of its width (0 to 1).
    implementation : {"numba", "numpy", "cuda"}, default "numba"
        The Numba kernel (:mod:`fastimpact.kernels.mi_cpu`), the NumPy reference, or the CUDA
        kernel (:mod:`fastimpact.kernels.mi_cuda`, the registration's choice on ``--device cuda``).

    The sample vectors are processed in float64 (float32 accepted). Cost with N = 2000
    samples and 32 x 32 bins: a few tens of microseconds (Numba, serial).
    """

    name = "mi"

    def __init__(self, bins: int = 32, *, fixed_bins: int | None = None,
                 moving_bins: int | None = None, fixed_kernel_order: int = 0,
                 limit_range_ratio: float = 0.01, implementation: str = "numba"):
        bins = _check_bins("bins", bins)
        self.fixed_bins = bins if fixed_bins is None else _check_bins("fixed_bins", fixed_bins)
        self.moving_bins = (bins if moving_bins is None
                            else _check_bins("moving_bins", moving_bins))
        self.bins = bins
        if isinstance(fixed_kernel_order, bool) or fixed_kernel_order not in FIXED_KERNEL_ORDERS:
            raise ConfigError(
                f"fixed_kernel_order = {fixed_kernel_order!r} is not supported; allowed: "
                f"{', '.join(map(str, FIXED_KERNEL_ORDERS))} (B-spline order of the fixed "
                "Parzen window); use 0 (elastix default) or 3")
        self.fixed_kernel_order = int(fixed_kernel_order)
        if (isinstance(limit_range_ratio, bool)
                or not isinstance(limit_range_ratio, (int, float, np.floating, np.integer))
                or not 0.0 <= float(limit_range_ratio) <= 1.0):
            raise ConfigError(
                f"limit_range_ratio = {limit_range_ratio!r} is invalid; allowed: a number in "
                "[0, 1] (fraction of the intensity range added at each end); default 0.01")
        self.limit_range_ratio = float(limit_range_ratio)
        if implementation not in IMPLEMENTATIONS:
            raise ConfigError(
                f"implementation = {implementation!r} is unknown; allowed: "
                f"{', '.join(IMPLEMENTATIONS)}; use 'numba' (the NumPy reference is slow)")
        self.implementation = implementation
        self._fixed_axis: _Axis | None = None
        self._moving_axis: _Axis | None = None

    def _options(self) -> dict:
        return {"fixed_bins": self.fixed_bins, "moving_bins": self.moving_bins,
                "fixed_kernel_order": self.fixed_kernel_order,
                "limit_range_ratio": self.limit_range_ratio}

    # ------------------------------------------------------------------------------------
    def prepare(self, fixed, moving, fixed_mask=None, moving_mask=None) -> None:
        """Fix the intensity ranges for this pyramid level.

        ``fixed``, ``moving``: the level's full images (any shape, any real dtype);
        masks: ``None`` or arrays of the same shape (nonzero = inside). Raises
        :class:`~fastimpact.errors.ImageError` for an empty mask, a constant image or
        non-finite intensities.
        """
        f_lo, f_hi = _masked_range(fixed, fixed_mask, "fixed")
        m_lo, m_hi = _masked_range(moving, moving_mask, "moving")
        r = self.limit_range_ratio
        self.set_ranges((f_lo - r * (f_hi - f_lo), f_hi + r * (f_hi - f_lo)),
                        (m_lo - r * (m_hi - m_lo), m_hi + r * (m_hi - m_lo)))

    def set_ranges(self, fixed_range: tuple[float, float],
                   moving_range: tuple[float, float]) -> None:
        """Set the (already widened) intensity ranges directly, e.g. for tests.

        Each range is ``(low, high)`` with ``low < high``, in intensity units.
        """
        for role, (lo, hi) in (("fixed", fixed_range), ("moving", moving_range)):
            if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
                raise ImageError(f"{role} intensity range ({lo}, {hi}) is empty or not finite; "
                                 "give low < high")
        self._fixed_axis = _Axis(float(fixed_range[0]), float(fixed_range[1]),
                                 self.fixed_bins, self.fixed_kernel_order)
        self._moving_axis = _Axis(float(moving_range[0]), float(moving_range[1]),
                                  self.moving_bins, MOVING_KERNEL_ORDER)

    def kernel_arguments(self) -> dict:
        """Keyword arguments of the MI kernels (bin counts, scales, offsets, clamps)."""
        if self._fixed_axis is None:
            raise RuntimeError("MattesMutualInformation.prepare() must be called before use "
                               "(once per pyramid level, with that level's images)")
        fa, ma = self._fixed_axis, self._moving_axis
        return dict(nbins_f=self.fixed_bins, nbins_m=self.moving_bins,
                    f_scale=fa.scale, f_offset=fa.offset, f_lo=fa.lo, f_hi=fa.hi,
                    m_scale=ma.scale, m_offset=ma.offset, m_lo=ma.lo, m_hi=ma.hi,
                    fixed_order=self.fixed_kernel_order)

    def _mutual_information(self, f, m, derivative: bool):
        kwargs = self.kernel_arguments()
        if f.dtype != m.dtype:  # one compiled specialisation per dtype, not per pair
            f, m = f.astype(np.float64), m.astype(np.float64)
        if self.implementation == "numba":
            from fastimpact.kernels import mi_cpu

            return mi_cpu.mattes_mi(f, m, derivative=derivative, **kwargs)
        if self.implementation == "cuda":
            from fastimpact.kernels import mi_cuda

            return mi_cuda.mattes_mi(f, m, derivative=derivative, **kwargs)
        from fastimpact.kernels import mi_reference

        return mi_reference.mattes_mi_reference(f, m, derivative=derivative, **kwargs)

    def value_and_derivative(self, f, m) -> tuple[float, np.ndarray]:
        """``(-MI, d(-MI)/dm)`` with the derivative (N,) float64."""
        f, m = as_samples(f, m, keep_float32=True)
        mi, dmi = self._mutual_information(f, m, True)
        return -mi, -dmi

    def value(self, f, m) -> float:
        """``-MI`` without the derivative pass."""
        f, m = as_samples(f, m, keep_float32=True)
        return -self._mutual_information(f, m, False)[0]

    def device_form(self):
        """The CUDA kernels on the GPU samples: the value is -MI, so MI's derivative enters with weight -1."""

        def form(samples) -> DeviceContribution:
            from fastimpact.kernels import mi_cuda  # numba.cuda: imported on the cuda backend only

            v, d = mi_cuda.mattes_mi(samples.f, samples.m, derivative=True, **self.kernel_arguments())
            return DeviceContribution(-float(v), dmi=d, dmi_weight=-1.0)

        return form
