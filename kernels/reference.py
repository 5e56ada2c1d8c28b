"""NumPy reference kernels: the specification every other backend is tested against.

Readability first: vectorised over points, written from the definitions (the B-spline weights come
from ``_beta3`` below, not from the closed forms the fast kernels use), so they are an independent
check. Fast enough for tests and for small problems only.

Coordinates
-----------
* Image ops take *continuous voxel indices* ``p = (i, j, k)`` into an array indexed ``img[i, j, k]``
  (voxel centres at integers).
* B-spline transform ops take *continuous control-grid indices* ``t`` (control point ``(a, b, c)``
  at integer ``t``); callers map mm -> grid index and scale derivatives by 1 / grid spacing (mm).
* Points are ``(N, 3)`` arrays (float64 unless stated); resampling ops also accept ``(X, Y, Z, 3)``.

Boundaries
----------
* ``cubic_sample``: whole-sample mirror of coefficients and coordinates, exactly as
  ``scipy.ndimage.map_coordinates(coef, p.T, order=3, mode='mirror', prefilter=False)``.
* Resampling ops (``cubic_sample_values``, ``linear_sample``, ``nearest_sample``): a point is inside
  iff ``-0.5 <= p_d <= n_d - 0.5`` on every axis; outside points (and NaN) get ``fill``.
* B-spline transform ops: control points outside the grid count as zero (zero-extended grid);
  a point with a non-finite (or ``|t| >= 1e15``) coordinate gives a zero displacement and
  Jacobian and scatters nothing.
"""

import numpy as np

from fastimpact.errors import ConfigError

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
    "cubic_sample_channels",
    "cubic_sample_channels_values",
    "prefilter_channels",
    "gather_patches",
    "sample_patches",
    "sample_patches_warped",
    "random_indices",
]

_CHUNK = 32768  # points per gather block: bounds the (chunk, 4, 4, 4) temporaries


# ----------------------------------------------------------------------------- helpers
def _beta3(x):
    """Cubic B-spline beta3 (vectorised), from its definition."""
    a = np.abs(x)
    return np.where(a < 1.0, 2.0 / 3.0 - a**2 + 0.5 * a**3, np.where(a < 2.0, (2.0 - a) ** 3 / 6.0, 0.0))


def _beta3_d1(x):
    a = np.abs(x)
    s = np.where(x >= 0.0, 1.0, -1.0)
    return s * np.where(a < 1.0, 1.5 * a**2 - 2.0 * a, np.where(a < 2.0, -0.5 * (2.0 - a) ** 2, 0.0))


def _points(points, name="points"):
    p = np.asarray(points)
    if p.ndim < 2 or p.shape[-1] != 3:
        raise ConfigError(
            f"{name} must have shape (N, 3) or (X, Y, Z, 3), got {p.shape}; pass one 3-vector per point"
        )
    return p


def _check_volume(arr, name):
    if np.ndim(arr) != 3:
        raise ConfigError(
            f"{name} must be a 3-D array, got shape {np.shape(arr)}; pass a single-channel volume"
        )


def _check_grid(coef):
    if np.ndim(coef) != 4 or np.shape(coef)[3] != 3:
        raise ConfigError(
            f"B-spline coefficients must have shape (gx, gy, gz, 3), got {np.shape(coef)}; "
            "pass the control grid"
        )


def _mirror_index(i, n):
    """Whole-sample mirror (-1 -> 1, n -> n-2) of integer indices into [0, n-1]."""
    if n == 1:
        return np.zeros_like(i)
    period = 2 * n - 2
    i = np.mod(i, period)
    return np.where(i >= n, period - i, i)


def _mirror_coord(x, n):
    """Fold continuous indices into [0, n-1]; returns (folded, d folded / d x)."""
    if n == 1:
        return np.zeros_like(x), np.ones_like(x)
    period = 2.0 * n - 2.0
    r = np.mod(x, period)
    flip = r > n - 1.0
    return np.where(flip, period - r, r), np.where(flip, -1.0, 1.0)


def _usable(t):
    """Coordinates the B-spline transform ops accept: finite and |t| < 1e15 (so floor fits int64)."""
    with np.errstate(invalid="ignore"):
        return np.abs(t) < 1e15


def _float_out_dtype(dtype):
    return np.dtype(dtype) if np.issubdtype(dtype, np.floating) else np.dtype(np.float64)


