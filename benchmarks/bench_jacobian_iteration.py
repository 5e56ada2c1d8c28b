"""Where one IMPACT Jacobian-mode iteration goes, for N = 250, 1000, 2000 samples.

On the finest level of the 1 mm (or 2 mm) T1 / T2-like pair, with a non-trivial B-spline
transform, it times the parts of one evaluation (median of ``--repeat`` runs): fixed patches
(gather on the level grid), moving patches at T(x + o) with gradients (fused Numba kernel), the
patch forward graph on both batches, the VJP graph, and the rest (distances, the chain to the
moving points, the scatter to the B-spline parameters: the whole evaluation minus the parts).

    python benchmarks/bench_jacobian_iteration.py --models mind,deepbet --samples 250,1000,2000
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_core as core  # noqa: E402

MODELS = {"mind": {"model": "mind"}, "mind-r2d1": {"model": "mind-r2d1"},
          "deepbet": {"model": "deepbet", "layers": "11"}, "deepbet-s012": {"model": "deepbet", "layers": "111"},
          "deepbet-17": {"model": "deepbet", "layers": "11", "patch_size": 17}}


def timed(fn, repeat):
    times = []
    out = None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=lambda v: core._csv(v, tuple(MODELS)), default=["mind", "deepbet"])
    p.add_argument("--samples", type=lambda v: [int(x) for x in v.split(",")], default=[250, 1000, 2000])
    p.add_argument("--resolution", choices=("1mm", "2mm"), default="1mm")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args(argv)

    from fastimpact.backend import set_threads
    from fastimpact.config import RegistrationConfig
    from fastimpact.features.maps import IntensityNormalization
    from fastimpact.features.settings import impact_settings
    from fastimpact.metrics.impact_jacobian import build_jacobian_impact
    from fastimpact.engine.cost import CostFunction
    from fastimpact.engine.levels import LevelData
    from fastimpact.metrics.term import WeightedSum
    from fastimpact.transforms.parameterisation import BSplineParameterisation
    from fastimpact.samplers import RandomSampler
    from fastimpact.synthetic import make_case
    from fastimpact.transforms import AffineTransform, BSplineGrid, CompositeTransform

    set_threads(args.threads)
    case = make_case("t2", args.resolution, seed=0)
    fixed, moving = case.fixed, case.moving
    lv = LevelData(fixed, moving, None, None)
    grid = BSplineGrid.for_image(fixed.shape, fixed.affine, 8.0)
    rng = np.random.default_rng(0)
    tr = CompositeTransform(AffineTransform(center=fixed.center()), grid, rng.normal(size=tuple(grid.shape) + (3,)))
    rows = []
    info = core.machine_info(args.threads)
    for name in args.models:
        cfg = RegistrationConfig(metric="impact", mode="jacobian", levels=1, **MODELS[name])
        norm = lambda img: (lambda spec: IntensityNormalization.from_image(img.data, None, spec.normalization))  # noqa: E731
        term = build_jacobian_impact(impact_settings(cfg, 0), fixed, moving, norm(fixed), norm(moving),
                                     moving_coef=lv.moving_coef, threads=args.threads)
        t = term.terms[0]
        for n in args.samples:
            sampler = RandomSampler(fixed.shape, None, n, seed=1)
            cost = CostFunction(lv, WeightedSum([(1.0, term)]), sampler,
                                BSplineParameterisation(tr, fixed.affine, 1.0, "cpu"), "cpu")
            flat = sampler.draw_flat()
            fa = fixed.affine
            idx = np.stack(np.unravel_index(flat, fixed.shape), 1).astype(np.float64)
            x = idx @ fa[:3, :3].T + fa[:3, 3]
            a = tr.affine.as_matrix()
            w2g = tr.grid.world_to_grid()
            cost.evaluate_at(flat)  # warm-up (sessions, kernels)
            total, _ = timed(lambda: cost.evaluate_at(flat), args.repeat)
            t_fix, fv = timed(lambda: term._fixed_patches(t, x), args.repeat)
            t_mov, (mv, mg) = timed(lambda: term.k_warped(term.moving_coef, x, t.offsets, a, tr.coef, w2g,
                                                          term.moving_inv), args.repeat)
            fin = t.batch(fv, t.fnorm, t.fspec)
            t_fwd, feats = timed(lambda: (t.f_patch.run_bound([fin], t.f_out), t.m_patch.run_bound([fin], t.m_out)),
                                 args.repeat)
            cots = [np.ones_like(f) for f in feats[0]]
            t_vjp, _ = timed(lambda: t.m_vjp.run_bound([fin, *cots], t.g_out), args.repeat)
            rest = total - t_fix - t_mov - t_fwd - t_vjp
            rows.append([name, f"{t.patch}^3", str(n), f"{total:.1f}", f"{t_fix:.1f}", f"{t_mov:.1f}", f"{t_fwd:.1f}",
                         f"{t_vjp:.1f}", f"{rest:.1f}"])
            print(" ".join(rows[-1]), file=sys.stderr, flush=True)
    header = ["model", "patch", "N", "iteration ms", "fixed patches", "moving patches + grad", "forward x2", "VJP",
              "rest"]
    print(f"\nOne IMPACT Jacobian-mode evaluation (value + gradient), finest level of the {args.resolution} pair, "
          f"{info['cpu']}, {args.threads} threads, median of {args.repeat}")
    core.print_table(rows, header)
    print("\nMarkdown:\n")
    print(core.markdown_table(rows, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
