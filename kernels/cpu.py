"""Numba CPU kernels (``parallel=True, cache=True``); same signatures and results as ``reference``.

Each public function is a thin Python wrapper that checks shapes, makes arrays contiguous (points
become float64 (M, 3)) and allocates outputs; the ``_k_*`` functions are the compiled loops
(``prange`` over points, blocks of points, voxel rows or point chunks). The scalar B-spline weights
and boundary helpers come from ``_bspline1d`` so the CUDA backend can compile the same source.
Arithmetic is float64 whatever the image dtype; outputs take the image dtype.

Threads: all cores by default; ``numba.set_num_threads(k)`` limits them (per calling thread). On a
machine shared with other busy processes, small (2000-point) parallel calls can stall for a
scheduler time slice (~4 ms) waiting for a worker; one thread avoids that at ~2x the compute time.

Compiled code is cached in fastimpact's user cache folder (``fastimpact.cache_dir()``, outside the
installed package; ``FASTIMPACT_CACHE_DIR`` or ``NUMBA_CACHE_DIR`` override it), so only the first process that meets a given dtype combination pays the compile time (~1 s per
kernel and dtype).
"""

import math

import numba
import numpy as np
from numba import prange

from fastimpact.errors import ConfigError

from . import _counter_rng as _rng
from . import _scalar
from . import reference as _ref

__all__ = list(_ref.__all__)

_jit = numba.njit(cache=True, nogil=True)
_pjit = numba.njit(parallel=True, cache=True, nogil=True)

# Per-iteration calls (a few thousand points) run single-threaded below this many points: a
# parallel launch saves ~0.1 ms on an idle 2-core machine but can stall for milliseconds while
# another process holds a core; the dense (whole-volume) operations stay parallel.
SERIAL_BELOW = 16384
_SERIAL_TWINS = {}


def _pick(kernel, n):
    """``kernel`` for n >= SERIAL_BELOW points, else its single-threaded twin (compiled once from
    the same source: prange runs as range without parallel=True)."""
    if n >= SERIAL_BELOW:
        return kernel
    twin = _SERIAL_TWINS.get(kernel)
    if twin is None:
        twin = _SERIAL_TWINS[kernel] = _jit(_renamed(kernel.py_func, "_serial"))
    return twin


def _renamed(func, suffix: str):
    """A copy of ``func`` whose qualified name ends in ``suffix``. Numba's on-disk cache names its
    entries by qualified name and line and keys them by signature only, not by the ``parallel``
    flag: a twin compiled from the very same function would share the parallel kernel's entry,
    and whichever was compiled first would be loaded for both (measured: the parallel kernel then
    ran serial code, 2x slower on 2 cores)."""
    import types

    twin = types.FunctionType(func.__code__, func.__globals__, func.__name__ + suffix, func.__defaults__,
                              func.__closure__)
    twin.__qualname__ = func.__qualname__ + suffix
    twin.__module__ = func.__module__
    twin.__doc__ = func.__doc__
    return twin

# the scalar functions (B-spline weights, mirrored / zero-extended taps, the cubic spline of an
# image at one point, the transform's displacement at one point): one source with the CUDA backend
_S = _scalar.build(_jit)
_w4, _dw4, _mirror_taps, _mirror_coord, _clamp_taps = _S.w4, _S.dw4, _S.mirror_taps, _S.mirror_coord, _S.clamp_taps
_finite3, _axis_mirror, _cubic_point, _cubic_value = _S.finite3, _S.axis_mirror, _S.cubic_point, _S.cubic_value
_taps, _eval_point = _S.taps, _S.eval_point
_inside, _linear_value, _jac_component = _S.inside, _S.linear_value, _S.jac_component


# ----------------------------------------------------------------------------- input handling
def _volume(arr, name):
    _ref._check_volume(arr, name)
    return np.ascontiguousarray(arr)


def _float_volume(arr, name):
    a = _volume(arr, name)
    if a.dtype not in (np.float32, np.float64):
        a = a.astype(np.float64)
    return a


def _points64(points, name="points"):
    """(..., 3) points as a float64 C-contiguous (M, 3) array, plus the leading shape."""
    p = _ref._points(points, name)
    return np.ascontiguousarray(p.reshape(-1, 3), dtype=np.float64), p.shape[:-1]


def _grid(coef):
    _ref._check_grid(coef)
    return np.ascontiguousarray(coef, dtype=np.float64)


def _float_out_dtype(dtype):
    return np.dtype(dtype) if np.issubdtype(dtype, np.floating) else np.dtype(np.float64)


# ----------------------------------------------------------------------------- image sampling
@_jit
def _affine_point(A, x, y, z):
    """(A[:3, :3] (x, y, z) + A[:3, 3]) of a 4x4 homogeneous matrix, as three scalars."""
    return (
        A[0, 0] * x + A[0, 1] * y + A[0, 2] * z + A[0, 3],
        A[1, 0] * x + A[1, 1] * y + A[1, 2] * z + A[1, 3],
        A[2, 0] * x + A[2, 1] * y + A[2, 2] * z + A[2, 3],
    )


# Points per block of the sampling loops (one prange iteration each).
_BLOCK = 64


@_pjit
def _k_cubic_sample(coef, pts, values, grads, sink):
    n = pts.shape[0]
    for blk in prange(sink.shape[0]):
        lo = blk * _BLOCK
        hi = min(lo + _BLOCK, n)
        for p in range(lo, hi):
            v, gx, gy, gz = _cubic_point(coef, pts[p, 0], pts[p, 1], pts[p, 2])
            values[p] = v
            grads[p, 0] = gx
            grads[p, 1] = gy
            grads[p, 2] = gz