# ----------------------------------------------------------------------------- B-spline weights
def bspline_weights(t):
    """Cubic B-spline tap indices and weights of continuous grid indices.

    Parameters
    ----------
    t : (N, 3) float array of continuous indices.

    Returns
    -------
    base : (N, 3) int64, ``floor(t) - 1`` (first of the four taps per axis); a non-finite or
        huge (``|t| >= 1e15``) coordinate is treated as 0.
    w : (N, 3, 4) float64, ``w[n, d, k] = beta3(t[n, d] - (base[n, d] + k))``.
    dw : (N, 3, 4) float64, ``d w[n, d, k] / d t[n, d]``.
    """
    t = _points(t, "t").reshape(-1, 3).astype(np.float64)
    t = np.where(_usable(t), t, 0.0)  # base/weights of unusable coordinates are those of 0
    fl = np.floor(t)
    base = fl.astype(np.int64) - 1
    dist = t[:, :, None] - (base[:, :, None] + np.arange(4))
    return base, _beta3(dist), _beta3_d1(dist)


# ----------------------------------------------------------------------------- image sampling
def _cubic_core(coef, pts, with_grad):
    """Mirror-boundary cubic B-spline evaluation at (M, 3) float64 points, in float64."""
    shape = coef.shape
    m = len(pts)
    values = np.empty(m)
    grads = np.empty((m, 3)) if with_grad else None
    for s in range(0, m, _CHUNK):
        p = pts[s : s + _CHUNK]
        finite = _usable(p).all(axis=1)
        p = np.where(finite[:, None], p, 0.0)
        y = np.empty_like(p)
        sign = np.empty_like(p)
        for d in range(3):
            y[:, d], sign[:, d] = _mirror_coord(p[:, d], shape[d])
        base, w, dw = bspline_weights(y)
        taps = [_mirror_index(base[:, d, None] + np.arange(4), shape[d]) for d in range(3)]
        c = coef[taps[0][:, :, None, None], taps[1][:, None, :, None], taps[2][:, None, None, :]]
        c = c.astype(np.float64)  # (n, 4, 4, 4)
        wx, wy, wz = w[:, 0], w[:, 1], w[:, 2]
        values[s : s + _CHUNK] = np.where(finite, np.einsum("nabc,na,nb,nc->n", c, wx, wy, wz), np.nan)
        if with_grad:
            dx, dy, dz = dw[:, 0], dw[:, 1], dw[:, 2]
            g = np.stack(
                [
                    np.einsum("nabc,na,nb,nc->n", c, dx, wy, wz),
                    np.einsum("nabc,na,nb,nc->n", c, wx, dy, wz),
                    np.einsum("nabc,na,nb,nc->n", c, wx, wy, dz),
                ],
                axis=1,
            )
            grads[s : s + _CHUNK] = np.where(finite[:, None], g * sign, np.nan)
    return values, grads


def cubic_sample(coef, points):
    """Cubic B-spline interpolation with gradient (the registration hot path).

    Parameters
    ----------
    coef : (nx, ny, nz) float32/float64 cubic B-spline coefficients, as
        ``scipy.ndimage.spline_filter(img, order=3, mode='mirror')`` returns.
    points : (N, 3) float64 continuous voxel indices.

    Returns
    -------
    values : (N,) in coef's dtype; equal to ``map_coordinates(coef, points.T, order=3,
        mode='mirror', prefilter=False)``.
    grads : (N, 3) in coef's dtype, d value / d index per axis (per voxel, not per mm).

    Points outside [0, n-1] are folded back by whole-sample mirroring (the gradient is that of the
    mirrored signal); points with a non-finite (or ``|p| >= 1e15``) coordinate give NaN.
    """
    _check_volume(coef, "coef")
    pts = _points(points).reshape(-1, 3).astype(np.float64)
    values, grads = _cubic_core(np.asarray(coef), pts, True)
    out_dtype = _float_out_dtype(coef.dtype)
    return values.astype(out_dtype), grads.astype(out_dtype)


def _inside(pts, shape):
    ok = np.ones(len(pts), dtype=bool)
    for d in range(3):
        ok &= (pts[:, d] >= -0.5) & (pts[:, d] <= shape[d] - 0.5)
    return ok


def cubic_sample_values(coef, points, fill=0.0):
    """Cubic B-spline resampling (no gradient).

    coef as in :func:`cubic_sample`; ``points`` (N, 3) or (X, Y, Z, 3), float32 or float64 voxel
    indices. Returns values of shape (N,) or (X, Y, Z) in coef's dtype; points outside
    ``[-0.5, n - 0.5]`` on any axis get ``fill`` (inside ones use the mirror boundary).
    """
    _check_volume(coef, "coef")
    p = _points(points)
    pts = p.reshape(-1, 3).astype(np.float64)
    ok = _inside(pts, coef.shape)
    out = np.full(len(pts), fill, dtype=np.float64)
    out[ok] = _cubic_core(np.asarray(coef), pts[ok], False)[0]
    return out.astype(_float_out_dtype(coef.dtype)).reshape(p.shape[:-1])


