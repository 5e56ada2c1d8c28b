"""Ablation against the reference IMPACT configuration on the shared-grid T1 / T2-like brain pair.

The reference (ITKIMPACT 0.1.6, as reported in issue 12: 0.21 mm): MIND-SSC radius 1 dilation 2,
Jacobian mode, patch 7^3 at 1 mm, L2, 3 levels x 150 iterations, 2000 fresh samples per
iteration, elastix's smoothing pyramid without downsampling (sigma 2 / 1 / 0.5 mm), features at
1 mm on every level, B-spline grid 32 / 16 / 8 mm, no affine stage. Each row changes one thing
from that configuration; every run is in this process with the Python API (the first row also
pays the kernel compilation). Columns: displacement error inside the fixed brain (mm) against the
known deformation, and wall time of the registration.

    python benchmarks/bench_ablation.py                  # 1 mm (needs nilearn: pip install --no-deps nilearn)
    python benchmarks/bench_ablation.py --resolution 2mm --rows ref,static
"""

from __future__ import annotations

import argparse
import time

REF = dict(metric="impact", mode="jacobian", model="mind", patch_size=7, distance="l2", levels=3, iterations=150,
           samples=2000, pyramid="smooth", voxel_size=1.0, grid_spacing=8.0, affine=False, jacobian_chain="centre")

ROWS = {
    "ref": ("the reference configuration", {}),
    "exact": ("exact chain (each patch voxel's own dT/dtheta)", {"jacobian_chain": "exact"}),
    "shrink": ("shrink pyramid (downsampling), features at 1 mm", {"pyramid": "shrink"}),
    "shrink-levelvox": ("shrink pyramid, features at each level's spacing", {"pyramid": "shrink", "voxel_size": None}),
    "static": ("static mode (feature maps once per level)", {"mode": "static", "patch_size": None}),
    "static-shrink": ("static mode, shrink pyramid, level voxel size (fastimpact's defaults)",
                      {"mode": "static", "patch_size": None, "pyramid": "shrink", "voxel_size": None}),
    "it500": ("500 iterations per level", {"iterations": 500}),
    "exact-it300": ("exact chain, 300 iterations", {"jacobian_chain": "exact", "iterations": 300}),
    "dd": ("ASGD displacement-distribution estimation", {"asgd_estimation": "displacement_distribution"}),
    "mi": ("Mattes MI instead of IMPACT (same pipeline)", {"metric": "mi", "mode": "static", "model": "mind",
                                                          "patch_size": None, "voxel_size": None,
                                                          "distance": "l2", "jacobian_chain": "centre"}),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolution", default="1mm", choices=("1mm", "2mm"))
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from fastimpact.engine import register
    from fastimpact.synthetic import field_error, make_case

    case = make_case("t2", resolution=args.resolution, seed=0)
    start = case.initial_error()
    print(f"pair: MNI152 T1 ({args.resolution}) vs T2-like, one grid; start error mean {start['mean']:.3f} mm")
    print("| row | change | mean (mm) | p95 (mm) | time (s) |")
    print("|---|---|---|---|---|")
    for name in args.rows.split(","):
        what, change = ROWS[name]
        opts = {**REF, **change}
        if opts["metric"] == "mi":
            opts = {k: v for k, v in opts.items() if k not in ("mode", "model", "patch_size", "voxel_size", "distance",
                                                                  "jacobian_chain")}
        opts = {k: v for k, v in opts.items() if v is not None}
        t0 = time.perf_counter()
        r = register(case.fixed, case.moving, threads=args.threads, seed=args.seed, **opts)
        e = field_error(r.displacement, case.u_true, case.mask)
        print(f"| {name} | {what} | {e['mean']:.3f} | {e['p95']:.3f} | {time.perf_counter() - t0:.1f} |", flush=True)


if __name__ == "__main__":
    main()
