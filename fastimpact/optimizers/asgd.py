"""Adaptive stochastic gradient descent (ASGD) with elastix's automatic parameter estimation.

Reference: S. Klein, J.P.W. Pluim, M. Staring, M.A. Viergever, "Adaptive stochastic gradient
descent optimisation for image registration", IJCV 81(3):227-239, 2009 (the update rule and the
"Original" estimation). The "DisplacementDistribution" estimation is from Y. Qiao, B. van Lew,
B.P.F. Lelieveldt, M. Staring, "Fast automatic step size estimation for gradient descent
optimization of image registration", IEEE TMI 35(2):391-403, 2016. Behaviour and defaults follow
elastix 5 (``AdaptiveStochasticGradientDescent``), read from its source, not only its manual.

Update rule (one call of :meth:`ASGD.step` per iteration k, g_k = stochastic gradient)::

    theta_{k+1} = theta_k - gamma(t_k) g_k,        gamma(t) = a / (A + t + 1)^alpha
    t_{k+1}     = max(0, t_k + f(-<g_k, g_{k-1}>))  (k >= 1; t_1 = t_0 = initial_time = 0)
    f(x)        = f_min + (f_max - f_min) / (1 + exp(-(x - beta) / omega)),
    beta        = omega * ln(-f_max / f_min)        (so that f(0) = 0)

Consecutive gradients that disagree (noise, overshoot) make <g_k, g_{k-1}> < 0, f ~ f_max > 0,
the time grows and the step shrinks; gradients that agree make t shrink towards 0 (larger steps).
Without adaptive step sizes t grows by (f_max + f_min) / 2 per iteration.

Automatic estimation, method "original" (elastix ``ASGDParameterEstimationMethod Original``),
done once per resolution level at the level's initial parameters theta_0. With M probe points x_j
in the fixed image and the transform Jacobians J_j = dT(x_j)/dtheta (3 x n_params, mm per
parameter unit):

* C = (1/M) sum_j J_j^T J_j;  TrC = trace C;  TrCC = ||C||_F^2;
  maxJJ  = max_j ||J_j||_F^2 + 2 sqrt2 ||J_j J_j^T||_F;
  maxJCJ = max_j tr(J_j C J_j^T) + 2 sqrt2 ||J_j C J_j^T||_F.
* N gradient measurements (``NumberOfGradientMeasurements``; 0 = automatic:
  N = max(2, ceil(8 TrCC / TrC^2 / (K - 1)^2)) with K = 1.5; 2 when TrC or TrCC <= 1e-14).
* Gradients are measured at perturbed positions theta_i = theta_0 + s * N(0, I) with
  s = delta / sqrt(maxJJ): gg = mean ||g_exact(theta_i)||^2 and, when the gradient is stochastic,
  ee = mean ||g_exact(theta_i) - g_stochastic(theta_i)||^2 (0 otherwise). elastix computes the
  "exact" gradient on a grid of ``NumberOfSamplesForExactGradient`` = 100000 samples.
* sigma1 = sqrt(gg / TrC), sigma3 = sqrt(ee / TrC), noise factor nf = sigma1^2/(sigma1^2+sigma3^2):
  alpha = 1; a = A delta / (sigma1 sqrt(maxJCJ)) * nf; f_max = 1; f_min = -0.99 + 0.98 nf;
  omega = max(1e-14, zeta sigma3^2 sqrt(TrCC)) with zeta = ``SigmoidScaleFactor`` = 0.1.
  The defining property: for gradients distributed as N(0, sigma1^2 C), the first step
  gamma(0) g gives max_j [E + 2 std of ||J_j gamma(0) g||^2] = (delta * nf * A / (A + 1))^2,
  i.e. no probe point moves by much more than delta (noise-free) in the first iterations.

Method "original_but_sigmoid_to_default" estimates a and alpha as above but keeps f_max, f_min,
omega at their settings. Method "displacement_distribution" (Qiao et al.): from one stochastic
gradient g at theta_0, d_j = ||J_j g||, jacg = mean(d) + 2 std(d) (population std, as elastix's
default multi-threaded code); a = delta (A + 1)^alpha / jacg * nf with alpha = 1, where
nf = gg / (gg + ee) from N gradient measurements (N = 2 when 0) if noise compensation is on
(``NoiseCompensation``, default true) else 1; the sigmoid keeps its settings. So the first step
moves the probe points by delta * nf in the mean + 2 std sense.

Defaults (elastix names in brackets, values from elastix's source):
iterations 500 [MaximumNumberOfIterations]; A = 20 [SP_A]; manual mode only: a = 400 [SP_a],
alpha = 0.602 [SP_alpha], f_max = 1 [SigmoidMax], f_min = -0.8 [SigmoidMin], omega = 1e-8
[SigmoidScale] (these sigmoid values are also used by "displacement_distribution"); t_0 = 0
[SigmoidInitialTime]; adaptive = true [UseAdaptiveStepSizes]; N = 0 = automatic
[NumberOfGradientMeasurements]; M = max(1000, number of parameters)
[NumberOfJacobianMeasurements], drawn by elastix on a regular grid of the level's fixed image
(see :func:`grid_sample_points`); delta [MaximumStepLength] defaults to
``MaximumStepLengthRatio`` (1.0) times the mean of the first two voxel spacings (x and y, the
"in-plane" ones) of the *original* fixed and moving images, the same for every level
(see :func:`default_max_step_length`).

Driver use, per level: build the probe Jacobians (:class:`SparseJacobian`) at M fixed points for
the current transform, call :func:`estimate_parameters` once (~0.3-0.6 s of CPU for 81k B-spline
parameters and 64k points on a busy 2-core machine, plus N exact and N stochastic gradient calls),
create :class:`ASGD` and call :meth:`ASGD.step` every iteration (O(n_params), ~0.1 ms for 81k).

Parameter scaling: elastix estimates in the scaled parameter space. A driver that scales
parameters (theta_scaled = theta * s) passes Jacobian columns divided by s and gradients in the
scaled space. All estimation arithmetic is float64 on the CPU; :meth:`ASGD.step` only uses array
methods, so it also runs on CuPy arrays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numba
import numpy as np

from ..errors import ConfigError, RegistrationError

__all__ = [
    "METHODS",
    "ASGDSettings",
    "ASGDParameters",
    "SparseJacobian",
    "JacobianTerms",
    "ASGD",
    "estimate_parameters",
    "manual_parameters",
    "jacobian_terms",
    "jacobian_terms_reference",
    "sigmoid",
    "default_max_step_length",
    "default_n_jacobian_measurements",
    "grid_sample_points",
]

#: Estimation methods, keyed by the name used in fastimpact configs -> elastix's name.
METHODS: Mapping[str, str] = {
    "original": "Original",
    "original_but_sigmoid_to_default": "OriginalButSigmoidToDefault",
    "displacement_distribution": "DisplacementDistribution",
}

_TINY = 1e-14  # elastix's guard against division by (near) zero
_SQRT2 = math.sqrt(2.0)


# ----------------------------------------------------------------------------------------------
# settings and results
# ----------------------------------------------------------------------------------------------


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_real(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def _check_real(name: str, v, *, lo=None, lo_open=False, hi=None, hi_open=False, hint: str) -> None:
    ok = _is_real(v) and math.isfinite(float(v))
    if ok and lo is not None:
        ok = float(v) > lo if lo_open else float(v) >= lo
    if ok and hi is not None:
        ok = float(v) < hi if hi_open else float(v) <= hi
    if not ok:
        parts = []
        if lo is not None:
            parts.append(f"{'>' if lo_open else '>='} {lo:g}")
        if hi is not None:
            parts.append(f"{'<' if hi_open else '<='} {hi:g}")
        allowed = "a finite number " + " and ".join(parts) if parts else "a finite number"
        raise ConfigError(f"ASGD setting {name} must be {allowed}, got {v!r}; {hint}")


def _check_int(name: str, v, *, lo: int, hint: str) -> None:
    if not _is_int(v) or int(v) < lo:
        raise ConfigError(f"ASGD setting {name} must be an integer >= {lo}, got {v!r}; {hint}")


def _check_bool(name: str, v) -> None:
    if not isinstance(v, (bool, np.bool_)):
        raise ConfigError(f"ASGD setting {name} must be true or false, got {v!r}; use a boolean")


@dataclass(frozen=True)
class ASGDSettings:
    """User settings of the ASGD optimiser for one resolution level (elastix names in brackets).

    iterations: iterations per level [MaximumNumberOfIterations], >= 1.
    automatic: estimate a, alpha and the sigmoid [AutomaticParameterEstimation].
    method: one of :data:`METHODS` [ASGDParameterEstimationMethod].
    a: gain numerator, manual mode only (None -> 400) [SP_a].
    A: gain offset, used in both modes [SP_A].
    alpha: gain decay exponent, manual mode only (automatic sets 1.0) [SP_alpha].
    f_max, f_min, omega: sigmoid maximum (> 0), minimum (< 0) and width (> 0) [SigmoidMax,
        SigmoidMin, SigmoidScale]; used in manual mode and by the methods that keep the sigmoid.
    initial_time: t_0 [SigmoidInitialTime], >= 0.
    adaptive: adapt the time with the sigmoid [UseAdaptiveStepSizes].
    max_step_mm: delta in mm [MaximumStepLength]; None -> the driver's default
        (:func:`default_max_step_length`).
    n_gradient_measurements: N, 0 = automatic [NumberOfGradientMeasurements].
    n_jacobian_measurements: M probe points, 0 = max(1000, n_params) [NumberOfJacobianMeasurements].
    n_samples_exact_gradient: samples of the "exact" gradient, for the driver
        [NumberOfSamplesForExactGradient].
    sigmoid_scale_factor: zeta in omega = zeta sigma3^2 sqrt(TrCC) [SigmoidScaleFactor].
    noise_compensation: noise factor in "displacement_distribution" [NoiseCompensation];
        "original" always compensates, as in elastix.
    """

    iterations: int = 500
    automatic: bool = True
    method: str = "original"
    a: float | None = None
    A: float = 20.0
    alpha: float = 0.602
    f_max: float = 1.0
    f_min: float = -0.8
    omega: float = 1e-8
    initial_time: float = 0.0
    adaptive: bool = True
    max_step_mm: float | None = None
    n_gradient_measurements: int = 0
    n_jacobian_measurements: int = 0
    n_samples_exact_gradient: int = 100_000
    sigmoid_scale_factor: float = 0.1
    noise_compensation: bool = True

    def __post_init__(self) -> None:
        _check_int("iterations", self.iterations, lo=1, hint="use e.g. 500 (elastix's default)")
        _check_bool("automatic", self.automatic)
        _check_bool("adaptive", self.adaptive)
        _check_bool("noise_compensation", self.noise_compensation)
        if not isinstance(self.method, str) or self.method not in METHODS:
            raise ConfigError(
                f"ASGD setting method must be one of {', '.join(METHODS)}, got {self.method!r}; "
                "use 'original' (elastix's default)"
            )
        if self.a is not None:
            _check_real("a (SP_a)", self.a, lo=0.0, lo_open=True, hint="use e.g. 400 or set automatic")
        _check_real("A (SP_A)", self.A, lo=0.0, hint="use e.g. 20 (elastix's default)")
        _check_real("alpha (SP_alpha)", self.alpha, lo=0.0, lo_open=True, hint="use e.g. 0.602 or 1.0")
        _check_real("f_max (SigmoidMax)", self.f_max, lo=0.0, lo_open=True, hint="use e.g. 1.0")
        _check_real("f_min (SigmoidMin)", self.f_min, hi=0.0, hi_open=True, hint="use e.g. -0.8")
        _check_real("omega (SigmoidScale)", self.omega, lo=0.0, lo_open=True, hint="use e.g. 1e-8")
        _check_real("initial_time (SigmoidInitialTime)", self.initial_time, lo=0.0, hint="use 0")
        if self.max_step_mm is not None:
            _check_real(
                "max_step_mm (MaximumStepLength)", self.max_step_mm, lo=0.0, lo_open=True,
                hint="use about one voxel spacing in mm, or leave it unset for the default",
            )
        _check_int("n_gradient_measurements", self.n_gradient_measurements, lo=0,
                   hint="use 0 for automatic or e.g. 10")
        _check_int("n_jacobian_measurements", self.n_jacobian_measurements, lo=0,
                   hint="use 0 for max(1000, number of parameters)")
        _check_int("n_samples_exact_gradient", self.n_samples_exact_gradient, lo=1,
                   hint="use e.g. 100000 (elastix's default)")
        _check_real("sigmoid_scale_factor", self.sigmoid_scale_factor, lo=0.0, lo_open=True,
                    hint="use e.g. 0.1 (elastix's default)")


@dataclass(frozen=True)
class ASGDParameters:
    """The gain and sigmoid parameters of one level, estimated or manual.

    ``info`` holds diagnostics of the estimation (TrC, TrCC, maxJJ, maxJCJ, gg, ee, sigma1,
    sigma3, noise_factor, n_gradient_measurements, perturbation_sigma, jacg, max_step_mm, ...).
    """

    a: float
    A: float
    alpha: float
    f_max: float
    f_min: float
    omega: float
    method: str = "manual"
    info: Mapping[str, float] = field(default_factory=dict)

    def gain(self, t: float) -> float:
        """Step size gamma(t) = a / (A + t + 1)^alpha."""
        return self.a / (self.A + t + 1.0) ** self.alpha


def manual_parameters(settings: ASGDSettings) -> ASGDParameters:
    """Parameters of manual mode (``automatic = False``): a (default 400), A, alpha, sigmoid."""
    return ASGDParameters(
        a=400.0 if settings.a is None else float(settings.a),
        A=float(settings.A),
        alpha=float(settings.alpha),
        f_max=float(settings.f_max),
        f_min=float(settings.f_min),
        omega=float(settings.omega),
        method="manual",
    )


def default_max_step_length(fixed_spacing, moving_spacing=None, ratio: float = 1.0) -> float:
    """elastix's default MaximumStepLength in mm.

    ``ratio`` (MaximumStepLengthRatio) times the mean of the first min(ndim, 2) voxel spacings of
    the fixed and the moving image, i.e. the x and y spacings (mm) of the *full-resolution* input
    images (elastix uses the original images, not the pyramid level). A missing moving spacing
    means the fixed one is used alone.
    """
    _check_real("max_step_ratio (MaximumStepLengthRatio)", ratio, lo=0.0, lo_open=True, hint="use 1.0")
    vals = []
    for sp in (fixed_spacing, moving_spacing):
        if sp is None:
            continue
        sp = np.asarray(sp, dtype=np.float64).ravel()
        if sp.size == 0 or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
            raise ConfigError(f"voxel spacing must be positive and finite, got {sp.tolist()}; fix the image header")
        vals.extend(sp[: min(sp.size, 2)].tolist())
    if not vals:
        raise ConfigError("default_max_step_length needs the fixed image spacing, got None; pass the spacing in mm")
    return float(ratio) * float(np.mean(vals))


def default_n_jacobian_measurements(n_params: int, settings: ASGDSettings | None = None) -> int:
    """M = ``settings.n_jacobian_measurements`` or, when 0, max(1000, n_params) (elastix)."""
    if settings is not None and settings.n_jacobian_measurements > 0:
        return int(settings.n_jacobian_measurements)
    return max(1000, int(n_params))


def grid_sample_points(shape, n_samples: int, mask: np.ndarray | None = None) -> np.ndarray:
    """Voxel indices of elastix's ImageGridSampler asked for about ``n_samples`` points.

    The grid has the same integer spacing s = max(1, round((V / n)^(1/3))) voxels along every
    axis, where V is the number of voxels of the mask's bounding box (the whole image without a
    mask); it is centred in that box and points outside the mask are dropped, so fewer than
    ``n_samples`` points may come back. elastix uses it for the Jacobian measurements
    (n = M) and for the "exact" gradient (n = 100000).

    shape: (3,) image shape; mask: bool array of that shape or None.
    Returns (P, 3) int64 voxel indices [i, j, k], C order (k fastest).
    """
    shape = tuple(int(s) for s in shape)
    if not _is_int(n_samples) or n_samples < 1:
        raise ConfigError(f"number of grid samples must be an integer >= 1, got {n_samples!r}; use e.g. 1000")
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != shape:
            raise ConfigError(f"mask shape {mask.shape} differs from image shape {shape}; resample the mask")
        nz = np.nonzero(mask)
        if nz[0].size == 0:
            raise RegistrationError("the fixed mask is empty, no grid samples can be drawn; check the mask")
        lo = np.array([a.min() for a in nz], dtype=np.int64)
        hi = np.array([a.max() for a in nz], dtype=np.int64) + 1
    else:
        lo = np.zeros(len(shape), dtype=np.int64)
        hi = np.array(shape, dtype=np.int64)
    size = hi - lo
    n_vox = float(np.prod(size))
    step = max(1, int(math.floor((n_vox / float(n_samples)) ** (1.0 / len(shape)) + 0.5)))
    axes = []
    for d in range(len(shape)):
        count = 1 + (int(size[d]) - 1) // step
        start = int(lo[d]) + (int(size[d]) - ((count - 1) * step + 1)) // 2
        axes.append(start + step * np.arange(count, dtype=np.int64))
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, len(shape))
    if mask is not None:
        grid = grid[mask[tuple(grid.T)]]
    return grid


# ----------------------------------------------------------------------------------------------
# sparse transform Jacobians at the probe points
# ----------------------------------------------------------------------------------------------


class SparseJacobian:
    """Per-point sparse Jacobians J_j = dT(x_j)/dtheta of a transform at P probe points.

    Two layouts, both with ``indices`` (P, K) int64 and ``values`` (P, D, K) float64:

    * general (``kron=1``): J_j[d, indices[j, k]] += values[j, d, k]; the output dimension is D.
      Affine: K = 12, D = 3, every row the same indices (all parameters); values are the dense
      3 x 12 Jacobian [(x_j - c)^T (x) I_3, I_3] in the transform's own parameter order.
    * Kronecker (``kron=n``, D = 1): J_j[d, indices[j, k] + d * stride] = values[j, 0, k] for
      d < n, i.e. J_j = w_j^T (x) I_n. Cubic B-spline: K = 64 control points with tensor weights
      w_j; elastix's layout (all x coefficients, then y, then z) is indices = control-point number
      and stride = n_control_points; an interleaved layout (cp0x, cp0y, cp0z, cp1x, ...) is
      indices = 3 * control-point number and stride = 1.

    Indices of a row may repeat (their contributions add up); zero values are allowed (padding).
    Rows need not be sorted, but points whose rows are identical (same B-spline cell) are
    grouped by the estimation, so giving them together is cheapest. Units: mm per parameter unit
    (for parameters in mm, dimensionless).
    """

    __slots__ = ("indices", "values", "n_params", "kron", "stride")

    def __init__(self, indices, values, n_params: int, *, kron: int = 1, stride: int = 1):
        idx = np.ascontiguousarray(indices, dtype=np.int64)
        val = np.ascontiguousarray(values, dtype=np.float64)
        if idx.ndim != 2:
            raise ValueError(f"indices must be (P, K), got shape {idx.shape}")
        if val.ndim == 2:
            val = val[:, None, :]
        if val.ndim != 3 or val.shape[0] != idx.shape[0] or val.shape[2] != idx.shape[1]:
            raise ValueError(f"values must be (P, D, K) with indices (P, K) = {idx.shape}, got {val.shape}")
        if idx.shape[0] == 0 or idx.shape[1] == 0:
            raise RegistrationError("no probe points (or no parameters) for the ASGD estimation; check the fixed mask")
        kron, stride, n_params = int(kron), int(stride), int(n_params)
        if kron < 1 or (kron > 1 and val.shape[1] != 1):
            raise ValueError(f"kron={kron} needs values of shape (P, 1, K), got {val.shape}")
        if not np.all(np.isfinite(val)):
            raise RegistrationError("the transform Jacobian has NaN or infinite values at the probe points")
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi + (kron - 1) * stride >= n_params:
            raise ValueError(f"Jacobian indices {lo}..{hi} (kron={kron}, stride={stride}) exceed n_params={n_params}")
        if kron > 1:  # every (node, dim) pair must own its parameter
            used = np.zeros(hi + 1, dtype=bool)
            used[idx.ravel()] = True
            full = (np.flatnonzero(used)[:, None] + stride * np.arange(kron)).ravel()
            if np.bincount(full, minlength=n_params).max() > 1:
                raise ValueError(f"kron layout with stride={stride} maps two (index, dim) pairs to one parameter")
        self.indices, self.values, self.n_params, self.kron, self.stride = idx, val, n_params, kron, stride

    @classmethod
    def kronecker(cls, indices, weights, n_params: int, *, n_dims: int = 3, stride: int) -> "SparseJacobian":
        """J_j = w_j^T (x) I_n_dims: ``weights`` (P, K) on node ``indices`` (P, K) (see class doc)."""
        w = np.asarray(weights, dtype=np.float64)
        return cls(indices, w.reshape(w.shape[0], 1, -1), n_params, kron=n_dims, stride=stride)

    @property
    def n_points(self) -> int:
        return int(self.indices.shape[0])

    @property
    def out_dim(self) -> int:
        """Dimension of T(x) (3 for 3-D registration)."""
        return int(self.values.shape[1]) * self.kron

    def apply(self, v: np.ndarray, chunk: int = 16384) -> np.ndarray:
        """(J_j v)_j for a parameter vector v (n_params,): returns (P, out_dim) in mm."""
        v = np.asarray(v, dtype=np.float64).ravel()
        if v.size != self.n_params:
            raise ValueError(f"vector has {v.size} entries, the transform has {self.n_params} parameters")
        out = np.empty((self.n_points, self.out_dim), dtype=np.float64)
        offs = self.stride * np.arange(self.kron, dtype=np.int64)
        for s in range(0, self.n_points, chunk):
            idx = self.indices[s : s + chunk]
            val = self.values[s : s + chunk]
            if self.kron == 1:
                out[s : s + chunk] = np.einsum("jdk,jk->jd", val, v[idx])
            else:
                out[s : s + chunk] = np.einsum("jk,jkd->jd", val[:, 0, :], v[idx[:, :, None] + offs])
        return out

    def apply_transpose(self, d: np.ndarray) -> np.ndarray:
        """sum_j J_j^T d_j for d (P, out_dim): returns (n_params,)."""
        d = np.asarray(d, dtype=np.float64)
        if d.shape != (self.n_points, self.out_dim):
            raise ValueError(f"expected shape {(self.n_points, self.out_dim)}, got {d.shape}")
        if self.kron == 1:
            w = np.einsum("jdk,jd->jk", self.values, d)
            return np.bincount(self.indices.ravel(), weights=w.ravel(), minlength=self.n_params)
        out = np.zeros(self.n_params, dtype=np.float64)
        w0 = self.values[:, 0, :]
        for dim in range(self.kron):
            out += np.bincount((self.indices + dim * self.stride).ravel(),
                               weights=(w0 * d[:, dim : dim + 1]).ravel(), minlength=self.n_params)
        return out

    def to_dense(self) -> np.ndarray:
        """Dense (P, out_dim, n_params) Jacobians; for tests on small problems."""
        P, D, K = self.values.shape
        dense = np.zeros((P, self.out_dim, self.n_params), dtype=np.float64)
        rows = np.arange(P)[:, None]
        for dim in range(self.out_dim):
            src, rep = (dim, 0) if self.kron == 1 else (0, dim)
            np.add.at(dense[:, dim, :], (rows, self.indices + rep * self.stride), self.values[:, src, :])
        return dense


# ----------------------------------------------------------------------------------------------
# the Jacobian terms of the "original" method
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JacobianTerms:
    """TrC = tr C, TrCC = ||C||_F^2 with C = (1/M) sum_j J_j^T J_j, and the maxima maxJJ, maxJCJ."""

    TrC: float
    TrCC: float
    maxJJ: float
    maxJCJ: float


def jacobian_terms_reference(jac: SparseJacobian) -> JacobianTerms:
    """Plain dense NumPy definition of :func:`jacobian_terms` (small problems only)."""
    J = jac.to_dense()
    M = J.shape[0]
    Jr = J.reshape(-1, J.shape[2])
    C = Jr.T @ Jr / M
    JJt = np.einsum("jdp,jep->jde", J, J)
    JCJt = np.einsum("jdq,jeq->jde", (Jr @ C).reshape(J.shape), J)
    jj = np.sum(J * J, axis=(1, 2)) + 2 * _SQRT2 * np.sqrt(np.sum(JJt * JJt, axis=(1, 2)))
    jcj = np.trace(JCJt, axis1=1, axis2=2) + 2 * _SQRT2 * np.sqrt(np.sum(JCJt * JCJt, axis=(1, 2)))
    return JacobianTerms(float(np.trace(C)), float(np.sum(C * C)), float(jj.max()), float(jcj.max()))


@numba.njit(cache=True)
def _group_starts(idx, order):
    """Start positions (in ``order``) of runs of points with identical index rows, plus P."""
    P, K = idx.shape
    starts = np.empty(P + 1, np.int64)
    n = 0
    for r in range(P):
        j = order[r]
        new = r == 0
        if not new:
            pj = order[r - 1]
            for k in range(K):
                if idx[j, k] != idx[pj, k]:
                    new = True
                    break
        if new:
            starts[n] = r
            n += 1
    starts[n] = P
    return starts[: n + 1].copy()


@numba.njit(cache=True)
def _mark_offsets(idx, order, starts, node_of, n_nodes):
    """Which node-index differences |q - p| occur within a row (the bands of C), and which
    groups have a repeated index in their row."""
    K = idx.shape[1]
    n_groups = starts.size - 1
    mark = np.zeros(n_nodes, np.bool_)
    dup = np.zeros(n_groups, np.bool_)
    mark[0] = True
    for g in range(n_groups):
        j = order[starts[g]]
        for k in range(K):
            p = node_of[idx[j, k]]
            for l in range(k + 1, K):
                d = abs(node_of[idx[j, l]] - p)
                mark[d] = True
                if d == 0:
                    dup[g] = True
    return mark, dup


@numba.njit(cache=True)
def _merge_repeated(idx, val, order, starts, dup):
    """Copy of ``val`` where a repeated index in a row keeps the summed value at its first
    occurrence and 0 at the others, so that columns can be treated as distinct parameters."""
    out = val.copy()
    K = idx.shape[1]
    D = val.shape[1]
    for g in range(starts.size - 1):
        if not dup[g]:
            continue
        for r in range(starts[g], starts[g + 1]):
            j = order[r]
            for k in range(1, K):
                for l in range(k):
                    if idx[j, l] == idx[j, k]:
                        for d in range(D):
                            out[j, d, l] += out[j, d, k]
                            out[j, d, k] = 0.0
                        break
    return out


class _Prepared:
    """Grouping of the probe points by identical index rows, node relabelling, band offsets."""

    def __init__(self, jac: SparseJacobian):
        idx = jac.indices
        used = np.zeros(int(idx.max()) + 1, dtype=bool)
        used[idx.ravel()] = True
        self.node_of = (np.cumsum(used) - 1).astype(np.int64)  # monotone relabelling to 0..n-1
        self.n_nodes = int(used.sum())
        self.order = np.lexsort((idx[:, -1], idx[:, 0])).astype(np.int64)
        self.starts = _group_starts(idx, self.order)
        self.mark, dup = _mark_offsets(idx, self.order, self.starts, self.node_of, self.n_nodes)
        self.values = _merge_repeated(idx, jac.values, self.order, self.starts, dup) if dup.any() else jac.values


# fastmath only lets the compiler reorder sums of finite products (inputs are checked finite).
# Serial on purpose: the scatter into C would race, and a chunked two-phase parallel version was
# slower (barriers) than this loop, which is ~0.15 s for 64k B-spline points on one core.
@numba.njit(cache=True, fastmath=True)
def _accumulate_band(idx, val, order, starts, node_of, band_of, n_nodes, n_bands):
    """Banded upper triangle of sum_j V_j^T V_j: band[p, band_of[q - p]] for q >= p.

    Each run of identical rows is summed densely (K x K) and then scattered once.
    """
    K = idx.shape[1]
    D = val.shape[1]
    band = np.zeros((n_nodes, n_bands), np.float64)
    S = np.empty((K, K), np.float64)
    nodes = np.empty(K, np.int64)
    b0 = band_of[0]
    for g in range(starts.size - 1):
        S[:, :] = 0.0
        for r in range(starts[g], starts[g + 1]):
            j = order[r]
            for d in range(D):
                for k in range(K):
                    vk = val[j, d, k]
                    for l in range(K):
                        S[k, l] += vk * val[j, d, l]
        j = order[starts[g]]
        for k in range(K):
            nodes[k] = node_of[idx[j, k]]
        for k in range(K):
            p = nodes[k]
            band[p, b0] += S[k, k]
            for l in range(k + 1, K):
                q = nodes[l]
                if q > p:
                    band[p, band_of[q - p]] += S[k, l]
                elif q < p:
                    band[q, band_of[p - q]] += S[k, l]
                else:  # repeated index (after merging one of the two columns is zero)
                    band[p, b0] += 2.0 * S[k, l]
    return band


@numba.njit(parallel=True, cache=True, fastmath=True)
def _point_terms(idx, val, order, starts, node_of, band_of, band, inv_m, kron, jj_out, jcj_out):
    """Per point: ||J||_F^2 + 2 sqrt2 ||J J^T||_F and tr(J C J^T) + 2 sqrt2 ||J C J^T||_F."""
    K = idx.shape[1]
    D = val.shape[1]
    sq2 = math.sqrt(2.0)
    rk = math.sqrt(kron)
    b0 = band_of[0]
    for g in numba.prange(starts.size - 1):
        j0 = order[starts[g]]
        nodes = np.empty(K, np.int64)
        for k in range(K):
            nodes[k] = node_of[idx[j0, k]]
        Cg = np.empty((K, K), np.float64)  # the K x K block of C seen by this row
        for k in range(K):
            p = nodes[k]
            Cg[k, k] = band[p, b0] * inv_m
            for l in range(k + 1, K):
                q = nodes[l]
                if q >= p:
                    c = band[p, band_of[q - p]] * inv_m
                else:
                    c = band[q, band_of[p - q]] * inv_m
                Cg[k, l] = c
                Cg[l, k] = c
        VC = np.empty((D, K), np.float64)
        for r in range(starts[g], starts[g + 1]):
            j = order[r]
            frob2 = 0.0
            vvt2 = 0.0
            for d in range(D):
                for e in range(D):
                    s = 0.0
                    for k in range(K):
                        s += val[j, d, k] * val[j, e, k]
                    vvt2 += s * s
                    if d == e:
                        frob2 += s
            for d in range(D):
                for l in range(K):
                    VC[d, l] = 0.0
                for k in range(K):
                    vk = val[j, d, k]
                    for l in range(K):
                        VC[d, l] += vk * Cg[k, l]
            tr = 0.0
            m2 = 0.0
            for d in range(D):
                for e in range(D):
                    s = 0.0
                    for l in range(K):
                        s += VC[d, l] * val[j, e, l]
                    m2 += s * s
                    if d == e:
                        tr += s
            # J = V (x) I_kron: traces scale with kron, Frobenius norms with sqrt(kron)
            jj_out[j] = kron * frob2 + 2.0 * sq2 * rk * math.sqrt(vvt2)
            jcj_out[j] = kron * tr + 2.0 * sq2 * rk * math.sqrt(m2)


def jacobian_terms(jac: SparseJacobian, *, max_band_entries: int = 60_000_000, _prep=None) -> JacobianTerms:
    """TrC, TrCC, maxJJ, maxJCJ of elastix's ComputeJacobianTerms, exactly, from sparse Jacobians.

    C is accumulated in banded form over the distinct index differences that occur within a row
    (343 for a cubic B-spline grid), after grouping points with identical index rows, so the cost
    is O(P K^2) multiply-adds plus O(groups K^2) scatters (numba, parallel over groups). Falls
    back to scipy.sparse when the band storage would exceed ``max_band_entries`` float64 values.
    """
    pr = _prep if _prep is not None else _Prepared(jac)
    idx, val = jac.indices, pr.values
    P = idx.shape[0]
    n_bands = int(pr.mark.sum())
    if pr.n_nodes * n_bands > max_band_entries:
        return _jacobian_terms_scipy(jac, pr.node_of, pr.n_nodes)
    band_of = np.full(pr.n_nodes, -1, dtype=np.int64)
    band_of[pr.mark] = np.arange(n_bands, dtype=np.int64)
    band = _accumulate_band(idx, val, pr.order, pr.starts, pr.node_of, band_of, pr.n_nodes, n_bands)
    diag = band[:, band_of[0]]
    kron = float(jac.kron)
    trc = kron * float(diag.sum()) / P
    trcc = kron * (2.0 * float(np.sum(band * band)) - float(np.sum(diag * diag))) / (P * P)
    jj = np.empty(P, dtype=np.float64)
    jcj = np.empty(P, dtype=np.float64)
    _point_terms(idx, val, pr.order, pr.starts, pr.node_of, band_of, band, 1.0 / P, kron, jj, jcj)
    return JacobianTerms(trc, trcc, float(jj.max()), float(jcj.max()))


def _jacobian_terms_scipy(jac: SparseJacobian, node_of: np.ndarray, n_nodes: int) -> JacobianTerms:
    """Fallback for index structures without a narrow band (slow for large P K^2)."""
    import scipy.sparse as sp

    P, D, K = jac.values.shape
    cols = node_of[jac.indices]
    rows = np.repeat(np.arange(P * D).reshape(P, D, 1), K, axis=2)
    V = sp.csr_matrix((jac.values.ravel(), (rows.ravel(), np.broadcast_to(cols[:, None, :], (P, D, K)).ravel())),
                      shape=(P * D, n_nodes))
    C = (V.T @ V).tocsr() / P
    kron = float(jac.kron)
    trc = kron * float(C.diagonal().sum())
    trcc = kron * float(C.multiply(C).sum())
    jj = np.empty(P)
    jcj = np.empty(P)
    rk = math.sqrt(kron)
    for j in range(P):
        Vj = V[j * D : (j + 1) * D]
        vvt = (Vj @ Vj.T).toarray()
        m = (Vj @ C @ Vj.T).toarray()
        jj[j] = kron * np.trace(vvt) + 2 * _SQRT2 * rk * np.linalg.norm(vvt)
        jcj[j] = kron * np.trace(m) + 2 * _SQRT2 * rk * np.linalg.norm(m)
    return JacobianTerms(trc, trcc, float(jj.max()), float(jcj.max()))


# ----------------------------------------------------------------------------------------------
# estimation
# ----------------------------------------------------------------------------------------------

GradientFn = Callable[[np.ndarray, int], np.ndarray]
ExactGradientFn = Callable[[np.ndarray], np.ndarray]


def _host(x) -> np.ndarray:
    """A float64 NumPy copy of a NumPy or CuPy vector."""
    if hasattr(x, "get") and not isinstance(x, np.ndarray):
        x = x.get()
    return np.asarray(x, dtype=np.float64).ravel()


def _max_jj(jac: SparseJacobian) -> float:
    """max_j ||J_j||_F^2 + 2 sqrt2 ||J_j J_j^T||_F (cheap: no C needed)."""
    v = _Prepared(jac).values
    vvt = np.einsum("jdk,jek->jde", v, v)
    frob2 = np.einsum("jdd->j", vvt)
    k = float(jac.kron)
    return float(np.max(k * frob2 + 2 * _SQRT2 * math.sqrt(k) * np.sqrt(np.sum(vvt * vvt, axis=(1, 2)))))


def _sample_gradients(theta0, sigma, n, gradient, exact_gradient, rng):
    """elastix's SampleGradients: mean ||g_exact||^2 and mean ||g_exact - g_stochastic||^2."""
    gg = ee = 0.0
    for _ in range(n):
        theta = theta0 + sigma * rng.standard_normal(theta0.size) if sigma > 0 else theta0.copy()
        seed = int(rng.integers(0, 2**31 - 1))
        if exact_gradient is not None:
            ge = _host(exact_gradient(theta))
            gs = _host(gradient(theta, seed))
            ee += float(np.dot(ge - gs, ge - gs))
        else:
            ge = _host(gradient(theta, seed))
        gg += float(np.dot(ge, ge))
    return gg / n, ee / n


