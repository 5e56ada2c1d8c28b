"""IMPACT static vs intensity metrics on a multimodal pair with an exact ground truth, in one run.

Case (:func:`fastimpact.synthetic.make_case` kind ``t2``): fixed = MNI152 2009a T1 under a known
smooth deformation (max 10 mm in the brain); moving = a T2-like image of the undeformed anatomy
synthesised from the tissue maps (CSF bright, WM dark, bias field, noise). Rows:

* fastimpact IMPACT static with the built-in models (mind R1D2 / R2D1, deepbet), L1 and L2, with
  and without PCA (``--configs`` picks them);
* fastimpact MI and NCC; itk-elastix MI (Mattes, 32 bins) with the same pipeline.

Every run is a subprocess writing warped.nii.gz + displacement.nii.gz (wall time includes start-up,
loading, feature inference and writing). Columns: displacement error inside the fixed brain
(mean, p95, max, mm) and Dice of GM / WM (moving tissue maps warped with the tool's field,
thresholded at 0.5, against the fixed tissue maps). The pipeline matches bench_core.py (affine +
B-spline 8 mm, 3 levels x 500 ASGD iterations, 2000 samples).

    python benchmarks/bench_impact.py                    # 1 mm (nilearn), default rows
    python benchmarks/bench_impact.py --resolution 2mm   # quick
    python benchmarks/bench_impact.py --configs mind-l2,mi --tools fastimpact
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_core as core  # noqa: E402  (the shared runners, evaluation and table helpers)

# name -> (metric, extra fastimpact options)
CONFIGS = {
    "mind-l2": ("impact", ["--model", "mind", "--distance", "l2"]),
    "mind-l1": ("impact", ["--model", "mind", "--distance", "l1"]),
    "mind-l2-pca6": ("impact", ["--model", "mind", "--distance", "l2", "--pca", "6"]),
    "mind-r2d1-l2": ("impact", ["--model", "mind-r2d1", "--distance", "l2"]),
    "deepbet-s0-l2": ("impact", ["--model", "deepbet", "--layers", "1", "--distance", "l2", "--voxel-size", "1"]),
    "deepbet-s01-l2-pca8": ("impact", ["--model", "deepbet", "--layers", "11", "--distance", "l2", "--pca", "8",
                                       "--voxel-size", "1"]),
    "mind-l2+0.1mi": ("impact+0.1*mi", ["--model", "mind", "--distance", "l2"]),
    "mi": ("mi", []),
    "ncc": ("ncc", []),
}
DEFAULT_CONFIGS = ("mind-l2", "mind-l1", "mind-l2-pca6", "mind-l2+0.1mi", "deepbet-s0-l2", "mi", "ncc")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    inter = np.count_nonzero(a & b)
    total = np.count_nonzero(a) + np.count_nonzero(b)
    return 2.0 * inter / total if total else float("nan")


def tissue_dice(run: dict, case) -> dict:
    from fastimpact.io import load_displacement_itk
    from fastimpact.synthetic import warp

    if not run["ok"]:
        return {}
    u, _ = load_displacement_itk(run["field"])
    out = {}
    for name, mov, fix in (("gm", case.moving_gm, case.gm), ("wm", case.moving_wm, case.wm)):
        warped = warp(np.asarray(mov, dtype=np.float32), case.moving.affine, u, order=1)
        out[f"dice_{name}"] = dice(warped > 0.5, fix > 0.5)
    return out


HEADER = ["config", "tool", "run", "wall s", "err mean", "err p95", "err max", "Dice GM", "Dice WM", "stage times s"]


def make_rows(records):
    rows = []
    for r in records:
        e = r.get("error", {})
        rows.append([r["config"], r["tool"], r["run"], core._fmt(r["wall_s"], 1), core._fmt(e.get("mean")),
                     core._fmt(e.get("p95")), core._fmt(e.get("max")), core._fmt(r.get("dice_gm"), 3),
                     core._fmt(r.get("dice_wm"), 3),
                     core._stage_summary(r["tool"], r) + ("" if r["ok"] else f" FAILED: {r['message']}")])
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", type=lambda v: core._csv(v, tuple(CONFIGS)), default=list(DEFAULT_CONFIGS),
                   help=f"comma-separated rows of fastimpact: {', '.join(CONFIGS)}")
    p.add_argument("--tools", type=lambda v: core._csv(v, ("fastimpact", "elastix")), default=["fastimpact", "elastix"])
    p.add_argument("--resolution", choices=("1mm", "2mm"), default="1mm")
    p.add_argument("--levels", type=core._positive_int, default=3)
    p.add_argument("--iterations", type=core._positive_int, default=500)
    p.add_argument("--affine-iterations", type=core._positive_int, default=250)
    p.add_argument("--affine", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--samples", type=core._positive_int, default=2000)
    p.add_argument("--grid-spacing", type=float, default=8.0)
    p.add_argument("--bins", type=core._positive_int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--estimation", choices=("Original", "DisplacementDistribution"), default="Original")
    p.add_argument("--repeat", type=core._positive_int, default=1)
    p.add_argument("--threads", type=core._positive_int, default=os.cpu_count())
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--timeout", type=float, default=3600.0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from fastimpact.io import save_image
    from fastimpact.synthetic import make_case

    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    tmp = tempfile.TemporaryDirectory(prefix="fastimpact-bench-") if args.workdir is None else None
    work = Path(tmp.name) if tmp else args.workdir
    work.mkdir(parents=True, exist_ok=True)
    info = core.machine_info(args.threads)
    log(f"machine: {info['cpu']}, {info['cores']} cores, threads {args.threads}, load {info['load_average']}")
    case = make_case("t2", args.resolution, seed=args.seed)
    fixed_p, moving_p = work / "fixed.nii.gz", work / "moving.nii.gz"
    save_image(case.fixed, fixed_p)
    save_image(case.moving, moving_p)
    initial = case.initial_error()
    log(f"case t2 {args.resolution}: shape {case.fixed.shape}, initial error mean {initial['mean']:.2f} mm")
    records = [{"config": "identity", "tool": "-", "run": "-", "wall_s": None, "ok": True, "error": initial,
                "dice_gm": dice(case.moving_gm > 0.5, case.gm > 0.5), "dice_wm": dice(case.moving_wm > 0.5, case.wm > 0.5)}]
    jobs = [("fastimpact", c) for c in args.configs if "fastimpact" in args.tools]
    if "elastix" in args.tools:
        jobs.append(("elastix", "mi"))
    cache = work / "numba_cache"
    cache.mkdir(exist_ok=True)
    first_fastimpact = next((j for j in jobs if j[0] == "fastimpact"), None)
    try:
        for tool, name in jobs:
            runs = [str(r + 1) for r in range(args.repeat)]
            if (tool, name) == first_fastimpact:
                runs = ["cold"] + runs  # compiles the Numba kernels into the fresh cache: reported apart
            for run in runs:
                out = work / f"{tool}_{name}_{run}"
                log(f"  {tool:10s} {name} run {run} ...")
                t = time.perf_counter()
                if tool == "elastix":
                    maps = core.elastix_parameter_maps("mi", levels=args.levels, iterations=args.iterations,
                                                       affine_iterations=args.affine_iterations, samples=args.samples,
                                                       grid_spacing=args.grid_spacing, bins=args.bins,
                                                       affine=args.affine, seed=args.seed, estimation=args.estimation)
                    r = core.run_elastix(fixed_p, moving_p, out, maps, args.threads, args.timeout)
                else:
                    metric, extra = CONFIGS[name]
                    ns = argparse.Namespace(**vars(args))
                    r = core.run_fastimpact(fixed_p, moving_p, out, metric, ns, args.threads, args.timeout, cache,
                                            extra=extra)
                r.update(core.evaluate(r, case, False))
                r.update(tissue_dice(r, case))
                rec = {"config": name, "tool": tool, "run": run, **r}
                records.append(rec)
                e = rec.get("error", {})
                log(f"    wall {r['wall_s']:.1f} s ({time.perf_counter() - t:.1f}), error mean {core._fmt(e.get('mean'))} mm"
                    + ("" if r["ok"] else f", FAILED: {r['message']}"))
    finally:
        if tmp is not None:
            tmp.cleanup()
    info["load_average_end"] = os.getloadavg()
    print(f"\nIMPACT static vs intensity metrics: T1 (deformed) / T2-like pair, MNI152 {args.resolution}, "
          f"{info['cpu']}, {info['cores']} cores, {args.threads} threads; affine {'on' if args.affine else 'off'}, "
          f"{args.iterations} it x {args.levels} levels, {args.samples} samples, grid {args.grid_spacing} mm")
    rows = make_rows(records)
    core.print_table(rows, HEADER)
    print("\nMarkdown:\n")
    print(core.markdown_table(rows, HEADER))
    print(f"\n(load average before {tuple(round(x, 2) for x in info['load_average'])}, after "
          f"{tuple(round(x, 2) for x in info['load_average_end'])})")
    return 0 if all(r["ok"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
