"""Error versus iterations: IMPACT Jacobian mode (patches or dense), static mode and MI, multimodal pair.

Case: as ``bench_impact.py`` (fixed = deformed MNI152 T1, moving = T2-like synthesis, known field).
For each iteration count (per level, every level) each row runs as a subprocess with the same
pipeline otherwise (affine stage, B-spline 8 mm, 3 levels, ``--samples``); the table gives the
displacement error (mean / p95 mm) and the wall time, so the paper's claim (Jacobian mode reaches a
lower error in fewer iterations than static mode) can be read off one table.

    python benchmarks/bench_jacobian.py --resolution 1mm --iterations 50,100,200,500
    python benchmarks/bench_jacobian.py --rows jacobian-mind,static-mind --samples 1000
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_core as core  # noqa: E402

ROWS = {
    "jacobian-mind": ("impact", ["--mode", "jacobian", "--model", "mind", "--distance", "l2"]),
    "jacobian-mind-exact": ("impact", ["--mode", "jacobian", "--model", "mind", "--distance", "l2",
                                       "--jacobian-chain", "exact"]),
    "jacobian-deepbet": ("impact", ["--mode", "jacobian", "--model", "deepbet", "--layers", "11", "--distance", "l2"]),
    "dense-mind": ("impact", ["--mode", "jacobian-dense", "--model", "mind", "--distance", "l2"]),
    "static-mind": ("impact", ["--model", "mind", "--distance", "l2"]),
    "mi": ("mi", []),
}
DEFAULT_ROWS = ("jacobian-mind", "static-mind", "mi")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=lambda v: core._csv(v, tuple(ROWS)), default=list(DEFAULT_ROWS))
    p.add_argument("--iterations", type=lambda v: [core._positive_int(x) for x in v.split(",")], default=[50, 100, 200, 500])
    p.add_argument("--resolution", choices=("1mm", "2mm"), default="1mm")
    p.add_argument("--levels", type=core._positive_int, default=3)
    p.add_argument("--affine-iterations", type=core._positive_int, default=250)
    p.add_argument("--affine", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--samples", type=core._positive_int, default=2000)
    p.add_argument("--grid-spacing", type=float, default=8.0)
    p.add_argument("--bins", type=core._positive_int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=core._positive_int, default=os.cpu_count())
    p.add_argument("--timeout", type=float, default=7200.0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from fastimpact.io import save_image
    from fastimpact.synthetic import make_case

    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    tmp = tempfile.TemporaryDirectory(prefix="fastimpact-bench-")
    work = Path(tmp.name)
    info = core.machine_info(args.threads)
    log(f"machine: {info['cpu']}, {info['cores']} cores, threads {args.threads}, load {info['load_average']}")
    case = make_case("t2", args.resolution, seed=args.seed)
    fixed_p, moving_p = work / "fixed.nii.gz", work / "moving.nii.gz"
    save_image(case.fixed, fixed_p)
    save_image(case.moving, moving_p)
    cache = work / "numba_cache"
    cache.mkdir()
    results = {}
    try:
        # one short run first: compiles the kernels into the fresh cache
        ns = argparse.Namespace(**{**vars(args), "iterations": 5, "affine_iterations": 5})
        core.run_fastimpact(fixed_p, moving_p, work / "warmup", "impact+0.1*mi", ns, args.threads, args.timeout,
                            cache, extra=["--mode", "jacobian"])
        for name in args.rows:
            metric, extra = ROWS[name]
            for it in args.iterations:
                ns = argparse.Namespace(**{**vars(args), "iterations": it})
                out = work / f"{name}_{it}"
                log(f"  {name} {it} it ...")
                t = time.perf_counter()
                r = core.run_fastimpact(fixed_p, moving_p, out, metric, ns, args.threads, args.timeout, cache,
                                        extra=extra)
                r.update(core.evaluate(r, case, False))
                results[(name, it)] = r
                e = r.get("error", {})
                log(f"    {time.perf_counter() - t:.1f} s, error mean {core._fmt(e.get('mean'))} mm"
                    + ("" if r["ok"] else f" FAILED: {r['message']}"))
    finally:
        tmp.cleanup()
    header = ["row"] + [f"{it} it: err mean / p95 mm, wall s" for it in args.iterations]
    rows = []
    for name in args.rows:
        cells = [name]
        for it in args.iterations:
            r = results.get((name, it), {})
            e = r.get("error", {})
            cells.append(f"{core._fmt(e.get('mean'))} / {core._fmt(e.get('p95'))}, {core._fmt(r.get('wall_s'), 1)}"
                         if r.get("ok") else "failed")
        rows.append(cells)
    print(f"\nError vs iterations per level, T1 / T2-like MNI152 {args.resolution} (initial error "
          f"{case.initial_error()['mean']:.2f} mm), {info['cpu']}, {args.threads} threads, {args.samples} samples, "
          f"affine {'on' if args.affine else 'off'} ({args.affine_iterations} it/level), {args.levels} levels")
    core.print_table(rows, header)
    print("\nMarkdown:\n")
    print(core.markdown_table(rows, header))
    return 0 if all(r.get("ok") for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
