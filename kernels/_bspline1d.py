"""Scalar cubic B-spline weights and boundary index helpers, written once for every backend.

These are plain Python functions on scalars (no NumPy, no allocation, no exceptions) so that the
same source compiles as Numba CPU functions (``numba.njit(func)``) and as CUDA device functions
(``numba.cuda.jit(device=True)(func)``). Backends wrap them; nothing here imports numba.

Conventions
-----------
``bspline3`` is the centred cubic B-spline beta3 (support (-2, 2)). A position ``x`` (continuous
index) has the four taps ``base + k``, k = 0..3, with ``base = floor(x) - 1`` and fractional offset
``f = x - floor(x)`` in [0, 1); tap k has weight ``beta3(x - (base + k)) = beta3(f + 1 - k)``.
``bspline3_weights(f)`` returns those four weights as a tuple, ``bspline3_weights_d1`` /
``bspline3_weights_d2`` their first / second derivatives with respect to ``x``.

No function here calls another one, so each compiles on its own with any numba target.
Numba's on-disk cache keys a kernel on its own source file only: after editing this file, delete
the cached ``*.nbi``/``*.nbc`` files under ``kernels/__pycache__`` (or touch ``cpu.py``).
"""

import math


def bspline3(x):
    """Cubic B-spline beta3(x): 2/3 - x^2 + |x|^3/2 for |x| < 1, (2 - |x|)^3/6 for |x| < 2, else 0."""
    a = abs(x)
    if a < 1.0:
        return 2.0 / 3.0 - a * a + 0.5 * a * a * a
    if a < 2.0:
        b = 2.0 - a
        return b * b * b / 6.0
    return 0.0


def bspline3_d1(x):
    """First derivative d beta3 / dx."""
    a = abs(x)
    s = 1.0 if x >= 0.0 else -1.0
    if a < 1.0:
        return s * (1.5 * a * a - 2.0 * a)
    if a < 2.0:
        b = 2.0 - a
        return -s * 0.5 * b * b
    return 0.0


def bspline3_d2(x):
    """Second derivative d^2 beta3 / dx^2 (piecewise linear, continuous)."""
    a = abs(x)
    if a < 1.0:
        return 3.0 * a - 2.0
    if a < 2.0:
        return 2.0 - a
    return 0.0


def bspline3_weights(f):
    """Weights of the taps base+0..base+3 for fractional offset f in [0, 1) (they sum to 1)."""
    g = 1.0 - f
    f2 = f * f
    f3 = f2 * f
    return (
        g * g * g / 6.0,
        0.5 * f3 - f2 + 2.0 / 3.0,
        -0.5 * f3 + 0.5 * f2 + 0.5 * f + 1.0 / 6.0,
        f3 / 6.0,
    )


def bspline3_weights_d1(f):
    """d/dx of the four tap weights (they sum to 0)."""
    g = 1.0 - f
    f2 = f * f
    return (-0.5 * g * g, 1.5 * f2 - 2.0 * f, -1.5 * f2 + f + 0.5, 0.5 * f2)


def bspline3_weights_d2(f):
    """d^2/dx^2 of the four tap weights (they sum to 0)."""
    return (1.0 - f, 3.0 * f - 2.0, 1.0 - 3.0 * f, f)


def fill_bspline3_weights(x, w, dw):
    """Write the 4 weights (and derivatives) of position ``x`` into ``w``/``dw``; return base.

    For kernels that keep weights in small local arrays (e.g. CUDA local memory).
    """
    fl = math.floor(x)
    f = x - fl
    g = 1.0 - f
    f2 = f * f
    f3 = f2 * f
    w[0] = g * g * g / 6.0
    w[1] = 0.5 * f3 - f2 + 2.0 / 3.0
    w[2] = -0.5 * f3 + 0.5 * f2 + 0.5 * f + 1.0 / 6.0
    w[3] = f3 / 6.0
    dw[0] = -0.5 * g * g
    dw[1] = 1.5 * f2 - 2.0 * f
    dw[2] = -1.5 * f2 + f + 0.5
    dw[3] = 0.5 * f2
    return int(fl) - 1


def mirror_index(i, n):
    """Whole-sample mirror of integer index ``i`` into [0, n-1] (scipy 'mirror': -1 -> 1, n -> n-2)."""
    if n == 1:
        return 0
    if i >= 0 and i < n:
        return i
    period = 2 * n - 2
    i = i % period  # Python semantics (non-negative) on every numba target
    if i >= n:
        i = period - i
    return i


def mirror_taps(base, n):
    """The four mirrored tap indices base+0..base+3 (fast path when all are inside)."""
    if base >= 0 and base + 3 < n:
        return (base, base + 1, base + 2, base + 3)
    if n == 1:
        return (0, 0, 0, 0)
    period = 2 * n - 2
    i0 = base % period
    i1 = (base + 1) % period
    i2 = (base + 2) % period
    i3 = (base + 3) % period
    return (
        period - i0 if i0 >= n else i0,
        period - i1 if i1 >= n else i1,
        period - i2 if i2 >= n else i2,
        period - i3 if i3 >= n else i3,
    )


def mirror_coord(x, n):
    """Fold a continuous index into [0, n-1] by whole-sample mirroring.

    Returns ``(y, s)`` with ``s = dy/dx`` (+1 or -1), so gradients of the mirrored signal stay exact.
    Non-finite ``x`` returns a non-finite ``y`` (callers test ``0 <= y <= n-1``).
    """
    if n == 1:
        return 0.0, 1.0
    if x >= 0.0 and x <= n - 1.0:
        return x, 1.0
    period = 2.0 * n - 2.0
    r = x - period * math.floor(x / period)
    if r > n - 1.0:
        return period - r, -1.0
    return r, 1.0


def clamp_taps(base, n, w):
    """Taps for a zero-extended grid: indices clamped into [0, n-1] and weights of missing taps 0.

    ``w`` is a 4-tuple of weights; returns ``(indices, weights)``, two 4-tuples. Summing
    ``weights[k] * c[indices[k]]`` then equals the sum over existing taps only, without branches
    in the inner loops and without reading outside the array.
    """
    if base >= 0 and base + 3 < n:
        return (base, base + 1, base + 2, base + 3), w
    i0 = base
    i1 = base + 1
    i2 = base + 2
    i3 = base + 3
    w0 = w[0] if (i0 >= 0 and i0 < n) else 0.0
    w1 = w[1] if (i1 >= 0 and i1 < n) else 0.0
    w2 = w[2] if (i2 >= 0 and i2 < n) else 0.0
    w3 = w[3] if (i3 >= 0 and i3 < n) else 0.0
    return (
        (min(max(i0, 0), n - 1), min(max(i1, 0), n - 1), min(max(i2, 0), n - 1), min(max(i3, 0), n - 1)),
        (w0, w1, w2, w3),
    )