def linear_sample(img, points, fill=0.0):
    """Trilinear resampling.

    ``img`` (nx, ny, nz); ``points`` (N, 3) or (X, Y, Z, 3) voxel indices. Points outside
    ``[-0.5, n - 0.5]`` get ``fill``; inside, neighbour indices are clamped into [0, n-1] so the
    half-voxel border takes edge values. Output dtype: img's if floating, else float64.
    """
    _check_volume(img, "img")
    img = np.asarray(img)
    p = _points(points)
    pts = p.reshape(-1, 3).astype(np.float64)
    ok = _inside(pts, img.shape)
    q = np.where(ok[:, None], pts, 0.0)
    i0 = np.floor(q).astype(np.int64)
    f = q - i0
    out = np.zeros(len(pts))
    n = np.array(img.shape)
    for a in (0, 1):
        for b in (0, 1):
            for c in (0, 1):
                off = np.array([a, b, c])
                idx = np.clip(i0 + off, 0, n - 1)
                wt = np.prod(np.where(off == 1, f, 1.0 - f), axis=1)
                out += wt * img[idx[:, 0], idx[:, 1], idx[:, 2]]
    out = np.where(ok, out, fill)
    return out.astype(_float_out_dtype(img.dtype)).reshape(p.shape[:-1])


def nearest_sample(img, points, fill=0):
    """Nearest-neighbour resampling that keeps img's dtype (label maps, integers).

    Rounds half up (index ``floor(p + 0.5)``, clamped into [0, n-1]); points outside
    ``[-0.5, n - 0.5]`` get ``fill`` (cast to img's dtype).
    """
    _check_volume(img, "img")
    img = np.asarray(img)
    p = _points(points)
    pts = p.reshape(-1, 3).astype(np.float64)
    ok = _inside(pts, img.shape)
    q = np.where(ok[:, None], pts, 0.0)
    idx = np.clip(np.floor(q + 0.5).astype(np.int64), 0, np.array(img.shape) - 1)
    out = np.full(len(pts), np.asarray(fill).astype(img.dtype), dtype=img.dtype)
    out[ok] = img[idx[ok, 0], idx[ok, 1], idx[ok, 2]]
    return out.reshape(p.shape[:-1])


# ----------------------------------------------------------------------------- B-spline transform
def _support(coef_shape, t):
    """Per point: finite mask, base, w, dw, and per-axis validity of the taps (zero extension)."""
    finite = _usable(t).all(axis=1)
    base, w, dw = bspline_weights(np.where(finite[:, None], t, 0.0))
    taps = base[:, :, None] + np.arange(4)  # (N, 3, 4)
    valid = (taps >= 0) & (taps < np.array(coef_shape[:3])[None, :, None])
    valid &= finite[:, None, None]
    return taps, valid, w, dw


def bspline_eval(coef, t):
    """Displacement of a cubic B-spline transform at continuous grid indices.

    ``coef`` (gx, gy, gz, 3) float64 control-point vectors; ``t`` (N, 3) float64 grid indices.
    Returns (N, 3) float64: ``sum_{a,b,c} w_a w_b w_c coef[base+a, base+b, base+c, :]`` over
    the existing control points (missing ones count as zero).
    """
    _check_grid(coef)
    t = _points(t, "t").reshape(-1, 3).astype(np.float64)
    taps, valid, w, _ = _support(coef.shape, t)
    out = np.zeros((len(t), 3))
    for a in range(4):
        for b in range(4):
            for c in range(4):
                ok = valid[:, 0, a] & valid[:, 1, b] & valid[:, 2, c]
                wt = np.where(ok, w[:, 0, a] * w[:, 1, b] * w[:, 2, c], 0.0)
                i = np.where(ok, taps[:, 0, a], 0)
                j = np.where(ok, taps[:, 1, b], 0)
                k = np.where(ok, taps[:, 2, c], 0)
                out += wt[:, None] * coef[i, j, k]
    return out


