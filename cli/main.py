"""The ``fastimpact`` command line (Typer). A thin layer over the Python API.

Heavy modules are imported inside the commands so ``fastimpact --version`` stays fast.
Errors a user can cause print one line on stderr and exit with status 2 (bad usage / input) or
1 (the registration could not proceed); no traceback unless FASTIMPACT_DEBUG=1.
"""

from __future__ import annotations

import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from fastimpact import __version__
from fastimpact.cli.output import NOTES as _NOTES
from fastimpact.cli.output import emit as _emit
from fastimpact.cli.output import note as _note

app = typer.Typer(
    name="fastimpact",
    help="Fast deformable 3-D medical image registration (B-spline FFD + ASGD; MSE, NCC, MI, IMPACT).",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


class Mode(str, Enum):
    static = "static"
    jacobian = "jacobian"
    jacobian_dense = "jacobian-dense"


class DemoCase(str, Enum):
    mono = "mono"
    contrast = "contrast"
    t2 = "t2"


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"
    auto = "auto"


class Interp(str, Enum):
    cubic = "cubic"
    linear = "linear"
    nearest = "nearest"


def _add_subcommands():
    from fastimpact.cli.features import features  # Typer only: keeps --version light
    from fastimpact.cli.models import app as models_app
    from fastimpact.cli.batch import batch
    from fastimpact.cli.evaluate import evaluate

    from fastimpact.cli.presets import app as presets_app

    app.add_typer(models_app, name="models")
    app.add_typer(presets_app, name="presets")
    app.command("features")(features)
    app.command("batch")(batch)
    from fastimpact.cli.invert import invert
    from fastimpact.cli.points import points

    app.command("invert")(invert)
    app.command("points")(points)
    app.command("evaluate")(evaluate)


_add_subcommands()


def _version(value: bool):
    if value:
        typer.echo(f"fastimpact {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = None,
):
    """fastimpact: register FIXED and MOVING images; see `fastimpact register --help`."""


def _level_line(info: dict) -> str:
    return (f"{info['stage']:7s} level {info['level']}: metric {info['metric_start']:.6g} -> {info['metric_end']:.6g} "
            f"({info['iterations']} it, {info['time_s']:.2f} s)")


def _progress(enabled: bool, console=None):
    """(context manager, callback) for ``registration.register``.

    Each level prints one line on stderr when it ends (metric start -> end, iterations, its real
    elapsed time). On a terminal a transient bar with an elapsed-time clock runs while a level
    optimises and is replaced by that line; off a terminal (logs, pipes) nothing else is drawn.
    ``enabled`` False (``--json``): (nullcontext, None).
    """
    import contextlib

    if not enabled:
        return contextlib.nullcontext(), None
    from rich.console import Console

    console = console or Console(stderr=True)
    if not console.is_terminal:
        def plain(event, info):
            if event == "level_end":
                typer.echo(_level_line(info), err=True)

        return contextlib.nullcontext(), plain
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn
    from rich.text import Text

    class Seconds(ProgressColumn):  # rich's TimeElapsedColumn shows whole seconds: 0:00:00 for most levels
        def render(self, task):
            return Text(f"{task.elapsed or 0.0:.1f} s")

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[value]}"), Seconds(), console=console, transient=True,
                        refresh_per_second=4)
    current = {}

    def callback(event, info):
        if event == "level_start":
            if "task" in current:
                progress.remove_task(current.pop("task"))
            current["task"] = progress.add_task(f"{info['stage']} level {info['level'] + 1}",
                                                total=info["iterations"], value="")
        elif event == "iteration" and "task" in current:
            progress.update(current["task"], advance=1, value=f"metric {info['value']:.5g}")
        elif event == "level_end":
            if "task" in current:
                progress.remove_task(current.pop("task"))
            progress.console.print(_level_line(info), markup=False, highlight=False, soft_wrap=True)

    return progress, callback


