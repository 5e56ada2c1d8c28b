"""The multi-resolution registration driver.

image (array + affine) -> pyramid -> sampler -> transform -> interpolator -> metric -> optimiser,
per resolution level, first for the affine stage (optional), then for the B-spline stage.

Geometry: every point is in world RAS mm. For a fixed voxel index ``i`` of a level, the world
point is ``x = F i``; the moving point is ``y = A(x) + u(x)``; its continuous moving voxel index
is ``q = M^-1 y``. The moving image is a cubic B-spline (prefiltered coefficients), sampled with
its gradient ``dm/dq``; ``dm/dy = M_lin^-T dm/dq``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import __version__
from .config import RegistrationConfig
from .errors import ConfigError, ImageError, RegistrationError
from .image import Image
from .transforms import AffineTransform, BendingEnergy, BSplineGrid, CompositeTransform, refine_coefficients

# A sample set with fewer valid points than this fraction of those drawn is an error.
MIN_VALID_FRACTION = 0.125
MIN_VALID_POINTS = 16


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------
def as_image(obj, role: str, *, mask: bool = False) -> Image:
    """Accept a path, an Image or an (array, affine) pair."""
    from .io import load_image

    if obj is None:
        return None
    if isinstance(obj, Image):
        img = obj
    elif isinstance(obj, (str, Path)):
        img = load_image(obj, role=role)
    elif isinstance(obj, tuple) and len(obj) == 2:
        img = Image(np.asarray(obj[0]), np.asarray(obj[1], dtype=np.float64))
    else:
        raise ConfigError(
            f"{role} must be a file path, a fastimpact.Image or an (array, affine) pair, got {type(obj).__name__}"
        )
    if img.data.ndim != 3:
        raise ImageError(f"{role} has shape {img.data.shape}: fastimpact registers 3-D images")
    if min(img.shape) < 1:
        raise ImageError(f"{role} is empty (shape {img.shape})")
    spacing = img.spacing
    if not np.all(np.isfinite(img.affine)) or np.any(spacing <= 0) or abs(np.linalg.det(img.affine[:3, :3])) < 1e-12:
        raise ImageError(f"{role} has an invalid voxel spacing {np.round(spacing, 6).tolist()}: fix the image header (affine)")
    if mask:
        return img
    data = img.data
    if np.issubdtype(data.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
            raise ImageError(f"{role} contains {bad} NaN/Inf voxels: replace them (e.g. with 0) before registering")
    return img


def _check_mask(mask: Image | None, image: Image, role: str) -> np.ndarray | None:
    if mask is None:
        return None
    if mask.shape != image.shape or not np.allclose(mask.affine, image.affine, atol=1e-4):
        raise ImageError(
            f"{role} mask is not on the {role} image grid (shape {mask.shape} vs {image.shape} or a different "
            "affine): resample the mask onto the image first"
        )
    m = np.asarray(mask.data) > 0
    if not m.any():
        raise ImageError(f"{role} mask is empty (no voxel > 0): give a mask that covers the region to register")
    return m


def _check_not_constant(data: np.ndarray, mask: np.ndarray | None, role: str):
    vals = data[mask] if mask is not None else data
    if vals.size == 0 or float(vals.max()) == float(vals.min()):
        raise ImageError(
            f"{role} image is constant (every voxel{' in the mask' if mask is not None else ''} is "
            f"{float(vals.flat[0]) if vals.size else 'n/a'}): nothing to register; check the file"
        )


# --------------------------------------------------------------------------------------------
# result
# --------------------------------------------------------------------------------------------
@dataclass
class Result:
    """Outcome of a registration: the transform and how to apply it.

    ``transform`` maps fixed world points to moving world points (RAS mm).
    ``displacement`` (lazy): u(x) = T(x) - x on the fixed voxel grid, (X, Y, Z, 3) mm.
    ``warped`` (lazy): the moving image resampled on the fixed grid.
    ``quality()`` (lazy): Jacobian-determinant figures of the field (inside / outside ``fixed_mask``,
    or a foreground of the fixed image without one) and ``warnings``: lines saying what looks
    unreliable (a level whose metric rose, many clipped steps, folds, a large deformation) and what
    to try; both go into ``report`` ('quality', 'warnings') and report.json.
    """

    transform: CompositeTransform
    fixed: Image
    moving: Image
    config: RegistrationConfig
    report: dict
    backend: str = "cpu"
    _displacement: np.ndarray | None = field(default=None, repr=False)
    _warped: Image | None = field(default=None, repr=False)
    _moving_coef: np.ndarray | None = field(default=None, repr=False)
    fixed_mask: np.ndarray | None = field(default=None, repr=False)  # (X, Y, Z) bool on the fixed grid
    _jacobian: np.ndarray | None = field(default=None, repr=False)

    @property
    def displacement(self) -> np.ndarray:
        if self._displacement is None:
            t0 = time.perf_counter()
            self._displacement = self.transform.displacement_field(self.fixed.shape, self.fixed.affine, self.backend)
            self.report.setdefault("timings_s", {})["dense_field"] = round(time.perf_counter() - t0, 4)
        return self._displacement

    @property
    def warped(self) -> Image:
        if self._warped is None:
            t0 = time.perf_counter()
            self._warped = warp_image(
                self.moving, self.fixed, self.displacement, self.config.interpolation, self.backend,
                coef=self._moving_coef,
            )
            self._moving_coef = None
            self.report.setdefault("timings_s", {})["warp"] = round(time.perf_counter() - t0, 4)
        return self._warped

    def quality(self) -> dict:
        """report['quality'] (computed once; also sets report['warnings'])."""
        if "quality" not in self.report:
            from .evaluation import assess_registration

            t0 = time.perf_counter()
            quality, warnings, det = assess_registration(
                self.displacement, self.fixed.affine, stages=self.report.get("stages", ()),
                fixed_mask=self.fixed_mask, fixed_data=self.fixed.data,
                affine_matrix=self.transform.affine.as_matrix())
            self._jacobian = det
            self.report["quality"] = quality
            self.report["warnings"] = warnings
            self.report.setdefault("timings_s", {})["quality"] = round(time.perf_counter() - t0, 4)
        return self.report["quality"]

    @property
    def warnings(self) -> list[str]:
        """What looks unreliable in this result, one line each (empty when nothing does)."""
        self.quality()
        return self.report["warnings"]

    @property
    def jacobian(self) -> np.ndarray:
        """(X, Y, Z) Jacobian determinant of x -> x + u(x) on the fixed grid (<= 0: folds)."""
        if self._jacobian is None:
            from .evaluation import jacobian_determinant

            self._jacobian = jacobian_determinant(self.displacement, self.fixed.affine)
        return self._jacobian

    def save(self, outdir, *, force: bool = False, fixed_name: str | None = None, moving_name: str | None = None,
             qc: bool = False) -> dict:
        """Write warped.nii.gz, displacement.nii.gz, transform.json, report.json (and with ``qc`` the
        folder qc/ of QC pictures and report.html) atomically."""
        return save_outputs(self, outdir, force=force, fixed_name=fixed_name, moving_name=moving_name, qc=qc)


#: transform files for other tools (ITK .tfm/.h5, elastix; see fastimpact.interchange)
TRANSFORM_FILE_NAMES = ("transform.tfm", "transform.h5", "TransformParameters.0.txt", "TransformParameters.affine.txt")
OUTPUT_NAMES = ("warped.nii.gz", "displacement.nii.gz", "transform.json", "report.json") + TRANSFORM_FILE_NAMES
QC_DIR = "qc"


def save_outputs(result: Result, outdir, *, force=False, fixed_name=None, moving_name=None, qc=False) -> dict:
    import json

    from .io import output_dir, save_displacement_itk, save_image

    disp = result.displacement
    warped = result.warped
    result.quality()
    t0 = time.perf_counter()
    paths = {}
    names = list(OUTPUT_NAMES) + ([QC_DIR] if qc else [])
    with output_dir(outdir, force=force, names=names) as tmp:
        tmp = Path(tmp)
        # zlib releases the GIL: the two volumes compress in parallel.
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(2) as pool:
            jobs = [pool.submit(save_image, warped, tmp / "warped.nii.gz"),
                    pool.submit(save_displacement_itk, disp, result.fixed, tmp / "displacement.nii.gz")]
            for job in jobs:
                job.result()
        tdict = transform_document(result, fixed_name, moving_name)
        (tmp / "transform.json").write_text(json.dumps(tdict) + "\n")
        from .interchange import write_transform_files

        tool_files, tool_notes = write_transform_files(result.transform, result.fixed, tmp)
        if tool_notes:
            result.report.setdefault("notes", []).extend(tool_notes)
        if qc:
            from .image import to_numpy
            from .qc import write_qc

            tq = time.perf_counter()
            (tmp / QC_DIR).mkdir()
            rep = result.report
            write_qc(tmp / QC_DIR, result.fixed, warped, disp, det=result.jacobian,
                     mask=None if result.fixed_mask is None else to_numpy(result.fixed_mask) > 0,
                     figures={"warnings": rep.get("warnings"), "quality": rep.get("quality"),
                              "stages": rep.get("stages"), "evaluation": rep.get("evaluation")},
                     title=f"fastimpact registration: {moving_name or 'moving'} to {fixed_name or 'fixed'}",
                     links={"report.json": "../report.json", "transform.json": "../transform.json"})
            result.report["timings_s"]["qc"] = round(time.perf_counter() - tq, 4)
        result.report.setdefault("timings_s", {})["write"] = round(time.perf_counter() - t0, 4)
        (tmp / "report.json").write_text(json.dumps(result.report, indent=2, default=_json_default) + "\n")
    for name in OUTPUT_NAMES:
        if name not in TRANSFORM_FILE_NAMES:
            paths[name.split(".")[0]] = str(Path(outdir) / name)
    paths.update({key: str(Path(outdir) / name) for key, name in tool_files.items()})
    if qc:
        paths["qc"] = str(Path(outdir) / QC_DIR / "report.html")
    return paths


def transform_document(result: Result, fixed_name=None, moving_name=None) -> dict:
    return {
        "format": "fastimpact-transform",
        "version": 1,
        "fastimpact_version": __version__,
        "convention": "maps fixed world points x (RAS mm) to moving world points T(x) = A(x) + u(x)",
        "fixed": {"shape": list(result.fixed.shape), "affine": result.fixed.affine.tolist(), "path": fixed_name},
        "moving": {"path": moving_name},
        "transform": result.transform.to_dict(),
        "config": result.config.to_dict(),
    }


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def warp_image(moving: Image, reference: Image, displacement: np.ndarray, interpolation: str,
               backend: str = "cpu", coef: np.ndarray | None = None, fill: float = 0.0) -> Image:
    """Resample ``moving`` at x + u(x) for every voxel x of ``reference``.

    interpolation: cubic (B-spline, prefiltered), linear or nearest (keeps integer label dtypes).
    """
    from .kernels import get_kernel

    minv = np.linalg.inv(moving.affine)
    # q = Minv (x + u) with x = R i: an affine map of the index plus Minv_lin u.
    vox = minv @ reference.affine
    data = moving.data
    if interpolation == "cubic":
        if coef is None:
            coef = prefilter(data)
        out = get_kernel("warp_cubic", backend)(coef, reference.shape, vox, displacement, minv[:3, :3], fill)
        return Image(np.asarray(out, dtype=np.float32), np.array(reference.affine))
    q = get_kernel("affine_grid", backend)(reference.shape, vox, displacement, minv[:3, :3])
    if interpolation == "nearest":
        out = get_kernel("nearest_sample", backend)(np.ascontiguousarray(data), q, fill)
    elif interpolation == "linear":
        src = np.ascontiguousarray(data, dtype=np.float32 if data.dtype != np.float64 else np.float64)
        out = get_kernel("linear_sample", backend)(src, q, fill)
    else:
        raise ConfigError(f"interpolation={interpolation!r} is invalid: choose cubic, linear or nearest")
    if interpolation != "nearest" and np.issubdtype(data.dtype, np.integer):
        out = np.asarray(out, dtype=np.float32)
    return Image(np.asarray(out), np.array(reference.affine))


def prefilter(data: np.ndarray) -> np.ndarray:
    """Cubic B-spline coefficients (float32, mirror boundary) of a 3-D image."""
    from scipy import ndimage

    return np.ascontiguousarray(
        ndimage.spline_filter(np.asarray(data, dtype=np.float32), order=3, mode="mirror", output=np.float32)
    )


# --------------------------------------------------------------------------------------------
# one pyramid level: images, sampler, metric, the cost function
# --------------------------------------------------------------------------------------------
class LevelData:
    """The images of one pyramid level, ready for sampling."""

    def __init__(self, fixed: Image, moving: Image, fixed_mask, moving_mask, moving_coef=None):
        self.fixed = fixed
        self.moving = moving
        self.fixed_values = np.ascontiguousarray(fixed.data, dtype=np.float32).ravel()
        self.fixed_mask = fixed_mask
        self.moving_mask = None if moving_mask is None else np.ascontiguousarray(moving_mask, dtype=np.uint8)
        self.moving_coef = prefilter(moving.data) if moving_coef is None else moving_coef
        self.moving_inv = np.linalg.inv(moving.affine)
        self._device = None

    def on_device(self, backend: str):
        """(fixed values, moving coefficients, moving mask) for the kernels of ``backend``: for
        ``cuda`` uploaded once per level and kept on the GPU for every iteration of both stages."""
        if backend != "cuda":
            return self.fixed_values, self.moving_coef, self.moving_mask
        if self._device is None:
            from .backend import to_device

            self._device = tuple(to_device(a, backend) for a in (self.fixed_values, self.moving_coef,
                                                                   self.moving_mask))
        return self._device

    def with_masks(self, fixed_mask, moving_mask) -> "LevelData":
        """The same level with other masks: images, coefficients and, where the moving mask is
        the same array, the GPU copies are shared (the fixed mask only steers the sampler)."""
        out = object.__new__(LevelData)
        out.__dict__.update(self.__dict__)
        out.fixed_mask = fixed_mask
        if moving_mask is not self.moving_mask:
            out.moving_mask = None if moving_mask is None else np.ascontiguousarray(moving_mask, dtype=np.uint8)
            out._device = None
        return out


class CostFunction:
    """Metric value and gradient of the current stage's parameters at random samples.

    ``metric``: a list of (weight, intensity metric) terms (or a single metric); ``impact``: an
    optional (weight, StaticImpact) term. All terms see the same kept samples.
    """

    def __init__(self, level: LevelData, metric, sampler, transform: CompositeTransform, stage: str,
                 backend: str, bending: BendingEnergy | None = None, bending_weight: float = 0.0,
                 radius: float = 1.0, level_index: int = 0, impact=None):
        from .kernels import get_kernel

        self.level = level
        self.terms = list(metric) if isinstance(metric, (list, tuple)) else ([(1.0, metric)] if metric is not None else [])
        self.impact = impact
        self.sampler = sampler
        self.transform = transform
        self.stage = stage
        self.bending = bending
        self.bending_weight = float(bending_weight)
        self.radius = radius
        self.level_index = level_index
        self.backend = backend
        self.k_pairs = get_kernel("sample_pairs", backend)
        self.k_eval = get_kernel("bspline_eval", backend)
        from .kernels import cpu as _cpu  # host-side helper (the parameters live on the host)

        self.k_absmax3 = _cpu.absmax3
        self.k_scatter = get_kernel("bspline_scatter", backend)
        fa = level.fixed.affine
        self.fixed_affine = fa
        if stage == "bspline":
            self.idx_to_grid = transform.grid.world_to_grid() @ fa
        from .transforms.linear import linear_parameters

        self.linear = linear_parameters(stage, transform.affine, radius)  # None for the B-spline stage
        self.iteration = 0
        self.last_valid = 0

    # parameters ---------------------------------------------------------------------------
    def get_parameters(self) -> np.ndarray:
        if self.linear is not None:
            return self.linear.get()
        return self.transform.coef.ravel().copy()

    def set_parameters(self, theta: np.ndarray) -> None:
        if self.linear is not None:
            self.linear.set(theta)
        else:
            self.transform.coef = theta.reshape(self.transform.coef.shape)

    @property
    def n_params(self) -> int:
        return self.linear.n_params if self.linear is not None else self.transform.coef.size

    # evaluation -----------------------------------------------------------------------------
    def _pairs(self, flat: np.ndarray):
        """(f, m, gy, pts, keep) of fixed voxels ``flat``: see kernels.reference.sample_pairs."""
        lv = self.level
        minv = lv.moving_inv
        f2m = minv @ self.transform.affine.as_matrix() @ self.fixed_affine  # fixed voxel -> moving voxel
        bspline = self.stage == "bspline"
        fixed_values, moving_coef, moving_mask = lv.on_device(self.backend)
        out = self.k_pairs(flat, fixed_values, lv.fixed.shape, f2m, moving_coef, moving_mask,
                           self.transform.coef if bspline else None, self.idx_to_grid if bspline else None,
                           minv[:3, :3])
        if self.backend == "cuda":  # the kept samples come back (a few thousand rows)
            from .backend import to_host

            out = tuple(to_host(a) for a in out)
        return out

    def evaluate(self, *, n_samples: int | None = None, gradient: bool = True):
        """Draw fresh samples; return (value, gradient w.r.t. the parameters or None)."""
        return self.evaluate_at(self.sampler.draw_flat(n_samples), gradient=gradient)

    def _map_points(self, flat: np.ndarray):
        """Fixed voxels -> (kept flat indices, x world (K, 3), y = T(x) world (K, 3), pts (K, 3)) with
        the points mapping outside the moving image (or its mask) dropped, as sample_pairs does."""
        lv = self.level
        idx = np.stack(np.unravel_index(flat, lv.fixed.shape), axis=1).astype(np.float64)
        fa = self.fixed_affine
        x = idx @ fa[:3, :3].T + fa[:3, 3]
        a = self.transform.affine.as_matrix()
        y = x @ a[:3, :3].T + a[:3, 3]
        if self.stage == "bspline":
            g = self.idx_to_grid
            pts = np.ascontiguousarray(idx @ g[:3, :3].T + g[:3, 3])
            y += self.k_eval(self.transform.coef, pts)
        else:
            pts = idx
        minv = lv.moving_inv
        q = y @ minv[:3, :3].T + minv[:3, 3]
        hi = np.asarray(lv.moving.shape, dtype=np.float64) - 1.0
        keep = np.all((q >= 0.0) & (q <= hi), axis=1)
        if lv.moving_mask is not None and keep.any():
            r = np.floor(q[keep] + 0.5).astype(np.intp)
            keep[np.flatnonzero(keep)[lv.moving_mask[r[:, 0], r[:, 1], r[:, 2]] == 0]] = False
            if self.impact is not None and getattr(self.impact[1], "jacobian", False):
                self._patch_in_moving_mask(x, keep)
        return flat[keep], x[keep], y[keep], pts[keep]

    def _patch_in_moving_mask(self, x: np.ndarray, keep: np.ndarray) -> None:
        """Jacobian mode: drop samples whose patch, mapped by T, leaves the moving image or mask
        (checked at the patch's corners; in place on ``keep``)."""
        lv = self.level
        offsets = self.impact[1].max_offsets()
        norm = np.linalg.norm(offsets, axis=1)
        corners = offsets[norm >= norm.max() - 1e-9]
        a = self.transform.affine.as_matrix()
        minv = lv.moving_inv
        hi = np.asarray(lv.moving.shape, dtype=np.float64) - 1.0
        for c in corners:
            kk = np.flatnonzero(keep)
            if kk.size == 0:
                return
            xc = x[kk] + c
            yc = xc @ a[:3, :3].T + a[:3, 3]
            if self.stage == "bspline":
                g = self.transform.grid.world_to_grid()
                yc += self.k_eval(self.transform.coef, np.ascontiguousarray(xc @ g[:3, :3].T + g[:3, 3]))
            q = yc @ minv[:3, :3].T + minv[:3, 3]
            inside = np.all((q >= 0.0) & (q <= hi), axis=1)
            r = np.clip(np.floor(q + 0.5), 0, hi).astype(np.intp)
            inside &= lv.moving_mask[r[:, 0], r[:, 1], r[:, 2]] != 0
            keep[kk[~inside]] = False

    def evaluate_at(self, flat: np.ndarray, *, gradient: bool = True):
        """Value and gradient at given fixed voxels (flat indices (N,) of the level's fixed image)."""
        n = len(flat)
        if self.impact is not None:
            flat_k, x, y, pts = self._map_points(np.asarray(flat, dtype=np.int64))
        else:
            flat_k = flat
        if self.terms:
            f, m, gy, pts, keep = self._pairs(flat_k)
            if self.impact is not None and not keep.all():
                flat_k, x, y = flat_k[keep], x[keep], y[keep]
        n_ok = len(pts)
        self.last_valid = n_ok
        if n_ok < max(MIN_VALID_POINTS, MIN_VALID_FRACTION * n):
            raise RegistrationError(
                f"only {n_ok} of {n} sample points map inside the moving image"
                f"{' and its mask' if self.level.moving_mask is not None else ''} ({self.stage} stage, level "
                f"{self.level_index + 1}): the images are probably far apart or the masks disjoint; check the "
                "image orientations, keep the affine initialisation on, or fix the masks"
            )
        bend = self.bending is not None and self.bending_weight > 0
        value = 0.0
        if self.terms:
            if gradient:
                dsum = None
                for w, metric in self.terms:
                    v, dm = metric.value_and_derivative(f, m)
                    value += w * v
                    dsum = w * dm if dsum is None else dsum + w * dm
                gy *= dsum[:, None]  # d value / d moving point, world mm
            else:
                value = sum(w * metric.value(f, m) for w, metric in self.terms)
        extra = None  # jacobian mode, exact chain: (points (M, 3) world, gradients (M, 3))
        if self.impact is not None:
            w, term = self.impact
            if getattr(term, "jacobian", False):
                bs = self.stage == "bspline"
                v, p_world, gi = term.value_and_gradient(
                    x, self.transform.affine.as_matrix(), self.transform.coef if bs else None,
                    self.transform.grid.world_to_grid() if bs else None, gradient)
                if gradient and p_world is not x:
                    extra, gi = (p_world, w * gi), None
            else:
                v, gi = term.value_and_gradient(flat_k, x, y, gradient)
            value += w * v
            if gradient and gi is not None:
                gy = w * gi if not self.terms else gy + w * gi
            elif gradient and not self.terms:
                gy = np.zeros_like(x)
        if gradient and extra is not None:
            # the exact chain: every patch voxel scatters at its own point
            if self.linear is not None:
                fi = np.linalg.inv(self.fixed_affine)
                extra_pts = extra[0] @ fi[:3, :3].T + fi[:3, 3]
            else:
                g = self.transform.grid.world_to_grid()
                extra_pts = extra[0] @ g[:3, :3].T + g[:3, 3]
            pts = np.concatenate([pts, extra_pts])
            gy = np.concatenate([gy, extra[1]])
        if not gradient:
            if bend:
                value += self.bending_weight * self.bending.value_and_gradient(self.transform.coef)[0]
            return float(value), None
        if self.linear is not None:
            fa = self.fixed_affine
            grad = self.linear.gradient_from_points(pts @ fa[:3, :3].T + fa[:3, 3], gy)
        else:
            if getattr(self, "_grad_buf", None) is None or self._grad_buf.shape[:3] != tuple(self.transform.grid.shape):
                self._grad_buf = np.empty(tuple(self.transform.grid.shape) + (3,))
            grad = self.k_scatter(np.ascontiguousarray(pts), np.ascontiguousarray(gy), self.transform.grid.shape,
                                  out=self._grad_buf).ravel()
            if bend:
                be, gbe = self.bending.value_and_gradient(self.transform.coef)
                value += self.bending_weight * be
                grad += self.bending_weight * gbe.ravel()
        return float(value), grad

    def max_displacement(self, direction: np.ndarray) -> float:
        """Upper bound (mm) of how far a parameter step ``direction`` moves any point of the box.

        B-spline: the weights are non-negative and sum to one, so |u_d(x)| <= max |dc_d|.
        Affine: the displacement is affine in x, so its maximum over the box is at a corner.
        """
        if self.stage == "bspline":
            return float(np.linalg.norm(self.k_absmax3(direction)))
        if not hasattr(self, "_corners"):
            shape = np.asarray(self.level.fixed.shape, dtype=np.float64) - 1.0
            corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], dtype=np.float64) * shape
            fa = self.fixed_affine
            self._corners = corners @ fa[:3, :3].T + fa[:3, 3]
        return float(np.linalg.norm(self.linear.jacobian_apply(self._corners, direction), axis=1).max())


