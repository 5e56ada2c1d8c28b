"""CUDA (Numba) kernels of the feature-map and patch operations; same signatures and results as
:mod:`fastimpact.kernels.reference` (the specification) and :mod:`fastimpact.kernels.cpu`.

Operations: ``cubic_sample_channels``, ``cubic_sample_channels_values``, ``prefilter_channels``,
``gather_patches``, ``sample_patches``, ``sample_patches_warped``.

Arrays in and out follow :mod:`fastimpact.kernels.cuda_common`: every array argument may be a
NumPy array or a device array; results are NumPy arrays when every array argument was a host
array, device arrays otherwise. Host inputs are converted exactly as the CPU backend converts them
(points, centres and offsets to float64, integer volumes to float64 or float32 as there). Device
inputs are used in place, without a copy: images and coefficients must then be float32 or float64
(C-contiguous), points / centres / offsets float32 or float64 (integer for ``gather_patches``);
float32 coordinates are widened to float64 inside the kernels, which is exact, so the results
equal those of the host path. The 4x4 matrices are small host arrays (a device matrix is copied
back); they reach the kernels as tuples of 12 floats, so no transfer is needed per call.

Arithmetic is float64 in every kernel whatever the storage dtype (as on the CPU), and the output
dtypes are those of the reference. Thread layout, chosen for coalesced memory traffic on a GPU:

* ``cubic_sample_channels*``: one thread per (point, channel); consecutive threads read
  consecutive channels of the same tap voxel of a channel-last map and write consecutive outputs.
* ``prefilter_channels``: one thread per (line, channel) for each spatial axis in turn; the
  recursive filter runs along the line in place, consecutive threads on consecutive channels
  (and, for the axes 0 and 1, consecutive z), so every step of the recursion is one coalesced
  load/store across a warp.
* patch operations: one thread per patch voxel (centre n, offset v), consecutive threads on
  consecutive offsets of one patch (neighbouring taps, consecutive outputs).

The scalar device functions (the cubic spline of a single-channel image and the B-spline
transform at one point, taps, matrices as 12 floats) are ``cuda_common``'s, shared with
``cuda.py``; the channel kernels loop over their own taps.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda

from fastimpact.errors import ConfigError

from . import cuda_common as _cc
from . import reference as _ref
from .cuda_common import Returns, device_in, device_out, grid_1d, is_device, mirror_index

__all__ = [
    "cubic_sample_channels",
    "cubic_sample_channels_values",
    "prefilter_channels",
    "gather_patches",
    "sample_patches",
    "sample_patches_warped",
]

_dev = cuda.jit(device=True)
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


# ----------------------------------------------------------------------------- device functions
# shared with cuda.py (cuda_common): one definition of the cubic spline and the transform at a point
_finite3 = _cc.finite3
_affine12 = _cc.affine3
_cubic_value = _cc.cubic_value
_cubic_point = _cc.cubic_point
_bspline_disp = _cc.eval_point
_axis_mirror = _cc.axis_mirror


# ----------------------------------------------------------------------------- kernels
@cuda.jit
def _k_channels(coef, pts, values, grads, with_grad):
    """One thread per (point n, channel ch), ch fastest; grads is a dummy when not with_grad."""
    t = cuda.grid(1)
    C = coef.shape[3]
    if t >= pts.shape[0] * C:
        return
    n = t // C
    ch = t - n * C
    x = np.float64(pts[n, 0])
    y = np.float64(pts[n, 1])
    z = np.float64(pts[n, 2])
    if not _finite3(x, y, z):
        values[n, ch] = math.nan
        if with_grad:
            grads[n, ch, 0] = math.nan
            grads[n, ch, 1] = math.nan
            grads[n, ch, 2] = math.nan
        return
    if with_grad:
        ix, wx, dwx, sx = _axis_mirror(x, coef.shape[0])
        iy, wy, dwy, sy = _axis_mirror(y, coef.shape[1])
        iz, wz, dwz, sz = _axis_mirror(z, coef.shape[2])
        val = 0.0
        gx = 0.0
        gy = 0.0
        gz = 0.0
        for a in range(4):
            sb = 0.0
            sby = 0.0
            sbz = 0.0
            for b in range(4):
                sc = 0.0
                scz = 0.0
                for c in range(4):
                    v = np.float64(coef[ix[a], iy[b], iz[c], ch])
                    sc += wz[c] * v
                    scz += dwz[c] * v
                sb += wy[b] * sc
                sby += dwy[b] * sc
                sbz += wy[b] * scz
            val += wx[a] * sb
            gx += dwx[a] * sb
            gy += wx[a] * sby
            gz += wx[a] * sbz
        values[n, ch] = val
        grads[n, ch, 0] = gx * sx
        grads[n, ch, 1] = gy * sy
        grads[n, ch, 2] = gz * sz
    else:
        ix, wx, _dx, _sx = _axis_mirror(x, coef.shape[0])
        iy, wy, _dy, _sy = _axis_mirror(y, coef.shape[1])
        iz, wz, _dz, _sz = _axis_mirror(z, coef.shape[2])
        val = 0.0
        for a in range(4):
            sb = 0.0
            for b in range(4):
                sc = 0.0
                for c in range(4):
                    sc += wz[c] * np.float64(coef[ix[a], iy[b], iz[c], ch])
                sb += wy[b] * sc
            val += wx[a] * sb
        values[n, ch] = val


_POLE = math.sqrt(3.0) - 2.0  # the cubic B-spline's pole z
# terms of the causal initial sum on long lines: |z|^k < 1e-14 beyond this (as the CPU backend)
_HORIZON = int(math.ceil(math.log(1e-14) / math.log(abs(_POLE))))


@cuda.jit
def _k_prefilter_axis(flat, X, Y, Z, C, axis, horizon):
    """Cubic B-spline prefilter (mirror boundary) of every line along ``axis`` of the
    C-contiguous (X, Y, Z, C) float32 map viewed as ``flat``, in place; one thread per
    (line, channel), channel fastest.

    The recursion (gain 6, causal then anti-causal pass with the pole z) keeps its running value
    in float64; the causal coefficients are stored in the float32 line between the two passes.
    """
    t = cuda.grid(1)
    if axis == 0:
        n = X
        m2 = Z
        lines = Y * Z * C
    elif axis == 1:
        n = Y
        m2 = Z
        lines = X * Z * C
    else:
        n = Z
        m2 = Y
        lines = X * Y * C
    if t >= lines:
        return
    ch = t % C
    p = t // C
    a = p // m2
    b = p - a * m2
    if axis == 0:  # line (:, a, b)
        base = (a * Z + b) * C + ch
        stride = Y * Z * C
    elif axis == 1:  # line (a, :, b)
        base = (a * Y * Z + b) * C + ch
        stride = Z * C
    else:  # line (a, b, :)
        base = (a * Y + b) * Z * C + ch
        stride = C
    z = _POLE
    # causal initial value: sum over the mirror-extended line (gain 6 applied to each sample),
    # truncated for long lines, in closed form for short ones
    if horizon < n:
        acc = 6.0 * np.float64(flat[base])
        zk = z
        for k in range(1, horizon):
            acc += zk * 6.0 * np.float64(flat[base + k * stride])
            zk *= z
    else:
        zn = z ** (n - 1)
        z2n = zn * zn
        acc = 6.0 * np.float64(flat[base]) + zn * 6.0 * np.float64(flat[base + (n - 1) * stride])
        zk = z
        for k in range(1, n - 1):
            acc += (zk + z2n / zk) * 6.0 * np.float64(flat[base + k * stride])
            zk *= z
        acc /= 1.0 - z2n
    flat[base] = acc
    prev2 = 0.0
    prev = acc
    for k in range(1, n):
        prev2 = prev
        prev = 6.0 * np.float64(flat[base + k * stride]) + z * prev
        flat[base + k * stride] = prev
    # anti-causal pass, started from the float64 causal values at n-1 and n-2
    c = (z / (z * z - 1.0)) * (prev + z * prev2)
    flat[base + (n - 1) * stride] = c
    for k in range(n - 2, -1, -1):
        cp = prev2 if k == n - 2 else np.float64(flat[base + k * stride])
        c = z * (c - cp)
        flat[base + k * stride] = c


@cuda.jit
def _k_cast(src, dst):
    """dst[i] = src[i] converted to dst's dtype (flat views)."""
    t = cuda.grid(1)
    if t < dst.shape[0]:
        dst[t] = src[t]


