"""Time every kernel: NumPy reference vs Numba CPU, in the same run.

    python benchmarks/bench_kernels.py                 # N = 2000 points + 197x233x189 dense ops
    python benchmarks/bench_kernels.py --n 20000 --no-dense
    python benchmarks/bench_kernels.py --no-numpy-dense  # skip the slow NumPy full-volume runs

Prints one row per operation: op, size, NumPy ms, Numba ms, speed-up. Times are the best of
``--repeat`` calls after one warm-up call (which also compiles or loads the Numba cache).
Sparse ops get a fresh random point set on every call (as a registration draws new samples each
iteration), so the image is not artificially cache-warm, and are timed round-robin per backend
(one call of each op per round): a burst of load from other processes on a shared machine spoils
one sample of every op instead of all samples of one op. ``--threads`` sets Numba's thread count.
"""

import argparse
import time

import numba
import numpy as np
from scipy import ndimage as ndi

from fastimpact.kernels import get_kernel


def best_ms(fn, repeat):
    return best_ms_round_robin([lambda _: fn()], repeat)[0]


def best_ms_round_robin(fns, repeat):
    """Best time per fn in ms; each call gets a new call number (to pick a fresh input set)."""
    calls = 0
    for fn in fns:
        fn(calls)  # warm-up: compile / load cache, fault pages in
        calls += 1
    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn(calls)
            best[i] = min(best[i], time.perf_counter() - t)
            calls += 1
    return [b * 1e3 for b in best]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="points per sparse op (default 2000)")
    ap.add_argument("--shape", type=int, nargs=3, default=(197, 233, 189), help="image shape")
    ap.add_argument("--grid", type=int, nargs=3, default=(28, 32, 27), help="control grid shape")
    ap.add_argument("--repeat", type=int, default=20, help="timed calls per sparse op")
    ap.add_argument("--no-dense", action="store_true", help="skip the full-volume ops")
    ap.add_argument("--no-numpy-dense", action="store_true", help="time full-volume ops in Numba only")
    ap.add_argument("--threads", type=int, default=0, help="Numba threads (default: all cores)")
    args = ap.parse_args()
    if args.threads:
        numba.set_num_threads(args.threads)

    rng = np.random.default_rng(0)
    shape = tuple(args.shape)
    gshape = tuple(args.grid)
    img = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 2.0)
    coef = ndi.spline_filter(img, order=3, mode="mirror", output=np.float32)
    labels = (img > 0).astype(np.uint8)
    # a 12-channel feature map (MIND-SSC size), channel-last
    coef12 = np.ascontiguousarray(np.repeat(coef[..., None], 12, axis=3) * np.arange(1, 13, dtype=np.float32))
    grid = rng.standard_normal(gshape + (3,))
    # Fresh samples per call, cycling through enough sets that the image lines a set touched are
    # evicted from the caches before that set comes back.
    nsets = 64
    pts_sets = [rng.uniform(0, np.array(shape) - 1, size=(args.n, 3)) for _ in range(nsets)]
    t_sets = [rng.uniform(0, np.array(gshape) - 1, size=(args.n, 3)) for _ in range(nsets)]
    g = rng.standard_normal((args.n, 3))
    A = np.eye(4)
    A[:3, :3] += 0.05 * rng.standard_normal((3, 3))
    A[:3, 3] = [2.0, -1.0, 0.5]
    A_f2grid = np.diag([(gshape[d] - 3.0) / (shape[d] - 1) for d in range(3)] + [1.0])
    A_f2grid[:3, 3] = 1.0
    W2M = np.eye(3)
    n = f"N={args.n}"

    # op, size label, arguments of set r
    sparse = [
        ("cubic_sample", n + " f32", lambda r: (coef, pts_sets[r % nsets])),
        ("cubic_sample_values", n + " f32", lambda r: (coef, pts_sets[r % nsets])),
        ("linear_sample", n + " f32", lambda r: (img, pts_sets[r % nsets])),
        ("nearest_sample", n + " u8", lambda r: (labels, pts_sets[r % nsets])),
        ("bspline_weights", n, lambda r: (t_sets[r % nsets],)),
        ("bspline_eval", n + f" grid {gshape}", lambda r: (grid, t_sets[r % nsets])),
        ("bspline_eval_jacobian", n, lambda r: (grid, t_sets[r % nsets])),
        ("bspline_scatter", n, lambda r: (t_sets[r % nsets], g, gshape)),
        ("points_affine", n, lambda r: (pts_sets[r % nsets], A)),
        ("warp_sample", n, lambda r: (coef, pts_sets[r % nsets], A, grid, A_f2grid, W2M)),
        ("cubic_sample_channels", n + " C=12 f32", lambda r: (coef12, pts_sets[r % nsets])),
    ]

    def iteration(backend, fused):
        """One registration iteration's kernel work: warp + sample with gradient + scatter."""
        k = {
            op: get_kernel(op, backend)
            for op in ("points_affine", "bspline_eval", "cubic_sample", "warp_sample", "bspline_scatter")
        }

        def run(r):
            pts = pts_sets[r % nsets]
            if fused:
                _, grads, _, tt = k["warp_sample"](coef, pts, A, grid, A_f2grid, W2M)
            else:
                tt = k["points_affine"](pts, A_f2grid)
                m = k["points_affine"](pts, A) + k["bspline_eval"](grid, tt) @ W2M.T
                _, grads = k["cubic_sample"](coef, m)
            k["bspline_scatter"](tt, grads @ W2M, gshape)

        return run

    names = [(op, size) for op, size, _ in sparse]
    names += [("iteration (separate)", n), ("iteration (fused)", n)]
    times = {}
    for backend in ("numpy", "cpu"):
        fns = [lambda r, f=get_kernel(op, backend), a=argf: f(*a(r)) for op, _, argf in sparse]
        fns += [iteration(backend, False), iteration(backend, True)]
        times[backend] = best_ms_round_robin(fns, args.repeat)
    rows = [(op, size, times["numpy"][i], times["cpu"][i]) for i, (op, size) in enumerate(names)]

    if not args.no_dense:
        vol = "x".join(map(str, shape))
        t0 = (1.0, 1.0, 1.0)
        dt = tuple((gshape[d] - 3.0) / (shape[d] - 1) for d in range(3))
        ii = np.indices(shape, dtype=np.float32)
        # a smooth warp of the voxel grid, (X, Y, Z, 3) float32: a resampling workload
        field = np.stack([ii[d] + 1.5 * np.sin(ii[(d + 1) % 3] / 17.0) for d in range(3)], axis=-1)
        del ii
        dense = [
            ("bspline_dense", vol + " f64", (grid, shape, t0, dt)),
            ("bspline_dense", vol + " f32", (grid, shape, t0, dt, np.float32)),
            ("cubic_sample_values", vol + " f32", (coef, field)),
            ("linear_sample", vol + " f32", (img, field)),
            ("nearest_sample", vol + " u8", (labels, field)),
        ]
        for op, size, fargs in dense:
            ref, cpu = get_kernel(op, "numpy"), get_kernel(op, "cpu")
            ref_ms = float("nan") if args.no_numpy_dense else best_ms(lambda: ref(*fargs), 1)
            rows.append((op, size, ref_ms, best_ms(lambda: cpu(*fargs), 3)))

    print(f"numba threads: {numba.get_num_threads()} (threading layer: {numba.threading_layer()})")
    print(f"{'op':<22} {'size':<32} {'numpy ms':>10} {'numba ms':>10} {'speed-up':>9}")
    for op, size, r, c in rows:
        print(f"{op:<22} {size:<32} {r:>10.3f} {c:>10.3f} {r / c:>8.1f}x")


if __name__ == "__main__":
    main()
