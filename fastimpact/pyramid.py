"""Multi-resolution pyramid in physical space.

Every level ``l`` of an ``L``-level pyramid has a **target spacing** in mm, the same for the
fixed and the moving image: ``t_l = 2**(L-1-l) * s`` with ``s`` the smallest voxel spacing of
the two images (so 4 s / 2 s / s for three levels). Each image axis is shrunk by its own factor
``f_a = max(1, t_l / spacing_a)``, so no axis becomes coarser than the level's target: a 5 mm
slice axis stays as it is until the in-plane spacing catches up with it, and two images on
different grids meet at the same spacing in mm on every level. Before shrinking, an axis is
smoothed by a Gaussian of sigma ``0.5 f_a`` voxels (``0.5 t_l`` mm, elastix's choice of 0.5
times the shrink factor); an axis that is not shrunk is not smoothed.

Two kinds of pyramid (``RegistrationConfig.pyramid``):

* ``shrink`` (default; elastix's recursive pyramid): smoothing + resampling on a grid with
  ``f_a`` times the spacing, the same direction cosines and ``ceil(n_a / f_a)`` voxels centred on
  the original box, so every level covers the same physical region.
* ``smooth`` (elastix's smoothing pyramid): smoothing only, every level on the image's own grid,
  sigma ``0.5 t_l`` mm on every axis, the finest level included (as elastix does).

``pyramid_schedule`` gives explicit per-level, per-axis shrink factors in voxels of each image
(elastix's ``FixedImagePyramidSchedule``); ``pyramid_sigma`` explicit smoothing sigmas in mm.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ConfigError
from .image import Image

PYRAMID_KINDS = ("shrink", "smooth")
_SNAP = 1e-3  # factors within this of an integer are that integer (no sub-voxel resampling)


def default_factors(levels: int) -> list[int]:
    if not isinstance(levels, (int, np.integer)) or isinstance(levels, bool) or levels < 1 or levels > 8:
        raise ConfigError(f"levels={levels!r} is invalid: use an integer from 1 to 8 (e.g. --levels 3)")
    return [2 ** (levels - 1 - i) for i in range(levels)]


@dataclass(frozen=True)
class LevelPlan:
    """The geometry of one level for one image: per-axis shrink ``factors`` (>= 1, voxels of the
    original image) and Gaussian ``sigma_mm`` per axis (0: no smoothing)."""

    factors: tuple
    sigma_mm: tuple

    def shape_affine(self, shape, affine):
        return level_geometry(shape, affine, self.factors)


@dataclass(frozen=True)
class PyramidPlan:
    """Per level (coarse to fine): the target spacing (mm) and each image's :class:`LevelPlan`."""

    kind: str
    target_mm: tuple
    fixed: tuple
    moving: tuple

    def describe(self) -> list[dict]:
        """Report entries: target spacing and per-axis factors / sigmas of both images."""
        return [
            {"level": i + 1, "target_spacing_mm": round(float(t), 4),
             "fixed_factors": [round(float(f), 4) for f in fp.factors],
             "moving_factors": [round(float(f), 4) for f in mp.factors],
             "fixed_sigma_mm": [round(float(s), 4) for s in fp.sigma_mm],
             "moving_sigma_mm": [round(float(s), 4) for s in mp.sigma_mm]}
            for i, (t, fp, mp) in enumerate(zip(self.target_mm, self.fixed, self.moving))
        ]


def _snap(f: np.ndarray) -> np.ndarray:
    f = np.maximum(np.asarray(f, dtype=np.float64), 1.0)
    r = np.round(f)
    return np.where(np.abs(f - r) < _SNAP, r, f)


def axis_factors(spacing, target_mm: float) -> np.ndarray:
    """Per-axis shrink factors that bring ``spacing`` (mm) to ``target_mm`` without making any
    axis coarser than the target (an axis already coarser keeps factor 1)."""
    return _snap(float(target_mm) / np.asarray(spacing, dtype=np.float64))


def _per_axis(value, name: str, level: int) -> np.ndarray:
    """One level's entry of a schedule: a number (all axes) or three numbers (a string "4 4 1" or
    a list)."""
    if isinstance(value, str):
        parts = value.replace(",", " ").split()
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        parts = [value]
    try:
        vals = np.array([float(p) for p in parts], dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} entry {value!r} of level {level + 1} is invalid: give one number or three "
                          "(one per image axis), e.g. '4 4 1'") from None
    if vals.size == 1:
        vals = np.repeat(vals, 3)
    if vals.size != 3 or not np.all(np.isfinite(vals)):
        raise ConfigError(f"{name} entry {value!r} of level {level + 1} is invalid: give one number or three "
                          "(one per image axis), e.g. '4 4 1'")
    return vals


