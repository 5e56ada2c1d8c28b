"""`fastimpact evaluate`: Dice / HD95 per label, TRE of landmarks, Jacobian and folding of a transform.

Only Typer and the standard library are imported at module level (``fastimpact --version`` stays light).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def _fmt(v, nd=4):
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if v != v else f"{v:.{nd}g}"
    return str(v)


class _Target:
    """What TARGET names: a registration folder, a transform.json or an ITK displacement field."""

    def __init__(self, target: Path):
        from fastimpact.errors import ImageIOError

        self.path = target
        self.transform = None
        self.field = None  # (u, grid Image) of a displacement-field file
        self.report = None
        self.doc = {}
        self.folder = None
        t = Path(target)
        name = t.name.lower()
        if t.is_dir():
            if not (t / "transform.json").is_file():
                raise ImageIOError(f"folder '{t}' holds no transform.json: pass the output folder of `fastimpact register`, "
                                   "a transform.json or a displacement field (.nii.gz)")
            self.folder, tjson = t, t / "transform.json"
        elif name.endswith((".nii", ".nii.gz")):
            from fastimpact.io import load_displacement_itk

            self.field = load_displacement_itk(t)
            tjson = None
            self.folder = t.parent
        else:
            tjson, self.folder = t, t.parent
        if tjson is not None:
            import json

            from fastimpact.apply import load_transform

            self.transform, self.grid = load_transform(tjson)
            try:
                self.doc = json.loads(Path(tjson).read_text())
            except ValueError:  # pragma: no cover - load_transform read it already
                self.doc = {}
        else:
            self.grid = self.field[1]
        rep = self.folder / "report.json" if self.folder is not None else None
        if rep is not None and rep.is_file() and (self.field is None or t.name == "displacement.nii.gz"):
            import json

            try:
                self.report = json.loads(rep.read_text())
            except ValueError:
                self.report = None

    def field_on(self, grid):
        """u (X, Y, Z, 3) mm on ``grid`` (an Image)."""
        import numpy as np

        from fastimpact.errors import ImageError

        if self.transform is not None:
            return self.transform.displacement_field(grid.shape, grid.affine)
        u, fgrid = self.field
        if not fgrid.same_grid(grid):
            raise ImageError(f"the displacement field's grid {fgrid.shape} differs from the fixed label map's "
                             f"{grid.shape}: give label maps on the grid of '{self.path}' or pass a transform.json")
        return np.asarray(u, dtype=np.float32)

    def map_points(self, pts):
        """T(p) for fixed world points (N, 3) RAS mm; also how many fell outside a field's grid."""
        from fastimpact.evaluation import sample_displacement

        if self.transform is not None:
            return self.transform.map_world(pts), 0
        u, fgrid = self.field
        d, inside = sample_displacement(u, fgrid.affine, pts)
        return pts + d, int((~inside).sum())


