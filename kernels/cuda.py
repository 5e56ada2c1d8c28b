"""Numba CUDA kernels of the core operations; same signatures and results as ``reference``.

Each public function checks shapes (the same ConfigError messages as ``reference``/``cpu``),
moves its array arguments to the GPU with :func:`cuda_common.device_in` (a no-op for arrays
already there), launches one or more kernels and returns through :class:`cuda_common.Returns`:
NumPy arrays when every array argument was a host array, else the Numba device arrays
themselves (nothing is copied back). Shape checks of device arrays read ``.shape`` only.

Launch layout
-------------
1-D grids of ``cuda_common.THREADS`` threads per block (:func:`cuda_common.grid_1d`):

* point ops: one thread per point; thread ``p`` reads row ``p`` of the (N, 3) points and writes
  row ``p`` of every output (neighbouring threads touch neighbouring rows);
* dense ops (``bspline_dense``, ``affine_grid``, ``warp_cubic``): one thread per output voxel,
  flat C-order index (``k`` fastest), so a warp writes 32 consecutive voxels;
* ``bspline_scatter``: one thread per point, 64 x 3 ``cuda.atomic.add`` (float64) into the grid;
* ``sample_pairs``: three launches (map + block scan, scan of the block counts, emit), see there.

Numerics
--------
Arithmetic is float64 whatever the input dtype (image, point and field elements are read
through ``float()``); outputs take the reference's dtype. Small matrices (4x4 affines, 3x3 linear parts)
travel as kernel arguments (tuples of 12 or 9 floats), not as device arrays, so a call with its
big arrays on the GPU makes no host <-> device copies at all (``sample_pairs`` copies its
8-byte kept count back: the output length depends on it). Atomic accumulation makes
``bspline_scatter`` reproducible only up to float64 rounding (the order of the additions varies).

Kernels are compiled on their first call for each combination of argument types (in memory, per
process: no on-disk cache); the CPU-only CI runs them in Numba's CUDA simulator.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda

from fastimpact.errors import ConfigError

from . import cuda_common as _cc
from . import reference as _ref

__all__ = [
    "cubic_sample",
    "cubic_sample_values",
    "linear_sample",
    "nearest_sample",
    "bspline_weights",
    "bspline_eval",
    "bspline_eval_jacobian",
    "bspline_scatter",
    "bspline_dense",
    "points_affine",
    "warp_sample",
    "affine_grid",
    "sample_pairs",
    "warp_cubic",
]

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_INTS = (np.dtype(np.int32), np.dtype(np.int64))
# shared-memory sizes of the block scans (threads per block at most; 32-thread chunks). Module
# constants: cuda.shared.array needs literal sizes, and a global int is typed as one.
_SCAN = _cc.THREADS
_SCAN_WARPS = _SCAN // 32

# shared device functions (compiled once from _bspline1d in cuda_common), bound to plain names so
# the kernels below reference module globals only
_w4 = _cc.bspline3_weights
_dw4 = _cc.bspline3_weights_d1
_mirror_taps = _cc.mirror_taps
_mirror_coord = _cc.mirror_coord
_clamp_taps = _cc.clamp_taps

_dev = cuda.jit(device=True)


# ----------------------------------------------------------------------------- host-side plumbing
def _shape_view(a):
    """Something with ``a``'s shape that the reference's shape checks accept without a copy: the
    array itself on the host, a zero-stride host view of that shape for a device array."""
    if _cc.is_device(a):
        return np.broadcast_to(np.zeros((), dtype=np.uint8), tuple(a.shape))
    return a


def _host(a):
    return a if _cc.is_device(a) else np.asarray(a)


def _upload(a, name, floating):
    """Device array of ``a``: float32/float64 kept, other dtypes cast to float64 on the host (and
    rejected with device_in's TypeError on the GPU) when ``floating``; any dtype kept otherwise."""
    a = _host(a)
    dt = a.dtype
    if floating and dt not in _FLOATS:
        dt = np.dtype(np.float64)
    return _cc.device_in(a, dt, name)


def _volume_in(a, name, floating=True):
    a = _host(a)
    _ref._check_volume(_shape_view(a), name)
    if not _cc.is_device(a) and a.dtype == np.bool_ and not floating:
        a = a.view(np.uint8)  # the kernels read bytes; nearest_sample views its result back
    return _upload(a, name, floating)


def _points_in(points, name="points"):
    """(M, 3) device points (float64 from the host; float32/float64 as they are on the GPU) and
    the leading shape of the input ((N,) or (X, Y, Z))."""
    p = _host(points)
    _ref._points(_shape_view(p), name)
    lead = tuple(p.shape[:-1])
    m = int(np.prod(lead, dtype=np.int64))
    if _cc.is_device(p):
        return _upload(p, name, True).reshape((m, 3)), lead
    return _cc.device_in(p.reshape(m, 3), np.float64, name), lead


def _grid_in(coef, name="bs_coef"):
    c = _host(coef)
    _ref._check_grid(_shape_view(c))
    return _cc.device_in(c, np.float64, name)


def _matrix(M, shape, name):
    """Validated matrix as a flat tuple of floats (rows 0..2 of a 4x4: 12 values; a 3x3: 9)."""
    if _cc.is_device(M):
        M = _cc.device_in(M).copy_to_host()  # tiny; matrices normally come from the host
    M = _ref._matrix(M, shape, name)
    return tuple(float(v) for v in M[:3].ravel())


_EYE4 = tuple(float(v) for v in np.eye(4)[:3].ravel())
_EYE3 = tuple(float(v) for v in np.eye(3).ravel())
_DUMMIES = {}


def _dummy(shape, dtype):
    """A tiny device array for an unused kernel argument (typed like the real one would be)."""
    key = (shape, np.dtype(dtype).str)
    d = _DUMMIES.get(key)
    if d is None:
        d = _DUMMIES[key] = _cc.device_out(shape, dtype)
    return d


def _launch(kernel, n):
    blocks, threads = _cc.grid_1d(n)
    return kernel[blocks, threads]


def _float_out_dtype(dtype):
    return np.dtype(dtype) if np.issubdtype(dtype, np.floating) else np.dtype(np.float64)


def _field_in(field, L, shape):
    """Validated (device field (X, Y, Z, 3), L tuple) of affine_grid / warp_cubic (cpu's messages)."""
    L = _matrix(L, (3, 3), "L")
    f = _host(field)
    if tuple(f.shape) != shape + (3,):
        raise ConfigError(f"field must have shape {shape + (3,)}, got {tuple(f.shape)}; pass a field on the same grid")
    return _upload(f, "field", True), L


# ----------------------------------------------------------------------------- device functions
# the scalar device functions shared with cuda_features live in cuda_common
_finite3 = _cc.finite3
_affine3 = _cc.affine3
_axis_mirror = _cc.axis_mirror
_cubic_point = _cc.cubic_point
_cubic_value = _cc.cubic_value
_taps = _cc.taps
_eval_point = _cc.eval_point
_inside = _cc.inside
_linear_value = _cc.linear_value
_jac_component = _cc.jac_component


@_dev
def _linear3(L, x, y, z):
    """L (x, y, z) for a 3x3 L given as 9 floats."""
    return (
        L[0] * x + L[1] * y + L[2] * z,
        L[3] * x + L[4] * y + L[5] * z,
        L[6] * x + L[7] * y + L[8] * z,
    )


@_dev
def _linear3_t(L, x, y, z):
    """L^T (x, y, z) for a 3x3 L given as 9 floats (a gradient row vector times L)."""
    return (
        L[0] * x + L[3] * y + L[6] * z,
        L[1] * x + L[4] * y + L[7] * z,
        L[2] * x + L[5] * y + L[8] * z,
    )


@_dev
def _block_exclusive_scan(s, wsum, tid, nt, v):
    """Exclusive prefix sum of ``v`` over the ``nt`` threads of a block; returns (this thread's
    exclusive sum, block total). ``s`` (>= nt) and ``wsum`` (>= nt / 32) are shared arrays.

    Three barriers: the values go to ``s``; each thread sums the values of the lower lanes of its
    32-thread chunk (in a warp every lane reads the same ``s[m]`` at the same step, a shared-memory
    broadcast) and the last lane stores the chunk total; then every thread adds the totals of the
    chunks before its own (at most 8). Every thread of the block must call it."""
    s[tid] = v
    cuda.syncthreads()
    c = tid // 32
    lo = c * 32
    r = 0
    for m in range(lo, tid):
        r += s[m]
    if tid == lo + 31 or tid == nt - 1:
        wsum[c] = r + v
    cuda.syncthreads()
    before = 0
    total = 0
    for m in range((nt + 31) // 32):
        x = wsum[m]
        if m < c:
            before += x
        total += x
    cuda.syncthreads()  # the caller may refill s and wsum right away
    return before + r, total


# ----------------------------------------------------------------------------- kernels: image sampling
@cuda.jit
def _k_cubic_sample(coef, pts, values, grads):
    p = cuda.grid(1)
    if p < pts.shape[0]:
        v, g0, g1, g2 = _cubic_point(coef, float(pts[p, 0]), float(pts[p, 1]), float(pts[p, 2]))
        values[p] = v
        grads[p, 0] = g0
        grads[p, 1] = g1
        grads[p, 2] = g2


@cuda.jit
def _k_cubic_values(coef, pts, fill, out):
    p = cuda.grid(1)
    if p < pts.shape[0]:
        nx, ny, nz = coef.shape
        x = float(pts[p, 0])
        y = float(pts[p, 1])
        z = float(pts[p, 2])
        if _inside(x, y, z, nx, ny, nz):
            out[p] = _cubic_value(coef, x, y, z)
        else:
            out[p] = fill


@cuda.jit
def _k_linear(img, pts, fill, out):
    n = cuda.grid(1)
    if n < pts.shape[0]:
        nx, ny, nz = img.shape
        x = float(pts[n, 0])
        y = float(pts[n, 1])
        z = float(pts[n, 2])
        out[n] = _linear_value(img, x, y, z) if _inside(x, y, z, nx, ny, nz) else fill


@cuda.jit
def _k_nearest(img, pts, fill, out):
    n = cuda.grid(1)
    if n < pts.shape[0]:
        nx, ny, nz = img.shape
        x = float(pts[n, 0])
        y = float(pts[n, 1])
        z = float(pts[n, 2])
        if not _inside(x, y, z, nx, ny, nz):
            out[n] = fill
            return
        i = max(min(int(math.floor(x + 0.5)), nx - 1), 0)
        j = max(min(int(math.floor(y + 0.5)), ny - 1), 0)
        k = max(min(int(math.floor(z + 0.5)), nz - 1), 0)
        out[n] = img[i, j, k]


# ----------------------------------------------------------------------------- kernels: B-spline transform
@cuda.jit
def _k_bspline_weights(t, base, w, dw):
    n = cuda.grid(1)
    if n < t.shape[0]:
        for d in range(3):
            v = float(t[n, d])
            if not abs(v) < 1e15:
                v = 0.0  # unusable coordinate: the taps of 0, as the reference reports
            fl = math.floor(v)
            f = v - fl
            base[n, d] = int(fl) - 1
            ww = _w4(f)
            dd = _dw4(f)
            for k in range(4):
                w[n, d, k] = ww[k]
                dw[n, d, k] = dd[k]


@cuda.jit
def _k_bspline_eval(coef, t, out):
    n = cuda.grid(1)
    if n < t.shape[0]:
        u0, u1, u2 = _eval_point(coef, float(t[n, 0]), float(t[n, 1]), float(t[n, 2]))
        out[n, 0] = u0
        out[n, 1] = u1
        out[n, 2] = u2


@cuda.jit
def _k_bspline_jacobian(coef, t, out):
    n = cuda.grid(1)
    if n < t.shape[0]:
        gx, gy, gz, _c = coef.shape
        x = float(t[n, 0])
        y = float(t[n, 1])
        z = float(t[n, 2])
        for cc in range(3):
            for d in range(3):
                out[n, cc, d] = 0.0
        if not _finite3(x, y, z):
            return
        ix, wx, dwx = _taps(x, gx)
        iy, wy, dwy = _taps(y, gy)
        iz, wz, dwz = _taps(z, gz)
        for cc in range(3):
            jx, jy, jz = _jac_component(coef, cc, ix, iy, iz, wx, wy, wz, dwx, dwy, dwz)
            out[n, cc, 0] = jx
            out[n, cc, 1] = jy
            out[n, cc, 2] = jz


@cuda.jit
def _k_zero(flat):
    i = cuda.grid(1)
    if i < flat.shape[0]:
        flat[i] = 0.0


@cuda.jit
def _k_scatter(t, g, acc):
    n = cuda.grid(1)
    if n < t.shape[0]:
        gx, gy, gz, _c = acc.shape
        x = float(t[n, 0])
        y = float(t[n, 1])
        z = float(t[n, 2])
        if not _finite3(x, y, z):
            return
        g0 = float(g[n, 0])
        g1 = float(g[n, 1])
        g2 = float(g[n, 2])
        fx = math.floor(x)
        fy = math.floor(y)
        fz = math.floor(z)
        wx = _w4(x - fx)
        wy = _w4(y - fy)
        wz = _w4(z - fz)
        bx = int(fx) - 1
        by = int(fy) - 1
        bz = int(fz) - 1
        # only existing control points receive (the reference's zero extension); a tap of weight
        # 0 inside the grid still adds 0 * g, as the reference does
        for a in range(4):
            i = bx + a
            if i < 0 or i >= gx:
                continue
            for b in range(4):
                j = by + b
                if j < 0 or j >= gy:
                    continue
                wab = wx[a] * wy[b]
                for c in range(4):
                    k = bz + c
                    if k < 0 or k >= gz:
                        continue
                    w = wab * wz[c]
                    cuda.atomic.add(acc, (i, j, k, 0), w * g0)
                    cuda.atomic.add(acc, (i, j, k, 1), w * g1)
                    cuda.atomic.add(acc, (i, j, k, 2), w * g2)


@cuda.jit
def _k_dense(coef, t0, dt, out):
    v = cuda.grid(1)
    X, Y, Z, _c = out.shape
    if v < X * Y * Z:
        i = v // (Y * Z)
        r = v - i * (Y * Z)
        j = r // Z
        k = r - j * Z
        u0, u1, u2 = _eval_point(coef, t0[0] + i * dt[0], t0[1] + j * dt[1], t0[2] + k * dt[2])
        out[i, j, k, 0] = u0
        out[i, j, k, 1] = u1
        out[i, j, k, 2] = u2


@cuda.jit
def _k_points_affine(idx, A, out):
    n = cuda.grid(1)
    if n < idx.shape[0]:
        q0, q1, q2 = _affine3(A, float(idx[n, 0]), float(idx[n, 1]), float(idx[n, 2]))
        out[n, 0] = q0
        out[n, 1] = q1
        out[n, 2] = q2


@cuda.jit
def _k_warp_sample(coef_img, idx, A_f2m, bs_coef, A_f2grid, W2M, values, grads, moving, t):
    p = cuda.grid(1)
    if p < idx.shape[0]:
        x = float(idx[p, 0])
        y = float(idx[p, 1])
        z = float(idx[p, 2])
        tx, ty, tz = _affine3(A_f2grid, x, y, z)
        u0, u1, u2 = _eval_point(bs_coef, tx, ty, tz)
        m0, m1, m2 = _affine3(A_f2m, x, y, z)
        d0, d1, d2 = _linear3(W2M, u0, u1, u2)
        m0 += d0
        m1 += d1
        m2 += d2
        moving[p, 0] = m0
        moving[p, 1] = m1
        moving[p, 2] = m2
        t[p, 0] = tx
        t[p, 1] = ty
        t[p, 2] = tz
        v, g0, g1, g2 = _cubic_point(coef_img, m0, m1, m2)
        values[p] = v
        grads[p, 0] = g0
        grads[p, 1] = g1
        grads[p, 2] = g2


@cuda.jit
def _k_affine_grid(A, field, L, use_field, out):
    v = cuda.grid(1)
    X, Y, Z, _c = out.shape
    if v < X * Y * Z:
        i = v // (Y * Z)
        r = v - i * (Y * Z)
        j = r // Z
        k = r - j * Z
        q0, q1, q2 = _affine3(A, float(i), float(j), float(k))
        if use_field:
            d0, d1, d2 = _linear3(L, float(field[i, j, k, 0]), float(field[i, j, k, 1]), float(field[i, j, k, 2]))
            q0 += d0
            q1 += d1
            q2 += d2
        out[i, j, k, 0] = q0
        out[i, j, k, 1] = q1
        out[i, j, k, 2] = q2


@cuda.jit
def _k_warp_cubic(coef, A, field, L, use_field, fill, out):
    v = cuda.grid(1)
    X, Y, Z = out.shape
    if v < X * Y * Z:
        nx, ny, nz = coef.shape
        i = v // (Y * Z)
        r = v - i * (Y * Z)
        j = r // Z
        k = r - j * Z
        q0, q1, q2 = _affine3(A, float(i), float(j), float(k))
        if use_field:
            d0, d1, d2 = _linear3(L, float(field[i, j, k, 0]), float(field[i, j, k, 1]), float(field[i, j, k, 2]))
            q0 += d0
            q1 += d1
            q2 += d2
        if _inside(q0, q1, q2, nx, ny, nz):
            out[i, j, k] = _cubic_value(coef, q0, q1, q2)
        else:
            out[i, j, k] = fill


# ----------------------------------------------------------------------------- kernels: sample_pairs
@cuda.jit
def _k_pairs_map(flat, ny, nz, f2m, mshape, mmask, use_mask, bs, use_bs, f2g, w2m, q, tp, keep, rank, counts):
    """Pass 1: per point the moving index q, the grid/voxel index t and the keep flag; in-block
    exclusive rank of the kept points and the block's count."""
    s = cuda.shared.array(_SCAN, np.int32)
    wsum = cuda.shared.array(_SCAN_WARPS, np.int32)
    tid = cuda.threadIdx.x
    p = cuda.blockIdx.x * cuda.blockDim.x + tid
    ok = False
    if p < flat.shape[0]:  # no early return: every thread takes part in the block scan
        fi = flat[p]
        i = fi // (ny * nz)
        r = fi - i * (ny * nz)
        j = r // nz
        kk = r - j * nz
        x = float(i)
        y = float(j)
        z = float(kk)
        q0, q1, q2 = _affine3(f2m, x, y, z)
        tx = x
        ty = y
        tz = z
        if use_bs:
            tx, ty, tz = _affine3(f2g, x, y, z)
            u0, u1, u2 = _eval_point(bs, tx, ty, tz)
            d0, d1, d2 = _linear3(w2m, u0, u1, u2)
            q0 += d0
            q1 += d1
            q2 += d2
        ok = (q0 >= 0.0 and q0 <= mshape[0] - 1.0 and q1 >= 0.0 and q1 <= mshape[1] - 1.0
              and q2 >= 0.0 and q2 <= mshape[2] - 1.0)
        if ok and use_mask:
            ok = mmask[int(math.floor(q0 + 0.5)), int(math.floor(q1 + 0.5)), int(math.floor(q2 + 0.5))] != 0
        q[p, 0] = q0
        q[p, 1] = q1
        q[p, 2] = q2
        tp[p, 0] = tx
        tp[p, 1] = ty
        tp[p, 2] = tz
        keep[p] = ok
    excl, total = _block_exclusive_scan(s, wsum, tid, cuda.blockDim.x, 1 if ok else 0)
    if p < flat.shape[0]:
        rank[p] = excl
    if tid == 0:
        counts[cuda.blockIdx.x] = total


@cuda.jit
def _k_scan_counts(counts, offsets, total):
    """Pass 2 (one block): exclusive prefix sum of the per-block counts, in chunks of blockDim."""
    s = cuda.shared.array(_SCAN, np.int64)
    wsum = cuda.shared.array(_SCAN_WARPS, np.int64)
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    nb = counts.shape[0]
    carry = 0
    for start in range(0, nb, nt):
        i = start + tid
        v = counts[i] if i < nb else 0
        excl, tot = _block_exclusive_scan(s, wsum, tid, nt, v)
        if i < nb:
            offsets[i] = carry + excl
        carry += tot
    if tid == 0:
        total[0] = carry


@cuda.jit
def _k_pairs_emit(flat, fvals, mcoef, w2m, q, tp, keep, rank, offsets, f_out, m_out, gy_out, pts_out):
    """Pass 3 (same launch layout as pass 1): kept point p goes to row offsets[block] + rank[p]."""
    p = cuda.grid(1)
    if p < flat.shape[0] and keep[p]:
        k = offsets[cuda.blockIdx.x] + rank[p]
        v, g0, g1, g2 = _cubic_point(mcoef, q[p, 0], q[p, 1], q[p, 2])
        a0, a1, a2 = _linear3_t(w2m, g0, g1, g2)
        f_out[k] = float(fvals[flat[p]])
        m_out[k] = v
        gy_out[k, 0] = a0
        gy_out[k, 1] = a1
        gy_out[k, 2] = a2
        pts_out[k, 0] = tp[p, 0]
        pts_out[k, 1] = tp[p, 1]
        pts_out[k, 2] = tp[p, 2]


# ----------------------------------------------------------------------------- public operations
def cubic_sample(coef, points):
    """One thread per point: value and index-gradient (64 mirrored taps, float64 sums).

    coef (nx, ny, nz) float32/float64 (host or device), points (N, 3); returns values (N,) and
    grads (N, 3) in coef's dtype (device arrays if any input was on the GPU)."""
    ret = _cc.Returns(coef, points)
    c = _volume_in(coef, "coef")
    pts, _ = _points_in(points)
    n = pts.shape[0]
    values = _cc.device_out(n, c.dtype)
    grads = _cc.device_out((n, 3), c.dtype)
    _launch(_k_cubic_sample, n)(c, pts, values, grads)
    return ret(values, grads)


def cubic_sample_values(coef, points, fill=0.0):
    """One thread per point (or per voxel of an (X, Y, Z, 3) point grid, C order)."""
    ret = _cc.Returns(coef, points)
    c = _volume_in(coef, "coef")
    pts, lead = _points_in(points)
    out = _cc.device_out(pts.shape[0], c.dtype)
    _launch(_k_cubic_values, pts.shape[0])(c, pts, float(fill), out)
    return ret(out.reshape(lead))


def linear_sample(img, points, fill=0.0):
    """One thread per point; 8 clamped neighbours, float64 weights."""
    ret = _cc.Returns(img, points)
    im = _volume_in(img, "img", floating=False)
    pts, lead = _points_in(points)
    out = _cc.device_out(pts.shape[0], _float_out_dtype(im.dtype))
    _launch(_k_linear, pts.shape[0])(im, pts, float(fill), out)
    return ret(out.reshape(lead))


def nearest_sample(img, points, fill=0):
    """One thread per point; the result keeps img's dtype (host bool images travel as uint8)."""
    ret = _cc.Returns(img, points)
    h = _host(img)
    was_bool = not _cc.is_device(h) and h.dtype == np.bool_
    im = _volume_in(h, "img", floating=False)
    pts, lead = _points_in(points)
    out = _cc.device_out(pts.shape[0], im.dtype)
    _launch(_k_nearest, pts.shape[0])(im, pts, np.asarray(fill).astype(h.dtype).astype(im.dtype)[()], out)
    res = ret(out.reshape(lead))
    return res.view(np.bool_) if was_bool else res


def bspline_weights(t):
    """One thread per point: base (N, 3) int64, w and dw (N, 3, 4) float64."""
    ret = _cc.Returns(t)
    pts, _ = _points_in(t, "t")
    n = pts.shape[0]
    base = _cc.device_out((n, 3), np.int64)
    w = _cc.device_out((n, 3, 4), np.float64)
    dw = _cc.device_out((n, 3, 4), np.float64)
    _launch(_k_bspline_weights, n)(pts, base, w, dw)
    return ret(base, w, dw)


def bspline_eval(coef, t):
    """One thread per point: 64 zero-extended control points, (N, 3) float64."""
    ret = _cc.Returns(coef, t)
    c = _grid_in(coef, "coef")
    pts, _ = _points_in(t, "t")
    out = _cc.device_out((pts.shape[0], 3), np.float64)
    _launch(_k_bspline_eval, pts.shape[0])(c, pts, out)
    return ret(out)


def bspline_eval_jacobian(coef, t):
    """One thread per point: (N, 3, 3) float64 Jacobian per grid index."""
    ret = _cc.Returns(coef, t)
    c = _grid_in(coef, "coef")
    pts, _ = _points_in(t, "t")
    out = _cc.device_out((pts.shape[0], 3, 3), np.float64)
    _launch(_k_bspline_jacobian, pts.shape[0])(c, pts, out)
    return ret(out)


def bspline_scatter(t, g, grid_shape, out=None):
    """One thread per point, ``cuda.atomic.add`` (float64) of w_a w_b w_c g into the grid.

    ``out``: None (a new grid, on the host if t and g were host arrays), a host float64 buffer
    (filled and returned, as the reference does) or a device float64 (gx, gy, gz, 3) C-contiguous
    array (zeroed, accumulated into and returned: no allocation per iteration)."""
    gs = _ref._grid_shape(grid_shape)
    shape = gs + (3,)
    if out is not None:
        if _cc.is_device(out):
            if tuple(out.shape) != shape or np.dtype(out.dtype) != np.float64:
                raise ConfigError(f"out must be a C-contiguous float64 array of shape {shape}; pass None to allocate")
        else:
            _ref._check_out(out, shape)
    ret = _cc.Returns(t, g)
    pts, _ = _points_in(t, "t")
    gh = _host(g)
    if _cc.is_device(gh):
        size = int(np.prod(gh.shape, dtype=np.int64))
        ng = size // 3 if size % 3 == 0 else -1
        gd = _upload(gh, "g", True).reshape((ng, 3)) if ng >= 0 else None
    else:
        gh = np.asarray(gh, dtype=np.float64).reshape(-1, 3)
        ng = len(gh)
        gd = None
    if ng != pts.shape[0]:
        raise ConfigError(f"g must have one 3-vector per point: got {ng} vectors for {pts.shape[0]} points")
    if gd is None:
        gd = _cc.device_in(gh, np.float64, "g")
    acc = _cc.device_in(out, np.float64, "out") if out is not None and _cc.is_device(out) else _cc.device_out(
        shape, np.float64)
    flat = acc.reshape(int(np.prod(shape)))
    _launch(_k_zero, flat.shape[0])(flat)
    _launch(_k_scatter, pts.shape[0])(pts, gd, acc)
    if out is None:
        return ret(acc)
    if not _cc.is_device(out):
        out[...] = acc.copy_to_host()
    return out


def bspline_dense(coef, shape, t0, dt, dtype=np.float64):
    """One thread per output voxel (flat C order): 64 zero-extended taps per voxel."""
    ret = _cc.Returns(coef)
    c = _grid_in(coef, "coef")
    (X, Y, Z), t0, dt, dtype = _ref._dense_args(shape, t0, dt, dtype)
    out = _cc.device_out((X, Y, Z, 3), dtype)
    _launch(_k_dense, X * Y * Z)(c, tuple(t0), tuple(dt), out)
    return ret(out)


def points_affine(idx, A):
    """One thread per point; (N, 3) or (X, Y, Z, 3) in, same shape float64 out."""
    ret = _cc.Returns(idx, A)
    pts, lead = _points_in(idx, "idx")
    A = _matrix(A, (4, 4), "A")
    out = _cc.device_out((pts.shape[0], 3), np.float64)
    _launch(_k_points_affine, pts.shape[0])(pts, A, out)
    return ret(out.reshape(lead + (3,)))


def warp_sample(coef_img, idx_fixed, A_f2m, bs_coef, A_f2grid, W2M):
    """One thread per point: affine + B-spline map, then value and gradient at the moving point."""
    ret = _cc.Returns(coef_img, idx_fixed, A_f2m, bs_coef, A_f2grid, W2M)
    A_f2m = _matrix(A_f2m, (4, 4), "A_f2m")
    A_f2grid = _matrix(A_f2grid, (4, 4), "A_f2grid")
    W2M = _matrix(W2M, (3, 3), "W2M")
    c = _volume_in(coef_img, "coef_img")
    idx, _ = _points_in(idx_fixed, "idx_fixed")
    bs = _grid_in(bs_coef)
    n = idx.shape[0]
    values = _cc.device_out(n, c.dtype)
    grads = _cc.device_out((n, 3), c.dtype)
    moving = _cc.device_out((n, 3), np.float64)
    t = _cc.device_out((n, 3), np.float64)
    _launch(_k_warp_sample, n)(c, idx, A_f2m, bs, A_f2grid, W2M, values, grads, moving, t)
    return ret(values, grads, moving, t)


def affine_grid(shape, A, field=None, L=None, dtype=np.float64):
    """One thread per output voxel (flat C order). ``dtype`` float32 or float64 (ConfigError
    otherwise: the GPU writes no other types here)."""
    ret = _cc.Returns(A, field, L)
    shape = tuple(int(n) for n in shape)
    A = _matrix(A, (4, 4), "A")
    dtype = np.dtype(dtype)
    if dtype not in _FLOATS:
        raise ConfigError(f"affine_grid dtype must be float32 or float64 on the cuda backend, got {dtype}; "
                          "pick one of those")
    if field is None:
        fd, L, use = _dummy((1, 1, 1, 3), np.float64), _EYE3, False
    else:
        (fd, L), use = _field_in(field, L, shape), True
    out = _cc.device_out(shape + (3,), dtype)
    _launch(_k_affine_grid, int(np.prod(shape)))(A, fd, L, use, out)
    return ret(out)


def sample_pairs(flat, fixed_values, fixed_shape, f2m, moving_coef, moving_mask=None, bs_coef=None, f2grid=None,
                 w2m=None):
    """Fixed/moving pairs of the kept points, in input order, with three launches:

    1. one thread per point (blocks of THREADS): q, t and the keep flag into (N, .) scratch
       arrays, the kept points' exclusive rank inside the block (shared-memory scan, three
       barriers) and the block's count;
    2. one block: exclusive prefix sum of the block counts (block offsets) and the total K;
    3. same layout as 1: a kept point samples the moving image (cubic value + gradient, only
       for kept points) and writes its row ``offsets[block] + rank``.

    The rows therefore come out in input order, exactly as the reference packs them
    (deterministic, no atomics). K is copied to the host (8 bytes, one synchronisation) because
    the outputs are sized by it. ``flat`` (int32/int64) is not range-checked when it lives on
    the GPU; host ``flat`` must index ``fixed_shape`` (ConfigError otherwise).
    """
    ret = _cc.Returns(flat, fixed_values, f2m, moving_coef, moving_mask, bs_coef, f2grid, w2m)
    fixed_shape = tuple(int(v) for v in fixed_shape)
    if len(fixed_shape) != 3 or min(fixed_shape) < 1:
        raise ConfigError(f"fixed_shape must be (X, Y, Z) with positive sizes, got {fixed_shape}")
    n_fixed = int(np.prod(fixed_shape, dtype=np.int64))
    f2m = _matrix(f2m, (4, 4), "f2m")
    use_bs = bs_coef is not None
    if use_bs:
        f2g = _matrix(f2grid, (4, 4), "f2grid")
        w2m = _matrix(w2m, (3, 3), "w2m")
        bs = _grid_in(bs_coef)
    else:
        f2g = _EYE4
        w2m = _EYE3 if w2m is None else _matrix(w2m, (3, 3), "w2m")
        bs = _dummy((1, 1, 1, 3), np.float64)
    mcoef = _volume_in(moving_coef, "moving_coef")
    use_mask = moving_mask is not None
    if use_mask:
        mh = _host(moving_mask)
        if tuple(mh.shape) != tuple(mcoef.shape):
            raise ConfigError(f"moving_mask must have the moving image's shape {tuple(mcoef.shape)}, got "
                              f"{tuple(mh.shape)}; pass the mask on the moving grid")
        if not _cc.is_device(mh) and mh.dtype == np.bool_:
            mh = mh.view(np.uint8)
        mmask = _cc.device_in(mh, None, "moving_mask")
    else:
        mmask = _dummy((1, 1, 1), np.uint8)
    fh = _host(flat)
    if _cc.is_device(fh):
        fd = _cc.device_in(fh, fh.dtype if fh.dtype in _INTS else np.int64, "flat").reshape(
            int(np.prod(fh.shape, dtype=np.int64)))
    else:
        fh = np.asarray(fh, dtype=np.int64).reshape(-1)
        if len(fh) and (fh.min() < 0 or fh.max() >= n_fixed):
            raise ConfigError(f"flat indices must lie in [0, {n_fixed}) for fixed_shape {fixed_shape}, got "
                              f"[{fh.min()}, {fh.max()}]; pass flat indices of the fixed image")
        fd = _cc.device_in(fh, np.int64, "flat")
    vh = _host(fixed_values)
    if int(np.prod(vh.shape, dtype=np.int64)) != n_fixed:
        raise ConfigError(f"fixed_values must hold the {n_fixed} voxels of fixed_shape {fixed_shape}, got shape "
                          f"{tuple(vh.shape)}; pass the fixed image (any shape, C order)")
    fv = _upload(vh, "fixed_values", True).reshape(n_fixed)

    n = fd.shape[0]
    blocks, threads = _cc.grid_1d(n)
    q = _cc.device_out((n, 3), np.float64)
    tp = _cc.device_out((n, 3), np.float64)
    keep = _cc.device_out(n, np.bool_)
    rank = _cc.device_out(n, np.int32)
    counts = _cc.device_out(blocks, np.int64)
    offsets = _cc.device_out(blocks, np.int64)
    total = _cc.device_out(1, np.int64)
    mshape = tuple(int(v) for v in mcoef.shape)
    _k_pairs_map[blocks, threads](fd, fixed_shape[1], fixed_shape[2], f2m, mshape, mmask, use_mask, bs, use_bs,
                                  f2g, w2m, q, tp, keep, rank, counts)
    _k_scan_counts[1, min(_SCAN, blocks) if _cc.simulated() else _SCAN](counts, offsets, total)
    k = int(total.copy_to_host()[0])
    f_out = _cc.device_out(k, np.float64)
    m_out = _cc.device_out(k, np.float64)
    gy_out = _cc.device_out((k, 3), np.float64)
    pts_out = _cc.device_out((k, 3), np.float64)
    if k:
        _k_pairs_emit[blocks, threads](fd, fv, mcoef, w2m, q, tp, keep, rank, offsets, f_out, m_out, gy_out,
                                       pts_out)
    return ret(f_out, m_out, gy_out, pts_out, keep)


def warp_cubic(coef, shape, A, field=None, L=None, fill=0.0):
    """One thread per output voxel (flat C order): q = A idx (+ L field), cubic value or fill."""
    ret = _cc.Returns(coef, A, field, L)
    shape = tuple(int(n) for n in shape)
    A = _matrix(A, (4, 4), "A")
    c = _volume_in(coef, "coef")
    if field is None:
        fd, L, use = _dummy((1, 1, 1, 3), np.float64), _EYE3, False
    else:
        (fd, L), use = _field_in(field, L, shape), True
    out = _cc.device_out(shape, c.dtype)
    _launch(_k_warp_cubic, int(np.prod(shape)))(c, A, fd, L, use, float(fill), out)
    return ret(out)


for _name in __all__:
    _f = globals()[_name]
    _f.__doc__ = (_f.__doc__ or "") + "\n\nSpecification (``reference``):\n" + (getattr(_ref, _name).__doc__ or "")
del _name, _f

# The rest of the operation table lives in topic modules (channels, patches and the prefilter of
# IMPACT; the counter-based sample draws): the ``cuda`` backend is this module.
from .cuda_features import (  # noqa: E402
    cubic_sample_channels,
    cubic_sample_channels_values,
    gather_patches,
    prefilter_channels,
    sample_patches,
    sample_patches_warped,
)
from .cuda_sampling import random_indices  # noqa: E402

#: The operations written in this module (the others are tested in their own modules' tests).
CORE_OPERATIONS = tuple(__all__)
__all__ += ["cubic_sample_channels", "cubic_sample_channels_values", "prefilter_channels", "gather_patches",
            "sample_patches", "sample_patches_warped", "random_indices"]