def estimate_parameters(
    settings: ASGDSettings,
    jacobian: SparseJacobian,
    theta0,
    gradient: GradientFn,
    *,
    exact_gradient: ExactGradientFn | None = None,
    max_step_mm: float | None = None,
    rng: np.random.Generator | int = 0,
) -> ASGDParameters:
    """Estimate a, alpha and the sigmoid at the start of a level, as elastix does.

    settings: the level's settings; manual mode (``automatic=False``) returns
        :func:`manual_parameters` without calling anything.
    jacobian: dT/dtheta at the M probe points (elastix: a grid of about M = max(1000, n_params)
        fixed-image points inside the mask, see :func:`grid_sample_points`).
    theta0: (n_params,) parameters at the start of the level.
    gradient: ``gradient(theta, seed) -> (n_params,)`` the metric gradient with the samples the
        optimisation uses (fresh random samples drawn with ``seed``).
    exact_gradient: ``exact_gradient(theta) -> (n_params,)`` on many samples (elastix: a grid of
        ``settings.n_samples_exact_gradient``). Give it whenever ``gradient`` is stochastic; None
        means ``gradient`` is deterministic, so the approximation error ee is 0 (no noise factor).
    max_step_mm: delta used when ``settings.max_step_mm`` is None (the driver's
        :func:`default_max_step_length`).
    rng: generator or seed for the perturbations and the gradient seeds.

    Cost: "original" computes the Jacobian terms (numba; ~0.3-0.6 s measured for 81k B-spline
    parameters and 64k probe points on a loaded 2-core machine, ~1.4 KB of memory per control
    point); "displacement_distribution" needs only J_j g (~0.3 s there). Both add N exact and N
    stochastic gradient calls (N is usually 2 for large B-spline grids), plus one for the latter.
    """
    if not settings.automatic:
        return manual_parameters(settings)
    delta = settings.max_step_mm if settings.max_step_mm is not None else max_step_mm
    if delta is None:
        raise ConfigError(
            "ASGD automatic estimation needs max_step_mm (MaximumStepLength), got None; "
            "set it or pass default_max_step_length(spacing)"
        )
    _check_real("max_step_mm (MaximumStepLength)", delta, lo=0.0, lo_open=True, hint="use about one voxel spacing")
    delta = float(delta)
    theta0 = _host(theta0)
    if theta0.size != jacobian.n_params:
        raise ValueError(f"theta0 has {theta0.size} entries, the Jacobian has {jacobian.n_params} parameters")
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    A = float(settings.A)
    alpha = 1.0
    info: dict[str, float] = {"max_step_mm": delta, "n_points": float(jacobian.n_points)}

    if settings.method == "displacement_distribution":
        maxjj = _max_jj(jacobian)
        g = _host(gradient(theta0, int(rng.integers(0, 2**31 - 1))))
        disp = np.linalg.norm(jacobian.apply(g), axis=1)
        jacg = float(disp.mean() + 2.0 * math.sqrt(max(float(np.mean(disp * disp)) - float(disp.mean()) ** 2, 0.0)))
        nf = 1.0
        n = 0
        if settings.noise_compensation:
            n = settings.n_gradient_measurements if settings.n_gradient_measurements > 0 else 2
            sigma = delta / math.sqrt(maxjj) if maxjj > _TINY else 0.0
            gg, ee = _sample_gradients(theta0, sigma, n, gradient, exact_gradient, rng)
            nf = gg / (gg + ee + _TINY)
            info.update(gg=gg, ee=ee, perturbation_sigma=sigma)
        a = delta * (A + 1.0) ** alpha / (jacg + _TINY) * nf
        info.update(maxJJ=maxjj, jacg=jacg, noise_factor=nf, n_gradient_measurements=float(n))
        return ASGDParameters(a, A, alpha, float(settings.f_max), float(settings.f_min), float(settings.omega),
                              method=settings.method, info=info)

    terms = jacobian_terms(jacobian)
    trc, trcc = terms.TrC, terms.TrCC
    n = settings.n_gradient_measurements
    if n == 0:
        k_ratio = 1.5
        n = math.ceil(8.0 * trcc / trc / trc / (k_ratio - 1) ** 2) if trcc > _TINY and trc > _TINY else 2
        n = max(2, int(n))
    sigma = delta / math.sqrt(terms.maxJJ) if terms.maxJJ > _TINY else 0.0
    gg, ee = _sample_gradients(theta0, sigma, n, gradient, exact_gradient, rng)
    sigma1 = math.sqrt(gg / trc) if gg > _TINY and trc > _TINY else 0.0
    sigma3 = math.sqrt(ee / trc) if ee > _TINY and trc > _TINY else 0.0
    a_max = A * delta / sigma1 / math.sqrt(terms.maxJCJ) if sigma1 > _TINY and terms.maxJCJ > _TINY else 0.0
    nf = sigma1 * sigma1 / (sigma1 * sigma1 + sigma3 * sigma3 + _TINY)
    a = a_max * nf
    if settings.method == "original":
        f_max, f_min = 1.0, -0.99 + 0.98 * nf
        omega = max(_TINY, settings.sigmoid_scale_factor * sigma3 * sigma3 * math.sqrt(trcc))
    else:  # original_but_sigmoid_to_default
        f_max, f_min, omega = float(settings.f_max), float(settings.f_min), float(settings.omega)
    info.update(TrC=trc, TrCC=trcc, maxJJ=terms.maxJJ, maxJCJ=terms.maxJCJ, gg=gg, ee=ee, sigma1=sigma1,
                sigma3=sigma3, noise_factor=nf, n_gradient_measurements=float(n), perturbation_sigma=sigma)
    return ASGDParameters(a, A, alpha, f_max, f_min, omega, method=settings.method, info=info)