def _sink(n):
    return np.empty((n + _BLOCK - 1) // _BLOCK)


@_pjit
def _k_cubic_values(coef, pts, fill, out, sink):
    nx, ny, nz = coef.shape
    n = pts.shape[0]
    for blk in prange(sink.shape[0]):
        lo = blk * _BLOCK
        hi = min(lo + _BLOCK, n)
        for p in range(lo, hi):
            x = np.float64(pts[p, 0])
            y = np.float64(pts[p, 1])
            z = np.float64(pts[p, 2])
            if _inside(x, y, z, nx, ny, nz):
                out[p] = _cubic_value(coef, x, y, z)
            else:
                out[p] = fill


@_pjit
def _k_linear(img, pts, fill, out):
    nx, ny, nz = img.shape
    for n in prange(pts.shape[0]):
        x = np.float64(pts[n, 0])
        y = np.float64(pts[n, 1])
        z = np.float64(pts[n, 2])
        out[n] = _linear_value(img, x, y, z) if _inside(x, y, z, nx, ny, nz) else fill


@_pjit
def _k_nearest(img, pts, fill, out):
    nx, ny, nz = img.shape
    for n in prange(pts.shape[0]):
        x = np.float64(pts[n, 0])
        y = np.float64(pts[n, 1])
        z = np.float64(pts[n, 2])
        if not _inside(x, y, z, nx, ny, nz):
            out[n] = fill
            continue
        i = min(int(math.floor(x + 0.5)), nx - 1)
        j = min(int(math.floor(y + 0.5)), ny - 1)
        k = min(int(math.floor(z + 0.5)), nz - 1)
        out[n] = img[max(i, 0), max(j, 0), max(k, 0)]


def cubic_sample(coef, points):
    coef = _float_volume(coef, "coef")
    pts, _ = _points64(points)
    values = np.empty(len(pts), dtype=coef.dtype)
    grads = np.empty((len(pts), 3), dtype=coef.dtype)
    _pick(_k_cubic_sample, len(pts))(coef, pts, values, grads, _sink(len(pts)))
    return values, grads


def cubic_sample_values(coef, points, fill=0.0):
    coef = _float_volume(coef, "coef")
    pts, lead = _points64(points)
    out = np.empty(len(pts), dtype=coef.dtype)
    _pick(_k_cubic_values, len(pts))(coef, pts, float(fill), out, _sink(len(pts)))
    return out.reshape(lead)


def linear_sample(img, points, fill=0.0):
    img = _volume(img, "img")
    if img.dtype == np.bool_:
        img = img.view(np.uint8)
    pts, lead = _points64(points)
    out = np.empty(len(pts), dtype=_float_out_dtype(img.dtype))
    _pick(_k_linear, len(pts))(img, pts, float(fill), out)
    return out.reshape(lead)


def nearest_sample(img, points, fill=0):
    img = _volume(img, "img")
    pts, lead = _points64(points)
    out = np.empty(len(pts), dtype=img.dtype)
    work = out.view(np.uint8) if img.dtype == np.bool_ else out
    src = img.view(np.uint8) if img.dtype == np.bool_ else img
    _pick(_k_nearest, len(pts))(src, pts, np.asarray(fill).astype(src.dtype)[()], work)
    return out.reshape(lead)


# ----------------------------------------------------------------------------- B-spline transform
@_pjit
def _k_bspline_weights(t, base, w, dw):
    for n in prange(t.shape[0]):
        for d in range(3):
            v = t[n, d]
            if not abs(v) < 1e15:
                v = 0.0  # unusable coordinate: report the taps of 0, as the reference does
            fl = math.floor(v)
            f = v - fl
            base[n, d] = int(fl) - 1
            ww = _w4(f)
            dd = _dw4(f)
            for k in range(4):
                w[n, d, k] = ww[k]
                dw[n, d, k] = dd[k]


@_pjit
def _k_bspline_eval(coef, t, out):
    for n in prange(t.shape[0]):
        u0, u1, u2 = _eval_point(coef, t[n, 0], t[n, 1], t[n, 2])
        out[n, 0] = u0
        out[n, 1] = u1
        out[n, 2] = u2


@_pjit
def _k_bspline_jacobian(coef, t, out):
    gx, gy, gz, _ = coef.shape
    for n in prange(t.shape[0]):
        x = t[n, 0]
        y = t[n, 1]
        z = t[n, 2]
        if not _finite3(x, y, z):
            for cc in range(3):
                for d in range(3):
                    out[n, cc, d] = 0.0
            continue
        ix, wx, dwx = _taps(x, gx)
        iy, wy, dwy = _taps(y, gy)
        iz, wz, dwz = _taps(z, gz)
        for cc in range(3):
            jx, jy, jz = _jac_component(coef, cc, ix, iy, iz, wx, wy, wz, dwx, dwy, dwz)
            out[n, cc, 0] = jx
            out[n, cc, 1] = jy
            out[n, cc, 2] = jz


@_jit
def _scatter_range(t, g, lo, hi, acc):
    gx, gy, gz, _ = acc.shape
    for n in range(lo, hi):
        x = t[n, 0]
        y = t[n, 1]
        z = t[n, 2]
        if not _finite3(x, y, z):
            continue
        ix, wx, _ = _taps(x, gx)
        iy, wy, _ = _taps(y, gy)
        iz, wz, _ = _taps(z, gz)
        k0, k1, k2, k3 = iz
        # g spread over the four z taps, then added to the 16 (i, j) rows
        h00 = wz[0] * g[n, 0]
        h01 = wz[0] * g[n, 1]
        h02 = wz[0] * g[n, 2]
        h10 = wz[1] * g[n, 0]
        h11 = wz[1] * g[n, 1]
        h12 = wz[1] * g[n, 2]
        h20 = wz[2] * g[n, 0]
        h21 = wz[2] * g[n, 1]
        h22 = wz[2] * g[n, 2]
        h30 = wz[3] * g[n, 0]
        h31 = wz[3] * g[n, 1]
        h32 = wz[3] * g[n, 2]
        for a in range(4):
            i = ix[a]
            for b in range(4):
                j = iy[b]
                w = wx[a] * wy[b]
                acc[i, j, k0, 0] += w * h00
                acc[i, j, k0, 1] += w * h01
                acc[i, j, k0, 2] += w * h02
                acc[i, j, k1, 0] += w * h10
                acc[i, j, k1, 1] += w * h11
                acc[i, j, k1, 2] += w * h12
                acc[i, j, k2, 0] += w * h20
                acc[i, j, k2, 1] += w * h21
                acc[i, j, k2, 2] += w * h22
                acc[i, j, k3, 0] += w * h30
                acc[i, j, k3, 1] += w * h31
                acc[i, j, k3, 2] += w * h32


@_pjit
def _k_bspline_scatter_chunks(t, g, part):
    """Chunk ``ch`` of the points accumulates into its private grid ``part[ch]`` (no races)."""
    nchunks = part.shape[0]
    npts = t.shape[0]
    for ch in prange(nchunks):
        _scatter_range(t, g, ch * npts // nchunks, (ch + 1) * npts // nchunks, part[ch])


def _scatter(t, g, grid_shape, nchunks):
    gx, gy, gz = grid_shape
    if nchunks <= 1:
        out = np.zeros((gx, gy, gz, 3))
        _scatter_range(t, g, 0, len(t), out)
        return out
    part = np.zeros((nchunks, gx, gy, gz, 3))
    _k_bspline_scatter_chunks(t, g, part)
    return part.sum(axis=0)


# Points per private grid cell below which a chunk is not worth its grid (zeroing + summing).
_SCATTER_POINTS_PER_CELL = 0.25


_SCATTER_MAX_CHUNKS = 16


def _scatter_chunks(npts, grid_cells):
    if npts < SERIAL_BELOW:
        return 1
    # a function of the work only, never of the thread count: the chunk sums (in chunk order)
    # then give the same bits for any --threads
    by_work = int(npts / max(_SCATTER_POINTS_PER_CELL * grid_cells, 1.0))
    return max(1, min(_SCATTER_MAX_CHUNKS, by_work))


@_jit
def _axis_taps(n_out, t0, dt, g):
    """Zero-extended tap indices (n_out, 4) and weights (n_out, 4) along one axis."""
    idx = np.empty((n_out, 4), dtype=np.int64)
    w = np.empty((n_out, 4))
    for i in range(n_out):
        t = t0 + i * dt
        if abs(t) < 1e15:
            ii, ww, _ = _taps(t, g)
        else:
            ii = (0, 0, 0, 0)
            ww = (0.0, 0.0, 0.0, 0.0)
        for k in range(4):
            idx[i, k] = ii[k]
            w[i, k] = ww[k]
    return idx, w


@_pjit
def _k_dense_yz(coef, Y, Z, t0y, t0z, dty, dtz):
    """Passes 1-2 of the separable dense evaluation: contract z, then y.

    Returns t2 (gx, Y, Z*3) with t2[a, j, 3k + d] = sum_{b,c} wy[j,b] wz[k,c] coef[a, b, c, d].
    """
    gx, gy, gz, _ = coef.shape
    iy, wy = _axis_taps(Y, t0y, dty, gy)
    iz, wz = _axis_taps(Z, t0z, dtz, gz)
    t1 = np.empty((gx, gy, Z, 3))
    for ab in prange(gx * gy):
        a = ab // gy
        b = ab % gy
        for k in range(Z):
            s0 = 0.0
            s1 = 0.0
            s2 = 0.0
            for c in range(4):
                wt = wz[k, c]
                kk = iz[k, c]
                s0 += wt * coef[a, b, kk, 0]
                s1 += wt * coef[a, b, kk, 1]
                s2 += wt * coef[a, b, kk, 2]
            t1[a, b, k, 0] = s0
            t1[a, b, k, 1] = s1
            t1[a, b, k, 2] = s2
    L = Z * 3
    t1f = t1.reshape(gx, gy, L)
    t2 = np.empty((gx, Y, L))
    for aj in prange(gx * Y):
        a = aj // Y
        j = aj % Y
        r0 = t1f[a, iy[j, 0]]
        r1 = t1f[a, iy[j, 1]]
        r2 = t1f[a, iy[j, 2]]
        r3 = t1f[a, iy[j, 3]]
        w0 = wy[j, 0]
        w1 = wy[j, 1]
        w2 = wy[j, 2]
        w3 = wy[j, 3]
        dst = t2[a, j]
        for m in range(L):
            dst[m] = w0 * r0[m] + w1 * r1[m] + w2 * r2[m] + w3 * r3[m]
    return t2


@_pjit
def _k_dense_x(t2, ix, wx, out):
    """Pass 3: out[i, j, :] = sum_a wx[i, a] t2[ix[i, a], j, :] (inner loop contiguous, vectorised)."""
    X = ix.shape[0]
    Y = t2.shape[1]
    L = t2.shape[2]
    outf = out.reshape(X, Y, L)
    for ij in prange(X * Y):
        i = ij // Y
        j = ij % Y
        r0 = t2[ix[i, 0], j]
        r1 = t2[ix[i, 1], j]
        r2 = t2[ix[i, 2], j]
        r3 = t2[ix[i, 3], j]
        w0 = wx[i, 0]
        w1 = wx[i, 1]
        w2 = wx[i, 2]
        w3 = wx[i, 3]
        dst = outf[i, j]
        for m in range(L):
            dst[m] = w0 * r0[m] + w1 * r1[m] + w2 * r2[m] + w3 * r3[m]


def bspline_weights(t):
    t, _ = _points64(t, "t")
    base = np.empty((len(t), 3), dtype=np.int64)
    w = np.empty((len(t), 3, 4))
    dw = np.empty((len(t), 3, 4))
    _pick(_k_bspline_weights, len(t))(t, base, w, dw)
    return base, w, dw


def bspline_eval(coef, t):
    coef = _grid(coef)
    t, _ = _points64(t, "t")
    out = np.empty((len(t), 3))
    _pick(_k_bspline_eval, len(t))(coef, t, out)
    return out


def bspline_eval_jacobian(coef, t):
    coef = _grid(coef)
    t, _ = _points64(t, "t")
    out = np.empty((len(t), 3, 3))
    _pick(_k_bspline_jacobian, len(t))(coef, t, out)
    return out


def bspline_scatter(t, g, grid_shape, out=None):
    gx, gy, gz = _ref._grid_shape(grid_shape)
    t, _ = _points64(t, "t")
    g = np.ascontiguousarray(np.asarray(g, dtype=np.float64).reshape(-1, 3))
    if len(g) != len(t):
        raise ConfigError(f"g must have one 3-vector per point: got {len(g)} vectors for {len(t)} points")
    nchunks = _scatter_chunks(len(t), gx * gy * gz)
    if out is None or nchunks > 1:
        res = _scatter(t, g, (gx, gy, gz), nchunks)
        if out is None:
            return res
        out[...] = res
        return out
    _ref._check_out(out, (gx, gy, gz, 3))
    out.fill(0.0)  # reusing the caller's buffer avoids a fresh (page-faulting) grid per call
    _scatter_range(t, g, 0, len(t), out)
    return out


def bspline_dense(coef, shape, t0, dt, dtype=np.float64):
    coef = _grid(coef)
    (X, Y, Z), t0, dt, dtype = _ref._dense_args(shape, t0, dt, dtype)
    out = np.empty((X, Y, Z, 3), dtype=dtype)
    t2 = _k_dense_yz(coef, Y, Z, t0[1], t0[2], dt[1], dt[2])
    ix, wx = _axis_taps(X, t0[0], dt[0], coef.shape[0])
    _k_dense_x(t2, ix, wx, out)
    return out


@_pjit
def _k_points_affine(idx, A, out):
    for n in prange(idx.shape[0]):
        x = np.float64(idx[n, 0])
        y = np.float64(idx[n, 1])
        z = np.float64(idx[n, 2])
        for r in range(3):
            out[n, r] = A[r, 0] * x + A[r, 1] * y + A[r, 2] * z + A[r, 3]


def points_affine(idx, A):
    pts, lead = _points64(idx, "idx")
    A = _ref._matrix(A, (4, 4), "A")
    out = np.empty((len(pts), 3))
    _pick(_k_points_affine, len(pts))(pts, A, out)
    return out.reshape(lead + (3,))


@_pjit
def _k_warp_sample(coef_img, idx, A_f2m, bs_coef, A_f2grid, W2M, values, grads, moving, t, sink):
    n = idx.shape[0]
    for blk in prange(sink.shape[0]):
        lo = blk * _BLOCK
        hi = min(lo + _BLOCK, n)
        for p in range(lo, hi):
            x = idx[p, 0]
            y = idx[p, 1]
            z = idx[p, 2]
            tx = A_f2grid[0, 0] * x + A_f2grid[0, 1] * y + A_f2grid[0, 2] * z + A_f2grid[0, 3]
            ty = A_f2grid[1, 0] * x + A_f2grid[1, 1] * y + A_f2grid[1, 2] * z + A_f2grid[1, 3]
            tz = A_f2grid[2, 0] * x + A_f2grid[2, 1] * y + A_f2grid[2, 2] * z + A_f2grid[2, 3]
            u0, u1, u2 = _eval_point(bs_coef, tx, ty, tz)
            m0 = A_f2m[0, 0] * x + A_f2m[0, 1] * y + A_f2m[0, 2] * z + A_f2m[0, 3]
            m1 = A_f2m[1, 0] * x + A_f2m[1, 1] * y + A_f2m[1, 2] * z + A_f2m[1, 3]
            m2 = A_f2m[2, 0] * x + A_f2m[2, 1] * y + A_f2m[2, 2] * z + A_f2m[2, 3]
            moving[p, 0] = m0 + W2M[0, 0] * u0 + W2M[0, 1] * u1 + W2M[0, 2] * u2
            moving[p, 1] = m1 + W2M[1, 0] * u0 + W2M[1, 1] * u1 + W2M[1, 2] * u2
            moving[p, 2] = m2 + W2M[2, 0] * u0 + W2M[2, 1] * u1 + W2M[2, 2] * u2
            t[p, 0] = tx
            t[p, 1] = ty
            t[p, 2] = tz
        for p in range(lo, hi):
            v, g0, g1, g2 = _cubic_point(coef_img, moving[p, 0], moving[p, 1], moving[p, 2])
            values[p] = v
            grads[p, 0] = g0
            grads[p, 1] = g1
            grads[p, 2] = g2


def warp_sample(coef_img, idx_fixed, A_f2m, bs_coef, A_f2grid, W2M):
    coef_img = _float_volume(coef_img, "coef_img")
    idx, _ = _points64(idx_fixed, "idx_fixed")
    bs_coef = _grid(bs_coef)
    A_f2m = _ref._matrix(A_f2m, (4, 4), "A_f2m")
    A_f2grid = _ref._matrix(A_f2grid, (4, 4), "A_f2grid")
    W2M = _ref._matrix(W2M, (3, 3), "W2M")
    n = len(idx)
    values = np.empty(n, dtype=coef_img.dtype)
    grads = np.empty((n, 3), dtype=coef_img.dtype)
    moving = np.empty((n, 3))
    t = np.empty((n, 3))
    _pick(_k_warp_sample, n)(coef_img, idx, A_f2m, bs_coef, A_f2grid, W2M, values, grads, moving, t, _sink(n))
    return values, grads, moving, t




@_pjit
def _k_affine_grid(A, out):
    X, Y, Z, _ = out.shape
    for ij in prange(X * Y):
        i = ij // Y
        j = ij % Y
        for r in range(3):
            base = A[r, 0] * i + A[r, 1] * j + A[r, 3]
            for k in range(Z):
                out[i, j, k, r] = base + A[r, 2] * k


@_pjit
def _k_affine_grid_field(A, field, L, out):
    X, Y, Z, _ = out.shape
    for ij in prange(X * Y):
        i = ij // Y
        j = ij % Y
        for k in range(Z):
            f0 = np.float64(field[i, j, k, 0])
            f1 = np.float64(field[i, j, k, 1])
            f2 = np.float64(field[i, j, k, 2])
            for r in range(3):
                out[i, j, k, r] = (A[r, 0] * i + A[r, 1] * j + A[r, 2] * k + A[r, 3]
                                   + L[r, 0] * f0 + L[r, 1] * f1 + L[r, 2] * f2)


def _field_args(field, L, shape):
    """Validated (contiguous field (X, Y, Z, 3), 3x3 L) of the affine_grid / warp_cubic ops."""
    L = _ref._matrix(L, (3, 3), "L")
    field = np.ascontiguousarray(field)
    if field.shape != shape + (3,):
        raise ConfigError(f"field must have shape {shape + (3,)}, got {field.shape}; pass a field on the same grid")
    return field, L


def affine_grid(shape, A, field=None, L=None, dtype=np.float64):
    shape = tuple(int(n) for n in shape)
    A = _ref._matrix(A, (4, 4), "A")
    out = np.empty(shape + (3,), dtype=dtype)
    if field is None:
        _k_affine_grid(A, out)
        return out
    field, L = _field_args(field, L, shape)
    _k_affine_grid_field(A, field, L, out)
    return out


@_jit
def _pair_point(fi, ny, nz, f2m, mcoef, mmask, use_mask, bs, use_bs, f2g, w2m):
    """One fixed voxel (flat index fi): (kept, m, dm/dy (3), grid index t or voxel index (3))."""
    mx, my, mz = mcoef.shape
    i = fi // (ny * nz)
    r = fi - i * ny * nz
    j = r // nz
    kk = r - j * nz
    x = np.float64(i)
    y = np.float64(j)
    z = np.float64(kk)
    q0 = f2m[0, 0] * x + f2m[0, 1] * y + f2m[0, 2] * z + f2m[0, 3]
    q1 = f2m[1, 0] * x + f2m[1, 1] * y + f2m[1, 2] * z + f2m[1, 3]
    q2 = f2m[2, 0] * x + f2m[2, 1] * y + f2m[2, 2] * z + f2m[2, 3]
    tx = x
    ty = y
    tz = z
    if use_bs:
        tx = f2g[0, 0] * x + f2g[0, 1] * y + f2g[0, 2] * z + f2g[0, 3]
        ty = f2g[1, 0] * x + f2g[1, 1] * y + f2g[1, 2] * z + f2g[1, 3]
        tz = f2g[2, 0] * x + f2g[2, 1] * y + f2g[2, 2] * z + f2g[2, 3]
        u0, u1, u2 = _eval_point(bs, tx, ty, tz)
        q0 += w2m[0, 0] * u0 + w2m[0, 1] * u1 + w2m[0, 2] * u2
        q1 += w2m[1, 0] * u0 + w2m[1, 1] * u1 + w2m[1, 2] * u2
        q2 += w2m[2, 0] * u0 + w2m[2, 1] * u1 + w2m[2, 2] * u2
    ok = q0 >= 0.0 and q0 <= mx - 1.0 and q1 >= 0.0 and q1 <= my - 1.0 and q2 >= 0.0 and q2 <= mz - 1.0
    if ok and use_mask:
        ok = mmask[int(math.floor(q0 + 0.5)), int(math.floor(q1 + 0.5)), int(math.floor(q2 + 0.5))] != 0
    if not ok:
        return False, 0.0, 0.0, 0.0, 0.0, tx, ty, tz
    v, g0, g1, g2 = _cubic_point(mcoef, q0, q1, q2)
    return (True, v,
            w2m[0, 0] * g0 + w2m[1, 0] * g1 + w2m[2, 0] * g2,
            w2m[0, 1] * g0 + w2m[1, 1] * g1 + w2m[2, 1] * g2,
            w2m[0, 2] * g0 + w2m[1, 2] * g1 + w2m[2, 2] * g2,
            tx, ty, tz)


@_jit
def _store_pair(k, fval, v, a0, a1, a2, tx, ty, tz, f_out, m_out, gy_out, pts_out):
    f_out[k] = fval
    m_out[k] = v
    gy_out[k, 0] = a0
    gy_out[k, 1] = a1
    gy_out[k, 2] = a2
    pts_out[k, 0] = tx
    pts_out[k, 1] = ty
    pts_out[k, 2] = tz


@_jit
def _k_sample_pairs_compact(flat, fvals, ny, nz, f2m, mcoef, mmask, use_mask, bs, use_bs, f2g, w2m,
                            f_out, m_out, gy_out, pts_out, keep):
    """Serial: kept points packed in input order; returns their count."""
    k = 0
    for p in range(flat.shape[0]):
        ok, v, a0, a1, a2, tx, ty, tz = _pair_point(flat[p], ny, nz, f2m, mcoef, mmask, use_mask, bs, use_bs,
                                                    f2g, w2m)
        keep[p] = ok
        if ok:
            _store_pair(k, fvals[flat[p]], v, a0, a1, a2, tx, ty, tz, f_out, m_out, gy_out, pts_out)
            k += 1
    return k


@_pjit
def _k_sample_pairs_rows(flat, fvals, ny, nz, f2m, mcoef, mmask, use_mask, bs, use_bs, f2g, w2m,
                         f_out, m_out, gy_out, pts_out, keep):
    """Parallel (large N): every row written; the caller packs the kept rows."""
    for p in prange(flat.shape[0]):
        ok, v, a0, a1, a2, tx, ty, tz = _pair_point(flat[p], ny, nz, f2m, mcoef, mmask, use_mask, bs, use_bs,
                                                    f2g, w2m)
        keep[p] = ok
        _store_pair(p, fvals[flat[p]], v, a0, a1, a2, tx, ty, tz, f_out, m_out, gy_out, pts_out)


@_jit
def absmax3(v):
    """Per-component maximum of |v| for v viewed as (n, 3): the displacement bound of a B-spline
    coefficient step (the weights are non-negative and sum to one)."""
    m0 = 0.0
    m1 = 0.0
    m2 = 0.0
    for i in range(0, v.shape[0] - 2, 3):
        m0 = max(m0, abs(v[i]))
        m1 = max(m1, abs(v[i + 1]))
        m2 = max(m2, abs(v[i + 2]))
    return m0, m1, m2


_NO_MASK = np.ones((1, 1, 1), dtype=np.uint8)
_NO_GRID = np.zeros((1, 1, 1, 3))


def sample_pairs(flat, fixed_values, fixed_shape, f2m, moving_coef, moving_mask=None, bs_coef=None, f2grid=None,
                 w2m=None):
    flat = np.ascontiguousarray(flat, dtype=np.int64)
    fvals = np.asarray(fixed_values).ravel()
    mcoef = _float_volume(moving_coef, "moving_coef")
    f2m = _ref._matrix(f2m, (4, 4), "f2m")
    use_bs = bs_coef is not None
    bs = _grid(bs_coef) if use_bs else _NO_GRID
    f2g = _ref._matrix(f2grid, (4, 4), "f2grid") if use_bs else np.eye(4)
    w2m = _ref._matrix(w2m, (3, 3), "w2m") if w2m is not None else np.eye(3)
    use_mask = moving_mask is not None
    mmask = np.ascontiguousarray(moving_mask, dtype=np.uint8) if use_mask else _NO_MASK
    n = len(flat)
    f = np.empty(n)
    m = np.empty(n)
    gy = np.empty((n, 3))
    pts = np.empty((n, 3))
    keep = np.empty(n, dtype=np.bool_)
    _, ny, nz = (int(v) for v in fixed_shape)
    args = (flat, fvals, ny, nz, f2m, mcoef, mmask, use_mask, bs, use_bs, f2g, w2m, f, m, gy, pts, keep)
    if n < SERIAL_BELOW:
        k = _k_sample_pairs_compact(*args)
        return f[:k], m[:k], gy[:k], pts[:k], keep
    _k_sample_pairs_rows(*args)
    return f[keep], m[keep], gy[keep], pts[keep], keep


@_pjit
def _k_warp_cubic(coef, A, field, L, use_field, fill, out):
    nx, ny, nz = coef.shape
    X, Y, Z = out.shape
    for ij in prange(X * Y):
        i = ij // Y
        j = ij % Y
        for k in range(Z):
            q0 = A[0, 0] * i + A[0, 1] * j + A[0, 2] * k + A[0, 3]
            q1 = A[1, 0] * i + A[1, 1] * j + A[1, 2] * k + A[1, 3]
            q2 = A[2, 0] * i + A[2, 1] * j + A[2, 2] * k + A[2, 3]
            if use_field:
                f0 = np.float64(field[i, j, k, 0])
                f1 = np.float64(field[i, j, k, 1])
                f2 = np.float64(field[i, j, k, 2])
                q0 += L[0, 0] * f0 + L[0, 1] * f1 + L[0, 2] * f2
                q1 += L[1, 0] * f0 + L[1, 1] * f1 + L[1, 2] * f2
                q2 += L[2, 0] * f0 + L[2, 1] * f1 + L[2, 2] * f2
            if _inside(q0, q1, q2, nx, ny, nz):
                out[i, j, k] = _cubic_value(coef, q0, q1, q2)
            else:
                out[i, j, k] = fill


def warp_cubic(coef, shape, A, field=None, L=None, fill=0.0):
    coef = _float_volume(coef, "coef")
    shape = tuple(int(n) for n in shape)
    A = _ref._matrix(A, (4, 4), "A")
    use_field = field is not None
    if use_field:
        field, L = _field_args(field, L, shape)
    else:
        field, L = np.zeros((1, 1, 1, 3), dtype=np.float32), np.eye(3)
    out = np.empty(shape, dtype=coef.dtype)
    _k_warp_cubic(coef, A, field, L, use_field, float(fill), out)
    return out


@_pjit
def _k_cubic_channels(coef, pts, values, grads, with_grad):
    nx, ny, nz, C = coef.shape
    for n in prange(pts.shape[0]):
        x = pts[n, 0]
        y = pts[n, 1]
        z = pts[n, 2]
        if not _finite3(x, y, z):
            for ch in range(C):
                values[n, ch] = np.nan
                if with_grad:
                    grads[n, ch, 0] = np.nan
                    grads[n, ch, 1] = np.nan
                    grads[n, ch, 2] = np.nan
            continue
        ix, wx, dwx, sx = _axis_mirror(x, nx)
        iy, wy, dwy, sy = _axis_mirror(y, ny)
        iz, wz, dwz, sz = _axis_mirror(z, nz)
        # contiguous per-point accumulators (value, d/dx, d/dy, d/dz) x C: the channel loop
        # vectorises and the outputs are written once
        acc = np.zeros((4, C))
        # the 64 tap weights are computed once per point and applied to every channel
        for a in range(4):
            for b in range(4):
                wab = wx[a] * wy[b]
                dxab = dwx[a] * wy[b] * sx
                dyab = wx[a] * dwy[b] * sy
                for c in range(4):
                    w = wab * wz[c]
                    i = ix[a]
                    j = iy[b]
                    k = iz[c]
                    if with_grad:
                        gx = dxab * wz[c]
                        gy = dyab * wz[c]
                        gz = wab * dwz[c] * sz
                        for ch in range(C):
                            v = np.float64(coef[i, j, k, ch])
                            acc[0, ch] += w * v
                            acc[1, ch] += gx * v
                            acc[2, ch] += gy * v
                            acc[3, ch] += gz * v
                    else:
                        for ch in range(C):
                            acc[0, ch] += w * np.float64(coef[i, j, k, ch])
        for ch in range(C):
            values[n, ch] = acc[0, ch]
            if with_grad:
                grads[n, ch, 0] = acc[1, ch]
                grads[n, ch, 1] = acc[2, ch]
                grads[n, ch, 2] = acc[3, ch]


def _channels_args(coef, points):
    coef = np.ascontiguousarray(coef)
    if coef.ndim != 4 or min(coef.shape) < 1:
        raise ConfigError(f"coef must be (nx, ny, nz, C) with positive sizes, got shape {coef.shape}")
    if coef.dtype not in (np.float32, np.float64):
        coef = coef.astype(np.float64)
    pts, _ = _points64(points)
    return coef, pts


def cubic_sample_channels(coef, points):
    coef, pts = _channels_args(coef, points)
    values = np.empty((len(pts), coef.shape[3]))
    grads = np.empty((len(pts), coef.shape[3], 3))
    # the work per point grows with the channels: parallel from SERIAL_BELOW point-channels
    _pick(_k_cubic_channels, len(pts) * coef.shape[3])(coef, pts, values, grads, True)
    return values, grads


def cubic_sample_channels_values(coef, points):
    coef, pts = _channels_args(coef, points)
    values = np.empty((len(pts), coef.shape[3]))
    _pick(_k_cubic_channels, len(pts) * coef.shape[3])(coef, pts, values, np.empty((1, 1, 3)), False)
    return values


_POLE = math.sqrt(3.0) - 2.0  # the cubic B-spline's pole


@numba.njit(cache=True, nogil=True, inline="always")
def _filter_line(line, n, C, horizon):
    """In place: cubic B-spline coefficients of ``line`` (n, C) float64, mirror boundary."""
    z = _POLE
    for ch in range(C):
        for k in range(n):
            line[k, ch] *= 6.0  # (1 - z)(1 - 1/z)
    # causal initial value: the sum over the mirror-extended line, truncated where |z|^k is below
    # double precision for long lines, in closed form for short ones
    for ch in range(C):
        if horizon < n:
            acc = line[0, ch]
            zk = z
            for k in range(1, horizon):
                acc += zk * line[k, ch]
                zk *= z
        else:
            zn = z ** (n - 1)
            z2n = zn * zn
            acc = line[0, ch] + zn * line[n - 1, ch]
            zk = z
            for k in range(1, n - 1):
                acc += (zk + z2n / zk) * line[k, ch]
                zk *= z
            acc /= 1.0 - z2n
        line[0, ch] = acc
    for k in range(1, n):
        for ch in range(C):
            line[k, ch] += z * line[k - 1, ch]
    for ch in range(C):
        line[n - 1, ch] = (z / (z * z - 1.0)) * (line[n - 1, ch] + z * line[n - 2, ch])
    for k in range(n - 2, -1, -1):
        for ch in range(C):
            line[k, ch] = z * (line[k + 1, ch] - line[k, ch])


@_pjit
def _k_prefilter_axis(data, axis, horizon):
    nx, ny, nz, C = data.shape
    shape = (nx, ny, nz)
    n = shape[axis]
    o1 = 1 if axis == 0 else 0
    o2 = 2 if axis != 2 else 1
    m1 = shape[o1]
    m2 = shape[o2]
    for p in prange(m1 * m2):
        a = p // m2
        b = p % m2
        line = np.empty((n, C))
        for k in range(n):
            if axis == 0:
                for ch in range(C):
                    line[k, ch] = data[k, a, b, ch]
            elif axis == 1:
                for ch in range(C):
                    line[k, ch] = data[a, k, b, ch]
            else:
                for ch in range(C):
                    line[k, ch] = data[a, b, k, ch]
        _filter_line(line, n, C, min(n, horizon))
        for k in range(n):
            if axis == 0:
                for ch in range(C):
                    data[k, a, b, ch] = line[k, ch]
            elif axis == 1:
                for ch in range(C):
                    data[a, k, b, ch] = line[k, ch]
            else:
                for ch in range(C):
                    data[a, b, k, ch] = line[k, ch]


# terms of the causal initial sum: |z|^k < 1e-14 beyond this
_HORIZON = int(math.ceil(math.log(1e-14) / math.log(abs(_POLE))))


def prefilter_channels(data, inplace=False):
    data = np.asarray(data)
    if data.ndim != 4:
        raise ConfigError(f"data must be (X, Y, Z, C), got shape {data.shape}")
    if inplace and data.dtype == np.float32 and data.flags.c_contiguous and data.flags.writeable:
        out = data
    else:
        out = np.array(data, dtype=np.float32, order="C", copy=True)
    for axis in range(3):
        if out.shape[axis] > 1:
            _k_prefilter_axis(out, axis, _HORIZON)
    return out


# ----------------------------------------------------------------------------- Jacobian-mode patches
# Both kernels walk the flattened (centre, offset) index in blocks of _BLOCK points, so a few
# centres with big patches balance over the threads as well as many centres with small ones, and
# consecutive points (one patch) read neighbouring coefficients. No (N * V, 3) point arrays.


# offsets are (M, V, 3): M = 1 for offsets shared by every centre, M = N for one set per centre
# (row n * each of the offsets belongs to centre n)
@_pjit
def _k_sample_patches(coef, centres, offsets, each, w2i, fill, values, sink):
    V = offsets.shape[1]
    total = values.shape[0]
    for blk in prange(sink.shape[0]):
        lo = blk * _BLOCK
        hi = min(lo + _BLOCK, total)
        for p in range(lo, hi):
            n = p // V
            v = p - n * V
            m = n * each
            q0, q1, q2 = _affine_point(
                w2i, centres[n, 0] + offsets[m, v, 0], centres[n, 1] + offsets[m, v, 1],
                centres[n, 2] + offsets[m, v, 2]
            )
            if _finite3(q0, q1, q2):
                values[p] = _cubic_value(coef, q0, q1, q2)
            else:
                values[p] = fill


@_pjit
def _k_sample_patches_warped(coef, centres, offsets, each, affine, bs, use_bs, w2grid, w2i, values, grads, sink):
    V = offsets.shape[1]
    total = values.shape[0]
    for blk in prange(sink.shape[0]):
        lo = blk * _BLOCK
        hi = min(lo + _BLOCK, total)
        for p in range(lo, hi):
            n = p // V
            v = p - n * V
            m = n * each
            x = centres[n, 0] + offsets[m, v, 0]
            y = centres[n, 1] + offsets[m, v, 1]
            z = centres[n, 2] + offsets[m, v, 2]
            y0, y1, y2 = _affine_point(affine, x, y, z)
            if use_bs:
                t0, t1, t2 = _affine_point(w2grid, x, y, z)
                u0, u1, u2 = _eval_point(bs, t0, t1, t2)
                y0 += u0
                y1 += u1
                y2 += u2
            q0, q1, q2 = _affine_point(w2i, y0, y1, y2)
            val, g0, g1, g2 = _cubic_point(coef, q0, q1, q2)
            values[p] = val
            # d value / d y = w2i[:3, :3]^T (d value / d q)
            grads[p, 0] = w2i[0, 0] * g0 + w2i[1, 0] * g1 + w2i[2, 0] * g2
            grads[p, 1] = w2i[0, 1] * g0 + w2i[1, 1] * g1 + w2i[2, 1] * g2
            grads[p, 2] = w2i[0, 2] * g0 + w2i[1, 2] * g1 + w2i[2, 2] * g2


def _patch_args(coef, centres, offsets):
    coef = _float_volume(coef, "coef")
    centres = _ref._point_list(centres, "centres")
    offsets = _ref._patch_offsets(offsets, len(centres))
    each = 1 if offsets.ndim == 3 else 0
    return coef, centres, np.ascontiguousarray(offsets if each else offsets[None]), each


def sample_patches(coef, centres, offsets, w2i, fill=0.0):
    coef, centres, offsets, each = _patch_args(coef, centres, offsets)
    w2i = _ref._matrix(w2i, (4, 4), "w2i")
    n, v = len(centres), offsets.shape[1]
    values = np.empty((n, v), dtype=np.float32)
    _pick(_k_sample_patches, n * v)(coef, centres, offsets, each, w2i, float(fill), values.reshape(-1), _sink(n * v))
    return values


def sample_patches_warped(coef, centres, offsets, affine, bs_coef, w2grid, w2i):
    coef, centres, offsets, each = _patch_args(coef, centres, offsets)
    affine = _ref._matrix(affine, (4, 4), "affine")
    w2i = _ref._matrix(w2i, (4, 4), "w2i")
    use_bs = bs_coef is not None
    bs = _grid(bs_coef) if use_bs else _NO_GRID
    w2grid = _ref._matrix(w2grid, (4, 4), "w2grid") if use_bs else np.eye(4)
    n, v = len(centres), offsets.shape[1]
    values = np.empty((n, v), dtype=np.float32)
    grads = np.empty((n, v, 3), dtype=np.float32)
    _pick(_k_sample_patches_warped, n * v)(coef, centres, offsets, each, affine, bs, use_bs, w2grid, w2i,
                                           values.reshape(-1), grads.reshape(-1, 3), _sink(n * v))
    return values, grads


@numba.njit(cache=True, nogil=True, inline="always")
def _fold(q, n):
    if n == 1:
        return 0
    period = 2 * n - 2
    q = q % period  # Python semantics in Numba: non-negative for a positive period
    return period - q if q >= n else q


@_pjit
def _k_gather_patches(data, centres, offsets, out):
    nx, ny, nz = data.shape
    V = offsets.shape[0]
    for n in prange(centres.shape[0]):
        cx = centres[n, 0]
        cy = centres[n, 1]
        cz = centres[n, 2]
        for v in range(V):
            i = _fold(cx + offsets[v, 0], nx)
            j = _fold(cy + offsets[v, 1], ny)
            k = _fold(cz + offsets[v, 2], nz)
            out[n, v] = data[i, j, k]


def gather_patches(data, centres, offsets):
    data = np.asarray(data)
    if data.ndim != 3:
        raise ConfigError(f"data must be a 3-D volume, got shape {data.shape}")
    data = np.ascontiguousarray(data, dtype=np.float32)
    centres = np.ascontiguousarray(np.asarray(centres, dtype=np.int64).reshape(-1, 3))
    offsets = np.ascontiguousarray(np.asarray(offsets, dtype=np.int64).reshape(-1, 3))
    out = np.empty((len(centres), len(offsets)), dtype=np.float32)
    _pick(_k_gather_patches, len(centres) * len(offsets) // 8)(data, centres, offsets, out)
    return out


# ----------------------------------------------------------------------------- random sampling
_draw_index = _jit(_rng.draw_index)


@_pjit
def _k_random_indices(key, counter, n_total, out):
    for i in prange(out.shape[0]):
        out[i] = np.int64(_draw_index(key, counter, np.uint64(i), n_total))


def random_indices(key, counter, n, n_total):
    key, counter, n, n_total = _ref._random_args(key, counter, n, n_total)
    out = np.empty(n, dtype=np.int64)
    _pick(_k_random_indices, n)(key, counter, np.uint64(n_total), out)
    return out


for _name in __all__:
    globals()[_name].__doc__ = getattr(_ref, _name).__doc__
del _name
