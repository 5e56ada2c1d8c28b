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

    app.add_typer(models_app, name="models")
    app.command("features")(features)


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


def _progress(enabled: bool):
    """A callback drawing a rich progress bar on stderr (None when stderr is not a terminal)."""
    if not enabled:
        return None, None
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    if not console.is_terminal:
        return None, None
    progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TextColumn("{task.fields[value]}"), TimeElapsedColumn(), console=console, transient=False)
    tasks = {}

    def callback(event, info):
        if event == "level_start":
            key = (info["stage"], info["level"])
            tasks[key] = progress.add_task(f"{info['stage']} level {info['level'] + 1}", total=info["iterations"], value="")
        elif event == "iteration":
            key = (info["stage"], info["level"])
            progress.update(tasks[key], advance=1, value=f"metric {info['value']:.5g}")

    return progress, callback


def _emit(result_summary: dict, as_json: bool):
    import json

    if as_json:
        sys.stdout.write(json.dumps(result_summary) + "\n")
        sys.stdout.flush()


@app.command()
def register(
    fixed: Annotated[Path, typer.Argument(help="Fixed (reference) image, NIfTI .nii/.nii.gz.")],
    moving: Annotated[Path, typer.Argument(help="Moving image, NIfTI .nii/.nii.gz.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder.")] = Path("fastimpact-out"),
    metric: Annotated[Optional[str], typer.Option(help="Similarity metric: mse | ncc | mi | impact, or a weighted sum such as 'impact+0.1*mi'. [default: mse]")] = None,
    fixed_mask: Annotated[Optional[Path], typer.Option("--fixed-mask", help="Mask on the fixed grid (voxels > 0 are sampled).")] = None,
    moving_mask: Annotated[Optional[Path], typer.Option("--moving-mask", help="Mask on the moving grid (samples mapping outside are dropped).")] = None,
    levels: Annotated[Optional[int], typer.Option(help="Pyramid levels (shrink factors 2^(L-1) ... 1). [default: 3]")] = None,
    iterations: Annotated[Optional[int], typer.Option(help="B-spline ASGD iterations per level. [default: 500]")] = None,
    samples: Annotated[Optional[int], typer.Option(help="Random samples per iteration. [default: 2000]")] = None,
    grid_spacing: Annotated[Optional[float], typer.Option("--grid-spacing", help="Final B-spline control-point spacing, mm (doubled per coarser level). [default: 8]")] = None,
    affine: Annotated[Optional[bool], typer.Option("--affine/--no-affine", help="Optimised affine stage before the B-spline stage. [default: on]")] = None,
    affine_iterations: Annotated[Optional[int], typer.Option("--affine-iterations", help="Affine ASGD iterations per level. [default: 250]")] = None,
    init: Annotated[Optional[str], typer.Option(help="Initial affine: moments | geometry | none. [default: moments]")] = None,
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
    config: Annotated[Optional[Path], typer.Option("--config", help="TOML or JSON settings file (command-line options override it). IMPACT options take per-level values separated by ';' (e.g. --distance 'l2;l2;l1').")] = None,
    elastix_params: Annotated[Optional[Path], typer.Option("--elastix-params", help="Import an elastix parameter file (including the reference's Impact* keys); --config and options override it.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON result on stdout.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing outputs.")] = False,
):
    """Register MOVING to FIXED; write warped.nii.gz, displacement.nii.gz, transform.json, report.json."""
    import time

    from fastimpact.config import RegistrationConfig
    from fastimpact.io import check_output_dir

    t0 = time.perf_counter()
    options = {
        k: (v.value if isinstance(v, Enum) else v)
        for k, v in dict(
            metric=metric, levels=levels, iterations=iterations, samples=samples, grid_spacing=grid_spacing,
            affine=affine, affine_iterations=affine_iterations, init=init, bins=bins, bending_weight=bending_weight,
            interpolation=interpolation, seed=seed, threads=threads, device=device, mode=mode,
            model=_per_level(model), moving_model=_per_level(moving_model), layers=_per_level(layers),
            distance=_per_level(distance), layer_weights=_per_level(layer_weights), pca=_per_level(pca),
            subset=_per_level(subset), feature_norm=_per_level(feature_norm), voxel_size=_per_level(voxel_size),
            patch_size=_per_level(patch_size), jacobian_chain=jacobian_chain,
            tile_size=tile_size, feature_memory=feature_memory, precision=precision,
        ).items()
        if v is not None
    }
    impact_given = [k for k in ("mode", "model", "moving_model", "layers", "distance", "layer_weights", "pca", "subset",
                                "feature_norm", "voxel_size", "patch_size", "jacobian_chain", "tile_size",
                                "feature_memory", "precision") if k in options]
    if impact_given and "metric" in options and "impact" not in str(options["metric"]).lower():
        from fastimpact.errors import ConfigError

        raise ConfigError(f"--{impact_given[0].replace('_', '-')} applies to the IMPACT metric, but --metric is "
                          f"{options['metric']!r}: add impact to --metric (e.g. 'impact' or 'impact+0.1*mi') or drop it")
    base, source = {}, "settings"
    if elastix_params is not None:
        from fastimpact.elastix_params import config_from_elastix

        base, warnings = config_from_elastix(elastix_params)
        if not as_json:
            for w in warnings:
                typer.echo(f"note: {w}", err=True)
    if config is not None:
        from fastimpact.config import read_config_file

        base.update(read_config_file(config))
        source = f"config file '{config}'"
    cfg = RegistrationConfig.from_dict(base, source=source) if base else RegistrationConfig()
    cfg = cfg.with_options(**options)
    # Fail on an unusable output folder before spending minutes registering.
    from fastimpact.registration import OUTPUT_NAMES

    check_output_dir(output, force=force, names=list(OUTPUT_NAMES))
    summary = _run_registration(fixed, moving, output, cfg, fixed_mask, moving_mask, force, as_json, t0)
    _emit(summary, as_json)


