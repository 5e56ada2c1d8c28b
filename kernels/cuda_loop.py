"""CUDA kernels of the device-resident ASGD loop (``fastimpact.device_loop``).

With these, one iteration of a classic-metric level (MSE, NCC, MI) keeps every array on the GPU:
the samples, the sampled pairs, the metric derivative, the B-spline gradient, the previous
gradient and the coefficients; the host reads a few scalars (the kept count, the metric sums,
the step bound, the ASGD inner product).

Reductions are block-wise in shared memory (a tree over ``blockDim.x`` threads, any block size)
followed by one float64 atomic per block, so a 2000-sample sum costs a handful of atomics. The
order of those atomics varies between runs, so sums may differ in the last bits (never more).

Every kernel has a NumPy statement of what it computes in its docstring; ``tests/test_cuda_loop.py``
checks them against NumPy in the simulator.
"""

from __future__ import annotations

import numpy as np
from numba import cuda, float64

from .cuda_common import THREADS, device_in, device_out, grid_1d

__all__ = [
    "MOMENT_SLOTS",
    "absmax3",
    "affine_sums",
    "asgd_update",
    "moments",
    "scale_gradient",
    "take",
]

#: Slots of the vector :func:`moments` fills.
MOMENT_SLOTS = ("sum_f", "sum_m", "cff", "cmm", "cfm", "ssd", "max_abs_f", "max_abs_m")


@cuda.jit(device=True)
def _block_add(sh, v, out, slot):
    """Add ``v`` of every thread of the block into ``out[slot]`` (one atomic per block).
    Every thread of the block must call it (it synchronises)."""
    t = cuda.threadIdx.x
    bd = cuda.blockDim.x
    sh[t] = v
    cuda.syncthreads()
    stride = 1
    while stride < bd:
        if t % (2 * stride) == 0 and t + stride < bd:
            sh[t] += sh[t + stride]
        cuda.syncthreads()
        stride *= 2
    if t == 0:
        cuda.atomic.add(out, slot, sh[0])
    cuda.syncthreads()


@cuda.jit(device=True)
def _block_max(sh, v, out, slot):
    """``out[slot] = max(out[slot], max of v over the block)``; every thread must call it."""
    t = cuda.threadIdx.x
    bd = cuda.blockDim.x
    sh[t] = v
    cuda.syncthreads()
    stride = 1
    while stride < bd:
        if t % (2 * stride) == 0 and t + stride < bd:
            sh[t] = max(sh[t], sh[t + stride])
        cuda.syncthreads()
        stride *= 2
    if t == 0:
        cuda.atomic.max(out, slot, sh[0])
    cuda.syncthreads()


@cuda.jit
def _k_raw_sums(f, m, n, out):
    sh = cuda.shared.array(THREADS, float64)
    i = cuda.grid(1)
    fv = 0.0
    mv = 0.0
    if i < n:
        fv = f[i]
        mv = m[i]
    _block_add(sh, fv, out, 0)
    _block_add(sh, mv, out, 1)
    _block_max(sh, abs(fv), out, 6)
    _block_max(sh, abs(mv), out, 7)


@cuda.jit
def _k_centred_sums(f, m, n, out):
    sh = cuda.shared.array(THREADS, float64)
    i = cuda.grid(1)
    mf = out[0] / n
    mm = out[1] / n
    fc = 0.0
    mc = 0.0
    d = 0.0
    if i < n:
        fc = f[i] - mf
        mc = m[i] - mm
        d = m[i] - f[i]
    _block_add(sh, fc * fc, out, 2)
    _block_add(sh, mc * mc, out, 3)
    _block_add(sh, fc * mc, out, 4)
    _block_add(sh, d * d, out, 5)


def moments(f, m, out=None):
    """Sample moments of the pairs, in one device vector (see :data:`MOMENT_SLOTS`)::

        [sum f, sum m, sum fc^2, sum mc^2, sum fc mc, sum (m - f)^2, max |f|, max |m|]

    with ``fc = f - mean f``, ``mc = m - mean m`` (the centred form NCC needs, without the
    cancellation of raw second moments). Two launches; the means never leave the GPU.
    ``out``: an optional (8,) float64 device vector to reuse. Returns the device vector.
    """
    n = int(f.shape[0])
    out = device_out(len(MOMENT_SLOTS), np.float64) if out is None else out
    _zero[1, len(MOMENT_SLOTS)](out)
    if n:
        blocks, threads = grid_1d(n)
        _k_raw_sums[blocks, threads](f, m, n, out)
        _k_centred_sums[blocks, threads](f, m, n, out)
    return out


