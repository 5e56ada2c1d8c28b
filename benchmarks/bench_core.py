"""fastimpact vs elastix (itk-elastix) on the same known-truth pairs, in one run.

Cases come from :func:`fastimpact.synthetic.make_case` (MNI152 2009a T1 under a known smooth
deformation, max 10 mm in the brain): ``mono`` (moving = T1) and ``contrast`` (moving = T1 with a
non-monotonic intensity remap, bias field and noise). Pairs: MSE and NCC on ``mono``; MI on every
case given.

Both tools get the same configuration:
  [affine stage: 3 levels x 250 ASGD iterations, centre-of-mass initialisation]  (--affine, default)
  B-spline FFD, final control-point spacing 8 mm, doubled per coarser level (32 / 16 / 8 mm);
  3 levels, Gaussian smoothing (sigma 0.5 f voxels) + downsampling pyramid, f = 4 / 2 / 1;
  ASGD with automatic parameter estimation (elastix: --estimation Original, its default, or
  DisplacementDistribution; pick the one fastimpact uses), 500 iterations per level;
  random coordinate sampler, 2000 samples, new samples every iteration; cubic B-spline image
  interpolation; MSE / NCC / Mattes MI with 32 bins; no masks (the error is measured inside the
  brain mask of the fixed image).

Each tool runs as a subprocess, so its wall time includes interpreter start, imports, reading the
images and writing the warped image and the displacement field as NIfTI. elastix runs through
itk-elastix (this file re-invoked with ``--elastix-worker``), its deformation field computed by
transformix. Both fields are read with :func:`fastimpact.io.load_displacement_itk` (ITK
convention: LPS components, fixed x -> moving x + u; converted to RAS there, the one place) and
compared with the true field voxel by voxel inside the brain mask.

Examples::

    python benchmarks/bench_core.py                       # 1 mm, all pairs, both tools
    python benchmarks/bench_core.py --resolution 2mm      # quick
    python benchmarks/bench_core.py --tools elastix --metrics mi --cases mono,contrast

Timings depend on what else runs on the machine: the table shows CPU seconds next to wall
seconds and the load average before and after. Timings never sit in unit tests; this prints a table (and the same table as markdown for
benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ELASTIX_METRICS = {
    "mse": "AdvancedMeanSquares",
    "ncc": "AdvancedNormalizedCorrelation",
    "mi": "AdvancedMattesMutualInformation",
}
ALL_METRICS = ("mse", "ncc", "mi")
ALL_CASES = ("mono", "contrast", "t2")
MONO_ONLY = ("mse", "ncc")  # metrics that assume equal intensities: run on the mono case only


# -------------------------------------------------------------------------------------------------
# elastix configuration
# -------------------------------------------------------------------------------------------------


def elastix_parameter_maps(
    metric: str,
    *,
    levels: int = 3,
    iterations: int = 500,
    affine_iterations: int = 250,
    samples: int = 2000,
    grid_spacing: float = 8.0,
    bins: int = 32,
    affine: bool = True,
    seed: int = 0,
    estimation: str = "Original",
) -> list[dict[str, list[str]]]:
    """elastix parameter maps equivalent to fastimpact's configuration (one per stage).

    Grid spacing: elastix's BSplineTransform uses FinalGridSpacingInPhysicalUnits x
    GridSpacingSchedule[level], so schedule 2^(L-1-l) (4 2 1) gives 32 / 16 / 8 mm, fastimpact's
    rule "final spacing, doubled per coarser level". Pyramid: the Recursive pyramids smooth with
    sigma = 0.5 x factor voxels and downsample by the factor (the Smoothing pyramids would not
    downsample), as fastimpact's pyramid does. ``estimation`` is elastix's
    ASGDParameterEstimationMethod: "Original" (elastix's default; at the finest B-spline level its
    "Computing the Jacobian terms" step alone takes tens of seconds) or "DisplacementDistribution".
    """
    factors = [2 ** (levels - 1 - i) for i in range(levels)]
    schedule = [str(f) for f in factors for _ in range(3)]
    common = {
        "FixedInternalImagePixelType": ["float"],
        "MovingInternalImagePixelType": ["float"],
        "UseDirectionCosines": ["true"],
        "Registration": ["MultiResolutionRegistration"],
        "FixedImagePyramid": ["FixedRecursiveImagePyramid"],
        "MovingImagePyramid": ["MovingRecursiveImagePyramid"],
        "NumberOfResolutions": [str(levels)],
        "FixedImagePyramidSchedule": schedule,
        "MovingImagePyramidSchedule": schedule,
        "Metric": [ELASTIX_METRICS[metric]],
        "Optimizer": ["AdaptiveStochasticGradientDescent"],
        "AutomaticParameterEstimation": ["true"],
        "ASGDParameterEstimationMethod": [estimation],
        "ImageSampler": ["RandomCoordinate"],
        "NumberOfSpatialSamples": [str(samples)],
        "NewSamplesEveryIteration": ["true"],
        "CheckNumberOfSamples": ["true"],
        "RandomSeed": [str(seed)],
        "Interpolator": ["BSplineInterpolator"],
        "BSplineInterpolationOrder": ["3"],
        "Resampler": ["DefaultResampler"],
        "ResampleInterpolator": ["FinalBSplineInterpolator"],
        "FinalBSplineInterpolationOrder": ["3"],
        "DefaultPixelValue": ["0"],
        "ResultImagePixelType": ["float"],
        "ResultImageFormat": ["nii.gz"],
        "HowToCombineTransforms": ["Compose"],
        "WriteIterationInfo": ["false"],
    }
    if metric == "mi":
        common["NumberOfHistogramBins"] = [str(bins)]
    maps = []
    if affine:
        m = dict(common)
        m.update(
            {
                "Transform": ["AffineTransform"],
                "AutomaticScalesEstimation": ["true"],
                "AutomaticTransformInitialization": ["true"],
                "AutomaticTransformInitializationMethod": ["CenterOfGravity"],
                "MaximumNumberOfIterations": [str(affine_iterations)],
                "WriteResultImage": ["false"],
            }
        )
        maps.append(m)
    m = dict(common)
    m.update(
        {
            "Transform": ["BSplineTransform"],
            "FinalGridSpacingInPhysicalUnits": [repr(float(grid_spacing))],
            "GridSpacingSchedule": [str(f) for f in factors],
            "BSplineTransformSplineOrder": ["3"],
            "MaximumNumberOfIterations": [str(iterations)],
            "WriteResultImage": ["true"],
        }
    )
    if not affine:
        m["AutomaticTransformInitialization"] = ["false"]
    maps.append(m)
    return maps


def format_parameter_map(m: dict[str, list[str]]) -> str:
    """An elastix parameter file text for one map (for the record / RESULTS.md)."""
    lines = []
    for k, vals in m.items():
        vs = " ".join(v if re.fullmatch(r"-?[0-9.eE+-]+", v) else f'"{v}"' for v in vals)
        lines.append(f"({k} {vs})")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------
# elastix worker (runs in its own process: `bench_core.py --elastix-worker spec.json`)
# -------------------------------------------------------------------------------------------------


def _elastix_worker(spec_path: str) -> None:
    t0 = time.perf_counter()
    spec = json.loads(Path(spec_path).read_text())
    timings = {}
    import itk

    threads = int(spec["threads"])
    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(threads)
    image_type = itk.Image[itk.F, 3]
    elastix_type = itk.ElastixRegistrationMethod[image_type, image_type]  # triggers the lazy load
    transformix_type = itk.TransformixFilter[image_type]
    timings["import"] = time.perf_counter() - t0

    t = time.perf_counter()
    fixed = itk.imread(spec["fixed"], itk.F)
    moving = itk.imread(spec["moving"], itk.F)
    timings["load"] = time.perf_counter() - t

    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    params = itk.ParameterObject.New()
    for m in spec["maps"]:
        params.AddParameterMap({k: tuple(v) for k, v in m.items()})

    t = time.perf_counter()
    elx = elastix_type.New()
    elx.SetFixedImage(fixed)
    elx.SetMovingImage(moving)
    elx.SetParameterObject(params)
    elx.SetNumberOfThreads(threads)
    for key, setter in (("fixed_mask", "SetFixedMask"), ("moving_mask", "SetMovingMask")):
        if spec.get(key):  # masks as elastix wants them: unsigned char images
            getattr(elx, setter)(itk.imread(spec[key], itk.UC))
    # No output directory: elastix writes nothing itself (with one it would also save its own
    # result image); its log goes to stdout, which the parent keeps as elastix.log.
    elx.SetLogToConsole(True)
    elx.Update()
    result = elx.GetOutput()
    tparams = elx.GetTransformParameterObject()
    timings["registration"] = time.perf_counter() - t

    # transformix always writes deformationField.<ResultImageFormat> (nii.gz here) into its output
    # directory (the current one if none is set): that file is elastix's field output, so it is
    # not written a second time.
    t = time.perf_counter()
    tfx = transformix_type.New()
    tfx.SetMovingImage(moving)
    tfx.SetTransformParameterObject(tparams)
    tfx.ComputeDeformationFieldOn()
    tfx.SetOutputDirectory(str(out))
    tfx.SetLogToConsole(False)
    if hasattr(tfx, "SetNumberOfThreads"):
        tfx.SetNumberOfThreads(threads)
    tfx.Update()
    written = sorted(out.glob("deformationField.nii*"))
    if not written:  # an itk-elastix that keeps the field in memory only
        itk.imwrite(tfx.GetOutputDeformationField(), str(out / "deformationField.nii.gz"))
        written = [out / "deformationField.nii.gz"]
    written[0].rename(out / ("displacement" + "".join(written[0].suffixes)))
    timings["deformation_field"] = time.perf_counter() - t

    t = time.perf_counter()
    itk.imwrite(result, str(out / "warped.nii.gz"))
    timings["write"] = time.perf_counter() - t
    timings["total_in_process"] = time.perf_counter() - t0
    Path(spec["result"]).write_text(json.dumps({"status": "ok", "timings_s": timings, "itk_threads": threads}))


def _parse_elastix_log(path: Path) -> list[dict]:
    """Per-level times from elastix's log ("Time spent in resolution k ...: t"); a new parameter
    map (stage) starts whenever the level number goes back to 0."""
    if not path.is_file():
        return []
    text = path.read_text(errors="replace")
    out = []
    stage = -1
    estimation = None
    for line in text.splitlines():
        m = re.search(r"Automatic parameter estimation took ([0-9.]+)s", line)
        if m:
            estimation = float(m.group(1))
        m = re.search(r"Time spent in resolution (\d+) \(ITK initialization and iterating\): ([0-9.]+)", line)
        if m:
            level = int(m.group(1))
            stage += level == 0
            out.append({"stage": stage, "level": level, "time_s": float(m.group(2)),
                        "estimation_s": estimation})
            estimation = None
        m = re.search(r"Stopping condition: (.*)", line)
        if m and out:
            out[-1]["stop"] = m.group(1).strip()
    return out


# -------------------------------------------------------------------------------------------------
# running the tools
# -------------------------------------------------------------------------------------------------


def _timed_run(cmd, env, timeout, cwd=None):
    """Run a command; return (CompletedProcess, wall seconds, CPU seconds user+sys of the child).

    CPU time is less sensitive than wall time to other jobs sharing the machine."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        proc = subprocess.CompletedProcess(cmd, -9, out, f"timed out after {timeout:.0f} s (--timeout)")
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return proc, wall, cpu


