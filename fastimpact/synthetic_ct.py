"""A CT / CBCT-like registration case with a known answer, built from a real chest CT.

The anatomy
-----------
The fixed image is a real axial chest CT shipped with fastimpact (``fastimpact/data/
ct_chest_lung1.nii.gz``: PyRadiomics' test case "lung1", in-plane 2 x 2 block-averaged, 256 x 220 x
48 voxels of 1.1406 x 1.1406 x 5 mm, HU; see ``LICENSE_pyradiomics.txt`` for provenance and
licence). It keeps its own grid: thick 5 mm slices, an LPS-style affine (RAS axes -x, -y, +z).

* ``size="full"``: that grid as it is (the real slice geometry, for benchmarks).
* ``size="small"``: 3 x 3 in-plane block average, 85 x 73 x 48 voxels of 3.42 x 3.42 x 5 mm (for
  tests of a few seconds; builds in about 1.5 s of CPU; the CBCT is about 88 x 88 x 51 voxels of
  3 mm). "full" takes about 9 s of CPU (CBCT about 263 x 263 x 151 voxels of 1 mm).

The moving image is a CBCT-like image of the same patient, on its own grid: axis-aligned RAS+
(identity direction, so its axes point the other way from the CT's), isotropic voxels (1 mm for
"full", 3 mm for "small"), covering only a cylinder (the CBCT field of view) of radius 120-135 mm
and 150 mm length, placed a few mm off the patient's centre. The patient is wider than the
disc, so the field of view truncates the body laterally. Outside the disc the image is exactly
one constant (the CBCT's air level), as scanners write it.

The deformation
---------------
A smooth random field ``v`` is defined in world space (a cubic B-spline with control points every
``smoothness_mm`` mm, random normal coefficients), and the moving image samples the CT at
``y + v(y)`` for each moving voxel centre ``y``. The ground truth of the registration is the exact
inverse on the fixed grid, in the convention of :mod:`fastimpact.synthetic`:

    ``u_true`` (X, Y, Z, 3) float32, RAS mm on the FIXED grid: fixed world point x corresponds to
    moving world point ``x + u_true(x)``, i.e. ``moving(x + u_true(x)) == CT(x)`` (up to the CBCT
    effects below and interpolation).

``u_true`` solves ``u(x) = -v(x + u(x))`` by fixed-point iteration (a contraction: ``|grad v| < 1``;
steps below 5e-4 mm) at nodes every ``smoothness_mm / 8`` mm, cubic-spline interpolated onto the
voxels: the residual ``|u + v(x + u)|`` is about 3e-3 mm (``info["inverse_residual_mm"]``). ``v`` is
scaled so that the largest displacement inside the body is ``max_mm`` (measured on the small grid),
and lives on the CT's box grown by 80 mm: one seed gives the same field, field of view centre,
radius and first slice for both sizes. ``v_moving`` (the field on the moving grid: moving y ->
fixed ``y + v(y)``) is returned too, for evaluating the inverse direction.

CBCT-like effects (on attenuation mu = (HU + 1000) / 1000, then mapped to CBCT units)
------------------------------------------------------------------------------------
* cupping: mu x (1 - c (1 - (r / R)^2)), r the distance to the disc axis, c in [0.12, 0.2];
* streaks: 2-4 radial line artefacts per slice, each through a dense voxel (bone, > 300 HU) at a
  random angle, Gaussian profile (sigma 1.5 mm or half a voxel), amplitude +-0.1-0.25 mu, fading
  along the line over 60-120 mm;
* noise: white Gaussian, std 0.02-0.035 mu (20-35 HU) plus a correlated part (Gaussian-smoothed
  noise of about half that std);
* intensity scale and offset: CBCT = gain 1000 mu + offset, gain in [0.75, 0.9], offset in
  [-1060, -940] (so CT numbers are not reproduced: MI and MIND are needed, not SSD);
* truncated field of view: outside the disc exactly ``offset`` (the air level), no noise.

Masks
-----
``body`` and ``lungs`` on the fixed grid, from the CT (thresholds -500 / -400 HU, largest component,
holes filled per slice; the couch is not body); the evaluation mask ``mask`` is the body where the fixed point maps
inside the moving field of view (``x + u_true(x)`` in the cylinder). ``moving_mask`` is the field
of view disc on the moving grid (a cylinder along the moving k axis).

Randomness: one integer ``seed``; independent streams for the field, the field of view and the
artefacts derive from it with :class:`numpy.random.SeedSequence`. Same seed, identical output.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field as dc_field
from importlib import resources

import numpy as np
from scipy import ndimage

from .errors import ConfigError, ImageIOError
from .image import Image
from .synthetic import MIN_JACOBIAN, field_error, jacobian_determinant

__all__ = [
    "CT_FILE",
    "SIZES",
    "CTCBCTCase",
    "load_chest_ct",
    "make_ct_cbct_case",
    "cbct_artefacts",
    "body_mask",
    "lung_mask",
]

CT_FILE = "ct_chest_lung1.nii.gz"
SIZES = ("small", "full")

#: per size: in-plane block factor applied to the shipped CT, and the moving (CBCT) voxel size in mm.
_GEOMETRY = {"small": (3, 3.0), "full": (1, 1.0)}

#: length of the CBCT field of view along its axis, mm (shortened if the CT is shorter).
FOV_LENGTH_MM = 150.0
#: radius range of the field of view disc, mm.
FOV_RADIUS_MM = (120.0, 135.0)
#: the disc centre is the body's centre of mass in-plane plus a random offset up to this, mm.
FOV_OFFSET_MM = 12.0
#: the random field is defined on the CT's box grown by this on every side, mm.
FIELD_MARGIN_MM = 80.0

BODY_HU = -500.0
LUNG_HU = -400.0
DENSE_HU = 300.0
TOL_INVERSE_MM = 5e-4
#: the inverse is computed exactly at nodes every smoothness_mm / this, with this many nodes of margin
INVERSE_NODES_PER_SPACING = 8.0
INVERSE_MARGIN_NODES = 6


# ---------------------------------------------------------------------------------------------
# The shipped CT
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def load_chest_ct() -> Image:
    """The shipped chest CT: float32 HU (read-only array), 256 x 220 x 48 at 1.14 x 1.14 x 5 mm."""
    import nibabel as nib

    path = resources.files("fastimpact.data").joinpath(CT_FILE)
    try:
        img = nib.load(str(path))
        arr = np.asarray(img.dataobj, dtype=np.float32)
    except (OSError, ValueError) as exc:
        raise ImageIOError(
            f"cannot read the shipped chest CT '{path}' ({exc}); reinstall fastimpact "
            "(pip install -e .) or rebuild it with python -m fastimpact.data.build_ct_data"
        ) from None
    arr.setflags(write=False)
    return Image(arr, np.asarray(img.affine, dtype=np.float64), name=CT_FILE)


def _block_mean(volume: np.ndarray, affine: np.ndarray, factor: int):
    from .data.build_ct_data import block_mean

    if factor == 1:
        return np.array(volume, dtype=np.float32), affine.copy()
    v, a = block_mean(volume, affine, factor)
    return v.astype(np.float32), a


def _world(affine: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """(..., 3) voxel indices -> (..., 3) world mm."""
    return idx @ affine[:3, :3].T + affine[:3, 3]


def _grid_world(shape, affine, rows=slice(None)) -> np.ndarray:
    """World coordinates (n, Y, Z, 3) float64 of the voxel centres in the slab ``rows`` of axis 0."""
    i = np.arange(shape[0], dtype=np.float64)[rows]
    idx = np.stack(
        np.meshgrid(i, np.arange(shape[1], dtype=np.float64), np.arange(shape[2], dtype=np.float64),
                    indexing="ij"),
        axis=-1,
    )
    return _world(affine, idx)


# ---------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------


def _fill_per_slice(mask: np.ndarray) -> np.ndarray:
    out = np.empty_like(mask)
    for k in range(mask.shape[2]):
        out[..., k] = ndimage.binary_fill_holes(mask[..., k])
    return out


def body_mask(hu: np.ndarray) -> np.ndarray:
    """The patient: HU > -500, opened in-plane (drops blankets and thin couch parts), the largest
    3-D component, holes filled slice by slice (the lungs and airways become body)."""
    m = np.asarray(hu) > BODY_HU
    m = ndimage.binary_opening(m, structure=np.ones((3, 3, 1), bool))
    lab, n = ndimage.label(m)
    if n == 0:
        raise ConfigError("the CT has no voxel above -500 HU; pass a CT in Hounsfield units")
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return _fill_per_slice(lab == int(np.argmax(sizes)))


def lung_mask(hu: np.ndarray, body: np.ndarray) -> np.ndarray:
    """The lungs: HU < -400 inside the body, opened, components larger than 2 % of the largest
    one (both lungs; the trachea and bowel gas are small)."""
    m = (np.asarray(hu) < LUNG_HU) & body
    m = ndimage.binary_opening(m, structure=np.ones((3, 3, 1), bool))
    lab, n = ndimage.label(m)
    if n == 0:
        return m
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    keep = np.nonzero(sizes > 0.02 * sizes.max())[0]
    return np.isin(lab, keep)


# ---------------------------------------------------------------------------------------------
# The world-space random field
# ---------------------------------------------------------------------------------------------


def _bspline3(t: np.ndarray) -> np.ndarray:
    """Cubic B-spline kernel beta3(t) (support |t| < 2)."""
    a = np.abs(t)
    return np.where(a < 1.0, 2.0 / 3.0 - a**2 + 0.5 * a**3, np.where(a < 2.0, (2.0 - a) ** 3 / 6.0, 0.0))


def _axis_coords(shape, affine) -> list[np.ndarray]:
    """World coordinate of every voxel centre along RAS x, y, z for an axis-aligned grid."""
    lin = np.asarray(affine, dtype=np.float64)[:3, :3]
    if not np.allclose(lin, np.diag(np.diag(lin))):
        raise ConfigError("this grid must be axis-aligned (a diagonal affine); resample it first")
    return [lin[a, a] * np.arange(shape[a]) + affine[a, 3] for a in range(3)]


def _separable(values: np.ndarray, mats) -> np.ndarray:
    """sum_abc M0[i,a] M1[j,b] M2[k,c] values[..., a, b, c] for the last three axes."""
    out = np.tensordot(values, mats[2], axes=(-1, 1))
    out = np.tensordot(out, mats[1], axes=(-2, 1))
    out = np.tensordot(out, mats[0], axes=(-3, 1))
    return np.moveaxis(out, (-1, -2, -3), (-3, -2, -1))


class _WorldSpline:
    """v(p): a cubic B-spline in world mm (axis-aligned control grid, spacing S) with 3 components.

    Two exact evaluations of the same sum coef[j] beta3((p - origin) / S - j): at scattered points
    (``scipy.ndimage.map_coordinates(..., order=3, prefilter=False)``, which sums the coefficients
    as given) and on axis-aligned grids (separable basis matrices, much faster).
    """

    def __init__(self, lo, hi, spacing_mm, rng):
        self.S = float(spacing_mm)
        self.origin = np.asarray(lo, dtype=np.float64) - 3 * self.S
        n = np.ceil((np.asarray(hi, dtype=np.float64) + 3 * self.S - self.origin) / self.S).astype(int) + 1
        self.coef = rng.standard_normal((3,) + tuple(int(k) for k in n))

    def __call__(self, pts: np.ndarray) -> np.ndarray:
        """pts (..., 3) world mm -> v (..., 3) mm (float64)."""
        t = ((pts - self.origin) / self.S).reshape(-1, 3).T
        out = np.stack(
            [ndimage.map_coordinates(self.coef[c], t, order=3, prefilter=False, mode="nearest")
             for c in range(3)],
            axis=-1,
        )
        return out.reshape(pts.shape)

    def on_grid(self, axes) -> np.ndarray:
        """v on the tensor grid of the 1-D world coordinates ``axes`` (RAS x, y, z): (X, Y, Z, 3)."""
        mats = [
            _bspline3((np.asarray(c, dtype=np.float64)[:, None] - self.origin[a]) / self.S
                      - np.arange(self.coef.shape[1 + a])[None, :])
            for a, c in enumerate(axes)
        ]
        return np.moveaxis(_separable(self.coef, mats), 0, -1)


def _min_jacobian_of(spline: _WorldSpline, lo, hi) -> float:
    """min det(I + grad v) over a grid of spacing S/4 covering [lo, hi] (central differences)."""
    h = spline.S / 4.0
    v = spline.on_grid([np.arange(a, b + h, h) for a, b in zip(lo, hi)])
    jac = np.empty(v.shape[:3] + (3, 3))
    for c in range(3):
        g = np.gradient(v[..., c], h, axis=(0, 1, 2))
        for d in range(3):
            jac[..., c, d] = g[d] + (c == d)
    return float(np.linalg.det(jac).min())


def _invert_points(spline: _WorldSpline, x: np.ndarray) -> np.ndarray:
    """u with u = -v(x + u) at the world points x (..., 3): fixed-point iteration (steps below 5e-4 mm)."""
    u = -spline(x)
    for _ in range(100):
        new = -spline(x + u)
        step = np.abs(new - u).max()
        u = new
        if step < TOL_INVERSE_MM:
            return u
    raise ConfigError(
        "the random field could not be inverted (the fixed-point iteration did not converge); "
        "lower max_mm or raise smoothness_mm"
    )


def _invert_on_grid(spline: _WorldSpline, shape, affine, rng):
    """The inverse field u on an axis-aligned grid: exact at nodes every S/8 mm (a margin of 6 nodes
    around the grid), interpolated with cubic splines (separable) onto the voxel centres. Returns
    (u (X, Y, Z, 3) float64, max residual |u + v(x + u)| at 20000 random voxels, mm; ~1e-3)."""
    axes = _axis_coords(shape, affine)
    h = spline.S / INVERSE_NODES_PER_SPACING
    mar = INVERSE_MARGIN_NODES
    node_axes = [np.arange(c.min() - mar * h, c.max() + (mar + 0.5) * h, h) for c in axes]
    nodes = np.stack(np.meshgrid(*node_axes, indexing="ij"), axis=-1)
    u_nodes = _invert_points(spline, nodes)
    coef = np.stack(
        [ndimage.spline_filter(u_nodes[..., c], order=3, mode="mirror") for c in range(3)], axis=0
    )
    mats = [
        _bspline3((c[:, None] - n[0]) / h - np.arange(len(n))[None, :]) for c, n in zip(axes, node_axes)
    ]
    u = np.moveaxis(_separable(coef, mats), 0, -1)
    pick = rng.integers(0, np.prod(shape), size=min(20000, int(np.prod(shape))))
    idx = np.stack(np.unravel_index(pick, shape), axis=-1).astype(np.float64)
    x = _world(affine, idx)
    up = u.reshape(-1, 3)[pick]
    residual = float(np.sqrt(((up + spline(x + up)) ** 2).sum(axis=-1)).max())
    return u, residual


# ---------------------------------------------------------------------------------------------
# CBCT artefacts
# ---------------------------------------------------------------------------------------------


def cbct_artefacts(hu, affine, centre_xy, radius_mm, seed=0):
    """Turn HU sampled on a CBCT grid into a CBCT-like image (see the module docstring).

    hu : (X, Y, Z) HU on an axis-aligned grid whose k axis is the cylinder axis (``affine`` voxel ->
         RAS mm, its 3x3 part diagonal); centre_xy : the disc centre (RAS x, y) mm; radius_mm : the
         disc radius. Returns (image float32, fov bool, params dict). Outside the disc the image is
         exactly ``params["background"]``.
    """
    hu = np.asarray(hu, dtype=np.float64)
    affine = np.asarray(affine, dtype=np.float64)
    if hu.ndim != 3:
        raise ConfigError(f"hu must be 3-D (X, Y, Z); got shape {hu.shape}")
    if not np.allclose(affine[:3, :3], np.diag(np.diag(affine[:3, :3]))):
        raise ConfigError("cbct_artefacts needs an axis-aligned grid (diagonal affine); resample first")
    rng = np.random.default_rng(seed)
    sx, sy = abs(affine[0, 0]), abs(affine[1, 1])
    xs = affine[0, 0] * np.arange(hu.shape[0]) + affine[0, 3] - centre_xy[0]
    ys = affine[1, 1] * np.arange(hu.shape[1]) + affine[1, 3] - centre_xy[1]
    dx, dy = np.meshgrid(xs, ys, indexing="ij")
    r2 = (dx**2 + dy**2) / radius_mm**2
    fov2d = r2 <= 1.0
    fov = np.broadcast_to(fov2d[..., None], hu.shape).copy()

    # global parameters first, so that they do not depend on the grid size
    cupping = rng.uniform(0.12, 0.20)
    noise_std = rng.uniform(0.02, 0.035)
    gain = rng.uniform(0.75, 0.90)
    offset = rng.uniform(-1060.0, -940.0)

    mu = np.clip((hu + 1000.0) / 1000.0, 0.0, None)
    mu *= (1.0 - cupping * (1.0 - np.minimum(r2, 1.0)))[..., None]

    width = max(1.5, 0.5 * min(sx, sy))
    n_streaks = 0
    for k in range(hu.shape[2]):
        dense = np.argwhere((hu[..., k] > DENSE_HU) & fov2d)
        for _ in range(int(rng.integers(2, 5))):
            if len(dense):
                i, j = dense[rng.integers(len(dense))]
                px, py = xs[i], ys[j]
            else:  # no bone in this slice: a streak through the central region
                rho, phi = 0.3 * radius_mm * np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
                px, py = rho * np.cos(phi), rho * np.sin(phi)
            theta = rng.uniform(0.0, np.pi)
            ux, uy = np.cos(theta), np.sin(theta)
            along = (dx - px) * ux + (dy - py) * uy
            across = -(dx - px) * uy + (dy - py) * ux
            amp = rng.choice([-1.0, 1.0]) * rng.uniform(0.10, 0.25)
            decay = rng.uniform(60.0, 120.0)
            mu[..., k] += amp * np.exp(-0.5 * (across / width) ** 2 - np.abs(along) / decay)
            n_streaks += 1

    white = rng.standard_normal(hu.shape)
    smooth = ndimage.gaussian_filter(rng.standard_normal(hu.shape), 1.5)
    smooth *= 0.5 * noise_std / max(smooth.std(), 1e-12)
    mu += noise_std * white + smooth

    out = gain * 1000.0 * mu + offset
    out[~fov] = offset
    params = {
        "cupping": float(cupping),
        "streaks": int(n_streaks),
        "streak_width_mm": float(width),
        "noise_std_hu": float(noise_std * 1000.0),
        "gain": float(gain),
        "offset": float(offset),
        "background": float(np.float32(offset)),
    }
    return out.astype(np.float32), fov, params


# ---------------------------------------------------------------------------------------------
# The case
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class CTCBCTCase:
    """A CT (fixed) / CBCT-like (moving) registration problem with a known answer.

    fixed : Image, the real CT in HU (float32) on its own grid (thick slices, LPS-style axes).
    moving : Image, the CBCT-like image (float32) on its own isotropic axis-aligned RAS grid.
    u_true : (X, Y, Z, 3) float32 RAS mm on the fixed grid; fixed x <-> moving x + u_true(x).
    v_moving : (X', Y', Z', 3) float32 RAS mm on the moving grid; moving y <-> fixed y + v(y).
    mask : evaluation mask on the fixed grid: body whose mapped point lies in the field of view.
    body, lungs : bool masks of the fixed CT.
    moving_mask : bool field-of-view disc (cylinder) on the moving grid; pass it as moving mask.
    min_jacobian : min Jacobian determinant of x -> x + u_true(x) on the fixed grid.
    fov : {"centre_ras": (x, y), "radius_mm": R, "z_range_mm": (z0, z1)} of the cylinder.
    info : spacings, artefact parameters, max |u_true| in the mask, inverse residual, source.
    """

    size: str
    seed: int
    max_mm: float
    fixed: Image
    moving: Image
    u_true: np.ndarray
    v_moving: np.ndarray
    mask: np.ndarray
    body: np.ndarray
    lungs: np.ndarray
    moving_mask: np.ndarray
    min_jacobian: float
    fov: dict
    info: dict = dc_field(default_factory=dict)

    def initial_error(self) -> dict:
        """field_error of the identity (u = 0) inside the evaluation mask."""
        return field_error(np.zeros_like(self.u_true), self.u_true, self.mask)


def make_ct_cbct_case(
    seed: int = 0,
    size: str = "small",
    max_mm: float = 10.0,
    smoothness_mm: float = 50.0,
    moving_spacing: float | None = None,
) -> CTCBCTCase:
    """Build the CT / CBCT-like case (module docstring): ``size`` "small" (tests) or "full".

    seed : one integer. max_mm : largest |u_true| in the body, mm (the field is scaled to it before
    inversion, so the exact maximum is within a few % of it; see ``info["max_u_mm"]``).
    smoothness_mm : B-spline control-point spacing of the random field, mm.
    moving_spacing : CBCT voxel size in mm (default 3 for "small", 1 for "full").
    """
    if size not in SIZES:
        raise ConfigError(f"size must be one of {', '.join(SIZES)}; got {size!r}")
    if not np.isfinite(max_mm) or max_mm <= 0:
        raise ConfigError(f"max_mm must be > 0 mm; got {max_mm}")
    if not np.isfinite(smoothness_mm) or smoothness_mm <= 0:
        raise ConfigError(f"smoothness_mm must be > 0 mm; got {smoothness_mm}")
    factor, default_spacing = _GEOMETRY[size]
    s = float(default_spacing if moving_spacing is None else moving_spacing)
    if not np.isfinite(s) or s <= 0:
        raise ConfigError(f"moving_spacing must be > 0 mm; got {moving_spacing}")
    s_field, s_fov, s_art = np.random.SeedSequence([int(seed), 0xC7CB]).spawn(3)

    ct = load_chest_ct()
    # The reference grid (the "small" one) fixes everything random in world space, so that one seed
    # gives the same field, field of view and scaling for both sizes.
    ref_hu, ref_aff = _block_mean(np.asarray(ct.data), ct.affine, _GEOMETRY["small"][0])
    ref_body = body_mask(ref_hu)
    if factor == _GEOMETRY["small"][0]:
        hu, f_aff, body = ref_hu, ref_aff, ref_body
    else:
        hu, f_aff = _block_mean(np.asarray(ct.data), ct.affine, factor)
        body = body_mask(hu)
    lungs = lung_mask(hu, body)
    shape = hu.shape

    # world box of the shipped CT (voxel centres)
    corners = np.array([[i, j, k] for i in (0, ct.shape[0] - 1) for j in (0, ct.shape[1] - 1)
                        for k in (0, ct.shape[2] - 1)], dtype=np.float64)
    wc = _world(ct.affine, corners)
    ct_lo, ct_hi = wc.min(axis=0), wc.max(axis=0)

    # field of view: a cylinder along RAS z, centred near the body's centre of mass
    rng_fov = np.random.default_rng(s_fov)
    com = _world(ref_aff, np.array(ndimage.center_of_mass(ref_body)))
    phi = rng_fov.uniform(0, 2 * np.pi)
    off = FOV_OFFSET_MM * np.sqrt(rng_fov.uniform())
    centre = com[:2] + off * np.array([np.cos(phi), np.sin(phi)])
    radius = rng_fov.uniform(*FOV_RADIUS_MM)
    margin = max_mm + 5.0
    length = min(FOV_LENGTH_MM, (ct_hi[2] - ct_lo[2]) - 2 * margin - 10.0)
    if length < 5 * s:
        raise ConfigError(f"the CT is too short for a field of view with max_mm={max_mm}; lower max_mm")
    z_mid = 0.5 * (ct_lo[2] + ct_hi[2])
    z_free = 0.5 * ((ct_hi[2] - ct_lo[2]) - length) - margin
    z0 = z_mid - 0.5 * length + rng_fov.uniform(-1, 1) * max(z_free, 0.0)

    # the moving grid: axis-aligned RAS+, isotropic s, covering the cylinder
    n_xy = int(np.floor(2 * radius / s)) + 1
    n_z = int(np.floor(length / s)) + 1
    m_shape = (n_xy, n_xy, n_z)
    m_aff = np.diag([s, s, s, 1.0])
    m_aff[:3, 3] = [centre[0] - 0.5 * (n_xy - 1) * s, centre[1] - 0.5 * (n_xy - 1) * s, z0]

    # the field on a domain that holds the CT and any field of view (the same for both sizes),
    # scaled on the body of the reference grid, checked for folding over the whole domain
    lo, hi = ct_lo - FIELD_MARGIN_MM, ct_hi + FIELD_MARGIN_MM
    m_corners = _world(m_aff, np.array([[0, 0, 0], [n_xy - 1, n_xy - 1, n_z - 1]], dtype=np.float64))
    if np.any(m_corners.min(axis=0) < lo) or np.any(m_corners.max(axis=0) > hi):
        raise ConfigError("the field of view leaves the field's domain; use the default geometry")
    spline = _WorldSpline(lo, hi, smoothness_mm, np.random.default_rng(s_field))
    peak = np.sqrt((spline.on_grid(_axis_coords(ref_hu.shape, ref_aff))[ref_body] ** 2).sum(axis=-1)).max()
    spline.coef *= max_mm / peak
    min_det_v = _min_jacobian_of(spline, lo, hi)
    if min_det_v < MIN_JACOBIAN:
        raise ConfigError(
            f"the random field folds: min Jacobian determinant {min_det_v:.3f} < {MIN_JACOBIAN} "
            f"(max_mm={max_mm}, smoothness_mm={smoothness_mm}); lower max_mm or raise smoothness_mm"
        )

    # u_true on the fixed grid: the inverse of y -> y + v(y)
    u, residual = _invert_on_grid(spline, shape, f_aff, np.random.default_rng(s_fov))
    u_true = u.astype(np.float32)
    mapped = _grid_world(shape, f_aff) + u
    r2 = ((mapped[..., 0] - centre[0]) ** 2 + (mapped[..., 1] - centre[1]) ** 2) / radius**2
    z_last = m_aff[2, 3] + (n_z - 1) * s
    in_fov = (r2 <= 1.0) & (mapped[..., 2] >= z0) & (mapped[..., 2] <= z_last)
    mask = body & in_fov
    min_jac = float(jacobian_determinant(u_true, f_aff).min())

    # the moving image: the CT at y + v(y), then the CBCT effects
    coeffs = ndimage.spline_filter(hu.astype(np.float64), order=3, mode="nearest")
    inv = np.linalg.inv(f_aff)
    v_moving = spline.on_grid(_axis_coords(m_shape, m_aff))
    m_hu = np.empty(m_shape, dtype=np.float64)
    slab = max(1, int(2_000_000 // (n_xy * n_z)))
    for i0 in range(0, n_xy, slab):
        rows = slice(i0, min(i0 + slab, n_xy))
        p = _grid_world(m_shape, m_aff, rows) + v_moving[rows]
        idx = (p @ inv[:3, :3].T + inv[:3, 3]).reshape(-1, 3).T
        m_hu[rows] = ndimage.map_coordinates(
            coeffs, idx, order=3, mode="nearest", prefilter=False
        ).reshape(p.shape[:3])
    v_moving = v_moving.astype(np.float32)
    np.clip(m_hu, -1024.0, 3071.0, out=m_hu)
    moving, fov_mask, art = cbct_artefacts(m_hu, m_aff, centre, radius, s_art)

    max_u = float(np.sqrt((u_true[mask].astype(np.float64) ** 2).sum(axis=-1)).max()) if mask.any() else 0.0
    info = {
        "source": "pyradiomics 3.0.1 sdist, data/lung1_image.nrrd (real chest CT); see LICENSE_pyradiomics.txt",
        "fixed_spacing_mm": tuple(float(a) for a in np.linalg.norm(f_aff[:3, :3], axis=0)),
        "moving_spacing_mm": (s, s, s),
        "smoothness_mm": float(smoothness_mm),
        "max_u_mm": max_u,
        "min_jacobian_v": min_det_v,
        "inverse_residual_mm": residual,
        **art,
    }
    return CTCBCTCase(
        size=size,
        seed=int(seed),
        max_mm=float(max_mm),
        fixed=Image(hu, f_aff, name=f"ct_{size}"),
        moving=Image(moving, m_aff, name=f"cbct_{size}"),
        u_true=u_true,
        v_moving=v_moving,
        mask=mask,
        body=body,
        lungs=lungs,
        moving_mask=fov_mask,
        min_jacobian=min_jac,
        fov={"centre_ras": (float(centre[0]), float(centre[1])), "radius_mm": float(radius),
             "z_range_mm": (float(z0), float(z_last))},
        info=info,
    )