@cuda.jit
def _k_gather(data, centres, offsets, out):
    """One thread per (centre n, offset v), v fastest: out[n, v] = data[mirror(centre + offset)]."""
    t = cuda.grid(1)
    V = offsets.shape[0]
    if t >= centres.shape[0] * V:
        return
    n = t // V
    v = t - n * V
    i = mirror_index(np.int64(centres[n, 0]) + np.int64(offsets[v, 0]), data.shape[0])
    j = mirror_index(np.int64(centres[n, 1]) + np.int64(offsets[v, 1]), data.shape[1])
    k = mirror_index(np.int64(centres[n, 2]) + np.int64(offsets[v, 2]), data.shape[2])
    out[n, v] = data[i, j, k]


@cuda.jit
def _k_sample_patches(coef, centres, offsets, each, w2i, fill, values):
    """One thread per patch voxel; offsets (M, V, 3) with M = 1 (shared, each = 0) or M = N."""
    t = cuda.grid(1)
    V = offsets.shape[1]
    if t >= centres.shape[0] * V:
        return
    n = t // V
    v = t - n * V
    r = n * each
    q0, q1, q2 = _affine12(
        w2i,
        np.float64(centres[n, 0]) + np.float64(offsets[r, v, 0]),
        np.float64(centres[n, 1]) + np.float64(offsets[r, v, 1]),
        np.float64(centres[n, 2]) + np.float64(offsets[r, v, 2]),
    )
    if _finite3(q0, q1, q2):
        values[n, v] = _cubic_value(coef, q0, q1, q2)
    else:
        values[n, v] = fill


