"""CUDA (Numba) kernel for Mattes mutual information: value and derivative w.r.t. moving samples.

Same signature and numbers as :func:`fastimpact.kernels.mi_cpu.mattes_mi`, whose specification is
:mod:`fastimpact.kernels.mi_reference` (notation and the derivation of the derivative are there).
Float64 throughout; ``f`` and ``m`` may be float32 or float64, NumPy or device arrays. The MI
value is returned as a Python float (one 16-byte copy back per call); the derivative (N,) float64
is a NumPy array when ``f`` and ``m`` were host arrays, else a device array that stays on the GPU.

Four launches per call:

1. ``_k_zero``: clear the (Bf * Bm) float64 histogram.
2. Joint Parzen histogram, one thread per sample (a grid-stride loop when N exceeds
   :data:`MAX_HIST_BLOCKS` blocks), each adding its ``(order + 1) x 4`` weights with
   ``cuda.atomic.add`` in float64. When the histogram fits in :data:`SHARED_HIST_BYTES` of
   shared memory each block first accumulates a private copy there (shared-memory atomics are
   much cheaper and contend only within the block), then adds its non-zero bins to the global
   histogram; otherwise the threads add straight into global memory.
3. ``_k_log_ratio``: one block normalises, forms the marginals, ``L = log(p / (p_f p_m))``
   (0 where p = 0), MI and the total ``S = sum h`` (fixed-order reductions within the block).
4. ``_k_derivative`` (only with ``derivative=True``): one thread per sample,
   ``dMI/dm_n = (m_scale / S) sum_{a,b} w_f[a] w_m'[b] L(i0 + a, k0 + b)`` for samples strictly
   inside the moving clamp interval, 0 otherwise.

Floating-point atomics make the histogram's summation order (and so the last bits of MI, about
1e-15 relative) vary from run to run; the results agree with the CPU kernel and the reference to
that level.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, float64

from .cuda_common import (
    THREADS,
    Returns,
    bspline3_weights,
    bspline3_weights_d1,
    device_in,
    device_out,
    grid_1d,
    is_device,
    simulated,
)

__all__ = ["mattes_mi", "SHARED_HIST_BYTES", "MAX_HIST_BLOCKS"]

#: Histograms up to this many bytes (Bf * Bm * 8; 48 KiB, the shared memory a block may use
#: without opting in: 6144 bins, e.g. 64 x 64 or 78 x 78) are accumulated per block in shared
#: memory first. Set to 0 to force the global-atomics variant.
SHARED_HIST_BYTES = 48 * 1024

#: Upper bound on the blocks of the histogram launch; beyond 256 * MAX_HIST_BLOCKS samples each
#: thread handles several (fewer per-block histograms to merge into global memory).
MAX_HIST_BLOCKS = 512

# Threads of the one-block log-ratio kernel (a power of two <= _RED); fewer in the simulator,
# which runs one Python thread per CUDA thread.
_RED = 256

_dev = cuda.jit(device=True)


# ----------------------------------------------------------------------------- device functions
@_dev
def _coordinate(v, scale, offset, lo, hi):
    """Bin coordinate of intensity v clamped to [lo, hi], and whether it is strictly inside.
    NaN maps to ``lo`` (outside), so it never indexes out of bounds."""
    c = v * scale + offset
    if c >= hi:
        return hi, False
    if not (c > lo):
        return lo, False
    return c, True


@_dev
def _fixed_window(xi, order):
    """First bin and 4 weights (the first order + 1 used) of the fixed Parzen window at ``xi``."""
    if order == 0:
        # beta_0 is 1 on (-1/2, 1/2]: the bin i with i - xi in (-1/2, 1/2]
        return int(math.floor(xi + 0.5)), (1.0, 0.0, 0.0, 0.0)
    base = math.floor(xi)
    t = xi - base
    if order == 1:
        return int(base), (1.0 - t, t, 0.0, 0.0)
    return int(base) - 1, bspline3_weights(t)


@_dev
def _windows(fn, mn, prm, order):
    """(i0, fixed weights, k0, moving fractional offset t, inside) of one sample.
    ``prm`` = (f_scale, f_offset, f_lo, f_hi, m_scale, m_offset, m_lo, m_hi)."""
    xi, _ = _coordinate(np.float64(fn), prm[0], prm[1], prm[2], prm[3])
    eta, inside = _coordinate(np.float64(mn), prm[4], prm[5], prm[6], prm[7])
    i0, wf = _fixed_window(xi, order)
    base = math.floor(eta)
    return i0, wf, int(base) - 1, eta - base, inside


# ----------------------------------------------------------------------------- kernels
@cuda.jit
def _k_zero(a):
    for t in range(cuda.grid(1), a.shape[0], cuda.gridsize(1)):
        a[t] = 0.0


@cuda.jit
def _k_hist_global(f, m, nbins_f, nbins_m, prm, order, hist):
    """Joint histogram (flat, row i = fixed bin) by float64 atomics in global memory."""
    nf = order + 1
    for n in range(cuda.grid(1), f.shape[0], cuda.gridsize(1)):
        i0, wf, k0, t, _ = _windows(f[n], m[n], prm, order)
        wm = bspline3_weights(t)
        for a in range(nf):
            i = i0 + a
            if i < 0 or i >= nbins_f or wf[a] == 0.0:  # only zero weights can fall outside
                continue
            for b in range(4):
                k = k0 + b
                w = wf[a] * wm[b]
                if k >= 0 and k < nbins_m and w != 0.0:
                    cuda.atomic.add(hist, i * nbins_m + k, w)


@cuda.jit
def _k_hist_shared(f, m, nbins_f, nbins_m, prm, order, hist):
    """As _k_hist_global, accumulated per block in dynamic shared memory (Bf * Bm float64)."""
    sh = cuda.shared.array(0, dtype=float64)
    nb = nbins_f * nbins_m
    tid = cuda.threadIdx.x
    for j in range(tid, nb, cuda.blockDim.x):
        sh[j] = 0.0
    cuda.syncthreads()
    nf = order + 1
    for n in range(cuda.grid(1), f.shape[0], cuda.gridsize(1)):
        i0, wf, k0, t, _ = _windows(f[n], m[n], prm, order)
        wm = bspline3_weights(t)
        for a in range(nf):
            i = i0 + a
            if i < 0 or i >= nbins_f or wf[a] == 0.0:
                continue
            for b in range(4):
                k = k0 + b
                w = wf[a] * wm[b]
                if k >= 0 and k < nbins_m and w != 0.0:
                    cuda.atomic.add(sh, i * nbins_m + k, w)
    cuda.syncthreads()
    for j in range(tid, nb, cuda.blockDim.x):
        v = sh[j]
        if v != 0.0:
            cuda.atomic.add(hist, j, v)


@cuda.jit
def _k_log_ratio(hist, nbins_f, nbins_m, log_pf, log_pm, log_ratio, scalars):
    """One block: p = h / S, log marginals, L = log(p / (p_f p_m)) (0 where p = 0);
    scalars[0] = MI, scalars[1] = S. hist and log_ratio are flat (Bf * Bm)."""
    part = cuda.shared.array(_RED, dtype=float64)
    shared_total = cuda.shared.array(1, dtype=float64)
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    nb = nbins_f * nbins_m
    s = 0.0
    for j in range(tid, nb, nt):
        s += hist[j]
    part[tid] = s
    cuda.syncthreads()
    if tid == 0:
        total = 0.0
        for r in range(nt):
            total += part[r]
        shared_total[0] = total
    cuda.syncthreads()
    total = shared_total[0]
    inv = 1.0 / total
    for i in range(tid, nbins_f, nt):
        acc = 0.0
        for k in range(nbins_m):
            acc += hist[i * nbins_m + k] * inv
        log_pf[i] = math.log(acc) if acc > 0.0 else 0.0
    for k in range(tid, nbins_m, nt):
        acc = 0.0
        for i in range(nbins_f):
            acc += hist[i * nbins_m + k] * inv
        log_pm[k] = math.log(acc) if acc > 0.0 else 0.0
    cuda.syncthreads()  # the log marginals (global memory) are visible to the whole block
    s = 0.0
    for j in range(tid, nb, nt):
        p = hist[j] * inv
        if p > 0.0:
            i = j // nbins_m
            r = math.log(p) - log_pf[i] - log_pm[j - i * nbins_m]
            log_ratio[j] = r
            s += p * r
        else:
            log_ratio[j] = 0.0
    part[tid] = s
    cuda.syncthreads()
    if tid == 0:
        mi = 0.0
        for r in range(nt):
            mi += part[r]
        scalars[0] = mi
        scalars[1] = total


@cuda.jit
def _k_derivative(f, m, nbins_f, nbins_m, prm, order, log_ratio, scalars, out):
    """One thread per sample: out[n] = dMI / dm_n."""
    n = cuda.grid(1)
    if n >= f.shape[0]:
        return
    i0, wf, k0, t, inside = _windows(f[n], m[n], prm, order)
    acc = 0.0
    if inside:
        dwm = bspline3_weights_d1(t)
        for a in range(order + 1):
            i = i0 + a
            if i < 0 or i >= nbins_f:
                continue
            row = 0.0
            for b in range(4):
                k = k0 + b
                if k >= 0 and k < nbins_m:
                    row += dwm[b] * log_ratio[i * nbins_m + k]
            acc += wf[a] * row
    out[n] = (prm[4] / scalars[1]) * acc


# ----------------------------------------------------------------------------- host
def _samples(a, name):
    if is_device(a):
        d = device_in(a, name=name)
        if d.dtype not in (np.float32, np.float64):
            raise TypeError(f"{name} on the GPU has dtype {d.dtype}, the CUDA MI kernel needs float32 or float64; "
                            "convert it once with .astype before the loop")
        return d
    h = np.asarray(a)
    return device_in(h, None if h.dtype in (np.float32, np.float64) else np.float64, name)


def mattes_mi(f, m, *, nbins_f, nbins_m, f_scale, f_offset, f_lo, f_hi,
              m_scale, m_offset, m_lo, m_hi, fixed_order, derivative=True, parallel=None):
    """Mattes MI (+MI, nats) and ``dMI/dm`` (N,) float64, or ``(mi, None)`` without derivative.

    Arguments and checks as :func:`fastimpact.kernels.mi_cpu.mattes_mi`; ``f`` and ``m`` are
    1-D float32/float64 arrays of equal length N >= 1, on the host or on the GPU. ``parallel``
    is accepted for signature compatibility and ignored (the GPU is always parallel).
    """
    shape_f = tuple(f.shape) if is_device(f) else np.shape(f)
    shape_m = tuple(m.shape) if is_device(m) else np.shape(m)
    if len(shape_f) != 1 or shape_f != shape_m or shape_f[0] == 0:
        raise ValueError(f"f and m must be non-empty 1-D arrays of equal length, got shapes "
                         f"{shape_f} and {shape_m}")
    pad_f = int(fixed_order) // 2
    if not (pad_f <= f_lo < f_hi <= nbins_f - 1 - pad_f and 1 <= m_lo < m_hi <= nbins_m - 2):
        raise ValueError("MI clamp intervals leave the histogram: the Parzen windows would not "
                         "be partitions of unity; build the arguments with "
                         "MattesMutualInformation.kernel_arguments()")
    ret = Returns(f, m)
    fd = _samples(f, "f")
    md = _samples(m, "m")
    n_samples = shape_f[0]
    bf, bm, order = int(nbins_f), int(nbins_m), int(fixed_order)
    prm = (float(f_scale), float(f_offset), float(f_lo), float(f_hi),
           float(m_scale), float(m_offset), float(m_lo), float(m_hi))
    nb = bf * bm

    if simulated():
        # one Python thread per CUDA thread there: few threads, several samples (bins) each, which
        # also exercises the grid-stride loops that large N takes on a GPU
        threads, max_blocks = 32, 2
    else:
        threads, max_blocks = THREADS, MAX_HIST_BLOCKS
    hist = device_out(nb, np.float64)
    _k_zero[min((nb + threads - 1) // threads, max_blocks), threads](hist)
    blocks = min((n_samples + threads - 1) // threads, max_blocks)
    if nb * 8 <= SHARED_HIST_BYTES:
        _k_hist_shared[blocks, threads, 0, nb * 8](fd, md, bf, bm, prm, order, hist)
    else:
        _k_hist_global[blocks, threads](fd, md, bf, bm, prm, order, hist)

    log_ratio = device_out(nb, np.float64)
    scalars = device_out(2, np.float64)
    red_threads = min(_RED, 8 if simulated() else THREADS)
    _k_log_ratio[1, red_threads](hist, bf, bm, device_out(bf, np.float64), device_out(bm, np.float64),
                                 log_ratio, scalars)
    out = None
    if derivative:
        out = device_out(n_samples, np.float64)
        _k_derivative[grid_1d(n_samples)](fd, md, bf, bm, prm, order, log_ratio, scalars, out)
    mi = float(scalars.copy_to_host()[0])
    return mi, (ret(out) if derivative else None)