def _per_level(value: str | None):
    """An IMPACT option: 'a;b;c' gives one entry per level, anything else one entry for all."""
    if value is None or ";" not in value:
        return value
    return tuple(v.strip() for v in value.split(";"))


def _run_registration(fixed, moving, output, cfg, fixed_mask, moving_mask, force, as_json, t0, truth=None):
    import time

    from fastimpact.registration import register as api_register

    progress, callback = _progress(not as_json)
    if progress is not None:
        with progress:
            result = api_register(fixed, moving, fixed_mask=fixed_mask, moving_mask=moving_mask, config=cfg, callback=callback)
    else:
        result = api_register(fixed, moving, fixed_mask=fixed_mask, moving_mask=moving_mask, config=cfg)
    if truth is not None:
        truth(result)
    paths = result.save(output, force=force, fixed_name=str(fixed) if isinstance(fixed, Path) else None,
                        moving_name=str(moving) if isinstance(moving, Path) else None)
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
    if not as_json:
        err = typer.echo
        if rep.get("device_note"):
            err(rep["device_note"], err=True)
        for s in summary["levels"]:
            err(f"{s['stage']:7s} level {s['level']}: metric {s['metric_start']:.6g} -> {s['metric_end']:.6g} "
                f"({s['iterations']} it, {s['time_s']:.2f} s)", err=True)
        err(f"done in {wall:.2f} s; outputs in {output}", err=True)
    return summary


@app.command()
def apply(
    transform: Annotated[Path, typer.Argument(help="transform.json written by `fastimpact register`.")],
    image: Annotated[Path, typer.Argument(help="Image or label map to resample (NIfTI).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output image file (.nii or .nii.gz).")],
    reference: Annotated[Optional[Path], typer.Option("--reference", help="Output grid (default: the fixed image grid of the registration).")] = None,
    interpolation: Annotated[Interp, typer.Option(help="cubic | linear | nearest (use nearest for label maps).")] = Interp.cubic,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output.")] = False,
):
    """Resample IMAGE through a saved transform onto the fixed (or --reference) grid."""
    from fastimpact.apply import apply_transform_file

    apply_transform_file(transform, image, output, reference=reference, interpolation=interpolation.value, force=force)
    typer.echo(f"wrote {output}", err=True)


