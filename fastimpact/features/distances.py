"""Per-layer IMPACT feature distances and feature normalisation, with exact gradients.

Conventions (all functions here):

* ``f`` (K, C): fixed feature vectors, ``m`` (K, C): moving feature vectors of the same K
  sample points, C channels; float32 or float64 in, all arithmetic and outputs float64.
* A distance is MINIMISED (lower = more similar). Its gradient ``dvalue/dm`` has the shape of
  ``m`` (K, C). The registration driver chains it with ``dm/dy`` and ``dT/dtheta``.
* Every distance except NCC is a mean of per-sample terms::

      value = (1/K) sum_k d(f_k, m_k)

  so ``dvalue/dm_k = (1/K) d'(f_k, m_k)`` and a sample set may be split and recombined with
  weights K_i / K (:data:`PER_SAMPLE_DISTANCES`). NCC is a correlation over all K samples per
  channel, averaged over channels; it does not split.

Definitions, with ``|x|_e = sqrt(sum_c x_c^2 + e^2)`` (a norm floored smoothly at ``e``)::

    l1          d = (1/C) sum_c |f_c - m_c|            (subgradient sign(0) = 0 at f_c = m_c)
    l2          d = (1/C) sum_c (f_c - m_c)^2
    dotproduct  d = -sum_c f_c m_c
    cosine      d = -f.m / (|f|_e |m|_e)
    l1cosine    d = -[f.m / (|f|_e |m|_e)] * (1/C) sum_c exp(-0.1 |f_c - m_c|)
    dice        d = -2 I U / (U^2 + e^2),  I = sum_c f_c m_c,  U = sum_c (f_c + m_c)
    ncc         value = -(1/C) sum_c u_c / sqrt((vf_c + K e_v) (vm_c + K e_v)), with
                fc = f - mean_k f, mc = m - mean_k m (per channel), u = sum_k fc mc,
                vf = sum_k fc^2, vm = sum_k mc^2

What the reference (elastix ``Components/Metrics/Impact/ImpactLoss.h`` and the ITKIMPACT module's
``include/ImpactLoss.h``) computes, and where we differ:

* L1, L2, DotProduct, Cosine: same per-sample terms (channel mean for L1/L2, channel sum for the
  dot product), summed over samples and divided by N by the metric. The reference additionally
  rescales L1 and L2 by their first value (elastix; ITKIMPACT dropped that) -- that belongs to the
  metric, not here. The reference guards no division (a zero vector gives NaN); we floor norms.
  The elastix Cosine gradient uses ``f_c m_c m_c`` where the exact derivative has ``(f.m) m_c``
  (ITKIMPACT fixed this); ours is exact.
* L1Cosine: the reference value is ``-(1/C) sum_c cos(f, m) exp(-lambda |f_c - m_c|)``, lambda = 0.1
  (in feature units), per sample -- the same as ours. The elastix gradient is not its derivative
  (it multiplies the cosine derivative by the exponential derivative); ITKIMPACT's corrected one
  ``-(1/C)[dcos/dm_j sum_c g_c + cos lambda sign(f_j - m_j) g_j]`` is what we compute.
* Dice: elastix rounds both vectors to {0, 1} (``round(x).clamp(0)``) and reports
  ``1 - mean_k (2 I + 1e-6)/(U + 1e-6)`` (per batch, then divided by N again), with a gradient
  that is not the derivative of that piecewise-constant value. ITKIMPACT uses the soft Dice on
  raw activations, ``-2 I / U`` per sample, with Dice := 1 and zero gradient where U == 0. Ours
  is the soft Dice with the regularised reciprocal ``U / (U^2 + e^2)`` in place of ``1 / U``:
  identical to ``-2 I / U`` when ``|U| >> e``, smooth and finite through U = 0 (value 0 there),
  and valid for features of either sign. Soft Dice is meaningful for non-negative features
  (ReLU outputs, MIND); with ``feature_norm=standardized`` U is identically 0 (each standardised
  vector sums to 0), so that combination is rejected by :func:`layer_value_and_grad`.
* NCC: the reference's value is ``-(1/C) sum_c u_c / sqrt(vf_c vm_c)`` from the raw sums
  ``Sfm - Sf Sm / N`` etc.; ITKIMPACT clamps the variances at 0 and the denominator at 1e-8 (with a
  gradient that is not the derivative of the clamped value). We use the centred form (no
  cancellation, variances never negative) and add the floor ``K e_v`` to each variance, so a
  constant channel contributes 0 and the gradient stays the exact derivative. Near a constant
  MOVING channel NCC is genuinely singular: the exact derivative there is about
  ``fc / sqrt(vf K e_v) / C``, large but finite.

Epsilons are absolute, in feature units: ``NORM_EPS`` = 1e-6 for every norm / standard-deviation
floor, ``DICE_EPS`` = 1e-6 for U, ``NCC_VAR_EPS`` = 1e-10 per sample for the NCC variances (a
standard deviation of 1e-5). They change values by a relative ~(eps / scale)^2: below 1e-4 for
features whose spread is 1e-3 or more, below 1e-10 at unit scale.

Feature normalisation (:func:`normalize`, per sample over the C channels) is applied to both
``f`` and ``m`` before the distance; :func:`normalize_backward` is its exact vector-Jacobian
product, so :func:`layer_value_and_grad` returns the gradient with respect to the raw ``m``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from ..errors import ConfigError
from ..vocabulary import DISTANCE_NAMES, FEATURE_NORMS

__all__ = ["DISTANCES", "PER_SAMPLE_DISTANCES", "FEATURE_NORMS", "NORM_EPS", "DICE_EPS", "NCC_VAR_EPS",
           "L1COSINE_LAMBDA", "distance", "check_distance", "check_feature_norm", "normalize",
           "normalize_backward", "NormState", "layer_value_and_grad"]

#: Floor of every vector norm and of the standard deviation in ``standardized`` (feature units).
NORM_EPS = 1e-6
#: Floor of the Dice denominator ``U = sum_c (f_c + m_c)`` (feature units).
DICE_EPS = 1e-6
#: Per-sample floor of the NCC variances (squared feature units); the floor is ``K * NCC_VAR_EPS``.
NCC_VAR_EPS = 1e-10
#: Decay of the L1 factor in L1Cosine, per feature unit (the reference's 0.1).
L1COSINE_LAMBDA = 0.1
#: Samples are processed in row blocks of about this many elements (128 KiB of float64): the
#: temporaries then stay in cache and are reused by the allocator, where whole (K, C)
#: temporaries are fresh pages each call (measured 3-6x slower at K = 2000-5000, C = 32-128).
BLOCK_ELEMENTS = 16384



class NormState(NamedTuple):
    """What :func:`normalize_backward` needs: the mode, the output y (K, C) and the per-sample
    scale (K, 1) that divided the (centred) input; None for ``none``."""

    mode: str
    y: np.ndarray
    scale: np.ndarray | None


def check_distance(name) -> str:
    """The registry key of a distance name (case-insensitive: elastix's ``L1Cosine`` works)."""
    key = str(name).lower()
    if key not in DISTANCES:
        raise ConfigError(f"distance={name!r} is unknown: choose one of {', '.join(DISTANCES)}")
    return key


def check_feature_norm(mode) -> str:
    """The canonical name of a feature normalisation mode (case-insensitive)."""
    key = str(mode).lower()
    if key not in FEATURE_NORMS:
        raise ConfigError(f"feature_norm={mode!r} is unknown: choose one of {', '.join(FEATURE_NORMS)}")
    return key


def _pair(f, m) -> tuple[np.ndarray, np.ndarray]:
    """Two equal (K, C) float arrays, left as float32 or float64 (blocks are converted later)."""
    f = np.asarray(f)
    m = np.asarray(m)
    if f.dtype not in (np.float32, np.float64):
        f = f.astype(np.float64)
    if m.dtype not in (np.float32, np.float64):
        m = m.astype(np.float64)
    if f.ndim != 2 or f.shape != m.shape or f.shape[0] == 0 or f.shape[1] == 0:
        raise ValueError(f"feature samples must be two 2-D arrays (K, C) of equal, non-empty shape; got "
                         f"{f.shape} and {m.shape}")
    return f, m


def _row_blocks(k: int, c: int):
    step = max(1, BLOCK_ELEMENTS // c)
    for a in range(0, k, step):
        yield slice(a, min(k, a + step))


# --- feature normalisation ----------------------------------------------------------------

def _norm(x: np.ndarray) -> np.ndarray:
    """(K, 1) floored norms ``sqrt(|x|^2 + NORM_EPS^2)``."""
    return np.sqrt(np.einsum("kc,kc->k", x, x) + NORM_EPS * NORM_EPS)[:, None]


def _normalize(x: np.ndarray, mode: str) -> tuple[np.ndarray, NormState]:
    x = np.asarray(x, dtype=np.float64)
    if mode == "none":
        return x, NormState(mode, x, None)
    if mode == "l2":
        s = _norm(x)
        y = x / s
    else:
        y = x - x.mean(axis=1, keepdims=True)
        s = np.sqrt(np.einsum("kc,kc->k", y, y)[:, None] * (1.0 / x.shape[1]) + NORM_EPS * NORM_EPS)
        y /= s
    return y, NormState(mode, y, s)


def _normalize_backward(dy: np.ndarray, state: NormState) -> np.ndarray:
    if state.mode == "none":
        return dy
    y, s = state.y, state.scale
    if state.mode == "l2":
        dx = dy - y * np.einsum("kc,kc->k", y, dy)[:, None]
    else:
        dx = dy - dy.mean(axis=1, keepdims=True)
        dx -= y * (np.einsum("kc,kc->k", y, dy)[:, None] * (1.0 / y.shape[1]))
    dx /= s
    return dx


def normalize(x, mode: str) -> tuple[np.ndarray, NormState]:
    """Normalise each sample's feature vector (each row of ``x`` (K, C)) over its channels.

    ``none``: ``y = x``. ``l2``: ``y = x / sqrt(|x|^2 + e^2)``. ``standardized``:
    ``y = (x - mean_c x) / sqrt(var_c x + e^2)`` with the population variance (divisor C).
    ``e`` = :data:`NORM_EPS`. Returns ``(y, state)``, y float64 (K, C) (for ``none`` and a
    float64 input, ``x`` itself).
    """
    mode = check_feature_norm(mode)
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError(f"features to normalise must be a 2-D array (K, C) with C >= 1, got shape {x.shape}")
    return _normalize(x, mode)


def normalize_backward(dy, state: NormState) -> np.ndarray:
    """Vector-Jacobian product of :func:`normalize`: ``dx = (dy/dx)^T dy`` (K, C) float64.

    ``l2``: ``dx = (dy - y (y.dy)) / s``. ``standardized``:
    ``dx = (dy - mean_c dy - y mean_c(y dy)) / s``. Both follow from ``ds/dx = x/s`` (l2) and
    ``ds/dx = (x - mean x)/(C s)`` (standardized), the floor ``e`` inside ``s`` included.
    """
    return _normalize_backward(np.asarray(dy, dtype=np.float64), state)


# --- per-sample distances on one block --------------------------------------------------
# Each kernel takes float64 blocks f, m (B, C) and the per-sample weight w = 1/K, and returns
# (w * sum over the block of d, w * dd/dm (B, C) or None). Kernels never modify f or m.

def _l1(f, m, w, with_grad):
    c = f.shape[1]
    diff = f - m
    value = w / c * float(np.abs(diff).sum())
    if not with_grad:
        return value, None
    g = np.sign(diff)  # sign(0) = 0: the subgradient at f_c == m_c (not in place: ~10x slower)
    g *= -w / c
    return value, g


def _l2(f, m, w, with_grad):
    c = f.shape[1]
    diff = f - m
    value = w / c * float(np.einsum("kc,kc->", diff, diff))
    if not with_grad:
        return value, None
    diff *= -2.0 * w / c
    return value, diff


def _dotproduct(f, m, w, with_grad):
    value = -w * float(np.einsum("kc,kc->", f, m))
    return value, (f * -w if with_grad else None)


def _cosine_parts(f, m):
    nf, nm = _norm(f), _norm(m)
    p = np.einsum("kc,kc->k", f, m)[:, None]
    return nf, nm, p, p / (nf * nm)


def _dcos_dm(f, m, nf, nm, p):
    """d cos / d m (B, C) for ``cos = p / (nf nm)``, ``nm = sqrt(|m|^2 + e^2)`` (dnm/dm = m / nm)."""
    inv = 1.0 / (nf * nm)
    g = f * inv
    g -= m * (p * inv / (nm * nm))
    return g


def _cosine(f, m, w, with_grad):
    nf, nm, p, cos = _cosine_parts(f, m)
    value = -w * float(cos.sum())
    if not with_grad:
        return value, None
    g = _dcos_dm(f, m, nf, nm, p)
    g *= -w
    return value, g


def _l1cosine(f, m, w, with_grad):
    c = f.shape[1]
    nf, nm, p, cos = _cosine_parts(f, m)
    diff = f - m
    e = np.abs(diff)
    e *= -L1COSINE_LAMBDA
    np.exp(e, out=e)
    gbar = e.mean(axis=1, keepdims=True)
    value = -w * float((cos * gbar).sum())
    if not with_grad:
        return value, None
    # d/dm_j exp(-lambda |f_j - m_j|) = lambda sign(f_j - m_j) exp(-lambda |f_j - m_j|)
    g = _dcos_dm(f, m, nf, nm, p)
    g *= gbar
    e *= np.sign(diff)
    e *= cos * (L1COSINE_LAMBDA / c)
    g += e
    g *= -w
    return value, g


def _dice(f, m, w, with_grad):
    inter = np.einsum("kc,kc->k", f, m)[:, None]
    u = f.sum(axis=1, keepdims=True) + m.sum(axis=1, keepdims=True)
    den = u * u + DICE_EPS * DICE_EPS
    r = u / den  # the regularised 1/U
    value = -2.0 * w * float((inter * r).sum())
    if not with_grad:
        return value, None
    dr = (DICE_EPS * DICE_EPS - u * u) / (den * den)  # dr/dU; dI/dm_j = f_j, dU/dm_j = 1
    g = f * r
    g += inter * dr
    g *= -2.0 * w
    return value, g


_KERNELS = {"l1": _l1, "l2": _l2, "cosine": _cosine, "l1cosine": _l1cosine, "dice": _dice,
            "dotproduct": _dotproduct}


def _per_sample(key: str, f, m, mode: str, with_grad: bool):
    """(1/K) sum_k d(norm(f_k), norm(m_k)) and its gradient w.r.t. the raw m, block by block."""
    kernel = _KERNELS[key]
    k, c = f.shape
    w = 1.0 / k
    out = np.empty((k, c)) if with_grad else None
    total = 0.0
    for sl in _row_blocks(k, c):
        fb, _ = _normalize(f[sl], mode)
        mb, state = _normalize(m[sl], mode)
        v, g = kernel(fb, mb, w, with_grad)
        total += v
        if with_grad:
            out[sl] = _normalize_backward(g, state)
    return total, out


def _ncc(f, m, mode: str, with_grad: bool):
    """NCC over all K samples per channel, from per-block centred sums merged exactly (Chan et
    al.'s pairwise update), then a second pass for the gradient (normalisation recomputed there,
    so no (K, C) temporary besides the output)."""
    k, c = f.shape
    n = 0
    mf = np.zeros(c)
    mm = np.zeros(c)
    sff = np.zeros(c)
    smm = np.zeros(c)
    sfm = np.zeros(c)
    for sl in _row_blocks(k, c):
        fb, _ = _normalize(f[sl], mode)
        mb, _ = _normalize(m[sl], mode)
        nb = fb.shape[0]
        bf = fb.mean(axis=0)
        bm = mb.mean(axis=0)
        fb = fb - bf
        mb = mb - bm
        df = bf - mf
        dm = bm - mm
        t = n * nb / (n + nb)
        sff += np.einsum("kc,kc->c", fb, fb) + t * df * df
        smm += np.einsum("kc,kc->c", mb, mb) + t * dm * dm
        sfm += np.einsum("kc,kc->c", fb, mb) + t * df * dm
        mf += df * (nb / (n + nb))
        mm += dm * (nb / (n + nb))
        n += nb
    floor = k * NCC_VAR_EPS
    vf = sff + floor
    vm = smm + floor
    d = np.sqrt(vf * vm)
    value = -float((sfm / d).sum()) / c
    if not with_grad:
        return value, None
    # dvalue/dm_kc = -(1/C)[fc_kc / D_c - u_c mc_kc / (vm_c D_c)]; the centring of m drops out
    # of du/dm and dvm/dm because sum_k fc = sum_k mc = 0.
    a = -1.0 / (c * d)
    b = sfm / (c * vm * d)
    out = np.empty((k, c))
    for sl in _row_blocks(k, c):
        fb, _ = _normalize(f[sl], mode)
        mb, state = _normalize(m[sl], mode)
        g = fb - mf
        g *= a
        g += (mb - mm) * b
        out[sl] = _normalize_backward(g, state)
    return value, out


def _evaluate(key: str, f, m, mode: str, with_grad: bool):
    if key == "ncc":
        return _ncc(f, m, mode, with_grad)
    return _per_sample(key, f, m, mode, with_grad)


def _public(key: str):
    def fn(f, m, with_grad: bool = True):
        f, m = _pair(f, m)
        return _evaluate(key, f, m, "none", with_grad)

    fn.__name__ = key
    fn.__doc__ = f"Distance ``{key}`` (see the module docstring): ``(f, m, with_grad) -> (value, dvalue/dm)``."
    return fn


#: name -> function ``(f, m, with_grad=True) -> (value, dvalue/dm (K, C) or None)`` on (K, C) arrays.
DISTANCES: dict[str, Callable] = {key: _public(key) for key in
                                  DISTANCE_NAMES}

#: Distances whose value is the mean of per-sample terms (all but NCC).
PER_SAMPLE_DISTANCES = frozenset(DISTANCES) - {"ncc"}


def distance(name: str, f, m, *, with_grad: bool = True) -> tuple[float, np.ndarray | None]:
    """Distance ``name`` between fixed features ``f`` (K, C) and moving features ``m`` (K, C).

    Returns ``(value, dvalue/dm)`` with the gradient (K, C) float64, or None without
    ``with_grad``. Raises :class:`ConfigError` for an unknown name, ``ValueError`` for arrays
    that are not two equal non-empty (K, C) arrays.
    """
    key = check_distance(name)
    f, m = _pair(f, m)
    return _evaluate(key, f, m, "none", with_grad)


def layer_value_and_grad(f, m, distance_name: str, feature_norm: str = "none", *,
                         with_grad: bool = True) -> tuple[float, np.ndarray | None]:
    """One layer's IMPACT term: normalise ``f`` and ``m`` (K, C) per sample, apply the
    distance, and return ``(value, dvalue/dm)`` with the gradient (K, C) float64 with respect
    to the UN-normalised ``m`` (None without ``with_grad``).

    Raises :class:`ConfigError` for unknown names and for ``dice`` with ``standardized``
    (standardised vectors sum to 0 over channels, so the Dice denominator vanishes).
    """
    key = check_distance(distance_name)
    mode = check_feature_norm(feature_norm)
    if key == "dice" and mode == "standardized":
        raise ConfigError("distance=dice with feature_norm=standardized is undefined: standardised feature "
                          "vectors sum to 0 over channels, so the Dice denominator is 0; use feature_norm none "
                          "or l2, or another distance")
    f, m = _pair(f, m)
    return _evaluate(key, f, m, mode, with_grad)