# --------------------------------------------------------------------------------------------
# the driver
# --------------------------------------------------------------------------------------------
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
    from .backend import resolve_device, set_threads
    from .metrics import make_metric

    cfg = (config or RegistrationConfig()).with_options(**options) if options else (config or RegistrationConfig())
    backend, device_note = resolve_device(cfg.device)
    providers = None
    if cfg.uses_impact():
        from .backend import onnx_providers
        from .features.precision import check_precision

        check_precision(cfg.precision, backend)

        providers, provider_note = onnx_providers(backend)
        device_note = "; ".join(n for n in (device_note, provider_note) if n)
    set_threads(cfg.threads)
    timings: dict[str, float] = {}
    t_start = time.perf_counter()

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:  # gzip inflation releases the GIL
        jobs = [pool.submit(as_image, fixed, "fixed image"), pool.submit(as_image, moving, "moving image")]
        fixed_img, moving_img = (job.result() for job in jobs)
    fmask_img = as_image(fixed_mask, "fixed mask", mask=True)
    mmask_img = as_image(moving_mask, "moving mask", mask=True)
    fmask = _check_mask(fmask_img, fixed_img, "fixed")
    mmask = _check_mask(mmask_img, moving_img, "moving")
    fov_notes = {}
    if cfg.fov_mask == "auto":
        from .fov import detect_field_of_view

        def fov(mask, img, role):
            """An image without a mask gets its detected field of view (if any) as its mask."""
            found = None if mask is not None else detect_field_of_view(np.asarray(img.data))
            if found is None:
                return mask
            fov_notes[role] = found[1]
            return found[0]

        fmask, mmask = fov(fmask, fixed_img, "fixed"), fov(mmask, moving_img, "moving")
    _check_not_constant(np.asarray(fixed_img.data), fmask, "fixed")
    _check_not_constant(np.asarray(moving_img.data), mmask, "moving")
    from .memory import check_run_memory

    memory_estimate = check_run_memory(cfg, fixed_img, moving_img, backend)  # refuse before any work
    fixed_img = fixed_img.with_data(np.asarray(fixed_img.data, dtype=np.float32))
    moving_f32 = moving_img.with_data(np.asarray(moving_img.data, dtype=np.float32))
    timings["load"] = time.perf_counter() - t_start

    if min(fixed_img.shape) < 4 or min(moving_img.shape) < 4:
        raise ImageError(
            f"images of shape {fixed_img.shape} / {moving_img.shape} are too small: every axis needs at least 4 voxels"
        )
    from .pyramid import build_pyramid, check_level_shapes, plan_pyramid

    plan = plan_pyramid(fixed_img.spacing, moving_img.spacing, cfg.levels, cfg.pyramid, cfg.pyramid_schedule,
                        cfg.pyramid_sigma)
    check_level_shapes(plan, fixed_img.shape, moving_img.shape)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:  # scipy.ndimage filters release the GIL
        jobs = [pool.submit(build_pyramid, img, levels) for img, levels in ((fixed_img, plan.fixed), (moving_f32, plan.moving))]
        fixed_pyr, moving_pyr = (job.result() for job in jobs)
    fmask_pyr = build_pyramid(Image(fmask, fixed_img.affine), plan.fixed, is_mask=True) if fmask is not None else [None] * cfg.levels
    mmask_pyr = build_pyramid(Image(mmask, moving_img.affine), plan.moving, is_mask=True) if mmask is not None else [None] * cfg.levels
    timings["pyramid"] = time.perf_counter() - t0

    # initial affine
    center, translation = _initial_affine(fixed_img, moving_f32, fmask, mmask, "none" if cfg.initial_transform else cfg.init)
    if cfg.initial_transform:  # a file's affine (fixed -> moving) replaces the centring, same centre c
        from .interchange import read_initial_affine

        transform = CompositeTransform(read_initial_affine(cfg.initial_transform, center))
    else:
        transform = CompositeTransform(AffineTransform(np.eye(3), translation, center))
    radius = _rms_radius(fixed_img, fmask, center)

    levels_data: list[LevelData | None] = [None] * cfg.levels

    def level_data(i):
        if levels_data[i] is None:
            t = time.perf_counter()
            fm = fmask_pyr[i].data if fmask_pyr[i] is not None else None
            mm = mmask_pyr[i].data if mmask_pyr[i] is not None else None
            levels_data[i] = LevelData(fixed_pyr[i], moving_pyr[i], fm, mm)
            timings["prefilter"] = timings.get("prefilter", 0.0) + time.perf_counter() - t
        return levels_data[i]

    report = {
        "fastimpact_version": __version__,
        "versions": _versions(),
        "device": backend,
        "device_note": device_note,
        "seed": cfg.seed,
        "config": cfg.to_dict(),
        "fixed": {"shape": list(fixed_img.shape), "spacing_mm": fixed_img.spacing.tolist()},
        "moving": {"shape": list(moving_img.shape), "spacing_mm": moving_img.spacing.tolist()},
        "initial_affine": transform.affine.to_dict(),
        "pyramid": plan.describe(),
        "memory_estimate_gib": round(memory_estimate.total / 1024**3, 3),
        **({"field_of_view": fov_notes} if fov_notes else {}),
        "stages": [],
    }

    terms = cfg.metric_terms()
    impact_weight = next((w for w, name in terms if name == "impact"), None)
    intensity_terms = [(w, name) for w, name in terms if name != "impact"]
    impact_levels: list = [None] * cfg.levels
    norm_cache: dict = {}

    def normalizer(role, img, mask):
        from .features.maps import IntensityNormalization

        def get(spec):
            key = (role, spec.normalization)
            if key not in norm_cache:
                norm_cache[key] = IntensityNormalization.from_image(img.data, mask, spec.normalization)
            return norm_cache[key]

        return get

    def level_impact_settings(i):
        """Level i's IMPACT settings with both images' features on one voxel size in mm (by
        default the finest spacing of the fixed level)."""
        from .features.settings import impact_settings, with_voxel_default

        return with_voxel_default(impact_settings(cfg, i), float(np.min(level_data(i).fixed.spacing)))

    def impact_term(i):
        """The IMPACT term of level i (static: feature maps computed once, shared by both stages)."""
        if impact_levels[i] is None:
            from .features.settings import impact_settings

            lv = level_data(i)
            t_feat = time.perf_counter()
            settings = level_impact_settings(i)
            if cfg.mode == "jacobian-dense":
                from .metrics.impact_dense import build_dense_impact

                impact_levels[i] = build_dense_impact(
                    impact_settings(cfg, i), lv.fixed, lv.moving, normalizer("fixed", fixed_img, fmask),
                    normalizer("moving", moving_f32, mmask), moving_coef=lv.moving_coef, threads=cfg.threads,
                    seed=cfg.seed + 104729 * (i + 1), backend=backend, providers=providers, precision=cfg.precision)
                timings["features"] = timings.get("features", 0.0) + time.perf_counter() - t_feat
            elif cfg.mode == "jacobian":
                from .metrics.impact_jacobian import build_jacobian_impact

                impact_levels[i] = build_jacobian_impact(
                    settings, lv.fixed, lv.moving, normalizer("fixed", fixed_img, fmask),
                    normalizer("moving", moving_f32, mmask), moving_coef=lv.moving_coef, chain=cfg.jacobian_chain,
                    threads=cfg.threads, seed=cfg.seed + 104729 * (i + 1), backend=backend, providers=providers, precision=cfg.precision)
                timings["features"] = timings.get("features", 0.0) + time.perf_counter() - t_feat
            else:
                from .metrics.impact import build_static_impact

                impact_levels[i] = build_static_impact(
                    settings, lv.fixed, lv.moving, normalizer("fixed", fixed_img, fmask),
                    normalizer("moving", moving_f32, mmask), fixed_mask_img=fmask_pyr[i], threads=cfg.threads,
                    tile_size=cfg.tile_size, memory_gb=cfg.feature_memory, seed=cfg.seed + 104729 * (i + 1),
                    backend=backend, providers=providers, precision=cfg.precision, timings=timings)
        impact_levels[i].reset_normalisation()  # each stage's loss normalisation starts afresh
        return impact_levels[i]

    support_levels: dict = {}

    def static_support_level(i):
        """Level i with the masks a static IMPACT sample needs: the whole receptive field of the
        compared features inside the fixed image (and mask) around x and inside the moving image
        (and mask) around T(x), i.e. both eroded by the receptive field's radius in mm."""
        if i not in support_levels:
            lv = level_data(i)
            radius = _support_radius_mm(level_impact_settings(i))
            fm, r_f = _erode_mm(lv.fixed_mask, lv.fixed, radius)
            mm, r_m = _erode_mm(None if lv.moving_mask is None else lv.moving_mask > 0, lv.moving, radius)
            support_levels[i] = lv.with_masks(fm, mm)
            report.setdefault("sample_support", []).append(
                {"level": i + 1, "receptive_radius_mm": round(radius, 3), "fixed_erosion_mm": round(r_f, 3),
                 "moving_erosion_mm": round(r_m, 3)})
        return support_levels[i]

    if impact_weight is not None:
        from .features.settings import impact_settings

        for i in range(cfg.levels):
            impact_settings(cfg, i)  # models exist, layers and channels match: fail before any work
    if cfg.max_step is not None:
        max_step = float(cfg.max_step)
    else:
        from .optimizers import default_max_step_length

        max_step = default_max_step_length(fixed_img.spacing, moving_img.spacing)
    iters_bs = cfg.per_level("iterations")
    iters_af = cfg.per_level("affine_iterations")
    iters_rg = cfg.per_level("rigid_iterations")
    stages = ((["rigid"] if cfg.rigid and sum(iters_rg) else []) + (["affine"] if cfg.affine and sum(iters_af) else [])
              + (["bspline"] if sum(iters_bs) else []))
    stage_iterations = {"rigid": iters_rg, "affine": iters_af, "bspline": iters_bs}
    samples = cfg.per_level("samples")
    bend_w = cfg.per_level("bending_weight")
    spacings = cfg.grid_spacings()

    for stage in stages:
        t_stage = time.perf_counter()
        for li in range(cfg.levels):
            n_it = stage_iterations[stage][li]
            bending = None
            if stage == "bspline":
                # the grid follows every level (also one with 0 iterations): each refinement
                # halves the spacing exactly
                grid = BSplineGrid.for_image(fixed_img.shape, fixed_img.affine, spacings[li])
                if transform.coef is None:
                    transform.grid, transform.coef = grid, np.zeros(tuple(grid.shape) + (3,))
                elif transform.grid.shape != grid.shape or not np.allclose(transform.grid.spacing, grid.spacing):
                    transform.coef = refine_coefficients(transform.coef, grid.shape)
                    transform.grid = grid
                if bend_w[li] > 0 and n_it > 0:
                    bending = BendingEnergy(grid, fixed_img.shape)
            if n_it == 0:
                continue
            lv = level_data(li)
            metrics = []
            for w, name in intensity_terms:
                options = {"bins": cfg.bins, "implementation": "cuda" if backend == "cuda" else "numba"}
                metric = make_metric(name, **(options if name == "mi" else {}))
                metric.prepare(lv.fixed.data, lv.moving.data, lv.fixed_mask, lv.moving_mask)
                metrics.append((w, metric))
            impact = (impact_weight, impact_term(li)) if impact_weight is not None else None
            from .samplers import RandomSampler

            if impact is not None and not getattr(impact[1], "jacobian", False):
                lv = static_support_level(li)  # receptive fields inside the images and masks
            sample_mask = lv.fixed_mask
            if impact is not None and getattr(impact[1], "jacobian", False) and sample_mask is not None:
                sample_mask = _patch_inside_mask(sample_mask, lv.fixed.affine, impact[1].max_offsets())
            sampler = RandomSampler(lv.fixed.shape, sample_mask, samples[li], cfg.seed,
                                    stream=(stages.index(stage), li), backend=backend)
            cost = CostFunction(lv, metrics, sampler, transform, stage, backend, bending, bend_w[li], radius, li,
                                impact=impact)
            if impact is not None and not getattr(impact[1], "jacobian", False):
                # draw where the current transform reaches the moving support, so a moving image
                # that covers less than the fixed one (a cut field of view) keeps enough valid samples
                region = _overlap_region(cost, sample_mask)
                if region is not None:
                    lv = lv.with_masks(region, lv.moving_mask)
                    sampler = RandomSampler(lv.fixed.shape, region, samples[li], cfg.seed,
                                            stream=(stages.index(stage), li), backend=backend)
                    cost = CostFunction(lv, metrics, sampler, transform, stage, backend, bending, bend_w[li],
                                        radius, li, impact=impact)
            info = _optimise(cost, n_it, lv, cfg, callback, stage, li, max_step)
            report["stages"].append(info)
        timings[f"{stage}_stage"] = time.perf_counter() - t_stage

    timings["total_registration"] = time.perf_counter() - t_start
    report["timings_s"] = {k: round(v, 4) for k, v in timings.items()}
    report["final_affine"] = transform.affine.to_dict()
    if transform.coef is not None:
        report["bspline_grid"] = {"shape": list(transform.grid.shape), "spacing_mm": transform.grid.spacing.tolist()}
    finest = levels_data[-1]
    result = Result(transform, fixed_img, moving_img, cfg, report, backend, fixed_mask=fmask)
    if finest is not None and moving_pyr[-1].data is moving_f32.data:  # the finest level is the input itself
        result._moving_coef = finest.moving_coef  # the output warp reuses the finest prefilter
    return result


