"""Every preset on every clinical-like pair kind, with elastix MI as the peer in the same run.

Pairs (known smooth deformation, so every voxel has a true answer; error in mm inside the
evaluation mask on the fixed grid):

* ``t2-shared``: MNI152 T1 vs a T2-like image of the anatomy, both on the template grid
  (:func:`fastimpact.synthetic.make_case` ``t2``);
* ``t2-cross``: the same T1 vs the T2-like image acquired on its own oblique grid with thick slices
  (in-plane 0.9 x the template spacing, 4 mm slices at 1 mm, other origin and extent;
  :func:`fastimpact.synthetic.make_cross_grid_case`);
* ``ct-cbct``: a real chest CT vs a CBCT-like image of it (cupping, streaks, noise, field of view cut
  to a disc, given to both tools as the moving mask; :func:`fastimpact.synthetic_ct.make_ct_cbct_case`).

Rows: ``fastimpact register --preset NAME`` for each preset, and itk-elastix Mattes MI (32 bins,
recursive pyramid, B-spline 8 mm, 3 levels x 500 ASGD iterations, 2000 samples, affine stage, the
same masks). Every run is a subprocess that writes its outputs; times are wall seconds of the whole
command on this machine.

    python benchmarks/bench_clinical.py                          # 1 mm brain pairs, full CT
    python benchmarks/bench_clinical.py --resolution 2mm --ct small --presets fast-cpu,mono
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_core as core  # noqa: E402


def build_pairs(resolution: str, ct_size: str, kinds):
    from fastimpact.synthetic import make_case, make_cross_grid_case

    out = {}
    if "t2-shared" in kinds:
        c = make_case("t2", resolution=resolution, seed=0)
        out["t2-shared"] = (c.fixed, c.moving, None, c.u_true, c.mask)
    if "t2-cross" in kinds:
        c = make_cross_grid_case(resolution, seed=0)
        out["t2-cross"] = (c.fixed, c.moving, None, c.u_true, c.mask)
    if "ct-cbct" in kinds:
        from fastimpact.synthetic_ct import make_ct_cbct_case

        c = make_ct_cbct_case(seed=0, size=ct_size)
        out["ct-cbct"] = (c.fixed, c.moving, c.moving_mask, c.u_true, c.mask)
    return out


def main(argv=None) -> int:
    from fastimpact.io import load_displacement_itk, save_image
    from fastimpact.image import Image
    from fastimpact.presets import preset_names
    from fastimpact.synthetic import field_error

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolution", default="1mm", choices=("1mm", "2mm"))
    ap.add_argument("--ct", default="full", choices=("small", "full"))
    ap.add_argument("--pairs", default="t2-shared,t2-cross,ct-cbct")
    ap.add_argument("--presets", default=",".join(preset_names()))
    ap.add_argument("--no-elastix", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=3600)
    args = ap.parse_args(argv)

    pairs = build_pairs(args.resolution, args.ct, args.pairs.split(","))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for pname, (fixed, moving, mmask, u_true, mask) in pairs.items():
            d = tmp / pname
            d.mkdir()
            save_image(fixed, d / "fixed.nii.gz")
            save_image(moving, d / "moving.nii.gz")
            mpath = None
            if mmask is not None:
                mpath = d / "moving_mask.nii.gz"
                save_image(Image(np.asarray(mmask, np.uint8), moving.affine), mpath)
            start = field_error(np.zeros_like(u_true), u_true, mask)["mean"]
            runs = []
            for preset in args.presets.split(","):
                out = d / f"fi-{preset}"
                cmd = core._fastimpact_command() + ["register", str(d / "fixed.nii.gz"), str(d / "moving.nii.gz"),
                                                    "-o", str(out), "--preset", preset, "--threads", str(args.threads),
                                                    "--json", "--force"]
                if mpath is not None:
                    cmd += ["--moving-mask", str(mpath)]
                proc, wall, _ = core._timed_run(cmd, dict(__import__("os").environ), args.timeout)
                runs.append((f"fastimpact --preset {preset}", proc.returncode == 0, wall, out / "displacement.nii.gz",
                             (proc.stderr or "").strip().splitlines()[-1:] if proc.returncode else []))
            if not args.no_elastix:
                maps = core.elastix_parameter_maps("mi")
                r = core.run_elastix(d / "fixed.nii.gz", d / "moving.nii.gz", d / "elastix", maps, args.threads,
                                     args.timeout, moving_mask=mpath)
                runs.append(("elastix MI", r["ok"], r["wall_s"], r["field"], [r["message"]] if not r["ok"] else []))
            for name, ok, wall, field, msg in runs:
                if ok:
                    u, _ = load_displacement_itk(field)
                    e = field_error(u, u_true, mask)
                    rows.append((pname, name, f"{start:.2f}", f"{e['mean']:.3f}", f"{e['p95']:.3f}", f"{wall:.1f}"))
                else:
                    rows.append((pname, name, f"{start:.2f}", "failed", " ".join(msg)[:80], f"{wall:.1f}"))
                print("| " + " | ".join(rows[-1]) + " |", flush=True)
    print()
    print("| pair | tool | start (mm) | mean (mm) | p95 (mm) | wall (s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
