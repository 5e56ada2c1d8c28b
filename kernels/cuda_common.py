"""Shared pieces of the CUDA backend (Numba CUDA): device functions and host/device plumbing.

Imported only when the ``cuda`` backend is asked for; the CPU path never imports this module
(nor ``numba.cuda``). On a machine without a GPU the same kernels run in Numba's CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``, set before numba is imported), which is how CPU-only CI tests them.

Device functions
----------------
The scalar cubic B-spline weights and boundary helpers are compiled from the one Python source
in ``_bspline1d`` (the CPU backend compiles the same functions with ``numba.njit``), so the two
backends cannot drift apart.

Arrays in and out
-----------------
Every CUDA operation accepts NumPy arrays or device arrays (anything with
``__cuda_array_interface__``: CuPy arrays, Numba device arrays). :func:`device_in` turns an input
into a Numba device array without a copy when it already lives on the GPU. :class:`Returns`
decides the output side once per call: host NumPy arrays when every array input was a host
array (so the kernels are tested against the NumPy reference like any other backend), else
Numba device arrays (wrap them with ``cupy.asarray`` for a zero-copy CuPy view). Data that stays
on the GPU for a whole level is therefore passed in as device arrays and never crosses the bus.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda

from . import _bspline1d as _b1

__all__ = [
    "THREADS",
    "affine3",
    "axis_mirror",
    "cubic_point",
    "cubic_value",
    "eval_point",
    "finite3",
    "taps",
    "Returns",
    "bspline3_weights",
    "bspline3_weights_d1",
    "clamp_taps",
    "device_in",
    "device_out",
    "grid_1d",
    "is_device",
    "mirror_coord",
    "mirror_index",
    "mirror_taps",
    "simulated",
]

#: Threads per block of the 1-D launches. 256 keeps occupancy high on every sm_70+ card; the
#: kernels use few registers and no shared memory unless stated.
THREADS = 256

_dev = cuda.jit(device=True)

bspline3_weights = _dev(_b1.bspline3_weights)
bspline3_weights_d1 = _dev(_b1.bspline3_weights_d1)
mirror_index = _dev(_b1.mirror_index)
mirror_taps = _dev(_b1.mirror_taps)
mirror_coord = _dev(_b1.mirror_coord)
clamp_taps = _dev(_b1.clamp_taps)


def _simulator_array_type():
    """The simulator's device-array class (it has no ``__cuda_array_interface__``), else a dummy."""
    from numba import config

    if config.ENABLE_CUDASIM:
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        return FakeCUDAArray
    return type(None)


_SIM_ARRAY = _simulator_array_type()


def simulated() -> bool:
    """True when Numba's CUDA simulator stands in for a GPU (``NUMBA_ENABLE_CUDASIM=1``)."""
    from numba import config

    return bool(config.ENABLE_CUDASIM)


def is_device(a) -> bool:
    """True for arrays that live on the GPU (CuPy, Numba device arrays, anything exposing
    ``__cuda_array_interface__``)."""
    return hasattr(a, "__cuda_array_interface__") or isinstance(a, _SIM_ARRAY)


def grid_1d(n: int, threads: int = THREADS) -> tuple[int, int]:
    """(blocks, threads) covering ``n`` work items with one thread each (at least one block)."""
    n = max(int(n), 1)
    threads = min(threads, n) if simulated() else threads  # the simulator runs one Python thread per CUDA thread
    return (n + threads - 1) // threads, threads


def device_in(a, dtype=None, name: str = "array"):
    """A Numba device array holding ``a`` (no copy if ``a`` is already on the GPU with ``dtype``).

    Host inputs are made C-contiguous (and cast to ``dtype`` when given) before the upload.
    Device inputs of another dtype or layout are rejected rather than silently copied, so a
    caller that keeps data on the GPU learns about the conversion it forgot.
    """
    if is_device(a):
        # Numba device arrays (real or simulated) have copy_to_host; CuPy arrays are wrapped
        # zero-copy through their __cuda_array_interface__.
        d = a if hasattr(a, "copy_to_host") else cuda.as_cuda_array(a)
        if dtype is not None and d.dtype != np.dtype(dtype):
            raise TypeError(f"{name} on the GPU has dtype {d.dtype}, the CUDA kernel needs {np.dtype(dtype)}; "
                            f"convert it once with .astype before the loop")
        if not d.is_c_contiguous():
            raise TypeError(f"{name} on the GPU is not C-contiguous; pass a contiguous copy")
        return d
    h = np.ascontiguousarray(a, dtype=dtype)
    return cuda.to_device(h)


def device_out(shape, dtype):
    """An uninitialised device array (the kernels write every element they return)."""
    return cuda.device_array(shape, dtype=np.dtype(dtype))


class Returns:
    """Output side of one call: host when every array argument was a host array.

    >>> ret = Returns(coef, points)     # inspects the inputs
    >>> return ret(values_dev, grads_dev)  # NumPy arrays or the device arrays themselves
    """

    def __init__(self, *arrays):
        self.host = not any(is_device(a) for a in arrays if a is not None)

    def __call__(self, *device_arrays):
        if self.host:
            out = tuple(None if d is None else d.copy_to_host() for d in device_arrays)
        else:
            out = device_arrays
        return out[0] if len(out) == 1 else out