@app.command()
def demo(
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Output folder. [default: ./fastimpact-demo, overwritten]")] = None,
    metric: Annotated[str, typer.Option(help="Similarity metric (mse, ncc, mi, impact or a sum such as 'impact+0.1*mi').")] = "mse",
    case: Annotated[Optional[DemoCase], typer.Option(help="mono: the T1 itself; contrast: a contrast-changed T1; t2: a T2-like image synthesised from the tissue maps (multimodal: use --metric mi or impact).")] = None,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON result on stdout.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing outputs in -o.")] = False,
):
    """Register the built-in MNI152 (2 mm) pair under a known smooth deformation and report the error."""
    import time

    import numpy as np

    from fastimpact.config import RegistrationConfig
    from fastimpact.io import check_output_dir
    from fastimpact.registration import OUTPUT_NAMES
    from fastimpact.synthetic import field_error, make_case

    t0 = time.perf_counter()
    if output is None:
        output, force = Path("fastimpact-demo"), True
    check_output_dir(output, force=force, names=list(OUTPUT_NAMES))
    kind = (case or DemoCase.mono).value
    case = make_case(kind, resolution="2mm", seed=0)
    before = field_error(np.zeros_like(case.u_true), case.u_true, case.mask)

    def evaluate(result):
        after = field_error(result.displacement, case.u_true, case.mask)
        result.report["evaluation"] = {
            "case": f"MNI152 2009a T1, 2 mm, known smooth deformation (seed 0), moving image: {case.kind}",
            "error_before_mm": before, "error_after_mm": after,
        }

    cfg = RegistrationConfig(metric=metric, threads=threads)
    summary = _run_registration(case.fixed, case.moving, output, cfg, None, None, force, as_json, t0, truth=evaluate)
    ev = summary["evaluation"]
    if not as_json:
        b, a = ev["error_before_mm"], ev["error_after_mm"]
        typer.echo(
            f"displacement error inside the brain (mm): before mean {b['mean']:.3f} p95 {b['p95']:.3f} max {b['max']:.3f}"
            f" | after mean {a['mean']:.3f} p95 {a['p95']:.3f} max {a['max']:.3f} | time {summary['wall_time_s']:.2f} s"
        )
    _emit(summary, as_json)


def _click_exceptions():
    """(Exit, Abort, UsageError, ClickException) for both Typer layouts (vendored click or not)."""
    try:
        from typer._click import exceptions as cx  # Typer >= 0.2x vendors click

        return typer.Exit, typer.Abort, cx.UsageError, cx.ClickException
    except ImportError:  # pragma: no cover - older Typer on click
        from click import exceptions as cx

        return cx.Exit, cx.Abort, cx.UsageError, cx.ClickException


def main(argv=None) -> int:
    """Console entry point: one-line errors, no tracebacks (FASTIMPACT_DEBUG=1 shows them)."""
    from fastimpact.errors import FastImpactError

    exit_exc, abort_exc, usage_exc, click_exc = _click_exceptions()
    debug = bool(os.environ.get("FASTIMPACT_DEBUG"))
    try:
        rv = app(args=argv, standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except exit_exc as exc:
        return exc.exit_code
    except abort_exc:
        typer.echo("error: aborted", err=True)
        return 130
    except usage_exc as exc:
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
            typer.echo(ctx.get_help())
            return 2
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        typer.echo(f"error: {exc.format_message()}{hint}".replace("\n", " "), err=True)
        return 2
    except click_exc as exc:
        typer.echo(f"error: {exc.format_message()}".replace("\n", " "), err=True)
        return 2
    except FastImpactError as exc:
        if debug:
            raise
        code = 1 if type(exc).__name__ in ("RegistrationError", "BackendError") else 2
        typer.echo(f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", err=True)
        return code
    except KeyboardInterrupt:
        typer.echo("error: interrupted", err=True)
        return 130
    except MemoryError:
        typer.echo("error: out of memory: use fewer --samples or a smaller image, or a machine with more memory", err=True)
        return 1
    except Exception as exc:  # pragma: no cover - last resort, keeps the one-line promise
        if debug:
            raise
        msg = str(exc).splitlines()[0][:300] if str(exc) else ""
        typer.echo(f"error: internal error {type(exc).__name__}: {msg} (rerun with FASTIMPACT_DEBUG=1 for the "
                   "traceback and report it)", err=True)
        return 1


def console_main():  # pragma: no cover - the console script
    sys.exit(main())