def bspline_eval_jacobian(coef, t):
    """Jacobian of :func:`bspline_eval`: (N, 3, 3) float64, ``J[n, c, d] = d u_c / d t_d``.

    Derivative per grid index; divide column d by the grid spacing (mm) for d u / d x.
    """
    _check_grid(coef)
    t = _points(t, "t").reshape(-1, 3).astype(np.float64)
    taps, valid, w, dw = _support(coef.shape, t)
    out = np.zeros((len(t), 3, 3))
    for a in range(4):
        for b in range(4):
            for c in range(4):
                ok = valid[:, 0, a] & valid[:, 1, b] & valid[:, 2, c]
                i = np.where(ok, taps[:, 0, a], 0)
                j = np.where(ok, taps[:, 1, b], 0)
                k = np.where(ok, taps[:, 2, c], 0)
                v = np.where(ok[:, None], coef[i, j, k], 0.0)  # (N, 3)
                out[:, :, 0] += v * (dw[:, 0, a] * w[:, 1, b] * w[:, 2, c])[:, None]
                out[:, :, 1] += v * (w[:, 0, a] * dw[:, 1, b] * w[:, 2, c])[:, None]
                out[:, :, 2] += v * (w[:, 0, a] * w[:, 1, b] * dw[:, 2, c])[:, None]
    return out


def _grid_shape(grid_shape):
    gs = tuple(int(s) for s in grid_shape)
    if len(gs) == 4 and gs[3] == 3:
        gs = gs[:3]
    if len(gs) != 3 or min(gs) < 1:
        raise ConfigError(f"grid_shape must be (gx, gy, gz) with positive sizes, got {tuple(grid_shape)}")
    return gs


def _check_out(out, shape):
    if not (isinstance(out, np.ndarray) and out.shape == shape and out.dtype == np.float64 and out.flags.c_contiguous):
        raise ConfigError(f"out must be a C-contiguous float64 array of shape {shape}; pass None to allocate")


def bspline_scatter(t, g, grid_shape, out=None):
    """Adjoint of :func:`bspline_eval`: spread per-point vectors onto the control grid.

    ``t`` (N, 3) grid indices, ``g`` (N, 3) vectors (e.g. dMetric/du per sample); ``grid_shape``
    (gx, gy, gz). Returns (gx, gy, gz, 3) float64 with
    ``out[base+a, base+b, base+c, :] += w_a w_b w_c g[n, :]`` over existing control points, so that
    ``<bspline_eval(c, t), g> == <c, bspline_scatter(t, g, c.shape[:3])>``. ``out``: optional
    (gx, gy, gz, 3) float64 buffer that receives the result (it is overwritten, not added to).
    """
    gs = _grid_shape(grid_shape)
    if out is not None:
        _check_out(out, gs + (3,))
    t = _points(t, "t").reshape(-1, 3).astype(np.float64)
    g = np.asarray(g, dtype=np.float64).reshape(-1, 3)
    if len(g) != len(t):
        raise ConfigError(f"g must have one 3-vector per point: got {len(g)} vectors for {len(t)} points")
    taps, valid, w, _ = _support(gs, t)
    acc = np.zeros(gs + (3,))
    for a in range(4):
        for b in range(4):
            for c in range(4):
                ok = valid[:, 0, a] & valid[:, 1, b] & valid[:, 2, c]
                wt = w[ok, 0, a] * w[ok, 1, b] * w[ok, 2, c]
                np.add.at(acc, (taps[ok, 0, a], taps[ok, 1, b], taps[ok, 2, c]), wt[:, None] * g[ok])
    if out is None:
        return acc
    out[...] = acc
    return out


def _dense_args(shape, t0, dt, dtype):
    """Validated (shape, t0, dt, dtype) of bspline_dense."""
    if len(shape) != 3 or min(int(s) for s in shape) < 1:
        raise ConfigError(f"shape must be (X, Y, Z) with positive sizes, got {tuple(shape)}")
    if len(t0) != 3 or len(dt) != 3:
        raise ConfigError(f"t0 and dt must hold 3 values (one per axis), got {tuple(t0)} and {tuple(dt)}")
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ConfigError(f"bspline_dense dtype must be float32 or float64, got {dtype}; pick one of those")
    return tuple(int(s) for s in shape), [float(v) for v in t0], [float(v) for v in dt], dtype


def _axis_matrix(n_out, t0, dt, g):
    """(n_out, g) matrix of 1-D weights: row i holds beta3(t0 + i*dt - a) for control point a."""
    t = t0 + dt * np.arange(n_out)
    return _beta3(t[:, None] - np.arange(g)[None, :])


