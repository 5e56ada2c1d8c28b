"""The report of a registration: the run's header and one entry per optimised level."""

from __future__ import annotations

import platform

from .. import __version__

__all__ = ["level_report", "run_report", "versions"]


def versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("numpy", "scipy", "numba", "nibabel"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # pragma: no cover - optional
            out[mod] = None
    return out


def run_report(cfg, backend, device_note, inputs, transform, plan) -> dict:
    """The report's header (before any level runs)."""
    return {
        "fastimpact_version": __version__,
        "versions": versions(),
        "device": backend,
        "device_note": device_note,
        "seed": cfg.seed,
        "config": cfg.to_dict(),
        "fixed": {"shape": list(inputs.fixed.shape), "spacing_mm": inputs.fixed.spacing.tolist()},
        "moving": {"shape": list(inputs.moving.shape), "spacing_mm": inputs.moving.spacing.tolist()},
        "initial_affine": transform.affine.to_dict(),
        "pyramid": plan.describe(),
        "memory_estimate_gib": round(inputs.memory_estimate.total / 1024**3, 3),
        **({"field_of_view": inputs.fov_notes} if inputs.fov_notes else {}),
        "stages": [],
    }


def level_report(cost, run, values, clipped, elapsed, t_est, params, opt, **extra) -> dict:
    """The report entry of one optimised level (both the host and the GPU-resident loop)."""
    lv = cost.level
    return {
        "stage": run.stage,
        "level": run.level + 1,
        "image_shape": list(lv.fixed.shape),
        "spacing_mm": [round(float(s), 4) for s in lv.fixed.spacing],
        "iterations": run.iterations,
        "n_parameters": cost.n_params,
        "metric_start": float(values[0]),
        "metric_end": float(values[-1]),
        "metric_end_mean10": float(values[-10:].mean()),
        "valid_samples_last": cost.last_valid,
        "clipped_steps": clipped,
        "time_s": round(elapsed, 4),
        "estimation_time_s": round(t_est, 4),
        **extra,
        "asgd": {"a": params.a, "A": params.A, "alpha": params.alpha, "f_max": params.f_max,
                 "f_min": params.f_min, "omega": params.omega, "final_time": opt.time,
                 **{k: float(v) for k, v in params.info.items()}},
    }
