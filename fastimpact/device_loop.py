"""The ASGD loop of one level kept on the GPU (``--device cuda``, classic metrics).

For levels whose cost is a weighted sum of MSE, NCC and Mattes MI (no IMPACT term, no bending
penalty), every iteration runs on the GPU from the sample draw to the parameter update:

1. counter-based sample draw (the same voxels the CPU would draw, ``RandomSampler``);
2. ``sample_pairs``: fixed values, mapped points, moving values and gradients of the kept points;
3. the metric: two reduction kernels give the moments MSE and NCC need, MI its own kernels; the
   host turns those scalars into the metric value and the coefficients of the derivative, which
   one kernel applies to the moving gradients in place;
4. B-spline stage: the sparse adjoint (``bspline_scatter``, float64 atomics) into a gradient grid
   that stays on the GPU, the step bound (per-component max), and the fused ASGD update
   (``theta -= step g``, ``<g, g_prev>``, ``g_prev = g``). Affine stage: 12 sums to the host,
   whose update is the CPU's.

The host reads per iteration: the kept count, 8 moments, MI's value (with MI), 3 maxima and the
ASGD inner product. The step-size estimation at the level's start stays on the hybrid path (a
few evaluations, once per level). Levels with an IMPACT term or a bending penalty use the
hybrid path: the kernels on the GPU, the metric and the optimiser on the host.
"""

from __future__ import annotations

import math
import time

import numpy as np

from .errors import RegistrationError

__all__ = ["eligible", "optimise_on_device"]

DEVICE_METRICS = ("mse", "ncc", "mi")
NCC_CONSTANT_RTOL = 1e-12  # as metrics.ncc.CONSTANT_RTOL


def eligible(cost) -> bool:
    """True when the level's cost can run entirely on the GPU (see the module docstring)."""
    return (cost.backend == "cuda" and cost.impact is None and cost.stage in ("affine", "bspline")
            and not (cost.bending is not None and cost.bending_weight > 0)
            and bool(cost.terms) and all(getattr(m, "name", "") in DEVICE_METRICS for _, m in cost.terms))


class _DeviceMetric:
    """Value and derivative coefficients of the weighted metric terms from device samples."""

    def __init__(self, terms):
        from .kernels import cuda_loop

        self.terms = list(terms)
        self.k = cuda_loop
        self._moments = None

    def __call__(self, f, m, gy) -> float:
        """The weighted metric value; ``gy`` (K, 3) becomes d value / d moving point, in place."""
        k = int(f.shape[0])
        need_moments = any(mt.name in ("mse", "ncc") for _, mt in self.terms)
        cm = cf = c0 = 0.0
        value = 0.0
        dmi, wmi = None, 0.0
        if need_moments:
            self._moments = self.k.moments(f, m, self._moments)
            s = self._moments.copy_to_host()
            sum_f, sum_m, cff, cmm, cfm, ssd, max_f, max_m = (float(v) for v in s)
        for w, mt in self.terms:
            if mt.name == "mse":
                value += w * ssd / k
                cm += w * 2.0 / k
                cf -= w * 2.0 / k
            elif mt.name == "ncc":
                constant = (cff <= k * (NCC_CONSTANT_RTOL * max_f) ** 2 or cmm <= k * (NCC_CONSTANT_RTOL * max_m) ** 2)
                if constant:
                    continue  # value 0, derivative 0 (as metrics.ncc)
                denom = math.sqrt(cff * cmm)
                ncc = cfm / denom
                value -= w * ncc
                # d(-NCC)/dm_i = -(f_i - mean f) / denom + (NCC / cmm) (m_i - mean m)
                cf -= w / denom
                cm += w * ncc / cmm
                c0 += w * (sum_f / k) / denom - w * (ncc / cmm) * (sum_m / k)
            else:  # mi
                from .kernels import mi_cuda

                v, d = mi_cuda.mattes_mi(f, m, derivative=True, **mt.kernel_arguments())
                if dmi is not None:
                    raise RegistrationError("two MI terms in one metric are not supported on the GPU; combine them")
                # the metric is -MI (metrics.mi): value and derivative change sign
                value -= w * float(v)
                dmi, wmi = d, -w
        self.k.scale_gradient(gy, f, m, cm, cf, c0, dmi, wmi)
        return value