def bspline_dense(coef, shape, t0, dt, dtype=np.float64):
    """Dense displacement field on an axis-aligned voxel grid.

    Voxel (i, j, k) of an image of ``shape`` (X, Y, Z) sits at grid index
    ``(t0[0] + i*dt[0], t0[1] + j*dt[1], t0[2] + k*dt[2])``. Returns (X, Y, Z, 3) in ``dtype``,
    equal to :func:`bspline_eval` at those points. Written as a separable tensor product
    ``out = sum Wx[i,a] Wy[j,b] Wz[k,c] coef[a,b,c]``.
    """
    _check_grid(coef)
    (X, Y, Z), t0, dt, dtype = _dense_args(shape, t0, dt, dtype)
    gx, gy, gz, _ = coef.shape
    wx = _axis_matrix(X, t0[0], dt[0], gx)
    wy = _axis_matrix(Y, t0[1], dt[1], gy)
    wz = _axis_matrix(Z, t0[2], dt[2], gz)
    tmp = np.einsum("kc,abcd->abkd", wz, coef)
    tmp = np.einsum("jb,abkd->ajkd", wy, tmp)
    out = np.tensordot(wx, tmp, axes=(1, 0))
    return out.astype(dtype)


def points_affine(idx, A):
    """Apply a 4x4 homogeneous matrix to (N, 3) points: ``idx @ A[:3, :3].T + A[:3, 3]`` (float64)."""
    idx = _points(idx, "idx")
    A = _matrix(A, (4, 4), "A")
    return idx.astype(np.float64, copy=False) @ A[:3, :3].T + A[:3, 3]


def _matrix(M, shape, name):
    M = np.ascontiguousarray(M, dtype=np.float64)
    if M.shape != shape:
        what = "a homogeneous affine" if shape == (4, 4) else "the linear part of an affine"
        raise ConfigError(f"{name} must be a {shape[0]}x{shape[1]} matrix, got shape {M.shape}; pass {what}")
    return M


def warp_sample(coef_img, idx_fixed, A_f2m, bs_coef, A_f2grid, W2M):
    """Fused hot path: map fixed voxels through affine + B-spline and sample the moving image.

    Parameters
    ----------
    coef_img : (nx, ny, nz) float32/float64 cubic B-spline coefficients of the moving image.
    idx_fixed : (N, 3) float64 fixed-image voxel indices (the samples).
    A_f2m : (4, 4) fixed voxel index -> moving voxel index of the affine part.
    bs_coef : (gx, gy, gz, 3) float64 control-point displacements in world units (mm).
    A_f2grid : (4, 4) fixed voxel index -> control-grid index.
    W2M : (3, 3) linear part of world (mm) -> moving voxel index (turns u into index units).

    With ``t = A_f2grid . idx`` and ``u = bspline_eval(bs_coef, t)``, the moving point is
    ``m = A_f2m . idx + W2M @ u``. Returns ``(values (N,), grads (N, 3), m (N, 3), t (N, 3))``:
    ``values, grads = cubic_sample(coef_img, m)`` (grads per moving voxel index, image dtype),
    ``m`` and ``t`` float64. The metric gradient w.r.t. ``u`` is ``grads @ W2M``, and
    ``bspline_scatter(t, ...)`` takes it to the control grid.
    """
    A_f2m = _matrix(A_f2m, (4, 4), "A_f2m")
    A_f2grid = _matrix(A_f2grid, (4, 4), "A_f2grid")
    W2M = _matrix(W2M, (3, 3), "W2M")
    idx = _points(idx_fixed, "idx_fixed").reshape(-1, 3).astype(np.float64)
    t = points_affine(idx, A_f2grid)
    u = bspline_eval(bs_coef, t)
    m = points_affine(idx, A_f2m) + u @ W2M.T
    values, grads = cubic_sample(coef_img, m)
    return values, grads, m, t


def affine_grid(shape, A, field=None, L=None, dtype=np.float64):
    """Dense mapped coordinates of a voxel grid: ``A idx (+ L field[idx])``.

    shape: (X, Y, Z) voxel grid; A: 4x4 homogeneous matrix applied to the voxel index (i, j, k);
    field: optional (X, Y, Z, 3) vectors added through the 3x3 matrix ``L``.
    Returns (X, Y, Z, 3) of ``dtype``. Used for the affine part of displacement fields
    (A maps an index to a displacement) and for resampling (A maps a reference voxel to a moving
    voxel index and L converts a world displacement to moving-index units).
    """
    shape = tuple(int(n) for n in shape)
    A = _matrix(A, (4, 4), "A")
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), axis=-1)
    out = idx @ A[:3, :3].T + A[:3, 3]
    if field is not None:
        L = _matrix(L, (3, 3), "L")
        f = np.asarray(field, dtype=np.float64)
        if f.shape != shape + (3,):
            raise ConfigError(f"field must have shape {shape + (3,)}, got {f.shape}; pass a field on the same grid")
        out = out + f @ L.T
    return out.astype(dtype, copy=False)


