"""Numba CPU kernel for Mattes mutual information (value and derivative w.r.t. moving samples).

Same numbers as the NumPy specification :mod:`fastimpact.kernels.mi_reference` (see its
docstring for notation and the derivation of the derivative); this module only makes them
fast. One call does everything: Parzen joint histogram, marginals, ``L = log(p/(p_f p_m))``,
MI, and the per-sample derivative ``dMI/dm_n`` (float64 throughout; ``f`` and ``m`` may be
float32 or float64).

Two variants, with bit-identical results:

* serial (one pass, no thread start-up cost), used for the usual few thousand samples;
* parallel: ``prange`` over sample chunks, each chunk with its own histogram, then ``prange``
  over the same chunks for the derivative (each sample writes only its own entry, so no
  race). Used from :data:`PARALLEL_MIN_SAMPLES` samples on.

Summation order (this is what makes the result independent of the thread count and of the
variant): the samples are cut into consecutive chunks whose layout depends only on N and the
bin counts (:func:`chunk_layout`), never on ``numba.get_num_threads()``. Inside a chunk the
samples are added in index order; the chunk histograms are then added in chunk order, bin
by bin, starting from zero. The serial variant follows the same order (it adds each chunk's
histogram to the total when the chunk ends), so serial, parallel with 1 thread and parallel
with any number of threads give the same bits.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from . import _bspline1d as _b1

__all__ = ["mattes_mi", "chunk_layout", "PARALLEL_MIN_SAMPLES", "CHUNK_SAMPLES"]

#: From this many samples on, :func:`mattes_mi` uses the parallel variant when
#: ``parallel=None``. With N = 2000 and 32 bins the serial kernel takes ~40 us, about
#: what waking the thread team costs (and far less than waiting for a thread when other
#: processes share the cores), so parallel only pays off for large sample sets (measured
#: on 2 cores: serial 2.2 ms vs parallel 1.5 ms at N = 100k; at N = 2000 serial 55 us vs
#: parallel 84 us).
PARALLEL_MIN_SAMPLES = 50_000

#: Smallest number of samples per histogram chunk (see :func:`chunk_layout`). Each chunk
#: costs one zeroed (Bf, Bm) histogram and Bf*Bm additions, against 16 additions per sample
#: (cubic fixed window), so at 4096 samples the chunking overhead is ~1.5 % for 32 x 32
#: bins, and 50k samples still give 13 chunks to share between the threads.
CHUNK_SAMPLES = 4096
#: At most this many chunks (the layout must not depend on the thread count, so this also
#: bounds how many threads can share the histogram pass) ...
MAX_CHUNKS = 64
#: ... and at most this many bytes of per-chunk histograms.
MAX_CHUNK_BYTES = 8 << 20


def chunk_layout(n_samples: int, nbins_f: int, nbins_m: int) -> tuple[int, int]:
    """``(samples per chunk, number of chunks)`` of the histogram reduction.

    A function of N and the bin counts only (not of the thread count), so the summation
    order, and hence every bit of the result, is the same for any ``--threads``.
    """
    n = max(int(n_samples), 1)
    cap = max(1, min(MAX_CHUNKS, MAX_CHUNK_BYTES // (8 * int(nbins_f) * int(nbins_m))))
    chunk = max(CHUNK_SAMPLES, -(-n // cap))
    return chunk, -(-n // chunk)


@numba.njit(inline="always")
def _coordinate(v, scale, offset, lo, hi):
    """Continuous bin coordinate of intensity v, clamped to [lo, hi]; inside = strictly within.

    NaN maps to ``lo`` (and counts as outside) so that it can never index out of bounds.
    """
    c = v * scale + offset
    if c >= hi:
        return hi, False
    if not (c > lo):  # also catches NaN
        return lo, False
    return c, True


# Cubic B-spline tap weights (and d/dc) for the fractional offset t = c - floor(c): the shared
# scalar definitions of kernels/_bspline1d.py, compiled here as inline device functions.
_cubic = numba.njit(inline="always")(_b1.bspline3_weights)
_cubic_derivative = numba.njit(inline="always")(_b1.bspline3_weights_d1)


@numba.njit(inline="always")
def _fixed_window(xi, order):
    """First bin and up to 4 weights of the fixed Parzen window of ``order`` at ``xi``."""
    if order == 0:
        # beta_0 is 1 on (-1/2, 1/2]: the bin i with i - xi in (-1/2, 1/2]
        return int(math.floor(xi + 0.5)), (1.0, 0.0, 0.0, 0.0)
    base = math.floor(xi)
    t = xi - base
    if order == 1:
        return int(base), (1.0 - t, t, 0.0, 0.0)
    return int(base) - 1, _cubic(t)


@numba.njit(inline="always")
def _windows(fn, mn, f_scale, f_offset, f_lo, f_hi, m_scale, m_offset, m_lo, m_hi, fixed_order):
    """Parzen windows of one sample: (i0, fixed weights, k0, moving weights, d/deta, inside).

    Scalars only: helpers taking array arguments (or array views) inside a ``prange`` body
    made the parallel kernel 10-100x slower here (measured; presumably reference-count
    traffic shared between threads), so the kernels index the arrays directly.
    """
    xi, _ = _coordinate(np.float64(fn), f_scale, f_offset, f_lo, f_hi)
    eta, inside = _coordinate(np.float64(mn), m_scale, m_offset, m_lo, m_hi)
    i0, wf = _fixed_window(xi, fixed_order)
    base = math.floor(eta)
    t = eta - base
    return i0, wf, int(base) - 1, _cubic(t), _cubic_derivative(t), inside


@numba.njit(cache=True)
def _log_ratio(hist, log_ratio):
    """Normalise hist in place to p; fill L = log(p/(p_f p_m)) (0 where p=0); return (MI, S)."""
    nbins_f, nbins_m = hist.shape
    total = 0.0
    for i in range(nbins_f):
        for k in range(nbins_m):
            total += hist[i, k]
    inv = 1.0 / total
    pf = np.zeros(nbins_f)
    pm = np.zeros(nbins_m)
    for i in range(nbins_f):
        for k in range(nbins_m):
            p = hist[i, k] * inv
            hist[i, k] = p
            pf[i] += p
            pm[k] += p
    # log(p / (pf pm)) = log p - log pf - log pm: fewer logs than B^2 divisions + logs
    log_pf = np.empty(nbins_f)
    log_pm = np.empty(nbins_m)
    for i in range(nbins_f):
        log_pf[i] = math.log(pf[i]) if pf[i] > 0.0 else 0.0
    for k in range(nbins_m):
        log_pm[k] = math.log(pm[k]) if pm[k] > 0.0 else 0.0
    mi = 0.0
    for i in range(nbins_f):
        for k in range(nbins_m):
            p = hist[i, k]
            if p > 0.0:
                r = math.log(p) - log_pf[i] - log_pm[k]
                log_ratio[i, k] = r
                mi += p * r
            else:
                log_ratio[i, k] = 0.0
    return mi, total


@numba.njit(cache=True)
def _mi_serial(f, m, nbins_f, nbins_m, f_scale, f_offset, f_lo, f_hi,
               m_scale, m_offset, m_lo, m_hi, fixed_order, want_derivative, out, chunk):
    n_samples = f.shape[0]
    nf = fixed_order + 1
    hist = np.zeros((nbins_f, nbins_m))
    part = np.zeros((nbins_f, nbins_m))
    # same order as _mi_parallel: within a chunk by sample index, then chunk by chunk
    for start in range(0, n_samples, chunk):
        part[:, :] = 0.0
        for n in range(start, min(start + chunk, n_samples)):
            i0, wf, k0, wm, _, _ = _windows(f[n], m[n], f_scale, f_offset, f_lo, f_hi,
                                            m_scale, m_offset, m_lo, m_hi, fixed_order)
            for a in range(nf):
                i = i0 + a
                if i < 0 or i >= nbins_f:  # only zero weights can fall outside
                    continue
                for b in range(4):
                    k = k0 + b
                    if k >= 0 and k < nbins_m:
                        part[i, k] += wf[a] * wm[b]
        for i in range(nbins_f):
            for k in range(nbins_m):
                hist[i, k] += part[i, k]
    log_ratio = np.empty((nbins_f, nbins_m))
    mi, total = _log_ratio(hist, log_ratio)
    if want_derivative:
        factor = m_scale / total
        for n in range(n_samples):
            i0, wf, k0, _, dwm, inside = _windows(f[n], m[n], f_scale, f_offset, f_lo, f_hi,
                                                  m_scale, m_offset, m_lo, m_hi, fixed_order)
            acc = 0.0
            if inside:
                for a in range(nf):
                    i = i0 + a
                    if i < 0 or i >= nbins_f:
                        continue
                    row = 0.0
                    for b in range(4):
                        k = k0 + b
                        if k >= 0 and k < nbins_m:
                            row += dwm[b] * log_ratio[i, k]
                    acc += wf[a] * row
            out[n] = factor * acc
    return mi


@numba.njit(parallel=True, cache=True)
def _mi_parallel(f, m, nbins_f, nbins_m, f_scale, f_offset, f_lo, f_hi,
                 m_scale, m_offset, m_lo, m_hi, fixed_order, want_derivative, out, chunk):
    n_samples = f.shape[0]
    nf = fixed_order + 1
    nchunks = (n_samples + chunk - 1) // chunk
    per_chunk = np.zeros((nchunks, nbins_f, nbins_m))
    for c in numba.prange(nchunks):
        for n in range(c * chunk, min((c + 1) * chunk, n_samples)):
            i0, wf, k0, wm, _, _ = _windows(f[n], m[n], f_scale, f_offset, f_lo, f_hi,
                                            m_scale, m_offset, m_lo, m_hi, fixed_order)
            for a in range(nf):
                i = i0 + a
                if i < 0 or i >= nbins_f:
                    continue
                for b in range(4):
                    k = k0 + b
                    if k >= 0 and k < nbins_m:
                        per_chunk[c, i, k] += wf[a] * wm[b]
    hist = np.zeros((nbins_f, nbins_m))
    for i in numba.prange(nbins_f):  # per bin: chunk order, from zero (the serial order)
        for c in range(nchunks):
            for k in range(nbins_m):
                hist[i, k] += per_chunk[c, i, k]
    log_ratio = np.empty((nbins_f, nbins_m))
    mi, total = _log_ratio(hist, log_ratio)
    if want_derivative:
        factor = m_scale / total
        for c in numba.prange(nchunks):
            for n in range(c * chunk, min((c + 1) * chunk, n_samples)):
                i0, wf, k0, _, dwm, inside = _windows(f[n], m[n], f_scale, f_offset, f_lo,
                                                      f_hi, m_scale, m_offset, m_lo, m_hi,
                                                      fixed_order)
                acc = 0.0
                if inside:
                    for a in range(nf):
                        i = i0 + a
                        if i < 0 or i >= nbins_f:
                            continue
                        row = 0.0
                        for b in range(4):
                            k = k0 + b
                            if k >= 0 and k < nbins_m:
                                row += dwm[b] * log_ratio[i, k]
                        acc += wf[a] * row
                out[n] = factor * acc
    return mi


def mattes_mi(f, m, *, nbins_f, nbins_m, f_scale, f_offset, f_lo, f_hi,
              m_scale, m_offset, m_lo, m_hi, fixed_order, derivative=True, parallel=None):
    """Mattes MI (+MI, nats) and ``dMI/dm`` (N,) float64, or ``(mi, None)`` without derivative.

    Arguments as :func:`fastimpact.kernels.mi_reference.mattes_mi_reference`; ``f`` and
    ``m`` are 1-D float32/float64 arrays of equal length N >= 1. The clamp intervals must
    lie inside the histogram with the window support (``f_lo >= order // 2``,
    ``f_hi <= nbins_f - 1 - order // 2``, ``m_lo >= 1``, ``m_hi <= nbins_m - 2``); the
    caller (:class:`fastimpact.metrics.mi.MattesMutualInformation`) guarantees this, and
    out-of-histogram indices are skipped anyway, so memory is never touched out of bounds.
    ``parallel``: True/False, or None to choose by N (:data:`PARALLEL_MIN_SAMPLES`); it
    changes the speed only: the result is bit-identical for either choice and any thread
    count (see the module docstring).
    """
    f = np.ascontiguousarray(f)
    m = np.ascontiguousarray(m)
    if f.ndim != 1 or f.shape != m.shape or f.size == 0:
        raise ValueError(f"f and m must be non-empty 1-D arrays of equal length, got shapes "
                         f"{f.shape} and {m.shape}")
    pad_f = int(fixed_order) // 2
    if not (pad_f <= f_lo < f_hi <= nbins_f - 1 - pad_f and 1 <= m_lo < m_hi <= nbins_m - 2):
        raise ValueError("MI clamp intervals leave the histogram: the Parzen windows would not "
                         "be partitions of unity; build the arguments with "
                         "MattesMutualInformation.kernel_arguments()")
    if f.dtype not in (np.float32, np.float64):
        f = f.astype(np.float64)
    if m.dtype not in (np.float32, np.float64):
        m = m.astype(np.float64)
    n_samples = f.shape[0]
    out = np.empty(n_samples if derivative else 0, dtype=np.float64)
    args = (f, m, int(nbins_f), int(nbins_m), float(f_scale), float(f_offset), float(f_lo),
            float(f_hi), float(m_scale), float(m_offset), float(m_lo), float(m_hi),
            int(fixed_order), bool(derivative), out)
    chunk, nchunks = chunk_layout(n_samples, nbins_f, nbins_m)
    if parallel is None:
        parallel = n_samples >= PARALLEL_MIN_SAMPLES
    if parallel and nchunks > 1:
        mi = _mi_parallel(*args, chunk)
    else:
        mi = _mi_serial(*args, chunk)
    return float(mi), (out if derivative else None)
