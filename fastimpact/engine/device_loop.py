"""The ASGD loop of one level kept on the GPU (``--device cuda``).

A level runs here when its term has a device form (a weighted sum of MSE, NCC and Mattes MI: no
IMPACT term, no bending penalty) and its parameterisation has one (affine or B-spline). Every
iteration runs on the GPU from the sample draw to the parameter update:

1. counter-based sample draw (the same voxels the CPU would draw, ``RandomSampler``);
2. ``sample_pairs``: fixed values, mapped points, moving values and gradients of the kept points;
3. the term's device form: from the samples' moments (one reduction, shared by the terms) or its
   own kernels (MI), the value and the coefficients of the derivative, which ``scale_gradient``
   applies to the moving gradients in place;
4. the parameterisation's device step (B-spline: the sparse adjoint into a gradient grid that stays
   on the GPU, the step bound and the fused ASGD update; affine: 12 sums to the host, whose update
   is the CPU's).

The step-size estimation at the level's start is the host's (a few evaluations, once per level).
"""

from __future__ import annotations

import time

import numpy as np

from ..kernels import get_kernel
from ..metrics.term import DeviceSamples
from .cost import check_valid_samples
from .estimation import start_level
from .report import level_report

__all__ = ["runs_on_device", "device_loop"]


def runs_on_device(cost) -> bool:
    """True when the level's cost can run entirely on the GPU (see the module docstring)."""
    return cost.backend == "cuda" and cost.param.has_device_form and cost.term.device_form() is not None


def device_loop(cost, run) -> dict:
    """Run one level's ASGD iterations on the GPU; same contract and report as the host loop."""
    from ..kernels import cuda_loop  # numba.cuda: imported on the cuda backend only

    t0 = time.perf_counter()
    opt, params, t_est, guard = start_level(cost, run)
    lv = cost.level
    k_pairs = get_kernel("sample_pairs", "cuda")
    k_moments = cuda_loop.moments
    k_scale = cuda_loop.scale_gradient
    form = cost.term.device_form()
    session = cost.param.device_session(lv.moving_inv, lv.fixed.shape)
    fixed_values, moving_coef, moving_mask = lv.on_device("cuda")
    minv = lv.moving_inv
    values = np.empty(run.iterations)
    n_req = cost.sampler.n_samples
    buffer = None
    for it in range(run.iterations):
        flat = cost.sampler.draw_flat_device()
        f2m, coef, idx_to_grid = session.pair_arguments()
        f, m, gy, pts, _ = k_pairs(flat, fixed_values, lv.fixed.shape, f2m, moving_coef, moving_mask, coef,
                                   idx_to_grid, minv[:3, :3])
        kept = int(f.shape[0])
        cost.last_valid = kept
        check_valid_samples(kept, n_req, lv, run.stage, run.level)
        samples = DeviceSamples(f, m, k_moments, buffer)
        c = form(samples)
        buffer = samples.buffer
        k_scale(gy, f, m, c.cm, c.cf, c.c0, c.dmi, c.dmi_weight)
        values[it] = c.value
        session.step(opt, gy, pts, opt.rate(), guard)
        run.emit("iteration", {"stage": run.stage, "level": run.level, "iteration": it, "value": c.value})
    session.finish()
    return level_report(cost, run, values, guard.clipped, time.perf_counter() - t0, t_est, params, opt,
                        loop="device")