# ----------------------------------------------------------------------------- shared device functions
# (cuda.py and cuda_features.py): the mirror-extended cubic spline of an image at one point, the
# zero-extended B-spline transform at one grid point, points through a 4x4 matrix given as 12 floats


@cuda.jit(device=True)
def finite3(x, y, z):
    # |v| < 1e15 is False for NaN and inf and keeps int(floor(v)) well defined.
    return abs(x) < 1e15 and abs(y) < 1e15 and abs(z) < 1e15


@cuda.jit(device=True)
def affine3(A, x, y, z):
    """A[:3, :3] (x, y, z) + A[:3, 3] for A given as 12 floats (rows of a 4x4)."""
    return (
        A[0] * x + A[1] * y + A[2] * z + A[3],
        A[4] * x + A[5] * y + A[6] * z + A[7],
        A[8] * x + A[9] * y + A[10] * z + A[11],
    )


@cuda.jit(device=True)
def axis_mirror(x, n):
    """Mirror-extended cubic taps of one coordinate: (indices, weights, d weights / dx, dy/dx)."""
    y, s = mirror_coord(x, n)
    fl = math.floor(y)
    f = y - fl
    return mirror_taps(int(fl) - 1, n), bspline3_weights(f), bspline3_weights_d1(f), s


@cuda.jit(device=True)
def cubic_point(coef, x, y, z):
    """Value and index-gradient of the mirror-extended spline at (x, y, z); NaN if not finite."""
    nx, ny, nz = coef.shape
    if not finite3(x, y, z):
        return math.nan, math.nan, math.nan, math.nan
    ix, wx, dwx, sx = axis_mirror(x, nx)
    iy, wy, dwy, sy = axis_mirror(y, ny)
    iz, wz, dwz, sz = axis_mirror(z, nz)
    k0, k1, k2, k3 = iz
    wz0, wz1, wz2, wz3 = wz
    dz0, dz1, dz2, dz3 = dwz
    val = 0.0
    gx = 0.0
    gy = 0.0
    gz = 0.0
    for a in range(4):
        i = ix[a]
        sb = 0.0
        sby = 0.0
        sbz = 0.0
        for b in range(4):
            j = iy[b]
            # the four z taps of one (i, j) row are adjacent in memory
            v0 = float(coef[i, j, k0])
            v1 = float(coef[i, j, k1])
            v2 = float(coef[i, j, k2])
            v3 = float(coef[i, j, k3])
            sc = wz0 * v0 + wz1 * v1 + wz2 * v2 + wz3 * v3
            scz = dz0 * v0 + dz1 * v1 + dz2 * v2 + dz3 * v3
            sb += wy[b] * sc
            sby += dwy[b] * sc
            sbz += wy[b] * scz
        val += wx[a] * sb
        gx += dwx[a] * sb
        gy += wx[a] * sby
        gz += wx[a] * sbz
    return val, gx * sx, gy * sy, gz * sz


@cuda.jit(device=True)
def cubic_value(coef, x, y, z):
    """Value only of the mirror-extended spline at a finite point."""
    nx, ny, nz = coef.shape
    x, _sx = mirror_coord(x, nx)
    y, _sy = mirror_coord(y, ny)
    z, _sz = mirror_coord(z, nz)
    fx = math.floor(x)
    fy = math.floor(y)
    fz = math.floor(z)
    ix = mirror_taps(int(fx) - 1, nx)
    iy = mirror_taps(int(fy) - 1, ny)
    k0, k1, k2, k3 = mirror_taps(int(fz) - 1, nz)
    wx = bspline3_weights(x - fx)
    wy = bspline3_weights(y - fy)
    wz0, wz1, wz2, wz3 = bspline3_weights(z - fz)
    val = 0.0
    for a in range(4):
        i = ix[a]
        sb = 0.0
        for b in range(4):
            j = iy[b]
            sb += wy[b] * (
                wz0 * float(coef[i, j, k0])
                + wz1 * float(coef[i, j, k1])
                + wz2 * float(coef[i, j, k2])
                + wz3 * float(coef[i, j, k3])
            )
        val += wx[a] * sb
    return val


@cuda.jit(device=True)
def taps(t, g):
    """Zero-extended taps of one finite coordinate: (indices clamped, weights, d weights), missing
    taps with weight 0."""
    fl = math.floor(t)
    f = t - fl
    base = int(fl) - 1
    idx, w = clamp_taps(base, g, bspline3_weights(f))
    _i, dw = clamp_taps(base, g, bspline3_weights_d1(f))
    return idx, w, dw


@cuda.jit(device=True)
def eval_point(coef, x, y, z):
    """B-spline displacement (3 floats) at grid index (x, y, z); zero for unusable coordinates."""
    gx, gy, gz, _c = coef.shape
    u0 = 0.0
    u1 = 0.0
    u2 = 0.0
    if finite3(x, y, z):
        ix, wx, _dx = taps(x, gx)
        iy, wy, _dy = taps(y, gy)
        iz, wz, _dz = taps(z, gz)
        for a in range(4):
            i = ix[a]
            for b in range(4):
                j = iy[b]
                wab = wx[a] * wy[b]
                for c in range(4):
                    k = iz[c]
                    w = wab * wz[c]
                    u0 += w * coef[i, j, k, 0]
                    u1 += w * coef[i, j, k, 1]
                    u2 += w * coef[i, j, k, 2]
    return u0, u1, u2