def _fastimpact_command() -> list[str]:
    exe = Path(sys.executable).parent / "fastimpact"
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("fastimpact")
    if found:
        return [found]
    return [sys.executable, "-c", "from fastimpact.cli.main import console_main; console_main()"]


def _last_json_line(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def run_elastix(fixed: Path, moving: Path, out: Path, maps, threads: int, timeout: float, *,
                fixed_mask: Path | None = None, moving_mask: Path | None = None) -> dict:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    spec = out / "worker_spec.json"
    result_file = out / "worker_result.json"
    spec.write_text(json.dumps({"fixed": str(fixed), "moving": str(moving), "out": str(out),
                                "maps": maps, "threads": threads, "result": str(result_file),
                                "fixed_mask": str(fixed_mask) if fixed_mask else None,
                                "moving_mask": str(moving_mask) if moving_mask else None}))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--elastix-worker", str(spec)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=str(threads))
    proc, wall, cpu = _timed_run(cmd, env, timeout, cwd=out)
    log = out / "elastix.log"
    log.write_text(proc.stdout or "")
    info = json.loads(result_file.read_text()) if result_file.is_file() else {}
    ok = proc.returncode == 0 and info.get("status") == "ok"
    return {
        "ok": ok, "wall_s": wall, "cpu_s": cpu, "timings_s": info.get("timings_s", {}), "levels": _parse_elastix_log(log),
        "field": out / "displacement.nii.gz", "warped": out / "warped.nii.gz",
        "message": "" if ok else _failure_message(proc, log),
    }


def run_fastimpact(fixed: Path, moving: Path, out: Path, metric: str, args, threads: int,
                   timeout: float, numba_cache: Path | None, extra=()) -> dict:
    cmd = _fastimpact_command() + [
        "register", str(fixed), str(moving), "-o", str(out), "--metric", metric, "--json", "--force",
        "--levels", str(args.levels), "--iterations", str(args.iterations),
        "--samples", str(args.samples), "--grid-spacing", str(args.grid_spacing),
        "--affine" if args.affine else "--no-affine", "--affine-iterations", str(args.affine_iterations),
        "--seed", str(args.seed), "--threads", str(threads),
    ]
    if "mi" in metric:
        cmd += ["--bins", str(args.bins)]
    cmd += list(extra)
    env = dict(os.environ, NUMBA_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    if numba_cache is not None:
        env["NUMBA_CACHE_DIR"] = str(numba_cache)
    proc, wall, cpu = _timed_run(cmd, env, timeout)
    info = _last_json_line(proc.stdout) or {}
    ok = proc.returncode == 0 and info.get("status") == "ok"
    levels = [
        {"stage": lv.get("stage"), "level": lv.get("level"), "time_s": lv.get("time_s")}
        for lv in info.get("levels", [])
    ]
    return {
        "ok": ok, "wall_s": wall, "cpu_s": cpu, "timings_s": info.get("timings_s", {}), "levels": levels,
        "field": out / "displacement.nii.gz", "warped": out / "warped.nii.gz",
        "message": "" if ok else _failure_message(proc), "command": " ".join(cmd),
    }


def _failure_message(proc, log: Path | None = None) -> str:
    lines = [ln for ln in (proc.stderr or "").strip().splitlines() if ln.strip()]
    if log is not None and log.is_file():
        errs = [ln for ln in log.read_text(errors="replace").splitlines()
                if "ERROR" in ln or "Description:" in ln or "Too many samples" in ln]
        lines += errs
    msg = lines[-1] if lines else f"exit status {proc.returncode}"
    return f"exit {proc.returncode}: {msg.strip()[:200]}"


# -------------------------------------------------------------------------------------------------
# evaluation
# -------------------------------------------------------------------------------------------------


def evaluate(run: dict, case, check_consistency: bool) -> dict:
    """Field error inside the fixed brain mask; optionally check that the tool's warped image is
    the moving image resampled with the field we read (catches sign / LPS-RAS mistakes)."""
    from fastimpact.io import load_displacement_itk, load_image
    from fastimpact.synthetic import field_error, warp

    if not run["ok"]:
        return {}
    u, ref = load_displacement_itk(run["field"])
    if u.shape[:3] != case.u_true.shape[:3] or not np.allclose(ref.affine, case.fixed.affine, atol=1e-3):
        return {"eval_note": f"field grid {u.shape[:3]} / affine differs from the fixed grid"}
    res = {"error": field_error(u, case.u_true, case.mask)}
    if check_consistency:
        warped = np.asarray(load_image(run["warped"]).data, dtype=np.float32)
        resampled = warp(np.asarray(case.moving.data), case.moving.affine, u)
        scale = np.percentile(np.abs(np.asarray(case.fixed.data)[case.mask]), 99)
        res["consistency"] = float(np.abs(warped - resampled)[case.mask].mean() / scale)
    return res


# -------------------------------------------------------------------------------------------------
# reporting
# -------------------------------------------------------------------------------------------------


def _stage_summary(tool: str, r: dict) -> str:
    t = r.get("timings_s", {})
    if tool == "elastix":
        keys = [("import", "import"), ("load", "load"), ("registration", "reg"),
                ("deformation_field", "field"), ("write", "write")]
    else:
        keys = [("load", "load"), ("pyramid", "pyr"), ("features", "features"), ("affine_stage", "affine"),
                ("bspline_stage", "bspline"), ("dense_field", "field"), ("warp", "warp"), ("write", "write")]
    parts = [f"{short} {float(t[k]):.1f}" for k, short in keys if k in t]
    if tool == "elastix" and r.get("levels"):
        stages = sorted({lv["stage"] for lv in r["levels"]})
        names = ["affine", "bspline"] if len(stages) == 2 else ["bspline"] * len(stages)
        for st, name in zip(stages, names):
            lvs = [lv for lv in r["levels"] if lv["stage"] == st]
            per = "/".join(f"{lv['time_s']:.1f}" for lv in lvs)
            est = sum(lv.get("estimation_s") or 0.0 for lv in lvs)
            parts.append(f"{name} levels {per} (step estimation {est:.1f})")
    return ", ".join(parts)


def _fmt(x, nd=2):
    return "-" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{nd}f}"


def make_rows(records):
    rows = []
    for rec in records:
        err = rec.get("error") or {}
        rows.append([
            rec["case"], rec["metric"], rec["tool"], rec["run"], _fmt(rec["wall_s"], 1), _fmt(rec.get("cpu_s"), 1),
            _stage_summary(rec["tool"], rec), _fmt(err.get("mean")), _fmt(err.get("p95")),
            _fmt(err.get("max")), _fmt(rec["initial"]["mean"]),
            "ok" if rec["ok"] else rec["message"],
        ])
    return rows


HEADER = ["case", "metric", "tool", "run", "wall s", "cpu s", "stage times s", "err mean", "err p95",
          "err max", "init mean", "status"]


def print_table(rows, header, file=sys.stdout):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    print("  ".join(str(h).ljust(w) for h, w in zip(header, widths)), file=file)
    print("  ".join("-" * w for w in widths), file=file)
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)), file=file)