@cuda.jit
def _k_sample_patches_warped(coef, centres, offsets, each, affine, bs, use_bs, w2grid, w2i, M, values, grads):
    """As _k_sample_patches through affine + B-spline, with d value / d y; ``M`` is w2i[:3, :3]
    as 9 floats (row major) for the chain rule w2i^T (d value / d q)."""
    t = cuda.grid(1)
    V = offsets.shape[1]
    if t >= centres.shape[0] * V:
        return
    n = t // V
    v = t - n * V
    r = n * each
    x = np.float64(centres[n, 0]) + np.float64(offsets[r, v, 0])
    y = np.float64(centres[n, 1]) + np.float64(offsets[r, v, 1])
    z = np.float64(centres[n, 2]) + np.float64(offsets[r, v, 2])
    y0, y1, y2 = _affine12(affine, x, y, z)
    if use_bs:
        t0, t1, t2 = _affine12(w2grid, x, y, z)
        u0, u1, u2 = _bspline_disp(bs, t0, t1, t2)
        y0 += u0
        y1 += u1
        y2 += u2
    q0, q1, q2 = _affine12(w2i, y0, y1, y2)
    val, g0, g1, g2 = _cubic_point(coef, q0, q1, q2)
    values[n, v] = val
    grads[n, v, 0] = M[0] * g0 + M[3] * g1 + M[6] * g2
    grads[n, v, 1] = M[1] * g0 + M[4] * g1 + M[7] * g2
    grads[n, v, 2] = M[2] * g0 + M[5] * g1 + M[8] * g2


# ----------------------------------------------------------------------------- input handling
def _float_device(a, name):
    """A device array of float32/float64 ``a`` (no copy for device inputs; host non-float
    inputs become float64, as on the CPU)."""
    if is_device(a):
        d = device_in(a, name=name)
        if d.dtype not in _FLOATS:
            raise TypeError(f"{name} on the GPU has dtype {d.dtype}, the CUDA kernel needs float32 or float64; "
                            "convert it once with .astype before the loop")
        return d
    h = np.asarray(a)
    if h.dtype not in _FLOATS:
        h = h.astype(np.float64)
    return device_in(h, name=name)