@app.command()
def register(
    fixed: Annotated[Path, typer.Argument(help="Fixed (reference) image: .nii/.nii.gz, .mha/.mhd, .nrrd (the itk extra) or a DICOM series folder.")],
    moving: Annotated[Path, typer.Argument(help="Moving image (the same formats).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder.")] = Path("fastimpact-out"),
    metric: Annotated[Optional[str], typer.Option(help="Similarity metric: mse | ncc | mi | impact, or a weighted sum such as 'impact+0.1*mi'. [default: mse]")] = None,
    fixed_mask: Annotated[Optional[Path], typer.Option("--fixed-mask", help="Mask on the fixed grid (voxels > 0 are sampled).")] = None,
    moving_mask: Annotated[Optional[Path], typer.Option("--moving-mask", help="Mask on the moving grid (samples mapping outside are dropped).")] = None,
    levels: Annotated[Optional[int], typer.Option(help="Pyramid levels; level l at 2^(L-1-l) x the finest spacing in mm, the same for both images. [default: 3]")] = None,
    pyramid: Annotated[Optional[str], typer.Option(help="shrink (smooth + per-axis downsampling, thick slices kept until the in-plane spacing catches up) | smooth (elastix's smoothing pyramid, no downsampling). [default: shrink]")] = None,
    pyramid_schedule: Annotated[Optional[str], typer.Option("--pyramid-schedule", help="Explicit shrink factors per level, ';'-separated, one or three (per axis) each, e.g. '4 4 1;2 2 1;1 1 1'. [default: automatic]")] = None,
    pyramid_sigma: Annotated[Optional[str], typer.Option("--pyramid-sigma", help="Explicit smoothing sigmas in mm per level, ';'-separated, e.g. '2;1;0.5'. [default: 0.5 x the level spacing]")] = None,
    iterations: Annotated[Optional[int], typer.Option(help="B-spline ASGD iterations per level. [default: 500]")] = None,
    samples: Annotated[Optional[int], typer.Option(help="Random samples per iteration. [default: 2000]")] = None,
    grid_spacing: Annotated[Optional[float], typer.Option("--grid-spacing", help="Final B-spline control-point spacing, mm (doubled per coarser level). [default: 8]")] = None,
    affine: Annotated[Optional[bool], typer.Option("--affine/--no-affine", help="Optimised affine stage before the B-spline stage. [default: on]")] = None,
    rigid: Annotated[Optional[bool], typer.Option("--rigid/--no-rigid", help="Optimised rigid stage (rotation + translation) before the affine stage; with --no-affine, rigid then B-spline. [default: off]")] = None,
    rigid_iterations: Annotated[Optional[int], typer.Option("--rigid-iterations", help="Rigid ASGD iterations per level. [default: 250]")] = None,
    affine_iterations: Annotated[Optional[int], typer.Option("--affine-iterations", help="Affine ASGD iterations per level. [default: 250]")] = None,
    init: Annotated[Optional[str], typer.Option(help="Initial affine: moments | geometry | none. [default: moments]")] = None,
    initial_transform: Annotated[Optional[Path], typer.Option("--initial-transform", help="Initial affine from a file, fixed -> moving: fastimpact transform.json, ITK .tfm/.h5/.mat, or elastix TransformParameters (affine/Euler/similarity/translation); replaces --init.")] = None,
    bins: Annotated[Optional[int], typer.Option(help="Histogram bins for mi. [default: 32]")] = None,
    bending_weight: Annotated[Optional[float], typer.Option("--bending-weight", help="Bending-energy penalty weight. [default: 0]")] = None,
    interpolation: Annotated[Optional[Interp], typer.Option(help="Interpolation of warped.nii.gz. [default: cubic]")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed. [default: 0]")] = None,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads. [default: all cores]")] = None,
    device: Annotated[Optional[Device], typer.Option(help="cpu | cuda | auto. [default: cpu]")] = None,
    mode: Annotated[Optional[Mode], typer.Option(help="IMPACT mode: static (feature maps once per level) | jacobian (patches through the network every iteration) | jacobian-dense (the whole warped image through the network every iteration; for the GPU). [default: static]", rich_help_panel="IMPACT")] = None,
    model: Annotated[Optional[str], typer.Option(help="IMPACT model(s): built-in name (fastimpact models list) or .onnx with a .json manifest; several space-separated. [default: mind]", rich_help_panel="IMPACT")] = None,
    moving_model: Annotated[Optional[str], typer.Option("--moving-model", help="IMPACT model(s) for the moving image. [default: --model]", rich_help_panel="IMPACT")] = None,
    layers: Annotated[Optional[str], typer.Option(help="Layer bit mask per model, e.g. 01 = second output only. [default: all]", rich_help_panel="IMPACT")] = None,
    distance: Annotated[Optional[str], typer.Option(help="Per layer: l1 | l2 | ncc | cosine | l1cosine | dice | dotproduct. [default: l2]", rich_help_panel="IMPACT")] = None,
    layer_weights: Annotated[Optional[str], typer.Option("--layer-weights", help="Per layer weight. [default: 1]", rich_help_panel="IMPACT")] = None,
    pca: Annotated[Optional[str], typer.Option(help="Per layer PCA components (0 = off). [default: 0]", rich_help_panel="IMPACT")] = None,
    subset: Annotated[Optional[str], typer.Option(help="Per layer random channels per iteration (0 = all). [default: 0]", rich_help_panel="IMPACT")] = None,
    feature_norm: Annotated[Optional[str], typer.Option("--feature-norm", help="Per layer: none | l2 | standardized. [default: none]", rich_help_panel="IMPACT")] = None,
    voxel_size: Annotated[Optional[str], typer.Option("--voxel-size", help="Per model voxel size (mm) of the grid the model sees. [default: the level's spacing]", rich_help_panel="IMPACT")] = None,
    patch_size: Annotated[Optional[str], typer.Option("--patch-size", help="Jacobian mode: per model patch edge in voxels (odd). [default: the model's]", rich_help_panel="IMPACT")] = None,
    jacobian_chain: Annotated[Optional[str], typer.Option("--jacobian-chain", help="Jacobian mode: centre (dT/dtheta at the patch centre, the reference's approximation) | exact. [default: centre]", rich_help_panel="IMPACT")] = None,
    tile_size: Annotated[Optional[int], typer.Option("--tile-size", help="Tile edge (voxels) for tiled feature inference; 0 = automatic. [default: 0]", rich_help_panel="IMPACT")] = None,
    feature_memory: Annotated[Optional[float], typer.Option("--feature-memory", help="Memory budget of one feature inference, GB. [default: 4]", rich_help_panel="IMPACT")] = None,
    precision: Annotated[Optional[str], typer.Option("--precision", help="Feature networks: fp32 | tf32 (TensorFloat-32 on the GPU) | fp16 (float16 graphs, for the GPU). [default: fp32]", rich_help_panel="IMPACT")] = None,
    memory: Annotated[Optional[float], typer.Option("--memory", help="Memory budget of the whole run, GB: a run whose estimated peak exceeds it (or what the machine offers) is refused before any work. [default: the machine's]")] = None,
    fov_mask: Annotated[Optional[str], typer.Option("--fov-mask", help="auto: an image without a mask whose data fill a cylinder in a constant background (cone-beam CT) gets that field of view as its mask | off. [default: auto]")] = None,
    preset: Annotated[Optional[str], typer.Option("--preset", help="Start from a preset (fastimpact presets list): mono, multimodal-brain, mr-ct, ct-cbct, fast-cpu; --elastix-params, --config and options override it.")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="TOML or JSON settings file (command-line options override it). IMPACT options take per-level values separated by ';' (e.g. --distance 'l2;l2;l1').")] = None,
    elastix_params: Annotated[Optional[list[Path]], typer.Option("--elastix-params", help="Import an elastix parameter file (including the reference's Impact* keys); repeat it to chain files as elastix -p does (an affine file, then a B-spline file); --config and options override it.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON result on stdout.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing outputs.")] = False,
    qc: Annotated[bool, typer.Option("--qc", help="Also write QC pictures (checkerboard, edges, deformed grid, Jacobian map) and qc/report.html into the output folder.")] = False,
):
    """Register MOVING to FIXED; write warped.nii.gz, displacement.nii.gz, transform.json, report.json, the ITK
    transform transform.h5 / transform.tfm and elastix's TransformParameters.0.txt (for transformix)."""
    import time

    from fastimpact.config import RegistrationConfig
    from fastimpact.io import check_output_dir

    t0 = time.perf_counter()
    options = {
        k: (v.value if isinstance(v, Enum) else v)
        for k, v in dict(
            metric=metric, levels=levels, pyramid=pyramid, pyramid_schedule=_schedule(pyramid_schedule),
            pyramid_sigma=_schedule(pyramid_sigma), fov_mask=fov_mask, memory=memory, iterations=iterations, samples=samples, grid_spacing=grid_spacing,
            affine=affine, affine_iterations=affine_iterations, rigid=rigid, rigid_iterations=rigid_iterations, init=init, bins=bins, bending_weight=bending_weight,
            initial_transform=str(initial_transform) if initial_transform is not None else None,
            interpolation=interpolation, seed=seed, threads=threads, device=device, mode=mode,
            model=_per_level(model), moving_model=_per_level(moving_model), layers=_per_level(layers),
            distance=_per_level(distance), layer_weights=_per_level(layer_weights), pca=_per_level(pca),
            subset=_per_level(subset), feature_norm=_per_level(feature_norm), voxel_size=_per_level(voxel_size),
            patch_size=_per_level(patch_size), jacobian_chain=jacobian_chain,
            tile_size=tile_size, feature_memory=feature_memory, precision=precision,
        ).items()
        if v is not None
    }
    base, source = {}, "settings"
    if preset is not None:
        from fastimpact.presets import load_preset

        base, source = load_preset(preset), f"preset '{preset}'"
    if elastix_params:
        from fastimpact.elastix_params import config_from_elastix_chain

        imported, warnings = config_from_elastix_chain(elastix_params)
        base.update(imported)
        for w in warnings:
            _note(w, as_json)
    if config is not None:
        from fastimpact.config import read_config_file

        base.update(read_config_file(config))
        source = f"config file '{config}'"
    cfg = RegistrationConfig.from_dict(base, source=source) if base else RegistrationConfig()
    cfg = cfg.with_options(**options)
    if cfg.initial_transform:  # a bad file fails now, not after the pyramid is built
        from fastimpact.interchange import initial_affine_matrix

        if init is not None:
            from fastimpact.errors import ConfigError

            raise ConfigError(f"--init {init} and --initial-transform both set the initial affine: give one of them")

        initial_affine_matrix(cfg.initial_transform)
    # Fail on an unusable output folder before spending minutes registering.
    from fastimpact.result import OUTPUT_NAMES

    check_output_dir(output, force=force, names=list(OUTPUT_NAMES) + (["qc"] if qc else []))
    summary = _run_registration(fixed, moving, output, cfg, fixed_mask, moving_mask, force, as_json, t0, qc=qc)
    _emit(summary, as_json)