def markdown_table(rows, header) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in rows]
    return "\n".join(out)


def ratio_rows(records):
    """Per pair: median warm fastimpact wall / median elastix wall (and vs elastix's in-process
    registration + field + write time, i.e. without Python/ITK start-up)."""
    rows = []
    pairs = sorted({(r["case"], r["metric"]) for r in records}, key=lambda p: (ALL_CASES.index(p[0]), ALL_METRICS.index(p[1])))
    for case, metric in pairs:
        fi = [r for r in records if (r["case"], r["metric"], r["tool"]) == (case, metric, "fastimpact")
              and r["run"] != "cold" and r["ok"]]
        el = [r for r in records if (r["case"], r["metric"], r["tool"]) == (case, metric, "elastix") and r["ok"]]
        if not fi or not el:
            continue
        f_wall = statistics.median(r["wall_s"] for r in fi)
        e_wall = statistics.median(r["wall_s"] for r in el)
        e_core = statistics.median(
            sum(r["timings_s"].get(k, 0.0) for k in ("load", "registration", "deformation_field", "write"))
            for r in el)
        f_cpu = statistics.median(r["cpu_s"] for r in fi)
        e_cpu = statistics.median(r["cpu_s"] for r in el)
        f_err = [r["error"]["mean"] for r in fi if r.get("error")]
        e_err = [r["error"]["mean"] for r in el if r.get("error")]
        rows.append([case, metric, _fmt(f_wall, 1), _fmt(e_wall, 1), _fmt(f_wall / e_wall, 3),
                     _fmt(e_core, 1), _fmt(f_wall / e_core, 3), _fmt(f_cpu / e_cpu, 3),
                     _fmt(statistics.median(f_err)) if f_err else "-",
                     _fmt(statistics.median(e_err)) if e_err else "-"])
    return rows