def evaluate(
    target: Annotated[Path, typer.Argument(help="Output folder of `fastimpact register`, its transform.json, or an ITK displacement field (.nii.gz; fixed x -> moving x + u(x)).")],
    fixed_labels: Annotated[Optional[Path], typer.Option("--fixed-labels", help="Label map on the fixed image (0 = background).")] = None,
    moving_labels: Annotated[Optional[Path], typer.Option("--moving-labels", help="Label map on the moving image; warped with nearest neighbour.")] = None,
    fixed_points: Annotated[Optional[Path], typer.Option("--fixed-points", help="Landmarks in the fixed image: CSV rows x,y,z in world mm (RAS unless declared; Slicer .fcsv read too).")] = None,
    moving_points: Annotated[Optional[Path], typer.Option("--moving-points", help="The paired landmarks in the moving image (same rows, same convention).")] = None,
    points_lps: Annotated[Optional[bool], typer.Option("--points-lps/--points-ras", help="Landmark coordinates are LPS (ITK, ANTs, elastix, Slicer >= 4.11) or RAS (nibabel, fastimpact). [default: what the file declares ('# CoordinateSystem = LPS'), else RAS]")] = None,
    labels: Annotated[Optional[str], typer.Option("--labels", help="Only these labels, comma-separated (e.g. 1,2,17). [default: every non-zero label]")] = None,
    fixed_mask: Annotated[Optional[Path], typer.Option("--fixed-mask", help="Region for the folding figures (inside / outside). [default: the fixed labels > 0, else a foreground of --fixed-image]")] = None,
    fixed_image: Annotated[Optional[Path], typer.Option("--fixed-image", help="Fixed image, for --qc pictures. [default: the one named in transform.json if it exists]")] = None,
    moving_image: Annotated[Optional[Path], typer.Option("--moving-image", help="Moving image, warped for --qc. [default: warped.nii.gz of the folder, else the warped labels]")] = None,
    learn2reg: Annotated[Optional[Path], typer.Option("--learn2reg", help="Export the field in the Learn2Reg convention: (X, Y, Z, 3) displacement in voxels, NIfTI.")] = None,
    qc: Annotated[Optional[Path], typer.Option("--qc", help="Folder for QC pictures and report.html (with evaluation.json).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of the table.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing --learn2reg / --qc outputs.")] = False,
):
    """Evaluate a registration: Dice and HD95 per label, TRE of paired landmarks, Jacobian determinant and folding."""
    import json

    import numpy as np

    from fastimpact.errors import ConfigError, ImageError
    from fastimpact.evaluation import (assess_registration, label_array, label_metrics, learn2reg_displacement,
                                       read_points, target_registration_error)
    from fastimpact.image import Image
    from fastimpact.io import load_image

    if (fixed_labels is None) != (moving_labels is None):
        raise ConfigError("--fixed-labels and --moving-labels go together: give both label maps or neither")
    if (fixed_points is None) != (moving_points is None):
        raise ConfigError("--fixed-points and --moving-points go together: give both landmark files or neither")
    label_list = None
    if labels is not None:
        try:
            label_list = [int(v) for v in labels.replace(" ", "").split(",") if v]
        except ValueError:
            raise ConfigError(f"--labels {labels!r} is invalid: give whole numbers separated by commas, e.g. 1,2,17") from None
        if not label_list:
            raise ConfigError("--labels is empty: give whole numbers separated by commas, e.g. 1,2,17")
    # fail on unusable outputs before any work
    from fastimpact.io import check_output_dir
    from fastimpact.qc import QC_FILES

    if qc is not None:
        check_output_dir(qc, force=force, names=[*QC_FILES, "evaluation.json"])
    if learn2reg is not None:
        if not learn2reg.name.lower().endswith((".nii", ".nii.gz")):
            raise ConfigError(f"--learn2reg {learn2reg} must end in .nii.gz or .nii")
        if learn2reg.exists() and not force:
            from fastimpact.errors import ImageIOError

            raise ImageIOError(f"output '{learn2reg}' exists; pass --force to overwrite or choose another name")

    tgt = _Target(target)
    grid = tgt.grid
    fl = ml = None
    if fixed_labels is not None:
        fl = load_image(fixed_labels, role="fixed labels")
        ml = load_image(moving_labels, role="moving labels")
        label_array(fl, f"fixed labels '{fixed_labels}'")
        label_array(ml, f"moving labels '{moving_labels}'")
        grid = fl  # the labels' own grid: Dice and HD95 where the fixed labels were drawn
    u = tgt.field_on(grid)
    out: dict = {"status": "ok", "target": str(target),
                 "grid": {"shape": list(grid.shape), "spacing_mm": [round(float(s), 6) for s in grid.spacing]},
                 "outputs": {}}
    extra_warnings = []
    warped_labels = None
    if fl is not None:
        from fastimpact.interpolation import warp_image

        mlab = Image(np.ascontiguousarray(label_array(ml).astype(np.int32)), ml.affine)
        warped_labels = warp_image(mlab, grid, u, "nearest").data
        before = warp_image(mlab, grid, np.zeros_like(u), "nearest").data
        lm = label_metrics(fl.data, warped_labels, grid.affine, label_list)
        lb = label_metrics(fl.data, before, grid.affine, label_list)
        by = {r["label"]: r for r in lb["labels"]}
        for r in lm["labels"]:
            r["dice_before"] = by[r["label"]]["dice"]
        lm["dice_mean_before"] = lb["dice_mean"]
        lm["hd95_mean_before_mm"] = lb["hd95_mean_mm"]
        out["labels"] = lm
        if lm["dice_mean"] is not None and lb["dice_mean"] is not None and lm["dice_mean"] < lb["dice_mean"] - 0.01:
            extra_warnings.append(f"labels: the mean Dice fell from {lb['dice_mean']:.3f} (no deformation, moving labels "
                                  f"resampled as they are) to {lm['dice_mean']:.3f}: the registration made the overlap "
                                  "worse; try another metric, a mask or another preset")
    if fixed_points is not None:
        fp, fconv = read_points(fixed_points, lps=points_lps)
        mp, mconv = read_points(moving_points, lps=points_lps)
        mapped, outside = tgt.map_points(fp)
        tre = target_registration_error(fp, mp, lambda p: mapped)
        tre["conventions"] = {"fixed": fconv, "moving": mconv}
        out["tre"] = tre
        if outside:
            extra_warnings.append(f"landmarks: {outside} fixed points lie outside the displacement field's grid (the "
                                  "border displacement was used): check the landmark convention (--points-lps)")
        if tre["mean"] > tre["before"]["mean"]:
            extra_warnings.append(f"landmarks: the mean TRE rose from {tre['before']['mean']:.2f} mm (before) to "
                                  f"{tre['mean']:.2f} mm: the registration moved the landmarks apart; check the landmark "
                                  "convention (--points-lps / --points-ras), or try another metric, a mask or another preset")
    # Jacobian / folding, with the region: --fixed-mask > fixed labels > a foreground of the fixed image
    mask, mask_name, fixed_img = None, "fixed mask", None
    if fixed_image is not None:
        fixed_img = load_image(fixed_image, role="fixed image")
        if not fixed_img.same_grid(grid):
            raise ImageError(f"--fixed-image '{fixed_image}' is not on the evaluation grid {grid.shape} (the fixed labels' "
                             "or the registration's fixed grid): give the fixed image of the registration")
    elif tgt.doc.get("fixed", {}).get("path") and Path(tgt.doc["fixed"]["path"]).is_file():
        fixed_img = load_image(tgt.doc["fixed"]["path"], role="fixed image")  # named in transform.json
        if not fixed_img.same_grid(grid):
            fixed_img = None
    if fixed_mask is not None:
        mimg = load_image(fixed_mask, role="fixed mask")
        if not mimg.same_grid(grid):
            raise ImageError(f"--fixed-mask '{fixed_mask}' is not on the evaluation grid {grid.shape} (the fixed labels' "
                             "or the registration's fixed grid): resample it first")
        mask = np.asarray(mimg.data) > 0
    elif fl is not None:
        mask, mask_name = label_array(fl) > 0, "labelled region"
    stages = (tgt.report or {}).get("stages", ())
    quality, warnings, det = assess_registration(
        u, grid.affine, stages=stages, fixed_mask=mask, mask_name=mask_name,
        fixed_data=None if fixed_img is None else fixed_img.data,
        affine_matrix=tgt.transform.affine.as_matrix() if tgt.transform is not None else None)
    out["jacobian"] = quality["jacobian"]
    out["displacement"] = quality["displacement"]
    out["affine_determinant"] = quality["affine_determinant"]
    out["warnings"] = warnings + extra_warnings

    if learn2reg is not None:
        import nibabel as nib

        from fastimpact.io import atomic_write_path

        mov_aff = ml.affine if ml is not None else None
        if mov_aff is None and moving_image is not None:
            mov_aff = load_image(moving_image, role="moving image").affine
        if mov_aff is None and tgt.doc.get("moving", {}).get("affine") is not None:
            mov_aff = np.asarray(tgt.doc["moving"]["affine"], dtype=np.float64)
        if mov_aff is None and tgt.doc.get("moving", {}).get("path") and Path(tgt.doc["moving"]["path"]).is_file():
            mov_aff = load_image(tgt.doc["moving"]["path"], role="moving image").affine
        if mov_aff is None:
            raise ConfigError("--learn2reg needs the moving grid (voxels of the moving image): give --moving-labels or --moving-image")
        d = learn2reg_displacement(u, grid.affine, mov_aff)
        with atomic_write_path(learn2reg, force=force) as tmp:
            nib.save(nib.Nifti1Image(d, grid.affine), str(tmp))
        out["outputs"]["learn2reg"] = str(learn2reg)

    if qc is not None:
        from fastimpact.io import output_dir
        from fastimpact.qc import write_qc

        if fixed_img is not None:
            fimg = fixed_img
        elif fl is not None:
            fimg = Image(np.asarray(fl.data, dtype=np.float32), grid.affine)
        else:
            raise ConfigError("--qc needs a fixed image: give --fixed-image (or --fixed-labels)")
        if moving_image is not None:
            from fastimpact.interpolation import warp_image

            mimg = load_image(moving_image, role="moving image")
            warped = warp_image(mimg.with_data(np.asarray(mimg.data, dtype=np.float32)), grid, u, "linear").data
        else:
            saved = tgt.folder / "warped.nii.gz" if tgt.folder is not None else None
            saved = load_image(saved, role="warped image") if saved is not None and saved.is_file() else None
            if saved is not None and saved.same_grid(grid):
                warped = saved.data
            elif warped_labels is not None:
                warped = warped_labels
            else:
                raise ConfigError("--qc needs the moving image: give --moving-image (or --moving-labels)")
        with output_dir(qc, force=force, names=[*QC_FILES, "evaluation.json"]) as tmp:
            paths = write_qc(tmp, fimg, warped, u, det=det, mask=mask,
                             figures={"warnings": out["warnings"], "quality": quality, "stages": list(stages) or None,
                                      "labels": out.get("labels"), "tre": out.get("tre")},
                             title=f"fastimpact evaluation: {target}", links={"evaluation.json": "evaluation.json"})
            (Path(tmp) / "evaluation.json").write_text(json.dumps(out, indent=2, default=str) + "\n")
        out["outputs"]["qc"] = str(Path(qc) / "report.html")
        for k in paths:
            out["outputs"][f"qc_{k}"] = str(Path(qc) / Path(paths[k]).name)

    if as_json:
        from fastimpact.cli.output import emit as _emit

        _emit(out, True)
        return
    _print_table(out)
    for w in out["warnings"]:
        typer.echo(f"warning: {w}", err=True)