def sample_pairs(flat, fixed_values, fixed_shape, f2m, moving_coef, moving_mask=None, bs_coef=None, f2grid=None,
                 w2m=None):
    """Fixed/moving sample pairs of one iteration, with the points that map outside dropped.

    flat: (N,) int64 flat indices of fixed voxels (C order of ``fixed_shape``); fixed_values: the
    fixed image raveled (float32/64). A fixed voxel index i maps to the moving voxel index
    ``q = f2m i + W2M u(t)`` with ``t = f2grid i`` when a B-spline grid ``bs_coef``
    (gx, gy, gz, 3) is given (u in world mm, ``w2m`` the world->moving-index 3x3 matrix), else
    ``q = f2m i``. A point is kept when 0 <= q <= n - 1 on every moving axis and, with a mask,
    the nearest mask voxel is non-zero. Returns, for the K kept points in input order:
    ``f`` (K,), ``m`` (K,) moving values (cubic B-spline of ``moving_coef``), ``gy`` (K, 3) the
    moving gradient w.r.t. the world point (``w2m^T dm/dq``), ``pts`` (K, 3) the grid indices t
    (with a B-spline) or the fixed voxel indices, and ``keep`` (N,) bool.
    """
    flat = np.asarray(flat, dtype=np.int64)
    idx = np.stack(np.unravel_index(flat, tuple(fixed_shape)), axis=1).astype(np.float64)
    f2m = _matrix(f2m, (4, 4), "f2m")
    q = idx @ f2m[:3, :3].T + f2m[:3, 3]
    if bs_coef is not None:
        f2grid = _matrix(f2grid, (4, 4), "f2grid")
        w2m = _matrix(w2m, (3, 3), "w2m")
        t = idx @ f2grid[:3, :3].T + f2grid[:3, 3]
        q = q + bspline_eval(bs_coef, t) @ w2m.T
        pts = t
    else:
        w2m = np.eye(3) if w2m is None else _matrix(w2m, (3, 3), "w2m")
        pts = idx
    hi = np.asarray(moving_coef.shape, dtype=np.float64) - 1.0
    keep = np.all((q >= 0.0) & (q <= hi), axis=1)
    if moving_mask is not None and keep.any():
        r = np.floor(q[keep] + 0.5).astype(np.intp)
        keep[np.flatnonzero(keep)[np.asarray(moving_mask)[r[:, 0], r[:, 1], r[:, 2]] == 0]] = False
    m, gq = cubic_sample(moving_coef, q[keep])
    gy = gq.astype(np.float64) @ w2m
    f = np.asarray(fixed_values).ravel()[flat[keep]].astype(np.float64)
    return f, m.astype(np.float64), gy, pts[keep], keep


def warp_cubic(coef, shape, A, field=None, L=None, fill=0.0):
    """Resample a cubic B-spline image on a voxel grid: ``cubic_sample_values(coef, q, fill)``
    with ``q = A idx (+ L field[idx])`` (see :func:`affine_grid`). Returns (X, Y, Z) of coef's dtype."""
    q = affine_grid(shape, A, field, L)
    return cubic_sample_values(coef, q, fill)


def cubic_sample_channels(coef, points):
    """Multi-channel cubic B-spline interpolation with gradient (feature maps: all channels of a
    point in one pass).

    coef : (nx, ny, nz, C) float32/float64, each channel prefiltered like :func:`cubic_sample`'s
        coefficients (``spline_filter`` over the three spatial axes); channel-last so that a tap
        reads the C values of a voxel contiguously.
    points : (N, 3) continuous voxel indices.
    Returns values (N, C) and grads (N, C, 3) (d value / d index), float64: channel c equals
    :func:`cubic_sample` of ``coef[..., c]`` (mirror boundary, NaN for non-finite points).
    """
    coef = np.asarray(coef)
    if coef.ndim != 4 or min(coef.shape) < 1:
        raise ConfigError(f"coef must be (nx, ny, nz, C) with positive sizes, got shape {coef.shape}")
    pts = _points(points).reshape(-1, 3).astype(np.float64)
    C = coef.shape[3]
    values = np.empty((len(pts), C))
    grads = np.empty((len(pts), C, 3))
    for c in range(C):
        v, g = _cubic_core(np.ascontiguousarray(coef[..., c]), pts, True)
        values[:, c] = v
        grads[:, c] = g
    return values, grads


