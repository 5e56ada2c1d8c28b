"""What every level's loop starts with: ASGD's automatic parameters (elastix's estimation) and the
step guard."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..optimizers import ASGD, ASGDSettings, default_n_jacobian_measurements, estimate_parameters, grid_sample_points
__all__ = ["LevelRun", "StepGuard", "estimate_asgd", "start_level", "EXACT_GRADIENT_SAMPLES", "STEP_LIMIT"]

EXACT_GRADIENT_SAMPLES = 100_000  # elastix's NumberOfSamplesForExactGradient
# A step that would move some point of the image further than this many maximum step lengths
# (elastix's MaximumStepLength, default one voxel) is scaled down to that length. ASGD's
# estimation aims at about one step length; the guard only stops a mis-estimated gain from
# throwing the transform out of the image before the adaptive step size reacts.
STEP_LIMIT = 3.0


@dataclass(frozen=True)
class LevelRun:
    """What a loop needs besides the cost function: the stage, the level, its iterations, the
    maximum step length (mm), the estimation's seed and method, and the progress callback."""

    stage: str
    level: int
    iterations: int
    max_step: float
    seed: int
    estimation: str
    callback: object = None

    def emit(self, event: str, info: dict) -> None:
        if self.callback:
            self.callback(event, info)


class StepGuard:
    """Scales down a step that would move some point further than STEP_LIMIT maximum step lengths,
    counting the steps it clipped."""

    def __init__(self, max_step: float):
        self.limit = STEP_LIMIT * max_step
        self.clipped = 0

    def scale(self, moved: float) -> float:
        """The factor for a step that moves points by at most ``moved`` mm."""
        if moved > self.limit:
            self.clipped += 1
            return self.limit / moved
        return 1.0


def estimate_asgd(cost, run: LevelRun):
    """Automatic ASGD parameters at the level's start (elastix's estimation methods)."""
    settings = ASGDSettings(iterations=run.iterations, max_step_mm=run.max_step, method=run.estimation)
    lv = cost.level
    n_probe = default_n_jacobian_measurements(cost.n_params, settings)
    probe = grid_sample_points(lv.fixed.shape, n_probe, lv.fixed_mask).astype(np.float64)
    jac = cost.param.probe(probe)
    n_exact = cost.term.exact_gradient_samples(cost.sampler.n_samples, EXACT_GRADIENT_SAMPLES)
    exact_idx = grid_sample_points(lv.fixed.shape, n_exact, lv.fixed_mask)
    exact_flat = np.ravel_multi_index(tuple(exact_idx.T), lv.fixed.shape)
    theta0 = cost.get_parameters()

    # copies: the cost function reuses one gradient buffer between calls
    def gradient(theta, _seed):
        cost.set_parameters(theta)
        return cost.evaluate()[1].copy()

    def exact_gradient(theta):
        cost.set_parameters(theta)
        return cost.evaluate_at(exact_flat)[1].copy()

    params = estimate_parameters(settings, jac, theta0, gradient, exact_gradient=exact_gradient, rng=run.seed)
    cost.set_parameters(theta0)
    return settings, params


def start_level(cost, run: LevelRun):
    """(optimiser, its parameters, estimation time, step guard) at a level's start; emits level_start."""
    t0 = time.perf_counter()
    settings, params = estimate_asgd(cost, run)
    opt = ASGD.from_settings(settings, params)
    t_est = time.perf_counter() - t0
    run.emit("level_start", {"stage": run.stage, "level": run.level, "iterations": run.iterations})
    return opt, params, t_est, StepGuard(run.max_step)