def _schedule(value: str | None):
    """A pyramid option: 'a;b;c' gives one entry per level (each one number or three)."""
    if value is None:
        return None
    return tuple(v.strip() for v in value.split(";"))


def _per_level(value: str | None):
    """An IMPACT option: 'a;b;c' gives one entry per level, anything else one entry for all."""
    if value is None or ";" not in value:
        return value
    return tuple(v.strip() for v in value.split(";"))


def _run_registration(fixed, moving, output, cfg, fixed_mask, moving_mask, force, as_json, t0, truth=None, qc=False):
    import time

    from fastimpact.engine import register as api_register

    progress, callback = _progress(not as_json)
    with progress:
        result = api_register(fixed, moving, fixed_mask=fixed_mask, moving_mask=moving_mask, config=cfg, callback=callback)
    if truth is not None:
        truth(result)
    if _NOTES:
        result.report["notes"] = list(_NOTES)
    if fixed_mask is not None and getattr(result, "fixed_mask", None) is None:
        from fastimpact.inputs import as_image

        result.fixed_mask = as_image(fixed_mask, "fixed mask", mask=True).data > 0  # folds inside / outside it
    paths = result.save(output, force=force, fixed_name=str(fixed) if isinstance(fixed, Path) else None,
                        moving_name=str(moving) if isinstance(moving, Path) else None, qc=qc)
    wall = time.perf_counter() - t0
    rep = result.report
    summary = {
        "status": "ok",
        "outputs": paths,
        "wall_time_s": round(wall, 3),
        "timings_s": rep.get("timings_s", {}),
        "metric": cfg.metric,
        "levels": [
            {k: s[k] for k in ("stage", "level", "iterations", "metric_start", "metric_end", "time_s")}
            for s in rep["stages"]
        ],
    }
    if rep.get("evaluation"):
        summary["evaluation"] = rep["evaluation"]
    jac = (rep.get("quality") or {}).get("jacobian") or {}
    summary["jacobian"] = {k: ({f: jac[k][f] for f in ("min", "max", "folding_fraction")} if jac.get(k) else None)
                           for k in ("all", "inside", "outside")} | {"region": jac.get("region")}
    summary["warnings"] = list(rep.get("warnings", []))
    if rep.get("device_note"):
        summary["notes"] = [rep["device_note"]]
    if not as_json:
        err = typer.echo
        if rep.get("device_note"):
            err(rep["device_note"], err=True)
        for w in summary["warnings"]:
            err(f"warning: {w}", err=True)
        err(f"done in {wall:.2f} s; outputs in {output}"
            f"{' (see the warnings above)' if summary['warnings'] else ''}", err=True)
    return summary