def plan_pyramid(fixed_spacing, moving_spacing, levels: int, kind: str = "shrink", schedule=None,
                 sigmas=None) -> PyramidPlan:
    """The pyramid of a registration.

    fixed_spacing / moving_spacing: (3,) voxel spacings in mm of the full-resolution images.
    schedule: None, or one entry per level (coarse to fine) of shrink factors in voxels (a number
    or three), applied to both images as elastix applies ``FixedImagePyramidSchedule``.
    sigmas: None, or one entry per level of Gaussian sigmas in mm (a number or three).
    """
    if kind not in PYRAMID_KINDS:
        raise ConfigError(f"pyramid={kind!r} is invalid: choose one of {', '.join(PYRAMID_KINDS)}")
    fs = np.asarray(fixed_spacing, dtype=np.float64)
    ms = np.asarray(moving_spacing, dtype=np.float64)
    base = float(min(fs.min(), ms.min()))
    mult = np.array(default_factors(levels), dtype=np.float64)
    target = tuple(float(m * base) for m in mult)

    def check_len(value, name):
        if value is None:
            return None
        entries = list(value) if isinstance(value, (list, tuple)) else [value]
        if len(entries) == 1:
            entries = entries * levels
        if len(entries) != levels:
            raise ConfigError(f"{name} has {len(entries)} entries for {levels} levels: give one per level "
                              f"(coarse to fine) or one for all")
        return entries

    sched = check_len(schedule, "pyramid_schedule")
    sig = check_len(sigmas, "pyramid_sigma")
    plans = {"fixed": [], "moving": []}
    for li in range(levels):
        s_entry = None if sig is None else _per_axis(sig[li], "pyramid_sigma", li)
        if s_entry is not None and np.any(s_entry < 0):
            raise ConfigError(f"pyramid_sigma of level {li + 1} is negative: give sigmas >= 0 mm")
        for role, spacing in (("fixed", fs), ("moving", ms)):
            if sched is not None:
                f = _per_axis(sched[li], "pyramid_schedule", li)
                if np.any(f < 1):
                    raise ConfigError(f"pyramid_schedule of level {li + 1} has a factor below 1: shrink factors "
                                      "are >= 1 (1 = full resolution)")
                f = _snap(f)
                t_axis = f * spacing  # the schedule's spacing of each axis
            else:
                f = axis_factors(spacing, target[li])
                t_axis = np.maximum(target[li], spacing)
            if kind == "smooth":
                # elastix's smoothing pyramid: no shrinking, sigma 0.5 x factor x spacing on every
                # axis, also at the finest level
                sigma = 0.5 * (f * spacing if sched is not None else np.full(3, target[li]))
                f = np.ones(3)
            else:
                sigma = np.where(f > 1.0, 0.5 * t_axis, 0.0)
            if s_entry is not None:
                sigma = s_entry.copy()
            plans[role].append(LevelPlan(tuple(float(v) for v in f), tuple(float(v) for v in sigma)))
    return PyramidPlan(kind, target, tuple(plans["fixed"]), tuple(plans["moving"]))


def level_geometry(shape, affine, factor):
    """Shape, affine and level-voxel -> original-voxel matrix of the grid with ``factor`` (one
    number or one per axis) times the spacing over the same box."""
    shape = np.asarray(shape)
    f = np.broadcast_to(np.asarray(factor, dtype=np.float64), (3,))
    new_shape = np.maximum(1, np.ceil(shape / f - 1e-9)).astype(int)
    offset = ((shape - 1) - f * (new_shape - 1)) / 2.0  # in original voxels, >= 0
    to_orig = np.eye(4)
    to_orig[:3, :3] = np.diag(f)
    to_orig[:3, 3] = offset
    return tuple(int(n) for n in new_shape), np.asarray(affine, float) @ to_orig, to_orig


def _resample(src: np.ndarray, src_to_orig: np.ndarray, shape, to_orig: np.ndarray, order: int) -> np.ndarray:
    """Sample ``src`` (a level whose voxel i is original voxel src_to_orig i) on a coarser level."""
    from scipy import ndimage

    m = np.linalg.solve(src_to_orig, to_orig)  # coarse voxel -> src voxel (diagonal + offset)
    return ndimage.affine_transform(src, np.diag(m[:3, :3]), offset=m[:3, 3], output_shape=shape,
                                    order=order, mode="nearest")