def _print_table(out: dict) -> None:
    echo = typer.echo
    lm = out.get("labels")
    if lm:
        echo(f"{'label':>7} {'dice':>7} {'before':>7} {'hd95_mm':>8} {'fixed_vox':>10} {'warped_vox':>10}")
        for r in lm["labels"]:
            echo(f"{r['label']:>7} {_fmt(r['dice']):>7} {_fmt(r.get('dice_before')):>7} {_fmt(r['hd95_mm']):>8} "
                 f"{r['fixed_voxels']:>10} {r['warped_voxels']:>10}")
        echo(f"{'mean':>7} {_fmt(lm['dice_mean']):>7} {_fmt(lm.get('dice_mean_before')):>7} {_fmt(lm['hd95_mean_mm']):>8}")
    t = out.get("tre")
    if t:
        echo(f"TRE ({t['n_points']} landmarks, {t['conventions']['fixed']}): mean {t['mean']:.3f} mm, std {t['std']:.3f}, "
             f"median {t['median']:.3f}, max {t['max']:.3f} | before: mean {t['before']['mean']:.3f} mm, max {t['before']['max']:.3f}")
    jac = out["jacobian"]
    for key, name in (("inside", f"inside the {jac['region']}"), ("outside", f"outside the {jac['region']}"), ("all", "whole grid")):
        s = jac.get(key)
        if s:
            echo(f"Jacobian {name}: min {s['min']:.4g}, max {s['max']:.4g}, std log {s['std_log_jacobian']:.4g}, "
                 f"folded {s['folded_voxels']} voxels ({100 * s['folding_fraction']:.4g}%)")
    for k, v in out["outputs"].items():
        if not k.startswith("qc_"):
            echo(f"wrote {k}: {v}")