RATIO_HEADER = ["case", "metric", "fastimpact wall s", "elastix wall s", "ratio",
                "elastix w/o start-up s", "ratio w/o start-up", "cpu ratio", "fastimpact err mean",
                "elastix err mean"]


def machine_info(threads: int) -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for pkg in ("fastimpact", "itk-elastix", "numba", "numpy"):
        try:
            from importlib.metadata import version

            versions[pkg] = version(pkg)
        except Exception:
            versions[pkg] = "?"
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "python": platform.python_version(),
            "load_average": os.getloadavg(), "versions": versions}


# -------------------------------------------------------------------------------------------------
# main
# -------------------------------------------------------------------------------------------------


def _csv(value: str, allowed) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"{value!r}: choose from {', '.join(allowed)} (comma separated)")
    return items


def _positive_int(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: use an integer >= 1")
    return n


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=lambda v: _csv(v, ALL_CASES), default=["mono", "contrast"],
                   help="comma-separated cases: mono, contrast, t2 (default mono,contrast)")
    p.add_argument("--metrics", type=lambda v: _csv(v, ALL_METRICS), default=list(ALL_METRICS),
                   help="comma-separated metrics: mse, ncc, mi (mse/ncc run on mono only)")
    p.add_argument("--tools", type=lambda v: _csv(v, ("fastimpact", "elastix")),
                   default=["fastimpact", "elastix"], help="fastimpact,elastix")
    p.add_argument("--resolution", choices=("1mm", "2mm"), default="1mm")
    p.add_argument("--iterations", type=_positive_int, default=500, help="B-spline ASGD iterations per level")
    p.add_argument("--affine-iterations", type=_positive_int, default=250, help="affine ASGD iterations per level")
    p.add_argument("--affine", action=argparse.BooleanOptionalAction, default=True,
                   help="affine stage before the B-spline stage in both tools (fastimpact's default: on)")
    p.add_argument("--levels", type=_positive_int, default=3)
    p.add_argument("--samples", type=_positive_int, default=2000)
    p.add_argument("--grid-spacing", type=float, default=8.0)
    p.add_argument("--bins", type=_positive_int, default=32)
    p.add_argument("--seed", type=int, default=0, help="case and sampler seed")
    p.add_argument("--estimation", choices=("Original", "DisplacementDistribution"), default="Original",
                   help="elastix ASGDParameterEstimationMethod (match fastimpact's; elastix default Original)")
    p.add_argument("--max-mm", type=float, default=10.0, help="largest true displacement in the brain")
    p.add_argument("--repeat", type=_positive_int, default=1, help="timed runs per tool and pair")
    p.add_argument("--threads", type=_positive_int, default=os.cpu_count(), help="threads for both tools (default: all cores)")
    p.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="run fastimpact once per pair with an empty numba cache first (reported as 'cold')")
    p.add_argument("--check-consistency", action=argparse.BooleanOptionalAction, default=True,
                   help="check each tool's warped image against the moving image resampled with its field")
    p.add_argument("--workdir", type=Path, default=None, help="keep inputs/outputs here (default: a temp dir)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per tool run")
    p.add_argument("--json-out", type=Path, default=None, help="also write all records as JSON")
    p.add_argument("--print-parameter-maps", action="store_true", help="print elastix's parameter maps and exit")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.print_parameter_maps:
        for metric in args.metrics:
            for i, m in enumerate(elastix_parameter_maps(metric, levels=args.levels, iterations=args.iterations,
                                                         affine_iterations=args.affine_iterations,
                                                         samples=args.samples, grid_spacing=args.grid_spacing,
                                                         bins=args.bins, affine=args.affine, seed=args.seed,
                                                         estimation=args.estimation)):
                print(f"// {metric}, parameter map {i}\n{format_parameter_map(m)}\n")
        return 0

    from fastimpact.io import save_image
    from fastimpact.synthetic import make_case

    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="fastimpact-bench-")
        work = Path(tmp.name)
    else:
        work = args.workdir
        work.mkdir(parents=True, exist_ok=True)
    info = machine_info(args.threads)
    log(f"machine: {info['cpu']}, {info['cores']} cores, threads {args.threads}, load {info['load_average']}")

    pairs = [(c, m) for c in args.cases for m in args.metrics if m not in MONO_ONLY or c == "mono"]
    records = []
    try:
        for case_kind in args.cases:
            case_pairs = [p for p in pairs if p[0] == case_kind]
            if not case_pairs:
                continue
            t = time.perf_counter()
            case = make_case(case_kind, args.resolution, seed=args.seed, max_mm=args.max_mm)
            cdir = work / f"{case_kind}_{args.resolution}"
            cdir.mkdir(parents=True, exist_ok=True)
            fixed_p, moving_p = cdir / "fixed.nii.gz", cdir / "moving.nii.gz"
            save_image(case.fixed, fixed_p)
            save_image(case.moving, moving_p)
            initial = case.initial_error()
            log(f"case {case_kind} {args.resolution}: shape {case.fixed.shape}, initial error mean "
                f"{initial['mean']:.2f} mm, min Jacobian {case.min_jacobian:.2f} ({time.perf_counter() - t:.1f} s)")
            for _, metric in case_pairs:
                maps = elastix_parameter_maps(metric, levels=args.levels, iterations=args.iterations,
                                              affine_iterations=args.affine_iterations, samples=args.samples,
                                              grid_spacing=args.grid_spacing, bins=args.bins,
                                              affine=args.affine, seed=args.seed, estimation=args.estimation)
                for tool in args.tools:
                    runs = [str(i + 1) for i in range(args.repeat)]
                    cache = None
                    if tool == "fastimpact" and args.warmup:
                        runs = ["cold"] + runs
                        cache = cdir / f"numba_cache_{metric}"
                        if cache.exists():
                            shutil.rmtree(cache)
                        cache.mkdir()
                    for run in runs:
                        out = cdir / f"{tool}_{metric}_{run}"
                        log(f"  {tool:10s} {case_kind}/{metric} run {run} ...")
                        if tool == "elastix":
                            r = run_elastix(fixed_p, moving_p, out, maps, args.threads, args.timeout)
                        else:
                            r = run_fastimpact(fixed_p, moving_p, out, metric, args, args.threads,
                                               args.timeout, cache)
                        r.update(evaluate(r, case, args.check_consistency))
                        rec = {"case": case_kind, "metric": metric, "tool": tool, "run": run,
                               "initial": initial, "resolution": args.resolution, **r}
                        rec["field"], rec["warped"] = str(rec["field"]), str(rec["warped"])
                        records.append(rec)
                        err = rec.get("error", {})
                        log(f"    wall {r['wall_s']:.1f} s, error mean {_fmt(err.get('mean'))} mm"
                            + (f", consistency {rec['consistency']:.2e}" if "consistency" in rec else "")
                            + ("" if r["ok"] else f", FAILED: {r['message']}"))
    finally:
        if tmp is not None:
            tmp.cleanup()

    info["load_average_end"] = os.getloadavg()
    rows = make_rows(records)
    print(f"\nfastimpact vs elastix, MNI152 {args.resolution}, {info['cpu']}, {info['cores']} cores, "
          f"{args.threads} threads; affine stage {'on' if args.affine else 'off'}; "
          f"{args.iterations} it x {args.levels} levels, {args.samples} samples, grid {args.grid_spacing} mm; "
          f"elastix ASGD estimation {args.estimation}")
    print_table(rows, HEADER)
    rrows = ratio_rows(records)
    if rrows:
        print()
        print_table(rrows, RATIO_HEADER)
    print("\nMarkdown:\n")
    print(markdown_table(rows, HEADER))
    if rrows:
        print()
        print(markdown_table(rrows, RATIO_HEADER))
    print(f"\n(load average before {tuple(round(x, 2) for x in info['load_average'])}, after "
          f"{tuple(round(x, 2) for x in info['load_average_end'])}; versions {info['versions']})")
    if args.json_out:
        args.json_out.write_text(json.dumps({"machine": info, "args": {k: str(v) for k, v in vars(args).items()},
                                             "records": records}, indent=1, default=str))
    return 0 if all(r["ok"] for r in records) else 1


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--elastix-worker":
        _elastix_worker(sys.argv[2])
    else:
        sys.exit(main())