def _points_in(points):
    """(M, 3) device points (float64 from the host; float32/float64 kept on the device)."""
    if is_device(points):
        shape = tuple(points.shape)
        if len(shape) < 2 or shape[-1] != 3:
            raise ConfigError(
                f"points must have shape (N, 3) or (X, Y, Z, 3), got {shape}; pass one 3-vector per point"
            )
        d = _float_device(points, "points")
        return d if len(shape) == 2 else d.reshape(-1, 3)
    p = _ref._points(points).reshape(-1, 3)
    return device_in(p, np.float64, "points")


def _matrix12(M, name):
    """First 12 entries (row major) of a validated 4x4 matrix, as a tuple of floats."""
    if is_device(M):
        M = device_in(M, name=name).copy_to_host()
    A = _ref._matrix(M, (4, 4), name)
    return tuple(float(v) for v in A.ravel()[:12])


def _launch(kernel, n, *args):
    if n > 0:
        blocks, threads = grid_1d(n)
        kernel[blocks, threads](*args)


# ----------------------------------------------------------------------------- channel sampling
def _channels_args(coef, points):
    shape = tuple(coef.shape) if is_device(coef) else np.shape(coef)
    if len(shape) != 4 or min(shape) < 1:
        raise ConfigError(f"coef must be (nx, ny, nz, C) with positive sizes, got shape {shape}")
    return _float_device(coef, "coef"), _points_in(points)


def cubic_sample_channels(coef, points):
    ret = Returns(coef, points)
    c, p = _channels_args(coef, points)
    C = c.shape[3]
    values = device_out((p.shape[0], C), np.float64)
    grads = device_out((p.shape[0], C, 3), np.float64)
    _launch(_k_channels, p.shape[0] * C, c, p, values, grads, True)
    return ret(values, grads)


def cubic_sample_channels_values(coef, points):
    ret = Returns(coef, points)
    c, p = _channels_args(coef, points)
    C = c.shape[3]
    values = device_out((p.shape[0], C), np.float64)
    _launch(_k_channels, p.shape[0] * C, c, p, values, device_out((1, 1, 3), np.float64), False)
    return ret(values)