# ----------------------------------------------------------------------------------------------
# the optimiser
# ----------------------------------------------------------------------------------------------


def sigmoid(x: float, f_max: float, f_min: float, omega: float) -> float:
    """f(x) = f_min + (f_max - f_min) / (1 + exp(-(x - beta) / omega)), f(0) = 0, overflow-safe."""
    z = (x - omega * math.log(-f_max / f_min)) / omega
    if z >= 0.0:
        e = 1.0 / (1.0 + math.exp(-z)) if z < 745.0 else 1.0
    else:
        ez = math.exp(z) if z > -745.0 else 0.0
        e = ez / (1.0 + ez)
    return f_min + (f_max - f_min) * e


@numba.njit(cache=True)
def _fused_update(theta, g, prev, step, use_prev):
    """theta -= step g; returns <g, prev> (when use_prev); then prev = g. One pass, in place."""
    inner = 0.0
    for i in range(theta.size):
        gi = g[i]
        if use_prev:
            inner += gi * prev[i]
        prev[i] = gi
        theta[i] -= step * gi
    return inner


class ASGD:
    """The ASGD iteration of one resolution level (see the module docstring).

    Create one per level (the time starts at ``initial_time`` and the previous gradient is
    forgotten), then call :meth:`step` once per iteration with the stochastic gradient at the
    current parameters. Works on NumPy or CuPy vectors (n_params,); O(n_params), no allocation
    beyond the returned vector and one gradient copy.
    """

    def __init__(self, params: ASGDParameters, *, adaptive: bool = True, initial_time: float = 0.0):
        for name in ("a", "A", "alpha", "f_max", "f_min", "omega"):
            v = getattr(params, name)
            if not (_is_real(v) and math.isfinite(float(v))):
                raise ConfigError(f"ASGD parameter {name} must be finite, got {v!r}; check the estimation")
        if params.a < 0 or params.A < 0 or params.f_max <= 0 or params.f_min >= 0 or params.omega <= 0:
            raise ConfigError(
                f"ASGD parameters need a >= 0, A >= 0, f_max > 0, f_min < 0, omega > 0, got a={params.a}, "
                f"A={params.A}, f_max={params.f_max}, f_min={params.f_min}, omega={params.omega}; fix the settings"
            )
        _check_real("initial_time (SigmoidInitialTime)", initial_time, lo=0.0, hint="use 0")
        self.params = params
        self.adaptive = bool(adaptive)
        self.time = float(initial_time)
        self.iteration = 0
        self.learning_rate = params.gain(self.time)
        self._prev = None

    @classmethod
    def from_settings(cls, settings: ASGDSettings, params: ASGDParameters | None = None) -> "ASGD":
        """An optimiser with ``settings.adaptive`` and ``settings.initial_time``; manual params if None."""
        return cls(params if params is not None else manual_parameters(settings),
                   adaptive=settings.adaptive, initial_time=settings.initial_time)

    def step_inplace(self, theta: np.ndarray, g: np.ndarray, scale: float = 1.0) -> float:
        """The same iteration as :meth:`step` for NumPy float64 vectors, in place and in one pass.

        ``theta -= scale * gamma(t_k) * g``; the time adapts with the unscaled ``g`` exactly as in
        :meth:`step` (``scale`` lets a driver shorten one step without changing the adaptation).
        Returns the learning rate gamma(t_k) used. No allocation: the driver's hot loop.
        """
        if g.shape != theta.shape:
            raise ValueError(f"gradient shape {g.shape} differs from parameter shape {theta.shape}")
        lr = self.rate()
        if self._prev is None:
            self._prev = np.empty_like(g)
            has_prev = False
        else:
            has_prev = True
        inner = _fused_update(theta, g, self._prev, lr * scale, has_prev and self.adaptive)
        self.advance(inner if has_prev else None)
        return lr

    def rate(self) -> float:
        """The learning rate gamma(t_k) = a / (A + t_k + 1)^alpha of the coming step (also kept in
        ``learning_rate``)."""
        p = self.params
        self.learning_rate = p.a / (p.A + self.time + 1.0) ** p.alpha
        return self.learning_rate

    def advance(self, inner: float | None) -> None:
        """Move the time on after a step whose gradient had inner product ``inner`` with the
        previous one (None for the first step of the level). For drivers that update the
        parameters themselves (e.g. on the GPU) and only hand back that scalar."""
        p = self.params
        if self.adaptive:
            if inner is not None:
                self.time = max(0.0, self.time + sigmoid(-inner, p.f_max, p.f_min, p.omega))
        else:
            self.time += 0.5 * (p.f_max + p.f_min)
        self.iteration += 1

    def step(self, theta, g, out=None):
        """Return theta - gamma(t_k) g and advance the time with <g_k, g_{k-1}>.

        theta, g: (n_params,) arrays (NumPy or CuPy); out: optional array for the result (may be
        theta itself for an in-place update). The learning rate used is in ``self.learning_rate``.
        """
        if g.shape != theta.shape:
            raise ValueError(f"gradient shape {g.shape} differs from parameter shape {theta.shape}")
        p = self.params
        lr = p.a / (p.A + self.time + 1.0) ** p.alpha
        self.learning_rate = lr
        if out is None:
            new = theta - lr * g
        else:
            out[...] = theta - lr * g
            new = out
        if self.adaptive:
            if self._prev is not None:
                # not ndarray.dot: a threaded BLAS dot costs ~10x more on a busy machine
                inner = float((g * self._prev).sum())
                self.time = max(0.0, self.time + sigmoid(-inner, p.f_max, p.f_min, p.omega))
                self._prev[...] = g
            else:
                self._prev = g.copy()
        else:
            self.time += 0.5 * (p.f_max + p.f_min)
        self.iteration += 1
        return new
