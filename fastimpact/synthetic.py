"""Known-truth registration cases built from real anatomy (MNI152 2009a T1 and tissue maps).

Convention (used everywhere in this module)
-------------------------------------------
A ground-truth displacement ``u_true`` is an array of shape (X, Y, Z, 3) in RAS+ millimetres,
defined on the voxel grid of the FIXED image: the fixed point ``x`` (world mm) corresponds to the
moving point ``x + u_true(x)``. This is the same convention as an ITK displacement field
(fixed x -> moving x + u), but with RAS components; conversion to LPS only happens in
``fastimpact.io``.

No field inversion is needed: the fixed image is the original anatomy resampled at
``x + u(x)`` (cubic B-spline interpolation) and the moving image is the original anatomy, optionally
with its contrast changed. Then ``moving(x + u_true(x)) == fixed(x)`` up to interpolation error,
so a registration that returns an estimate ``u_est`` in the same convention is scored voxel by
voxel with :func:`field_error` (a target registration error at every voxel of the mask).

Randomness: every function takes a ``seed`` that is anything :func:`numpy.random.default_rng`
accepts (an int, a :class:`numpy.random.SeedSequence`, ...). The same seed gives identical output.
:func:`make_case` derives independent streams for the field, the contrast change and the noise from
its one seed with :class:`numpy.random.SeedSequence`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field as dc_field

import numpy as np
from scipy import ndimage

from .errors import ConfigError

__all__ = [
    "smooth_displacement",
    "jacobian_determinant",
    "warp",
    "contrast_change",
    "t2_like",
    "field_error",
    "make_case",
    "make_cross_grid_case",
    "oblique_grid",
    "resample_thick_slices",
    "Case",
    "KINDS",
    "RESOLUTIONS",
]

KINDS = ("mono", "contrast", "t2")
RESOLUTIONS = ("2mm", "1mm")

# Minimum Jacobian determinant of x -> x + u(x) that smooth_displacement accepts. A field with a
# smaller determinant compresses tissue almost to a fold and is no fair registration target.
MIN_JACOBIAN = 0.3

# Map tissue probabilities above this (GM + WM) to "brain".
BRAIN_THRESHOLD = 0.5


# ---------------------------------------------------------------------------------------------
# Cubic B-spline random fields (separable: one basis matrix per axis)
# ---------------------------------------------------------------------------------------------


def _bspline3(t: np.ndarray) -> np.ndarray:
    """Cubic B-spline kernel beta3(t) (support |t| < 2, integral 1)."""
    a = np.abs(t)
    out = np.zeros_like(a)
    inner = a < 1.0
    outer = (a >= 1.0) & (a < 2.0)
    out[inner] = 2.0 / 3.0 - a[inner] ** 2 + 0.5 * a[inner] ** 3
    out[outer] = (2.0 - a[outer]) ** 3 / 6.0
    return out


def _bspline3_derivative(t: np.ndarray) -> np.ndarray:
    """d beta3 / dt."""
    a = np.abs(t)
    s = np.sign(t)
    out = np.zeros_like(a)
    inner = a < 1.0
    outer = (a >= 1.0) & (a < 2.0)
    out[inner] = (-2.0 * a[inner] + 1.5 * a[inner] ** 2) * s[inner]
    out[outer] = -0.5 * (2.0 - a[outer]) ** 2 * s[outer]
    return out


def _basis_matrices(n: int, spacing_vox: float) -> tuple[np.ndarray, np.ndarray]:
    """Basis of a cubic B-spline with knots every ``spacing_vox`` voxels along one axis.

    Returns (W, dW), both (n, m): W[i, j] = beta3((i - c_j) / s) with control points
    c_j = (j - 1) * s covering [-s, n - 1 + 2 s], and dW = dW/di (per voxel).
    """
    s = float(spacing_vox)
    m = int(np.floor((n - 1) / s)) + 4
    t = (np.arange(n, dtype=np.float64)[:, None] - (np.arange(m)[None, :] - 1) * s) / s
    return _bspline3(t), _bspline3_derivative(t) / s


def _evaluate_separable(coef: np.ndarray, mats: tuple[np.ndarray, np.ndarray, np.ndarray]):
    """Tensor-product evaluation: sum_abc M0[i,a] M1[j,b] M2[k,c] coef[a,b,c] -> (X, Y, Z)."""
    out = np.tensordot(mats[0], coef, axes=(1, 0))  # (X, b, c)
    out = np.tensordot(out, mats[1], axes=(1, 1))  # (X, c, Y)
    out = np.tensordot(out, mats[2], axes=(1, 1))  # (X, Y, Z)
    return out


class _SplineField:
    """A random smooth field: cubic B-spline on a control grid, per component, in voxel index space."""

    def __init__(self, shape, spacing_vox, ncomp, rng):
        self.shape = tuple(int(n) for n in shape)
        self.bases = [_basis_matrices(n, s) for n, s in zip(self.shape, spacing_vox)]
        grid = tuple(b[0].shape[1] for b in self.bases)
        self.coef = rng.standard_normal((ncomp,) + grid)

    def values(self, comp: int) -> np.ndarray:
        return _evaluate_separable(self.coef[comp], tuple(b[0] for b in self.bases))

    def index_derivative(self, comp: int, axis: int, rows: slice = slice(None)) -> np.ndarray:
        """d field_comp / d index_axis (per voxel), for the slab ``rows`` of the first axis."""
        mats = [b[1] if a == axis else b[0] for a, b in enumerate(self.bases)]
        mats[0] = mats[0][rows]
        return _evaluate_separable(self.coef[comp], tuple(mats))


def _check_affine(affine) -> np.ndarray:
    from .image import check_affine

    return check_affine(affine, "synthetic image grid")


def _check_shape(shape) -> tuple[int, int, int]:
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 2:
        raise ConfigError(f"shape must be 3-D with every size >= 2; got {shape}; pass image.shape")
    return shape


def _check_field(fld: np.ndarray, name: str = "field", shape=None) -> np.ndarray:
    fld = np.asarray(fld)
    if fld.ndim != 4 or fld.shape[-1] != 3:
        raise ConfigError(
            f"{name} must have shape (X, Y, Z, 3) (RAS mm on the fixed grid); got {fld.shape}"
        )
    if shape is not None and fld.shape[:3] != tuple(shape):
        raise ConfigError(
            f"{name} grid {fld.shape[:3]} does not match the image grid {tuple(shape)}; "
            "the displacement must be defined on the same voxel grid"
        )
    return fld


def _voxel_spacing(affine: np.ndarray) -> np.ndarray:
    return np.sqrt((affine[:3, :3] ** 2).sum(axis=0))


def jacobian_determinant(field: np.ndarray, affine) -> np.ndarray:
    """Determinant of the Jacobian of x -> x + u(x) at every voxel (central differences).

    field: (X, Y, Z, 3) RAS mm on the grid of ``affine`` (voxel -> RAS mm). Returns (X, Y, Z)
    float64; values <= 0 mean folding. Derivatives are taken in world mm (the index gradient is
    mapped through the inverse of the affine's 3x3 part), so oblique and flipped grids work.
    """
    affine = _check_affine(affine)
    field = _check_field(field)
    inv = np.linalg.inv(affine[:3, :3])  # d index / d world
    grads = np.empty(field.shape[:3] + (3, 3))
    for c in range(3):
        g = np.gradient(field[..., c].astype(np.float64), axis=(0, 1, 2))
        for d in range(3):
            grads[..., c, d] = sum(g[a] * inv[a, d] for a in range(3))
    grads += np.eye(3)
    return np.linalg.det(grads)


def smooth_displacement(
    shape,
    affine,
    max_mm: float = 10.0,
    seed=0,
    smoothness_mm: float = 40.0,
    mask: np.ndarray | None = None,
    *,
    return_min_jacobian: bool = False,
):
    """A random smooth, invertible displacement field.

    The field is a cubic B-spline with control points every ``smoothness_mm`` millimetres and
    standard-normal random coefficients (one set per RAS component), evaluated exactly on the grid;
    it is then scaled so that max |u| over ``mask`` (the whole image if None) is ``max_mm``.

    Parameters
    ----------
    shape : (X, Y, Z) voxel grid of the fixed image.
    affine : 4x4 voxel -> RAS mm of that grid.
    max_mm : the largest displacement length inside the mask, mm (> 0).
    seed : anything numpy.random.default_rng accepts; the same seed gives the same field.
    smoothness_mm : control-point spacing of the random spline, mm. Larger = smoother.
    mask : optional (X, Y, Z) boolean array; the maximum is taken there (e.g. the brain).
    return_min_jacobian : also return the minimum Jacobian determinant over the whole grid.

    Returns
    -------
    u : (X, Y, Z, 3) float32, RAS mm; fixed point x corresponds to moving point x + u(x).
    (u, min_det) if ``return_min_jacobian``.

    Raises ConfigError if the Jacobian determinant of x -> x + u(x) drops below 0.3 anywhere
    (the field would nearly fold): lower ``max_mm`` or raise ``smoothness_mm``.
    """
    shape = _check_shape(shape)
    affine = _check_affine(affine)
    if not np.isfinite(max_mm) or max_mm <= 0:
        raise ConfigError(f"max_mm must be > 0 mm; got {max_mm}")
    if not np.isfinite(smoothness_mm) or smoothness_mm <= 0:
        raise ConfigError(f"smoothness_mm must be > 0 mm; got {smoothness_mm}")
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != shape:
            raise ConfigError(f"mask shape {mask.shape} does not match the grid {shape}")
        if not mask.any():
            raise ConfigError("mask is empty; pass a mask with at least one voxel or mask=None")

    rng = np.random.default_rng(seed)
    spacing_vox = smoothness_mm / _voxel_spacing(affine)
    spline = _SplineField(shape, spacing_vox, 3, rng)
    u = np.stack([spline.values(c) for c in range(3)], axis=-1)
    norm = np.sqrt((u**2).sum(axis=-1))
    peak = norm[mask].max() if mask is not None else norm.max()
    if peak <= 0:  # cannot happen with continuous random coefficients; guard division anyway
        raise ConfigError("the random field is zero inside the mask; use another seed")
    scale = max_mm / peak
    u *= scale

    # Exact Jacobian from the spline derivatives (no finite differences), slab by slab.
    inv = np.linalg.inv(affine[:3, :3])
    min_det = np.inf
    spline.coef *= scale
    for i0 in range(0, shape[0], 32):
        sl = slice(i0, min(i0 + 32, shape[0]))
        dui = [[spline.index_derivative(c, a, sl) for a in range(3)] for c in range(3)]
        j = [
            [sum(dui[c][a] * inv[a, d] for a in range(3)) + (c == d) for d in range(3)]
            for c in range(3)
        ]
        det = (
            j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
            - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
            + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0])
        )
        min_det = min(min_det, float(det.min()))
    if min_det < MIN_JACOBIAN:
        raise ConfigError(
            f"the random field folds: min Jacobian determinant {min_det:.3f} < {MIN_JACOBIAN} "
            f"(max_mm={max_mm}, smoothness_mm={smoothness_mm}); lower max_mm or raise smoothness_mm"
        )
    u = u.astype(np.float32)
    return (u, min_det) if return_min_jacobian else u


# ---------------------------------------------------------------------------------------------
# Resampling
# ---------------------------------------------------------------------------------------------


def warp(
    image_array: np.ndarray,
    affine,
    field: np.ndarray,
    order: int = 3,
    *,
    mode: str = "nearest",
    slab: int = 16,
) -> np.ndarray:
    """Resample an image at x + u(x): out(x) = image(x + field(x)).

    image_array : (X, Y, Z) image on the grid of ``affine`` (voxel -> RAS mm).
    field : (X, Y, Z, 3) RAS mm on the same grid.
    order : spline order of scipy.ndimage interpolation (0, 1 or 3); 3 = cubic B-spline.
    mode : how values outside the image are extended (scipy.ndimage modes).
    Returns a float32 (X, Y, Z) array on the same grid. Deterministic.
    """
    affine = _check_affine(affine)
    img = np.asarray(image_array)
    if img.ndim != 3:
        raise ConfigError(f"image_array must be 3-D (X, Y, Z); got shape {img.shape}")
    field = _check_field(field, shape=img.shape)
    if order not in (0, 1, 3):
        raise ConfigError(f"order must be 0, 1 or 3; got {order}")
    img = img.astype(np.float64, copy=False)
    coeffs = ndimage.spline_filter(img, order=order, mode=mode) if order > 1 else img
    inv = np.linalg.inv(affine[:3, :3])  # displacement mm -> index offset
    out = np.empty(img.shape, dtype=np.float32)
    grid_jk = np.indices(img.shape[1:], dtype=np.float64)
    for i0 in range(0, img.shape[0], slab):
        i1 = min(i0 + slab, img.shape[0])
        f = field[i0:i1].astype(np.float64)
        n = i1 - i0
        base = (
            np.broadcast_to(np.arange(i0, i1, dtype=np.float64)[:, None, None], (n,) + img.shape[1:]),
            np.broadcast_to(grid_jk[0], (n,) + img.shape[1:]),
            np.broadcast_to(grid_jk[1], (n,) + img.shape[1:]),
        )
        coords = np.stack([base[a] + f @ inv[a] for a in range(3)], axis=0)
        out[i0:i1] = ndimage.map_coordinates(
            coeffs, coords, order=order, mode=mode, prefilter=False
        )
    return out


# ---------------------------------------------------------------------------------------------
# Intensity changes
# ---------------------------------------------------------------------------------------------


def _index_bias_field(shape, rng, strength: float) -> np.ndarray:
    """Smooth multiplicative bias exp(b), b a cubic spline with ~4 control intervals per axis,
    scaled so max |b| = strength (index space: no affine needed)."""
    spline = _SplineField(shape, [max(n / 3.0, 2.0) for n in shape], 1, rng)
    b = spline.values(0)
    b *= strength / max(np.abs(b).max(), 1e-12)
    return np.exp(b)


def _stats_region(array: np.ndarray, mask) -> np.ndarray:
    if mask is None:
        return array
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != array.shape:
        raise ConfigError(f"mask shape {mask.shape} does not match the image {array.shape}")
    if not mask.any():
        raise ConfigError("mask is empty; pass a mask with at least one voxel or mask=None")
    return array[mask]


def contrast_change(
    array: np.ndarray,
    seed=0,
    mask: np.ndarray | None = None,
    *,
    bias: float = 0.15,
    noise: float = 0.02,
) -> np.ndarray:
    """A non-monotonic intensity remap + smooth bias field + Gaussian noise (a test for MI).

    With t the intensity scaled to [0, 1] by the 0.5 and 99.5 percentiles of the image (inside
    ``mask`` if given), the remap adds a Gaussian bump f(t) = t + a exp(-(t - c)^2 / (2 w^2)),
    centred at a random intensity quantile in [0.25, 0.45] of the mask (grey matter for a brain
    mask), with a in [0.35, 0.5], w in [0.06, 0.09]: slope 1 - a sqrt(1/e)/w < 0 next to the bump,
    so the order of grey and white matter partly swaps. Then the image is multiplied by a smooth
    bias exp(b(x)) with max |b| = ``bias`` and Gaussian noise of standard deviation
    ``noise`` x (intensity range) is added. Returns float32 in the input's intensity range scale.
    """
    a = np.asarray(array, dtype=np.float64)
    if a.ndim != 3:
        raise ConfigError(f"array must be 3-D (X, Y, Z); got shape {a.shape}")
    region = _stats_region(a, mask)
    rng = np.random.default_rng(seed)
    lo, hi = np.percentile(region, [0.5, 99.5])
    if hi <= lo:
        raise ConfigError("the image is constant inside the mask; a contrast change needs contrast")
    t = (a - lo) / (hi - lo)
    centre = (np.quantile(region, rng.uniform(0.25, 0.45)) - lo) / (hi - lo)
    amp = rng.uniform(0.35, 0.5)
    width = rng.uniform(0.06, 0.09)
    t = t + amp * np.exp(-0.5 * ((t - centre) / width) ** 2)
    t *= _index_bias_field(a.shape, rng, bias)
    t += rng.normal(0.0, noise, size=a.shape)
    return (t * (hi - lo) + lo).astype(np.float32)


def t2_like(
    t1: np.ndarray,
    gm: np.ndarray,
    wm: np.ndarray,
    seed=0,
    *,
    bias: float = 0.15,
    noise: float = 0.02,
) -> np.ndarray:
    """A T2-weighted-looking image synthesised from tissue maps: CSF bright, GM mid, WM dark.

    t1 : (X, Y, Z) T1 image; only used to find the head (T1 above 5 % of its 99th percentile,
         holes filled) and for the intensity scale of the output.
    gm, wm : (X, Y, Z) tissue probabilities in [0, 1] on the same grid.
    CSF = clip(head - gm - wm, 0, 1). Intensity = 1.0 CSF + 0.55 GM + 0.25 WM (x the T1's 99th
    percentile), times a smooth bias exp(b), max |b| = ``bias``, plus Gaussian noise of std
    ``noise`` x scale. Returns float32.
    """
    t1 = np.asarray(t1, dtype=np.float64)
    gm = np.asarray(gm, dtype=np.float64)
    wm = np.asarray(wm, dtype=np.float64)
    if t1.ndim != 3 or gm.shape != t1.shape or wm.shape != t1.shape:
        raise ConfigError(
            f"t1, gm and wm must be 3-D arrays on one grid; got {t1.shape}, {gm.shape}, {wm.shape}"
        )
    for name, p in (("gm", gm), ("wm", wm)):
        if p.min() < -1e-6 or p.max() > 1 + 1e-6:
            raise ConfigError(
                f"{name} must hold probabilities in [0, 1]; got range [{p.min():.3g}, {p.max():.3g}]; "
                "divide 0-255 maps by 255"
            )
    rng = np.random.default_rng(seed)
    scale = np.percentile(t1, 99)
    if scale <= 0:
        raise ConfigError("t1 is zero almost everywhere; pass a real T1 image")
    head = ndimage.binary_fill_holes(t1 > 0.05 * scale)
    csf = np.clip(head.astype(np.float64) - gm - wm, 0.0, 1.0)
    img = 1.0 * csf + 0.55 * gm + 0.25 * wm
    img *= _index_bias_field(t1.shape, rng, bias)
    img += rng.normal(0.0, noise, size=t1.shape)
    return (img * scale).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def field_error(u_est: np.ndarray, u_true: np.ndarray, mask: np.ndarray | None = None) -> dict:
    """Per-voxel error |u_est - u_true| in mm over the mask: dict(mean, p95, max) (floats).

    Both fields: (X, Y, Z, 3) RAS mm on the fixed grid in this module's convention.
    mask: (X, Y, Z) boolean (the whole grid if None).
    """
    u_true = _check_field(u_true, "u_true")
    u_est = _check_field(u_est, "u_est", shape=u_true.shape[:3])
    err = np.sqrt(((u_est.astype(np.float64) - u_true.astype(np.float64)) ** 2).sum(axis=-1))
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != err.shape:
            raise ConfigError(f"mask shape {mask.shape} does not match the field grid {err.shape}")
        if not mask.any():
            raise ConfigError("mask is empty; pass a mask with at least one voxel or mask=None")
        err = err[mask]
    return {
        "mean": float(err.mean()),
        "p95": float(np.percentile(err, 95)),
        "max": float(err.max()),
    }


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Case:
    """A registration problem with a known answer.

    fixed, moving : fastimpact.image.Image on the same grid (float32).
    u_true : (X, Y, Z, 3) float32 RAS mm on the fixed grid; fixed x <-> moving x + u_true(x).
    mask : (X, Y, Z) bool brain mask of the FIXED image (warped GM + WM > 0.5).
    gm, wm : (X, Y, Z) float32 tissue probabilities on the fixed grid (warped).
    moving_mask, moving_gm, moving_wm : the same on the moving grid (the originals).
    min_jacobian : minimum Jacobian determinant of x -> x + u_true(x).
    """

    kind: str
    resolution: str
    seed: int
    max_mm: float
    fixed: object
    moving: object
    u_true: np.ndarray
    mask: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    moving_mask: np.ndarray
    moving_gm: np.ndarray
    moving_wm: np.ndarray
    min_jacobian: float
    info: dict = dc_field(default_factory=dict)

    def initial_error(self) -> dict:
        """field_error of the identity (u = 0) inside the fixed brain mask."""
        return field_error(np.zeros_like(self.u_true), self.u_true, self.mask)


def _paths_to_triplet(paths):
    """Accept the data module's return value as a dict, an object with attributes, or a tuple."""
    if isinstance(paths, dict):
        return paths["t1"], paths["gm"], paths["wm"]
    if all(hasattr(paths, k) for k in ("t1", "gm", "wm")):
        return paths.t1, paths.gm, paths.wm
    t1, gm, wm = paths
    return t1, gm, wm


@functools.lru_cache(maxsize=2)
def _load_template(resolution: str):
    """(t1, gm, wm, affine): float32 read-only arrays; gm/wm in [0, 1]. Cached per resolution."""
    import nibabel as nib

    from . import data

    paths = data.demo_paths() if resolution == "2mm" else data.mni152_1mm_paths()
    out = []
    affine = None
    for name, p in zip(("t1", "gm", "wm"), _paths_to_triplet(paths)):
        img = nib.load(str(p))
        arr = np.asarray(img.dataobj, dtype=np.float32)
        if name != "t1" and arr.max() > 1.5:  # 0-255 probability maps
            arr /= 255.0
        arr.setflags(write=False)
        out.append(arr)
        affine = img.affine if affine is None else affine
    affine = np.asarray(affine, dtype=np.float64)
    affine.setflags(write=False)
    return out[0], out[1], out[2], affine


def make_case(
    kind: str = "mono",
    resolution: str = "2mm",
    seed: int = 0,
    max_mm: float = 10.0,
    smoothness_mm: float = 40.0,
) -> Case:
    """Build a known-truth case from the MNI152 2009a template.

    kind : "mono" (moving = original T1), "contrast" (moving = contrast_change(T1)) or
           "t2" (moving = t2_like(T1, GM, WM)). The fixed image is always the T1 warped by u_true.
    resolution : "2mm" (packaged demo files, fastimpact.data.demo_paths()) or "1mm" (nilearn's
           originals, fastimpact.data.mni152_1mm_paths(); needs `pip install --no-deps nilearn`).
    seed : one integer; independent streams for the field and the intensity changes derive from it.
    max_mm : largest |u_true| inside the original brain, mm; smoothness_mm: see smooth_displacement.
    """
    from .image import Image

    if kind not in KINDS:
        raise ConfigError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
    if resolution not in RESOLUTIONS:
        raise ConfigError(f"resolution must be one of {', '.join(RESOLUTIONS)}; got {resolution!r}")
    t1, gm, wm, affine = _load_template(resolution)
    s_field, s_intensity = np.random.SeedSequence([int(seed), 0x5EED]).spawn(2)

    brain = (gm + wm) > BRAIN_THRESHOLD
    u, min_det = smooth_displacement(
        t1.shape, affine, max_mm, s_field, smoothness_mm, mask=brain, return_min_jacobian=True
    )
    fixed = warp(t1, affine, u, order=3)
    gm_f = np.clip(warp(gm, affine, u, order=1), 0, 1)
    wm_f = np.clip(warp(wm, affine, u, order=1), 0, 1)
    mask = (gm_f + wm_f) > BRAIN_THRESHOLD

    if kind == "mono":
        moving = np.array(t1, dtype=np.float32)
    elif kind == "contrast":
        moving = contrast_change(t1, s_intensity, mask=brain)
    else:
        moving = t2_like(t1, gm, wm, s_intensity)

    aff = np.array(affine)
    return Case(
        kind=kind,
        resolution=resolution,
        seed=int(seed),
        max_mm=float(max_mm),
        fixed=Image(fixed, aff.copy()),
        moving=Image(moving, aff.copy()),
        u_true=u,
        mask=mask,
        gm=gm_f,
        wm=wm_f,
        moving_mask=brain.copy(),
        moving_gm=np.array(gm),
        moving_wm=np.array(wm),
        min_jacobian=min_det,
        info={"smoothness_mm": float(smoothness_mm)},
    )


# ---------------------------------------------------------------------------------------------
# A clinical-like cross-grid pair: the moving image on its own oblique grid with thick slices
# ---------------------------------------------------------------------------------------------


def oblique_grid(shape_mm, center, spacing, angles_deg=(12.0, -8.0, 6.0)):
    """(shape, affine) of a grid with voxel ``spacing`` (3,) mm covering a box of ``shape_mm`` (3,)
    mm centred on ``center`` (world RAS mm), its axes rotated by ``angles_deg`` about x, y, z."""
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    rot = rz @ ry @ rx
    spacing = np.asarray(spacing, dtype=np.float64)
    shape = tuple(int(max(4, round(float(e) / float(s)))) for e, s in zip(shape_mm, spacing))
    affine = np.eye(4)
    affine[:3, :3] = rot * spacing[None, :]
    affine[:3, 3] = np.asarray(center, float) - affine[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return shape, affine


def resample_thick_slices(volume: np.ndarray, vol_affine, shape, affine, *, order: int = 3,
                          oversample: int = 4, cval: float = 0.0) -> np.ndarray:
    """``volume`` (on ``vol_affine``) acquired on the grid (``shape``, ``affine``) whose last axis is
    the slice axis: each slice is the average of ``oversample`` thin sections weighted by a
    Gaussian slice profile of FWHM = the slice spacing (so a thick slice sees the anatomy
    across its thickness, as a 2-D MR acquisition does). In-plane: interpolation of ``order``."""
    vol_affine = np.asarray(vol_affine, dtype=np.float64)
    affine = np.asarray(affine, dtype=np.float64)
    coeffs = ndimage.spline_filter(np.asarray(volume, dtype=np.float64), order=order) if order > 1 else volume
    # thin sections at offsets within +- 1 slice spacing along the slice axis
    offs = (np.arange(2 * oversample + 1) - oversample) / oversample  # in slices, -1 .. 1
    sigma = 1.0 / 2.3548  # FWHM = one slice spacing
    weights = np.exp(-0.5 * (offs / sigma) ** 2)
    weights /= weights.sum()
    to_vol = np.linalg.inv(vol_affine) @ affine
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), axis=0)
    out = np.zeros(shape, dtype=np.float64)
    for o, w in zip(offs, weights):
        pts = idx.copy()
        pts[2] += o
        q = np.tensordot(to_vol[:3, :3], pts, axes=1) + to_vol[:3, 3, None, None, None]
        out += w * ndimage.map_coordinates(coeffs, q, order=order, mode="constant", cval=cval, prefilter=False)
    return out.astype(np.float32)