def _overlap_region(cost: CostFunction, sample_mask: np.ndarray | None) -> np.ndarray | None:
    """The part of the fixed sample region that the cost function's current transform maps into
    the moving image (and its mask), found on a coarse grid of about 200k voxels and widened by
    one coarse cell; None when that is (almost) everything or too little to sample from."""
    shape = cost.level.fixed.shape
    stride = max(1, int(round((np.prod(shape) / 200_000) ** (1 / 3))))
    axes = [np.arange(0, n, stride) for n in shape]
    idx = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    if sample_mask is not None:
        idx = idx[sample_mask[idx[:, 0], idx[:, 1], idx[:, 2]]]
    if len(idx) == 0:
        return None
    kept = cost._map_points(np.ravel_multi_index(tuple(idx.T), shape).astype(np.int64))[0]
    if len(kept) >= 0.98 * len(idx) or len(kept) < 0.01 * len(idx) or len(kept) < 64:
        return None
    coarse = np.zeros(tuple(len(a) for a in axes), bool)
    k = np.stack(np.unravel_index(kept, shape), axis=1) // stride
    coarse[k[:, 0], k[:, 1], k[:, 2]] = True
    from scipy import ndimage

    coarse = ndimage.binary_dilation(coarse, iterations=1)
    region = coarse.repeat(stride, 0).repeat(stride, 1).repeat(stride, 2)[: shape[0], : shape[1], : shape[2]]
    return region if sample_mask is None else region & sample_mask