@cuda.jit
def _zero(a):
    i = cuda.grid(1)
    if i < a.shape[0]:
        a[i] = 0.0


@cuda.jit
def _k_scale_gradient(gy, f, m, dmi, use_mi, cm, cf, c0, wmi):
    i = cuda.grid(1)
    if i < gy.shape[0]:
        s = cm * m[i] + cf * f[i] + c0
        if use_mi:
            s += wmi * dmi[i]
        gy[i, 0] *= s
        gy[i, 1] *= s
        gy[i, 2] *= s


def scale_gradient(gy, f, m, cm, cf, c0, dmi=None, wmi=0.0):
    """In place: ``gy[i] *= cm m_i + cf f_i + c0 + wmi dmi_i`` (the weighted metric derivative
    d value / d m_i of MSE and NCC is affine in (f_i, m_i); MI adds its own per-sample term)."""
    n = int(gy.shape[0])
    if n:
        blocks, threads = grid_1d(n)
        use_mi = dmi is not None
        _k_scale_gradient[blocks, threads](gy, f, m, dmi if use_mi else f, use_mi, float(cm), float(cf), float(c0),
                                           float(wmi))
    return gy


@cuda.jit
def _k_affine_sums(gy, idx, n, out):
    sh = cuda.shared.array(THREADS, float64)
    i = cuda.grid(1)
    for d in range(3):
        g = gy[i, d] if i < n else 0.0
        for e in range(3):
            x = idx[i, e] if i < n else 0.0
            _block_add(sh, g * x, out, 3 * d + e)
        _block_add(sh, g, out, 9 + d)


def affine_sums(gy, idx):
    """(12,) host vector ``[sum_n gy_n idx_n^T (row-major 3x3), sum_n gy_n]``: what the affine
    gradient needs (the host maps voxel indices to world points with the fixed affine)."""
    n = int(gy.shape[0])
    out = device_out(12, np.float64)
    _zero[1, 12](out)
    if n:
        blocks, threads = grid_1d(n)
        _k_affine_sums[blocks, threads](gy, idx, n, out)
    return out.copy_to_host()


@cuda.jit
def _k_absmax3(v, out):
    sh = cuda.shared.array(THREADS, float64)
    j = cuda.grid(1)
    n = v.shape[0] // 3
    for c in range(3):
        a = abs(v[3 * j + c]) if j < n else 0.0
        _block_max(sh, a, out, c)


def absmax3(v):
    """Per-component max |v| of a flat (3 n,) device vector viewed as (n, 3): host 3-tuple."""
    out = device_out(3, np.float64)
    _zero[1, 3](out)
    n = int(v.shape[0]) // 3
    if n:
        blocks, threads = grid_1d(n)
        _k_absmax3[blocks, threads](v, out)
    h = out.copy_to_host()
    return float(h[0]), float(h[1]), float(h[2])


@cuda.jit
def _k_asgd(theta, g, prev, step, use_prev, out):
    sh = cuda.shared.array(THREADS, float64)
    i = cuda.grid(1)
    contrib = 0.0
    if i < theta.shape[0]:
        gi = g[i]
        if use_prev:
            contrib = gi * prev[i]
        prev[i] = gi
        theta[i] -= step * gi
    _block_add(sh, contrib, out, 0)


def asgd_update(theta, g, prev, step: float, use_prev: bool) -> float:
    """In place on the device: ``inner = <g, prev>`` (when ``use_prev``), ``prev = g``,
    ``theta -= step g``. Returns ``inner`` (0.0 without ``use_prev``): the one scalar the
    adaptive time needs."""
    out = device_out(1, np.float64)
    _zero[1, 1](out)
    blocks, threads = grid_1d(int(theta.shape[0]))
    _k_asgd[blocks, threads](theta, g, prev, float(step), bool(use_prev), out)
    return float(out.copy_to_host()[0])


@cuda.jit
def _k_take(src, picks, out):
    i = cuda.grid(1)
    if i < out.shape[0]:
        out[i] = src[picks[i]]


def take(src, picks):
    """``src[picks]`` on the device (e.g. mask candidates at drawn positions)."""
    src = device_in(src, None, "src")
    out = device_out(int(picks.shape[0]), src.dtype)
    if out.shape[0]:
        blocks, threads = grid_1d(int(out.shape[0]))
        _k_take[blocks, threads](src, picks, out)
    return out