def make_cross_grid_case(resolution: str = "2mm", seed: int = 0, max_mm: float = 10.0, smoothness_mm: float = 40.0,
                         inplane: float | None = None, slice_mm: float | None = None,
                         angles_deg=(12.0, -8.0, 6.0), crop=(0.9, 0.95, 0.75), shift_mm=(6.0, -4.0, 5.0)) -> Case:
    """A T1 / T2-like pair on different grids, the way clinical MR pairs come.

    fixed: the MNI152 T1 warped by ``u_true`` on the template grid (1 or 2 mm isotropic).
    moving: a T2-like image of the original anatomy acquired on its own oblique grid: in-plane
    spacing ``inplane`` (default 0.9 x the template spacing), thick slices ``slice_mm`` apart
    (default 4 mm at 1 mm, 6 mm at 2 mm) with a Gaussian slice profile, axes rotated by
    ``angles_deg``, covering ``crop`` of the head's extent per axis (so the top and bottom of the
    head are cut) around a centre shifted by ``shift_mm``. Masks: ``mask`` the fixed brain,
    ``moving_mask`` the brain on the moving grid. Same ``u_true`` convention as :func:`make_case`.
    """
    from .image import Image

    if resolution not in RESOLUTIONS:
        raise ConfigError(f"resolution must be one of {', '.join(RESOLUTIONS)}; got {resolution!r}")
    t1, gm, wm, affine = _load_template(resolution)
    base = float(np.linalg.norm(affine[:3, 0]))
    inplane = 0.9 * base if inplane is None else float(inplane)
    slice_mm = (4.0 if resolution == "1mm" else 6.0) if slice_mm is None else float(slice_mm)
    s_field, s_intensity = np.random.SeedSequence([int(seed), 0xC055]).spawn(2)
    brain = (gm + wm) > BRAIN_THRESHOLD
    u, min_det = smooth_displacement(t1.shape, affine, max_mm, s_field, smoothness_mm, mask=brain,
                                     return_min_jacobian=True)
    fixed = warp(t1, affine, u, order=3)
    gm_f = np.clip(warp(gm, affine, u, order=1), 0, 1)
    wm_f = np.clip(warp(wm, affine, u, order=1), 0, 1)
    mask = (gm_f + wm_f) > BRAIN_THRESHOLD

    t2 = t2_like(t1, gm, wm, s_intensity)
    head = np.argwhere(t1 > 0.05 * np.percentile(t1, 99))
    lo, hi = head.min(0), head.max(0)
    center_idx = (lo + hi) / 2.0
    center = affine[:3, :3] @ center_idx + affine[:3, 3] + np.asarray(shift_mm, float)
    extent = (hi - lo + 1) * base * np.asarray(crop, float)
    shape, m_aff = oblique_grid(extent, center, (inplane, inplane, slice_mm), angles_deg)
    moving = resample_thick_slices(t2, affine, shape, m_aff, order=3)
    to_t = np.linalg.inv(affine) @ m_aff
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), axis=0)
    q = np.tensordot(to_t[:3, :3], idx, axes=1) + to_t[:3, 3, None, None, None]
    mgm = ndimage.map_coordinates(np.asarray(gm, np.float64), q, order=1, mode="constant").astype(np.float32)
    mwm = ndimage.map_coordinates(np.asarray(wm, np.float64), q, order=1, mode="constant").astype(np.float32)
    return Case(
        kind="t2-cross-grid", resolution=resolution, seed=int(seed), max_mm=float(max_mm),
        fixed=Image(fixed, np.array(affine)), moving=Image(moving, m_aff),
        u_true=u, mask=mask, gm=gm_f, wm=wm_f,
        moving_mask=(mgm + mwm) > BRAIN_THRESHOLD, moving_gm=mgm, moving_wm=mwm, min_jacobian=min_det,
        info={"smoothness_mm": float(smoothness_mm), "moving_spacing_mm": [inplane, inplane, slice_mm],
              "moving_angles_deg": list(angles_deg), "crop": list(crop)},
    )