def cubic_sample_channels_values(coef, points):
    """Values only of :func:`cubic_sample_channels`: (N, C) float64 (the fixed features, whose
    gradient the metric never needs)."""
    return cubic_sample_channels(coef, points)[0]


def prefilter_channels(data, inplace=False):
    """Cubic B-spline coefficients of a channel-last map ``data`` (X, Y, Z, C): each channel
    filtered along the three spatial axes with mirror boundaries (``scipy.ndimage.spline_filter1d``,
    the specification). Returns float32 (X, Y, Z, C), C-contiguous. ``inplace``: a backend may
    overwrite a float32 C-contiguous ``data`` and return it (saves a copy of a large map); the
    result is the same either way."""
    from scipy import ndimage

    out = np.asarray(data, dtype=np.float32)
    if out.ndim != 4:
        raise ConfigError(f"data must be (X, Y, Z, C), got shape {out.shape}")
    for axis in range(3):
        if out.shape[axis] > 1:
            out = ndimage.spline_filter1d(out, 3, axis=axis, mode="mirror", output=np.float64 if out.dtype ==
                                          np.float64 else np.float32)
    return np.ascontiguousarray(out, dtype=np.float32)



# ----------------------------------------------------------------------------- Jacobian-mode patches
def _point_list(arr, name):
    """(M, 3) float64 array of one 3-vector per row (patch centres and offsets are plain lists)."""
    a = np.asarray(arr)
    if a.ndim != 2 or a.shape[1] != 3:
        raise ConfigError(f"{name} must have shape (M, 3), got {a.shape}; pass one world point (mm) per row")
    return np.ascontiguousarray(a, dtype=np.float64)


def _patch_offsets(offsets, n):
    """Patch offsets as float64: (V, 3) shared by every centre, or (n, V, 3) one set per centre."""
    o = np.asarray(offsets)
    if o.ndim == 3 and o.shape[0] == n and o.shape[2] == 3:
        return np.ascontiguousarray(o, dtype=np.float64)
    if o.ndim != 2 or o.shape[1] != 3:
        raise ConfigError(f"offsets must have shape (V, 3) or (N, V, 3) with N = {n} centres, got {o.shape}; "
                          "pass one world offset (mm) per row, shared or per centre")
    return np.ascontiguousarray(o, dtype=np.float64)


def _patch_points(centres, offsets):
    """World points of every patch voxel: (N * V, 3), row n * V + v = centres[n] + offsets[v]
    (shared offsets (V, 3)) or centres[n] + offsets[n, v] (per-centre offsets (N, V, 3))."""
    c = _point_list(centres, "centres")
    o = _patch_offsets(offsets, len(c))
    o3 = o if o.ndim == 3 else o[None, :, :]
    return (c[:, None, :] + o3).reshape(-1, 3), len(c), o.shape[-2]


def sample_patches(coef, centres, offsets, w2i, fill=0.0):
    """Patches of a cubic B-spline image around world points (IMPACT Jacobian mode, fixed side).

    Parameters
    ----------
    coef : (nx, ny, nz) float32/float64 cubic B-spline coefficients (as for :func:`cubic_sample`).
    centres : (N, 3) world points (mm), the patch centres.
    offsets : (V, 3) world offsets (mm) of the patch voxels from their centre (e.g. a P^3 grid),
        shared by every centre, or (N, V, 3): one set per centre (e.g. a randomly oriented P x P
        plane per sample, for 2-D models).
    w2i : (4, 4) world (mm) -> continuous voxel index of ``coef``.
    fill : value of points with a non-finite (or ``|q| >= 1e15``) voxel index.

    Returns
    -------
    values : (N, V) float32; ``values[n, v]`` is :func:`cubic_sample`'s value at
        ``q = w2i (centres[n] + offsets[v])`` (``offsets[n, v]`` for per-centre offsets). Points
        outside ``[0, n-1]`` are mirrored exactly as there (a patch may reach past the image
        border); ``fill`` is only for non-finite points.
    """
    _check_volume(coef, "coef")
    w2i = _matrix(w2i, (4, 4), "w2i")
    p, n, v = _patch_points(centres, offsets)
    with np.errstate(invalid="ignore"):  # inf * 0: such points get fill
        q = p @ w2i[:3, :3].T + w2i[:3, 3]
    values, _ = _cubic_core(np.asarray(coef), q, False)
    values = np.where(_usable(q).all(axis=1), values, fill)
    return values.astype(np.float32).reshape(n, v)


