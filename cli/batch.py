"""`fastimpact batch`: register the pairs of a CSV on Dask distributed; resumable; a summary table.

Only Typer and the standard library are imported at module level.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def batch(
    pairs: Annotated[Path, typer.Argument(help="CSV with a header: fixed,moving and optionally fixed_mask,moving_mask,fixed_labels,moving_labels,name (paths relative to the CSV).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder: one sub-folder per pair, summary.csv and summary.json.")],
    scheduler: Annotated[Optional[str], typer.Option("--scheduler", help="Address of a running Dask scheduler (e.g. tcp://host:8786). [default: a LocalCluster]")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", help="LocalCluster worker processes, one registration at a time each; 0 = no Dask, a plain loop in this process. [default: min(4, cores/2)]")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", help="CPU threads per registration. [default: the cores divided among the workers]")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="TOML or JSON file of registration settings (any `register` setting); the options below override it.")] = None,
    metric: Annotated[Optional[str], typer.Option(help="Similarity metric (mse, ncc, mi, impact or a sum). [default: mse]")] = None,
    levels: Annotated[Optional[int], typer.Option(help="Pyramid levels. [default: 3]")] = None,
    iterations: Annotated[Optional[int], typer.Option(help="B-spline iterations per level. [default: 500]")] = None,
    samples: Annotated[Optional[int], typer.Option(help="Random samples per iteration. [default: 2000]")] = None,
    grid_spacing: Annotated[Optional[float], typer.Option("--grid-spacing", help="Final B-spline control-point spacing, mm. [default: 8]")] = None,
    affine_iterations: Annotated[Optional[int], typer.Option("--affine-iterations", help="Affine iterations per level. [default: 250]")] = None,
    bending_weight: Annotated[Optional[float], typer.Option("--bending-weight", help="Bending-energy penalty weight. [default: 0]")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed. [default: 0]")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu | cuda | auto; with cuda each local worker gets one GPU. [default: cpu]")] = None,
    qc: Annotated[bool, typer.Option("--qc", help="QC pictures and report.html in every pair's folder.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object on stdout.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Rerun the pairs already done.")] = False,
):
    """Register every pair of PAIRS (a CSV) into OUTPUT/<name>; pairs already done are skipped."""
    import time

    from fastimpact.batch import read_pairs, run_batch, write_summary
    from fastimpact.config import RegistrationConfig, read_config_file
    from fastimpact.errors import ConfigError

    t0 = time.perf_counter()
    if workers is not None and workers < 0:
        raise ConfigError(f"--workers {workers} is invalid: give 0 (no Dask) or more")
    if workers is not None and scheduler is not None:
        raise ConfigError("--workers applies to the local cluster: drop it with --scheduler (the scheduler has its workers)")
    plist = read_pairs(pairs)
    base = read_config_file(config) if config is not None else {}
    cfg = RegistrationConfig.from_dict(base, source=f"config file '{config}'") if base else RegistrationConfig()
    options = {k: v for k, v in dict(metric=metric, levels=levels, iterations=iterations, samples=samples,
                                     grid_spacing=grid_spacing, affine_iterations=affine_iterations,
                                     bending_weight=bending_weight, seed=seed, device=device).items() if v is not None}
    cfg = cfg.with_options(**options)
    if output.exists() and not output.is_dir():
        from fastimpact.errors import ImageIOError

        raise ImageIOError(f"output folder '{output}' exists and is a file; choose another -o")

    progress = _progress(len(plist), quiet=as_json)
    with progress["context"]:
        records = run_batch(plist, cfg.to_dict(), output, workers=workers, scheduler=scheduler, threads=threads,
                            qc=qc, force=force, on_result=progress["callback"])
    doc = write_summary(output, records, time.perf_counter() - t0)
    if as_json:
        import json
        import sys

        sys.stdout.write(json.dumps({"status": "ok" if not doc["failed"] else "failed", **doc}, default=str) + "\n")
    else:
        _table(records)
        typer.echo(f"{doc['ok']} registered, {doc['done_before']} done before, {doc['failed']} failed in "
                   f"{doc['wall_time_s']:.1f} s; summary in {output / 'summary.csv'}", err=True)
    if doc["failed"]:
        raise typer.Exit(1)


def _progress(total: int, quiet: bool) -> dict:
    import contextlib

    if quiet:
        return {"context": contextlib.nullcontext(), "callback": None}
    from rich.console import Console

    console = Console(stderr=True)
    if not console.is_terminal:
        def plain(rec, n, tot):
            extra = rec.get("message") or (f"{rec['time_s']:.1f} s" if rec.get("time_s") else "")
            typer.echo(f"[{n}/{tot}] {rec['name']}: {rec['status']}{' - ' + extra if extra else ''}", err=True)

        return {"context": contextlib.nullcontext(), "callback": plain}
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    prog = Progress(TextColumn("pairs"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[last]}"),
                    TimeElapsedColumn(), console=console)
    task = prog.add_task("pairs", total=total, last="")

    def cb(rec, n, tot):
        prog.update(task, completed=n, last=f"{rec['name']}: {rec['status']}")
        if rec["status"] == "error":
            prog.console.print(f"{rec['name']}: error: {rec.get('message', '')}", markup=False, highlight=False)

    return {"context": prog, "callback": cb}


def _table(records: list[dict]) -> None:
    from fastimpact.batch import summary_rows

    def f(v, nd=4):
        if v is None or v == "":
            return "-"
        return f"{v:.{nd}g}" if isinstance(v, float) else str(v)

    rows = summary_rows(records)
    w = max([4] + [len(r["name"]) for r in rows])
    typer.echo(f"{'name':<{w}} {'status':<6} {'time_s':>7} {'jac_min':>8} {'fold_in':>8} {'fold_out':>8} "
               f"{'dice':>6} {'hd95':>6} {'warn':>4}  message")
    for r in rows:
        typer.echo(f"{r['name']:<{w}} {r['status']:<6} {f(r['time_s']):>7} {f(r['jacobian_min']):>8} "
                   f"{f(r['folding_inside']):>8} {f(r['folding_outside']):>8} {f(r['dice_mean'], 3):>6} "
                   f"{f(r['hd95_mean_mm'], 3):>6} {r['warnings']:>4}  {r['message']}")