def optimise_on_device(cost, iterations: int, lv, cfg, callback, stage: str, li: int, max_step: float) -> dict:
    """Run one level's ASGD iterations on the GPU; same contract and report as the host loop."""
    from numba import cuda

    from .kernels import cuda_loop, get_kernel
    from .optimizers import ASGD
    from .registration import MIN_VALID_FRACTION, MIN_VALID_POINTS, STEP_LIMIT, _estimate_asgd, level_report

    t0 = time.perf_counter()
    settings, params = _estimate_asgd(cost, iterations, max_step, cfg.seed + 7919 * li, cfg.asgd_estimation)
    opt = ASGD.from_settings(settings, params)
    t_est = time.perf_counter() - t0
    k_pairs = get_kernel("sample_pairs", "cuda")
    k_scatter = get_kernel("bspline_scatter", "cuda")
    metric = _DeviceMetric(cost.terms)
    fixed_values, moving_coef, moving_mask = lv.on_device("cuda")
    minv = lv.moving_inv
    fa = cost.fixed_affine
    bspline = stage == "bspline"
    tr = cost.transform
    if bspline:
        coef = cuda.to_device(np.ascontiguousarray(tr.coef, dtype=np.float64))
        coef_flat = coef.reshape(coef.size)
        grad = cuda.device_array(coef.shape, dtype=np.float64)
        prev = cuda.device_array(coef.size, dtype=np.float64)
        f2m = minv @ tr.affine.as_matrix() @ fa  # the affine part is fixed in this stage
    else:
        theta = cost.get_parameters()
    values = np.empty(iterations)
    limit = STEP_LIMIT * max_step
    clipped = 0
    n_req = cost.sampler.n_samples
    if callback:
        callback("level_start", {"stage": stage, "level": li, "iterations": iterations})
    for it in range(iterations):
        flat = cost.sampler.draw_flat_device()
        if not bspline:
            f2m = minv @ tr.affine.as_matrix() @ fa
        f, m, gy, pts, _ = k_pairs(flat, fixed_values, lv.fixed.shape, f2m, moving_coef, moving_mask,
                                   coef if bspline else None, cost.idx_to_grid if bspline else None, minv[:3, :3])
        kept = int(f.shape[0])
        cost.last_valid = kept
        if kept < max(MIN_VALID_POINTS, MIN_VALID_FRACTION * n_req):
            raise RegistrationError(
                f"only {kept} of {n_req} sample points map inside the moving image"
                f"{' and its mask' if lv.moving_mask is not None else ''} ({stage} stage, level {li + 1}): the "
                "images are probably far apart or the masks disjoint; check the image orientations, keep the "
                "affine initialisation on, or fix the masks")
        value = metric(f, m, gy)
        values[it] = value
        gain = opt.rate()
        if bspline:
            g = k_scatter(pts, gy, tuple(tr.grid.shape), out=grad)
            g_flat = g.reshape(g.size)
            moved = gain * float(np.linalg.norm(cuda_loop.absmax3(g_flat)))
            scale = 1.0
            if moved > limit:
                scale = limit / moved
                clipped += 1
            first = it == 0  # no previous gradient yet
            inner = cuda_loop.asgd_update(coef_flat, g_flat, prev, gain * scale, not first and opt.adaptive)
            opt.advance(None if first else inner)
        else:
            s = cuda_loop.affine_sums(gy, pts)
            # world points x = fa idx + b:  sum gy (x - c)^T = S1 fa^T + S0 (b - c)^T
            s1, s0 = s[:9].reshape(3, 3), s[9:]
            gm = (s1 @ fa[:3, :3].T + np.outer(s0, fa[:3, 3] - tr.affine.center)) / cost.radius
            g = np.r_[gm.ravel(), s0]
            moved = gain * cost.max_displacement(g)
            scale = 1.0
            if moved > limit:
                scale = limit / moved
                clipped += 1
            opt.step_inplace(theta, g, scale)
            cost.set_parameters(theta)
        if callback:
            callback("iteration", {"stage": stage, "level": li, "iteration": it, "value": value})
    if bspline:
        tr.coef = coef.copy_to_host()
    return level_report(cost, lv, stage, li, iterations, values, clipped, time.perf_counter() - t0, t_est, params, opt,
                        loop="device")
