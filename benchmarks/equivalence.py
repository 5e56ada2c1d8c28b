"""Same results before and after a refactoring: record, then compare, the displacement fields of
a fixed set of registrations (every metric, every IMPACT mode, weighted sums, bending, masks,
rigid / affine stages, a pair on different grids) for one seed.

    python benchmarks/equivalence.py record before.npz [--cuda]
    python benchmarks/equivalence.py compare before.npz [--cuda]      # prints max |du| per case (mm)

``--cuda`` runs the cases on the CUDA backend (set NUMBA_ENABLE_CUDASIM=1 without a GPU; the
simulator is slow, so only the classic-metric cases run there).
"""

from __future__ import annotations

import sys
import time

import numpy as np

import fastimpact
from fastimpact.synthetic import make_cross_grid_case, make_case


def _pairs():
    mono = make_case("mono", resolution="2mm", seed=3, max_mm=6.0)
    t2 = make_case("t2", resolution="2mm", seed=4, max_mm=6.0)
    cross = make_cross_grid_case(resolution="2mm", seed=5, max_mm=6.0)
    return mono, t2, cross


BASE = dict(levels=2, iterations=[20, 10], affine_iterations=[15, 8], samples=[600, 600], threads=2, seed=11,
            grid_spacing=20.0)
CASES = {
    "mse": ("mono", dict(metric="mse")),
    "ncc_rigid": ("mono", dict(metric="ncc", rigid=True, rigid_iterations=[10, 5])),
    "mi_masks": ("t2", dict(metric="mi", bins=24, masks=True)),
    "mse_bending": ("mono", dict(metric="mse", bending_weight=0.05)),
    "mi+0.5ncc": ("t2", dict(metric="mi+0.5*ncc")),
    "mi_cross": ("cross", dict(metric="mi", masks=True)),
    "impact_static": ("t2", dict(metric="impact", iterations=[8, 4], affine_iterations=[4, 2])),
    "impact+mi_cross": ("cross", dict(metric="impact+0.1*mi", iterations=[6, 3], affine_iterations=[3, 2],
                                      masks=True)),
    "impact_jacobian": ("t2", dict(metric="impact", mode="jacobian", iterations=[4, 2], affine_iterations=[3, 2],
                                   samples=[200, 200])),
    "impact_jacobian_exact_masks": ("t2", dict(metric="impact", mode="jacobian", jacobian_chain="exact",
                                               iterations=[3, 2], affine_iterations=[2, 2], samples=[150, 150],
                                               masks=True, moving_masks=True)),
    "impact_dense": ("t2", dict(metric="impact", mode="jacobian-dense", levels=1, iterations=[3],
                                affine_iterations=[2], samples=[200])),
}
CUDA_CASES = ("mse", "ncc_rigid", "mi_masks", "mse_bending", "mi_cross", "impact_static")


def run(names, device):
    cases = dict(zip(("mono", "t2", "cross"), _pairs()))
    out = {}
    for name in names:
        kind, opts = CASES[name]
        opts = {**BASE, **opts, "device": device}
        masks = opts.pop("masks", False)
        moving_masks = opts.pop("moving_masks", False)
        case = cases[kind]
        aff_f = case.fixed.affine
        fm = (case.mask, aff_f) if masks and case.mask is not None else None
        mmask = getattr(case, "moving_mask", None)
        mm = (mmask, case.moving.affine) if moving_masks or (masks and kind == "cross") else None
        if mm is not None and mm[0] is None:
            mm = (case.mask, case.moving.affine)
        t0 = time.perf_counter()
        res = fastimpact.register(case.fixed, case.moving, fixed_mask=fm, moving_mask=mm, **opts)
        out[name] = np.asarray(res.displacement, dtype=np.float64)
        print(f"{name:32s} {time.perf_counter() - t0:6.1f} s", flush=True)
    return out


def main(argv):
    action, path = argv[0], argv[1]
    device = "cuda" if "--cuda" in argv else "cpu"
    names = CUDA_CASES if device == "cuda" else tuple(CASES)
    fields = run(names, device)
    if action == "record":
        np.savez_compressed(path, **fields)
        return 0
    ref = np.load(path)
    worst = 0.0
    print(f"{'case':32s} {'max |du| mm':>12s}")
    for name, u in fields.items():
        d = float(np.abs(u - ref[name]).max())
        worst = max(worst, d)
        print(f"{name:32s} {d:12.3g}")
    print(f"worst {worst:.3g} mm")
    return 0 if worst <= 1e-6 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