def sample_patches_warped(coef, centres, offsets, affine, bs_coef, w2grid, w2i):
    """Patches of a cubic B-spline image read through an affine + B-spline transform, with the
    gradient (IMPACT Jacobian mode, moving side).

    Parameters
    ----------
    coef : (nx, ny, nz) float32/float64 cubic B-spline coefficients of the moving image.
    centres : (N, 3) world points (mm) of the patch centres, in the fixed (reference) space.
    offsets : (V, 3) world offsets (mm) of the patch voxels, shared, or (N, V, 3) per centre.
    affine : (4, 4) affine part of the transform, world -> world (mm).
    bs_coef : (gx, gy, gz, 3) B-spline control-point displacements (mm), zero-extended as in
        :func:`bspline_eval`; None means no B-spline (u = 0).
    w2grid : (4, 4) world (mm) -> continuous control-grid index (ignored when ``bs_coef`` is None).
    w2i : (4, 4) world (mm) -> continuous voxel index of ``coef``.

    For ``p = centres[n] + offsets[v]`` (or ``offsets[n, v]``) the moving point is
    ``y = affine[:3, :3] p + affine[:3, 3] + u(w2grid p)`` (mm) and ``q = w2i y``.

    Returns
    -------
    values : (N, V) float32, :func:`cubic_sample`'s value at q (mirror boundary; NaN where q is
        not finite).
    grads : (N, V, 3) float32, d value / d y per world axis (1/mm):
        ``w2i[:3, :3]^T (d value / d q)``.
    """
    _check_volume(coef, "coef")
    affine = _matrix(affine, (4, 4), "affine")
    w2i = _matrix(w2i, (4, 4), "w2i")
    w2grid = _matrix(w2grid, (4, 4), "w2grid") if bs_coef is not None else None
    p, n, v = _patch_points(centres, offsets)
    with np.errstate(invalid="ignore"):  # inf * 0 in the products: such points give NaN anyway
        y = points_affine(p, affine)
        if bs_coef is not None:
            y = y + bspline_eval(bs_coef, points_affine(p, w2grid))
        q = points_affine(y, w2i)
    values, gq = _cubic_core(np.asarray(coef), q, True)
    g = gq @ w2i[:3, :3]  # row vector times the matrix: w2i^T applied to each gradient
    return values.astype(np.float32).reshape(n, v), g.astype(np.float32).reshape(n, v, 3)


def gather_patches(data, centres, offsets):
    """Patches of a volume on its own grid: ``data`` (X, Y, Z); ``centres`` (N, 3) and ``offsets``
    (V, 3) integer voxel indices. Returns (N, V) float32 ``data[centre + offset]`` with indices
    outside mirrored like :func:`cubic_sample` (which interpolates prefiltered coefficients to
    exactly these values at grid points)."""
    data = np.asarray(data)
    if data.ndim != 3:
        raise ConfigError(f"data must be a 3-D volume, got shape {data.shape}")
    centres = np.asarray(centres, dtype=np.int64).reshape(-1, 3)
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 3)
    flat = np.zeros((len(centres), len(offsets)), dtype=np.int64)
    for d in range(3):
        flat = flat * data.shape[d] + _mirror_index(centres[:, d, None] + offsets[None, :, d], data.shape[d])
    return np.asarray(data, dtype=np.float32).ravel()[flat]


# ----------------------------------------------------------------------------- random sampling
def _random_args(key, counter, n, n_total):
    n, n_total = int(n), int(n_total)
    if n < 0:
        raise ConfigError(f"number of draws must be >= 0, got {n}")
    if not 1 <= n_total <= 2**32 - 1:
        raise ConfigError(f"random_indices draws from 1 .. 2^32 - 1 candidates, got {n_total}; "
                          "register a smaller image or use a fixed mask")
    return np.uint64(int(key) % 2**64), np.uint64(int(counter) % 2**32), n, n_total


def random_indices(key, counter, n, n_total):
    """``n`` uniform indices in [0, n_total) (int64), draw ``i`` a pure function of (key, counter, i).

    The counter-based generator of ``_counter_rng`` (SplitMix64 output function of a Weyl
    sequence), written out here with NumPy uint64 arrays (which wrap modulo 2^64): call
    ``counter`` of a sampler with ``key`` gives the same indices on every backend.
    """
    key, counter, n, n_total = _random_args(key, counter, n, n_total)
    i = np.arange(n, dtype=np.uint64)
    z = key + np.uint64(0x9E3779B97F4A7C15) * ((counter << np.uint64(32)) + i + np.uint64(1))
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return ((z >> np.uint64(32)) * np.uint64(n_total) >> np.uint64(32)).astype(np.int64)