@app.command()
def apply(
    transform: Annotated[Path, typer.Argument(help="transform.json written by `fastimpact register`.")],
    image: Annotated[Path, typer.Argument(help="Image or label map to resample (.nii/.nii.gz, .mha/.mhd, .nrrd, DICOM folder).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output image file (.nii, .nii.gz, .mha, .mhd, .nrrd).")],
    reference: Annotated[Optional[Path], typer.Option("--reference", help="Output grid (default: the fixed image grid of the registration).")] = None,
    interpolation: Annotated[Optional[Interp], typer.Option(help="cubic | linear | nearest. [default: nearest for an integer label map (its dtype is kept), cubic otherwise]")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON result on stdout.")] = False,
):
    """Resample IMAGE through a saved transform onto the fixed (or --reference) grid."""
    from fastimpact.apply import apply_transform_file

    used = apply_transform_file(transform, image, output, reference=reference, force=force,
                                interpolation=interpolation.value if interpolation is not None else None)
    if interpolation is None and used == "nearest":
        _note(f"'{image}' is an integer label map: nearest interpolation, labels and dtype kept "
              "(pass --interpolation to choose)", as_json)
    if not as_json:
        typer.echo(f"wrote {output}", err=True)
    _emit({"status": "ok", "outputs": {"image": str(output)}, "interpolation": used}, as_json)


#: The demo's input pair, written beside the registration outputs.
DEMO_INPUTS = ("fixed.nii.gz", "moving.nii.gz")


@app.command()
def demo(
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Output folder. [default: ./fastimpact-demo, overwritten]")] = None,
    metric: Annotated[Optional[str], typer.Option(help="Similarity metric (mse, ncc, mi, impact or a sum such as 'impact+0.1*mi'). [default: impact, with mi beside it for comparison]")] = None,
    case: Annotated[Optional[DemoCase], typer.Option(help="mono: the T1 itself; contrast: a contrast-changed T1; t2: a T2-like image synthesised from the tissue maps (multimodal). [default: t2; mono when --metric is mse or ncc]")] = None,
    compare: Annotated[Optional[str], typer.Option(help="A second metric registered on the same pair, its error printed beside the first ('none' to skip). [default: mi when --metric is not given]")] = None,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON result on stdout.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing outputs in -o.")] = False,
):
    """Register the built-in MNI152 (2 mm) pair under a known smooth deformation and report the error.

    By default the multimodal case: a T1 against a T2-like image, registered with IMPACT (MIND-SSC
    features) and, for comparison, with Mattes MI; both errors are printed. The outputs of the first
    metric (fixed, moving, warped, the transforms, report.json and a QC page in qc/) are written.
    """
    import time

    import numpy as np

    from fastimpact.config import RegistrationConfig
    from fastimpact.io import check_output_dir
    from fastimpact.result import OUTPUT_NAMES, QC_DIR
    from fastimpact.engine import register as api_register
    from fastimpact.synthetic import field_error, make_case

    t0 = time.perf_counter()
    if output is None:
        output, force = Path("fastimpact-demo"), True
    check_output_dir(output, force=force, names=[*OUTPUT_NAMES, *DEMO_INPUTS, QC_DIR])
    if compare is None:
        compare = "mi" if metric is None else "none"
    metric = metric or "impact"
    if case is None:
        case = DemoCase.mono if metric in ("mse", "ncc") else DemoCase.t2
    kind = case.value
    case = make_case(kind, resolution="2mm", seed=0)
    before = field_error(np.zeros_like(case.u_true), case.u_true, case.mask)

    def evaluate(result):
        after = field_error(result.displacement, case.u_true, case.mask)
        result.report["evaluation"] = {
            "case": f"MNI152 2009a T1, 2 mm, known smooth deformation (seed 0), moving image: {case.kind}",
            "metric": metric, "error_before_mm": before, "error_after_mm": after,
        }

    # the head as fixed mask (the fixed image above 5 % of its 99th percentile, holes filled), as
    # one would give it for a real pair: samples and the quality figures stay on the anatomy
    from scipy import ndimage

    fdata = np.asarray(case.fixed.data)
    head = ndimage.binary_dilation(ndimage.binary_fill_holes(fdata > 0.05 * np.percentile(fdata, 99)), iterations=2)
    from fastimpact.image import Image

    head_mask = Image(head.astype(np.uint8), case.fixed.affine)
    cfg = RegistrationConfig(metric=metric, threads=threads)
    summary = _run_registration(case.fixed, case.moving, output, cfg, head_mask, None, force, as_json, t0,
                                truth=evaluate, qc=True)
    from fastimpact.io import atomic_write_path, save_image

    for name, img in zip(DEMO_INPUTS, (case.fixed, case.moving)):  # the pair, to look at beside warped.nii.gz
        with atomic_write_path(output / name, force=force) as tmp:
            save_image(img, tmp)
        summary["outputs"][name.split(".")[0]] = str(output / name)
    ev = summary["evaluation"]
    rows = [(metric, ev["error_after_mm"], summary["wall_time_s"])]
    if compare and compare != "none":
        t1 = time.perf_counter()
        other = api_register(case.fixed, case.moving, fixed_mask=head_mask,
                             config=RegistrationConfig(metric=compare, threads=threads))
        err = field_error(other.displacement, case.u_true, case.mask)
        summary["comparison"] = {"metric": compare, "error_after_mm": err,
                                 "wall_time_s": round(time.perf_counter() - t1, 3)}
        rows.append((compare, err, summary["comparison"]["wall_time_s"]))
    if not as_json:
        b = ev["error_before_mm"]
        typer.echo(f"MNI152 T1 vs {kind} image, 2 mm, known deformation: error inside the brain (mm) before: "
                   f"mean {b['mean']:.3f} p95 {b['p95']:.3f} max {b['max']:.3f}")
        for name, a, wall in rows:
            typer.echo(f"  {name:>14s}: mean {a['mean']:.3f} p95 {a['p95']:.3f} max {a['max']:.3f} | {wall:.2f} s")
        typer.echo(f"outputs of {metric} in {output} (QC page: {output / QC_DIR / 'report.html'})")
    _emit(summary, as_json)


def _click_exceptions():
    """(Exit, Abort, UsageError, ClickException) for both Typer layouts (vendored click or not)."""
    try:
        from typer._click import exceptions as cx  # Typer >= 0.2x vendors click

        return typer.Exit, typer.Abort, cx.UsageError, cx.ClickException
    except ImportError:  # pragma: no cover - older Typer on click
        from click import exceptions as cx

        return cx.Exit, cx.Abort, cx.UsageError, cx.ClickException


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived. A BaseException but not a KeyboardInterrupt: Typer turns the latter
    into a silent exit 130, and ``except Exception`` blocks must not swallow either; the output
    context managers (``io.output_dir``, ``io.atomic_write_path``) remove their temporary files."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _install_signal_handlers() -> dict:
    """SIGINT and SIGTERM raise :class:`Interrupted` in the main thread; returns the old handlers."""
    import signal

    def handler(signum, _frame):
        exc = Interrupted(signum)
        io = sys.modules.get("fastimpact.io")
        if io is not None and io.defer_interrupt(exc):  # outputs being moved into place: raised after
            return
        raise exc

    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            old[sig] = signal.signal(sig, handler)
        except (ValueError, OSError):  # pragma: no cover - not the main thread (an embedding program)
            pass
    return old


def _restore_signal_handlers(old: dict) -> None:
    import signal

    for sig, h in old.items():
        try:
            signal.signal(sig, h)
        except (ValueError, OSError, TypeError):  # pragma: no cover
            pass


def _wants_json(argv) -> bool:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--" in args:
        args = args[: args.index("--")]
    return "--json" in args


def _fail(message: str, code: int, as_json: bool, kind: str) -> int:
    """One line on stderr; with --json also one object on stdout."""
    message = " ".join(str(message).split())
    typer.echo(f"error: {message}", err=True)
    if as_json:
        import json

        doc = {"status": "error", "error": kind, "message": message, "exit_code": code}
        if _NOTES:
            doc["notes"] = list(_NOTES)
        sys.stdout.write(json.dumps(doc) + "\n")
        sys.stdout.flush()
    return code


def main(argv=None) -> int:
    """Console entry point: one-line errors, no tracebacks (FASTIMPACT_DEBUG=1 shows them).

    Exit status: 0 success, 2 bad usage or input, 1 the run could not proceed, 130 interrupted
    (Ctrl-C), 143 terminated (SIGTERM). With ``--json`` every outcome prints one JSON object on
    stdout (``"status": "ok"`` or ``"error"`` with ``message`` and ``exit_code``).
    """
    from fastimpact.errors import FastImpactError

    exit_exc, abort_exc, usage_exc, click_exc = _click_exceptions()
    debug = bool(os.environ.get("FASTIMPACT_DEBUG"))
    as_json = _wants_json(argv)
    _NOTES.clear()
    old_handlers = _install_signal_handlers()
    try:
        rv = app(args=argv, standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except exit_exc as exc:
        return exc.exit_code
    except (Interrupted, KeyboardInterrupt) as exc:
        _restore_signal_handlers(old_handlers)
        old_handlers = {}
        import signal

        if isinstance(exc, Interrupted) and exc.signum == signal.SIGTERM:
            return _fail("interrupted (SIGTERM)", 143, as_json, "interrupted")
        return _fail("interrupted", 130, as_json, "interrupted")
    except abort_exc:
        return _fail("aborted", 130, as_json, "interrupted")
    except usage_exc as exc:
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
            typer.echo(ctx.get_help())
            return 2
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        return _fail(f"{exc.format_message()}{hint}", 2, as_json, "usage")
    except click_exc as exc:
        return _fail(exc.format_message(), 2, as_json, "usage")
    except FastImpactError as exc:
        if debug:
            raise
        code = 1 if type(exc).__name__ in ("RegistrationError", "BackendError") else 2
        return _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, code, as_json, type(exc).__name__)
    except MemoryError as exc:
        from fastimpact.memory import out_of_memory_message

        msg = str(exc).splitlines()[0] if str(exc) else out_of_memory_message(None)
        return _fail(msg if msg.startswith("out of memory") else out_of_memory_message(None), 1, as_json, "MemoryError")
    except Exception as exc:  # pragma: no cover - last resort, keeps the one-line promise
        if debug:
            raise
        msg = str(exc).splitlines()[0][:300] if str(exc) else ""
        return _fail(f"internal error {type(exc).__name__}: {msg} (rerun with FASTIMPACT_DEBUG=1 for the "
                     "traceback and report it)", 1, as_json, "internal")
    finally:
        _restore_signal_handlers(old_handlers)


def console_main():  # pragma: no cover - the console script
    sys.exit(main())
