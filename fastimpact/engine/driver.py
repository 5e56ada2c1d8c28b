"""The registration driver: inputs -> pyramid -> initial transform -> per stage and level: term,
sampler, cost function, optimisation -> result.

Geometry: every point is in world RAS mm. For a fixed voxel index ``i`` of a level, the world
point is ``x = F i``; the moving point is ``y = A(x) + u(x)``; its continuous moving voxel index
is ``q = M^-1 y``. The moving image is a cubic B-spline (prefiltered coefficients), sampled with
its gradient ``dm/dq``; ``dm/dy = M_lin^-T dm/dq``.
"""

from __future__ import annotations

import time
from typing import Callable

from ..backend import onnx_providers, resolve_device, set_threads
from ..config import RegistrationConfig
from ..features.precision import check_precision
from ..inputs import load_inputs
from ..optimizers import default_max_step_length
from ..result import Result
from ..samplers import RandomSampler
from ..transforms.parameterisation import PARAMETERISATIONS
from ..vocabulary import STAGES
from .cost import CostFunction, overlap_region
from .estimation import LevelRun
from .initial import initial_transform
from .levels import Levels, patch_inside_mask
from .optimise import optimise
from .report import run_report
from .terms import TermFactory

__all__ = ["register"]


def register(fixed, moving, *, fixed_mask=None, moving_mask=None, config: RegistrationConfig | None = None,
             callback: Callable | None = None, **options) -> Result:
    """Register ``moving`` to ``fixed``.

    fixed, moving, masks: file paths, fastimpact.Image, or (array, affine) pairs (affine: voxel
    index -> world RAS mm). Options are RegistrationConfig fields (metric, levels, iterations,
    samples, grid_spacing, affine, seed, threads, device, ...) and override ``config``.
    callback(event: str, info: dict) is called with 'level_start', 'iteration', 'level_end' (whose
    info holds the level's report and the current ``transform``).
    Returns a Result; ``result.save(outdir)`` writes the standard outputs.
    """
    cfg = (config or RegistrationConfig()).with_options(**options) if options else (config or RegistrationConfig())
    backend, providers, device_note = _device(cfg)
    set_threads(cfg.threads)
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    inputs = load_inputs(fixed, moving, fixed_mask, moving_mask, cfg, backend)
    timings["load"] = time.perf_counter() - t_start
    levels = Levels(inputs, cfg, timings)
    transform, radius = initial_transform(cfg, inputs)
    report = run_report(cfg, backend, device_note, inputs, transform, levels.plan)
    terms = TermFactory(cfg, inputs, levels, backend, providers, timings)
    max_step = float(cfg.max_step) if cfg.max_step is not None else default_max_step_length(
        inputs.fixed.spacing, inputs.moving.spacing)
    for stream, (stage, iterations) in enumerate(_stages(cfg)):
        t_stage = time.perf_counter()
        stage_cls = PARAMETERISATIONS[stage]
        for li in range(cfg.levels):
            stage_cls.enter_level(transform, inputs.fixed.shape, inputs.fixed.affine, cfg.grid_spacings()[li])
            if iterations[li] == 0:
                continue
            param = stage_cls(transform, levels[li].fixed.affine, radius, backend)
            term = terms.stage_term(li, stage_cls, transform, cfg.per_level("bending_weight")[li])
            cost = _cost_function(levels, li, term, param, cfg, backend, stream, report)
            run = LevelRun(stage, li, iterations[li], max_step, cfg.seed + 7919 * li, cfg.asgd_estimation, callback)
            report["stages"].append(optimise(cost, run))
        timings[f"{stage}_stage"] = time.perf_counter() - t_stage
    timings["total_registration"] = time.perf_counter() - t_start
    return _result(transform, inputs, cfg, report, timings, backend, levels)


def _device(cfg):
    """(backend, ONNX providers or None, note on the device choice)."""
    backend, note = resolve_device(cfg.device)
    providers = None
    if cfg.uses_impact():
        check_precision(cfg.precision, backend)
        providers, provider_note = onnx_providers(backend)
        note = "; ".join(n for n in (note, provider_note) if n)
    return backend, providers, note


def _stages(cfg):
    """(stage, iterations per level) of the stages that run, in order."""
    runs = {"rigid": cfg.rigid, "affine": cfg.affine, "bspline": True}
    its = {"rigid": cfg.per_level("rigid_iterations"), "affine": cfg.per_level("affine_iterations"),
           "bspline": cfg.per_level("iterations")}
    return [(s, its[s]) for s in STAGES if runs[s] and sum(its[s])]


def _cost_function(levels, li, term, param, cfg, backend, stream, report) -> CostFunction:
    """The level's cost function, sampling where the term's support allows: inside the receptive
    fields (static features), with whole patches inside the fixed mask (patches), and where the
    transform reaches the moving image's support (static features)."""
    lv = levels[li]
    support = term.support
    if support.receptive_radius_mm > 0 or support.overlap_sampling:
        lv = levels.receptive_support(li, support.receptive_radius_mm, report)
    sample_mask = lv.fixed_mask
    if support.patch_offsets is not None and sample_mask is not None:
        sample_mask = patch_inside_mask(sample_mask, lv.fixed.affine, support.patch_offsets)
    n = cfg.per_level("samples")[li]
    sampler = RandomSampler(lv.fixed.shape, sample_mask, n, cfg.seed, stream=(stream, li), backend=backend)
    cost = CostFunction(lv, term, sampler, param, backend, li)
    if support.overlap_sampling:
        region = overlap_region(cost, sample_mask)
        if region is not None:
            lv = lv.with_masks(region, lv.moving_mask)
            sampler = RandomSampler(lv.fixed.shape, region, n, cfg.seed, stream=(stream, li), backend=backend)
            cost = CostFunction(lv, term, sampler, param, backend, li)
    return cost


def _result(transform, inputs, cfg, report, timings, backend, levels) -> Result:
    report["timings_s"] = {k: round(v, 4) for k, v in timings.items()}
    report["final_affine"] = transform.affine.to_dict()
    if transform.coef is not None:
        report["bspline_grid"] = {"shape": list(transform.grid.shape), "spacing_mm": transform.grid.spacing.tolist()}
    # the output warp reuses the finest level's prefilter when that level is the input image
    return Result(transform, inputs.fixed_f32, inputs.moving, cfg, report, backend, fixed_mask=inputs.fixed_mask,
                  moving_coef=levels.finest_moving_coef())