def prefilter_channels(data, inplace=False):
    ret = Returns(data)
    if is_device(data):
        shape = tuple(data.shape)
        if len(shape) != 4:
            raise ConfigError(f"data must be (X, Y, Z, C), got shape {shape}")
        d = device_in(data, name="data")
        if inplace and d.dtype == np.float32:
            out = d
        else:
            out = device_out(shape, np.float32)
            _launch(_k_cast, out.size, d.reshape(-1), out.reshape(-1))
    else:
        host = np.asarray(data)
        if host.ndim != 4:
            raise ConfigError(f"data must be (X, Y, Z, C), got shape {host.shape}")
        out = device_in(host, np.float32, "data")
    X, Y, Z, C = (int(s) for s in out.shape)
    if out.size:
        flat = out.reshape(-1)
        for axis, n in enumerate((X, Y, Z)):
            if n > 1:
                _launch(_k_prefilter_axis, out.size // n, flat, X, Y, Z, C, axis, _HORIZON)
    if ret.host and inplace and isinstance(data, np.ndarray) and data.dtype == np.float32 \
            and data.flags.c_contiguous and data.flags.writeable:
        out.copy_to_host(data)  # the result goes back into the caller's buffer, no new array
        return data
    return ret(out)


# ----------------------------------------------------------------------------- patches
def _int_device(a, name):
    """(M, 3) integer voxel indices on the device (int64 from the host; integer kept on the device)."""
    if is_device(a):
        shape = tuple(a.shape)
        size = int(np.prod(shape)) if shape else 1
        if size % 3:
            raise ConfigError(f"{name} must have shape (M, 3), got {shape}; pass one integer voxel index per row")
        d = device_in(a, name=name)
        if d.dtype.kind not in "iu":
            raise TypeError(f"{name} on the GPU has dtype {d.dtype}, the CUDA kernel needs integers; "
                            "convert it once with .astype before the loop")
        return d if len(shape) == 2 and shape[1] == 3 else d.reshape(-1, 3)
    return device_in(np.asarray(a, dtype=np.int64).reshape(-1, 3), np.int64, name)


def gather_patches(data, centres, offsets):
    ret = Returns(data, centres, offsets)
    if is_device(data):
        if len(data.shape) != 3:
            raise ConfigError(f"data must be a 3-D volume, got shape {tuple(data.shape)}")
        d = _float_device(data, "data")  # float64 values are rounded to float32 on store
    else:
        host = np.asarray(data)
        if host.ndim != 3:
            raise ConfigError(f"data must be a 3-D volume, got shape {host.shape}")
        d = device_in(host, np.float32, "data")
    c = _int_device(centres, "centres")
    o = _int_device(offsets, "offsets")
    out = device_out((c.shape[0], o.shape[0]), np.float32)
    _launch(_k_gather, c.shape[0] * o.shape[0], d, c, o, out)
    return ret(out)


def _patch_args(coef, centres, offsets):
    """Device (coef, centres (N, 3), offsets (M, V, 3), each) with the reference's checks."""
    _ref._check_volume(coef, "coef")
    co = _float_device(coef, "coef")
    if is_device(centres):
        shape = tuple(centres.shape)
        if len(shape) != 2 or shape[1] != 3:
            raise ConfigError(f"centres must have shape (M, 3), got {shape}; pass one world point (mm) per row")
        c = _float_device(centres, "centres")
    else:
        c = device_in(_ref._point_list(centres, "centres"), np.float64, "centres")
    n = c.shape[0]
    if is_device(offsets):
        shape = tuple(offsets.shape)
        if len(shape) == 3 and shape[0] == n and shape[2] == 3:
            o, each = _float_device(offsets, "offsets"), 1
        elif len(shape) == 2 and shape[1] == 3:
            o, each = _float_device(offsets, "offsets").reshape(1, shape[0], 3), 0
        else:
            raise ConfigError(f"offsets must have shape (V, 3) or (N, V, 3) with N = {n} centres, got {shape}; "
                              "pass one world offset (mm) per row, shared or per centre")
    else:
        oh = _ref._patch_offsets(offsets, n)
        each = 1 if oh.ndim == 3 else 0
        o = device_in(oh if each else oh[None], np.float64, "offsets")
    return co, c, o, each


def sample_patches(coef, centres, offsets, w2i, fill=0.0):
    ret = Returns(coef, centres, offsets, w2i)
    co, c, o, each = _patch_args(coef, centres, offsets)
    A = _matrix12(w2i, "w2i")
    n, v = c.shape[0], o.shape[1]
    values = device_out((n, v), np.float32)
    _launch(_k_sample_patches, n * v, co, c, o, each, A, float(fill), values)
    return ret(values)


_NO_GRID = np.zeros((1, 1, 1, 3))


def sample_patches_warped(coef, centres, offsets, affine, bs_coef, w2grid, w2i):
    ret = Returns(coef, centres, offsets, affine, bs_coef, w2grid, w2i)
    co, c, o, each = _patch_args(coef, centres, offsets)
    aff = _matrix12(affine, "affine")
    A = _matrix12(w2i, "w2i")
    use_bs = bs_coef is not None
    if use_bs:
        _ref._check_grid(bs_coef)
        bs = device_in(bs_coef, np.float64, "bs_coef")
        g = _matrix12(w2grid, "w2grid")
    else:
        bs = device_in(_NO_GRID, np.float64, "bs_coef")
        g = tuple(float(x) for x in np.eye(4).ravel()[:12])
    M = (A[0], A[1], A[2], A[4], A[5], A[6], A[8], A[9], A[10])
    n, v = c.shape[0], o.shape[1]
    values = device_out((n, v), np.float32)
    grads = device_out((n, v, 3), np.float32)
    _launch(_k_sample_patches_warped, n * v, co, c, o, each, aff, bs, use_bs, g, A, M, values, grads)
    return ret(values, grads)


for _name in __all__:
    globals()[_name].__doc__ = getattr(_ref, _name).__doc__
del _name
