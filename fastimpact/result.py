"""The outcome of a registration (:class:`Result`) and its output files."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .config import RegistrationConfig
from .image import Image
from .interpolation import warp_image
from .transforms import CompositeTransform

__all__ = ["Result", "save_outputs", "transform_document", "OUTPUT_NAMES", "TRANSFORM_FILE_NAMES", "QC_DIR"]


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
    fixed_mask: np.ndarray | None = field(default=None, repr=False)  # (X, Y, Z) bool on the fixed grid
    moving_coef: np.ndarray | None = field(default=None, repr=False)  # the moving B-spline coefficients, if known
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
                coef=self.moving_coef,
            )
            self.moving_coef = None
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
