"""The level's ASGD loop on the host (the cost function's kernels may run on the GPU)."""

from __future__ import annotations

import time

import numpy as np

from .estimation import LevelRun, start_level
from .report import level_report

__all__ = ["host_loop"]


def host_loop(cost, run: LevelRun) -> dict:
    """The level's ASGD iterations with the cost function on the host (its kernels may run on the
    GPU); returns the level's report."""
    t0 = time.perf_counter()
    opt, params, t_est, guard = start_level(cost, run)
    theta = cost.get_parameters()
    values = np.empty(run.iterations)
    for k in range(run.iterations):
        value, g = cost.evaluate()
        values[k] = value
        # safeguard: no single step moves a point further than STEP_LIMIT maximum step lengths
        scale = guard.scale(opt.params.gain(opt.time) * cost.max_displacement(g))
        opt.step_inplace(theta, g, scale)
        cost.set_parameters(theta)
        run.emit("iteration", {"stage": run.stage, "level": run.level, "iteration": k, "value": value})
    return level_report(cost, run, values, guard.clipped, time.perf_counter() - t0, t_est, params, opt)