def _support_radius_mm(settings) -> float:
    """The largest receptive-field radius (mm) of the compared layers of a level's IMPACT settings
    (``(rf - 1) / 2`` input voxels of the model's grid, ``voxel_size`` mm each)."""
    from .onnx_models import load_model_spec

    radius = 0.0
    for mu in settings.models:
        for name in dict.fromkeys((mu.fixed_model, mu.moving_model)):
            spec = load_model_spec(name)
            for lu in mu.layers:
                rf = spec.layers[lu.index].receptive_field or spec.receptive_field
                radius = max(radius, 0.5 * (float(rf) - 1.0) * float(mu.voxel_size))
    return radius


# An erosion that would leave less than this fraction of the region is halved until it does not
# (a deep layer's receptive field can exceed a coarse level's field of view).
MIN_SUPPORT_FRACTION = 0.1


def _erode_mm(mask: np.ndarray | None, image: Image, radius_mm: float):
    """(region, radius used): ``mask`` (None: the whole image box) eroded by ``radius_mm`` along each
    axis of the image grid, the box edges included; the radius is halved while less than
    MIN_SUPPORT_FRACTION of the region would remain."""
    from scipy import ndimage

    region = np.ones(image.shape, bool) if mask is None else np.asarray(mask, bool)
    total = int(region.sum())
    r = float(radius_mm)
    while r > 0:
        reach = np.floor(r / image.spacing + 1e-6).astype(int)
        if not reach.any():
            break
        out = ndimage.minimum_filter(region.view(np.uint8), size=tuple(2 * reach + 1), mode="constant", cval=0) > 0
        if out.sum() >= MIN_SUPPORT_FRACTION * total:
            return out, r
        r *= 0.5
    return (None if mask is None else region), 0.0