def _as_plans(factors, sigmas_mm, spacing) -> list[LevelPlan]:
    plans = []
    for i, f in enumerate(factors):
        if isinstance(f, LevelPlan):
            plans.append(f)
            continue
        fa = _snap(np.broadcast_to(np.asarray(f, dtype=np.float64), (3,)))
        if sigmas_mm is None:
            sig = np.where(fa > 1.0, 0.5 * fa * spacing, 0.0)
        else:
            sig = np.broadcast_to(np.asarray(sigmas_mm[i], dtype=np.float64), (3,))
        plans.append(LevelPlan(tuple(float(v) for v in fa), tuple(float(v) for v in sig)))
    return plans


def build_pyramid(image: Image, factors, *, is_mask: bool = False, sigmas_mm=None) -> list[Image]:
    """The levels of ``image`` (coarse to fine).

    factors: per level a :class:`LevelPlan`, or a shrink factor (one number or one per axis;
    sigma then 0.5 f voxels on every shrunk axis, or ``sigmas_mm`` per level).
    Images are computed as a cascade, finest first: each coarser level smooths the next finer
    one by the missing sigma per axis, sqrt(s^2 - s_finer^2), and resamples it (linear), so the
    full-resolution volume is filtered once (levels whose factors or sigmas do not grow on
    every axis are computed from the original instead). Masks are resampled with nearest
    neighbour from the original and never smoothed. Returns float32 images (masks: bool).
    """
    from scipy import ndimage

    spacing = image.spacing
    plans = _as_plans(factors, sigmas_mm, spacing)
    order = sorted(range(len(plans)), key=lambda i: (np.prod(plans[i].factors), np.sum(plans[i].sigma_mm)))
    out: list[Image | None] = [None] * len(plans)
    orig = np.asarray(image.data > 0) if is_mask else np.asarray(image.data, dtype=np.float32)
    prev_data, prev_to_orig = orig, np.eye(4)
    prev_f, prev_sig = np.ones(3), np.zeros(3)
    for i in order:
        p = plans[i]
        f, sig = np.asarray(p.factors), np.asarray(p.sigma_mm)
        identity = np.all(f == 1.0)
        if is_mask:
            if identity:
                out[i] = image.with_data(np.asarray(image.data > 0))
            else:
                shape, affine, to_orig = level_geometry(image.shape, image.affine, f)
                data = _resample(np.asarray(image.data > 0, dtype=np.float32), np.eye(4), shape, to_orig, 0) > 0.5
                out[i] = Image(data, affine)
            continue
        if not (np.all(f >= prev_f) and np.all(sig >= prev_sig)):  # not a cascade: from the original
            prev_data, prev_to_orig, prev_f, prev_sig = orig, np.eye(4), np.ones(3), np.zeros(3)
        extra_mm = np.sqrt(np.maximum(sig**2 - prev_sig**2, 0.0))
        extra_vox = extra_mm / (prev_f * spacing)
        if identity and not np.any(extra_vox > 0):
            out[i] = image.with_data(prev_data if prev_data is orig else orig)
            continue
        data = prev_data
        if np.any(extra_vox > 0):
            data = ndimage.gaussian_filter(data, sigma=tuple(float(s) for s in extra_vox), mode="nearest", truncate=3.0)
        if identity:
            to_orig, affine = np.eye(4), np.asarray(image.affine, float)
        else:
            shape, affine, to_orig = level_geometry(image.shape, image.affine, f)
            if not np.allclose(to_orig, prev_to_orig):
                data = _resample(data, prev_to_orig, shape, to_orig, 1)
        data = np.asarray(data, dtype=np.float32)
        prev_data, prev_to_orig, prev_f, prev_sig = data, to_orig, f, np.maximum(sig, prev_sig)
        out[i] = Image(data, affine)
    return out


def check_level_shapes(plan: PyramidPlan, fixed_shape, moving_shape) -> None:
    """Every axis of every level keeps at least 4 voxels, else a clear error."""
    for role, shape, plans in (("fixed", fixed_shape, plan.fixed), ("moving", moving_shape, plan.moving)):
        for li, p in enumerate(plans):
            s, _, _ = level_geometry(shape, np.eye(4), p.factors)
            if min(s) < 4:
                raise ConfigError(
                    f"level {li + 1} of the pyramid shrinks the {role} image to {list(s)} voxels (factors "
                    f"{[round(v, 3) for v in p.factors]}): every axis needs at least 4; use fewer --levels or a "
                    "smaller pyramid schedule"
                )


def downsample(image: Image, factor, *, is_mask: bool = False) -> Image:
    """One pyramid level of ``image`` for a shrink ``factor`` (one number or one per axis)."""
    return build_pyramid(image, [factor], is_mask=is_mask)[0]


__all__ = ["PYRAMID_KINDS", "LevelPlan", "PyramidPlan", "axis_factors", "build_pyramid", "check_level_shapes",
           "default_factors", "downsample", "level_geometry", "plan_pyramid"]