def _patch_inside_mask(mask: np.ndarray, affine: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """The voxels of ``mask`` whose whole patch (world ``offsets`` around them) lies inside it: the
    mask eroded by the patch's extent in voxels of the grid."""
    from scipy import ndimage

    lin_inv = np.linalg.inv(affine[:3, :3])
    reach = np.ceil(np.abs(offsets @ lin_inv.T).max(axis=0) - 1e-6).astype(int)
    out = ndimage.binary_erosion(mask, structure=np.ones(tuple(2 * reach + 1), bool), border_value=0)
    if not out.any():
        raise ImageError(
            f"no voxel of the fixed mask has its whole IMPACT patch (reach {reach.tolist()} voxels) inside the "
            "mask: use a larger mask, a smaller --patch-size or a smaller --voxel-size"
        )
    return out


def _probe_jacobian(cost: CostFunction, idx: np.ndarray):
    """dT/dtheta at probe voxels ``idx`` (P, 3) of the level, as the optimiser's SparseJacobian."""
    from .kernels import get_kernel
    from .optimizers import SparseJacobian

    fa = cost.fixed_affine
    if cost.linear is not None:
        vals = cost.linear.jacobian_at(idx @ fa[:3, :3].T + fa[:3, 3])
        n = cost.linear.n_params
        return SparseJacobian(np.broadcast_to(np.arange(n), (len(idx), n)), vals, n)
    g = cost.idx_to_grid
    t = np.ascontiguousarray(idx @ g[:3, :3].T + g[:3, 3])
    base, w, _ = get_kernel("bspline_weights", cost.backend)(t)
    gx, gy, gz = cost.transform.grid.shape
    a = np.arange(4)
    ix = np.clip(base[:, 0, None] + a, 0, gx - 1)
    iy = np.clip(base[:, 1, None] + a, 0, gy - 1)
    iz = np.clip(base[:, 2, None] + a, 0, gz - 1)
    nodes = (ix[:, :, None, None] * gy + iy[:, None, :, None]) * gz + iz[:, None, None, :]
    weights = w[:, 0, :, None, None] * w[:, 1, None, :, None] * w[:, 2, None, None, :]
    # parameters are coef.ravel() of (gx, gy, gz, 3): node n, component d -> 3 n + d
    return SparseJacobian.kronecker(3 * nodes.reshape(len(idx), 64), weights.reshape(len(idx), 64),
                                    cost.n_params, n_dims=3, stride=1)


EXACT_GRADIENT_SAMPLES = 100_000  # elastix's NumberOfSamplesForExactGradient
JACOBIAN_EXACT_GRADIENT_FACTOR = 5  # IMPACT Jacobian mode: 5x the samples of one iteration
# A step that would move some point of the image further than this many maximum step lengths
# (elastix's MaximumStepLength, default one voxel) is scaled down to that length. ASGD's
# estimation aims at about one step length; the guard only stops a mis-estimated gain from
# throwing the transform out of the image before the adaptive step size reacts.
STEP_LIMIT = 3.0


def _estimate_asgd(cost: CostFunction, iterations: int, max_step: float, seed: int, method: str):
    """Automatic ASGD parameters at the level's start (elastix's estimation methods)."""
    from .optimizers import ASGDSettings, default_n_jacobian_measurements, estimate_parameters, grid_sample_points

    settings = ASGDSettings(iterations=iterations, max_step_mm=max_step, method=method)
    lv = cost.level
    n_probe = default_n_jacobian_measurements(cost.n_params, settings)
    probe = grid_sample_points(lv.fixed.shape, n_probe, lv.fixed_mask).astype(np.float64)
    jac = _probe_jacobian(cost, probe)
    n_exact = EXACT_GRADIENT_SAMPLES
    if cost.impact is not None and getattr(cost.impact[1], "jacobian", False):
        # every Jacobian-mode sample is a patch through the network: 100k of them would cost more
        # than a whole level; the exact-gradient estimate only needs to be much less noisy than
        # one iteration's gradient
        n_exact = min(n_exact, JACOBIAN_EXACT_GRADIENT_FACTOR * cost.sampler.n_samples)
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

    params = estimate_parameters(settings, jac, theta0, gradient, exact_gradient=exact_gradient, rng=seed)
    cost.set_parameters(theta0)
    return settings, params


def _optimise(cost: CostFunction, iterations: int, lv: LevelData, cfg: RegistrationConfig, callback, stage, li,
              max_step: float):
    from .optimizers import ASGD

    if cost.backend == "cuda":
        from .device_loop import eligible, optimise_on_device

        if eligible(cost):
            info = optimise_on_device(cost, iterations, lv, cfg, callback, stage, li, max_step)
            if callback:
                callback("level_end", {**info, "transform": cost.transform})
            return info
    t0 = time.perf_counter()
    settings, params = _estimate_asgd(cost, iterations, max_step, cfg.seed + 7919 * li, cfg.asgd_estimation)
    opt = ASGD.from_settings(settings, params)
    t_est = time.perf_counter() - t0
    theta = cost.get_parameters()
    values = np.empty(iterations)
    limit = STEP_LIMIT * max_step
    clipped = 0
    if callback:
        callback("level_start", {"stage": stage, "level": li, "iterations": iterations})
    for k in range(iterations):
        value, g = cost.evaluate()
        values[k] = value
        # safeguard: no single step moves a point further than STEP_LIMIT maximum step lengths
        moved = opt.params.gain(opt.time) * cost.max_displacement(g)
        scale = 1.0
        if moved > limit:
            scale = limit / moved
            clipped += 1
        opt.step_inplace(theta, g, scale)
        cost.set_parameters(theta)
        if callback:
            callback("iteration", {"stage": stage, "level": li, "iteration": k, "value": value})
    info = level_report(cost, lv, stage, li, iterations, values, clipped, time.perf_counter() - t0, t_est, params, opt)
    if callback:
        callback("level_end", {**info, "transform": cost.transform})
    return info


def level_report(cost, lv, stage, li, iterations, values, clipped, elapsed, t_est, params, opt, **extra) -> dict:
    """The report entry of one optimised level (both the host and the GPU-resident loop)."""
    return {
        "stage": stage,
        "level": li + 1,
        "image_shape": list(lv.fixed.shape),
        "spacing_mm": [round(float(s), 4) for s in lv.fixed.spacing],
        "iterations": iterations,
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


def _initial_affine(fixed: Image, moving: Image, fmask, mmask, mode: str):
    """(centre, translation) of the initial affine: identity about the fixed image's centre
    ("none"), or the translation matching image centres ("geometry") or centres of mass
    ("moments", inside the masks when given)."""
    if mode == "none":
        return _center(fixed, fmask, "geometry"), np.zeros(3)
    fc = _center(fixed, fmask, mode)
    mc = _center(moving, mmask, mode)
    return fc, mc - fc


def _center(img: Image, mask, mode: str) -> np.ndarray:
    if mode == "geometry":
        mid = (np.asarray(img.shape, dtype=np.float64) - 1.0) / 2.0
        return img.affine[:3, :3] @ mid + img.affine[:3, 3]
    data = np.asarray(img.data, dtype=np.float64)
    w = data - data.min()
    if mask is not None:
        w = w * mask
    total = w.sum()
    if total <= 0:
        return _center(img, mask, "geometry")
    idx = [np.arange(n, dtype=np.float64) for n in img.shape]
    com = np.array([
        (w.sum(axis=(1, 2)) * idx[0]).sum(),
        (w.sum(axis=(0, 2)) * idx[1]).sum(),
        (w.sum(axis=(0, 1)) * idx[2]).sum(),
    ]) / total
    return img.affine[:3, :3] @ com + img.affine[:3, 3]


def _rms_radius(img: Image, mask, center) -> float:
    """RMS distance (mm) of the fixed image's (masked) voxels from the centre."""
    shape = img.shape
    step = max(1, int(round(np.prod(shape) ** (1 / 3) / 32)))
    idx = np.stack(np.meshgrid(*[np.arange(0, n, step) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    if mask is not None:
        idx = idx[mask[idx[:, 0], idx[:, 1], idx[:, 2]]]
        if idx.size == 0:
            idx = np.argwhere(mask)
    x = idx @ img.affine[:3, :3].T + img.affine[:3, 3]
    return float(max(np.sqrt(np.mean(np.sum((x - center) ** 2, axis=1))), 1.0))


def _versions() -> dict:
    import platform

    out = {"python": platform.python_version()}
    for mod in ("numpy", "scipy", "numba", "nibabel"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # pragma: no cover - optional
            out[mod] = None
    return out
