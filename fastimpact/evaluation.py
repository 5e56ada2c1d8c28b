"""How good is a registration: overlap, surface distance, landmark error and the regularity of the field.

Conventions (as everywhere in fastimpact): world points are RAS+ mm; an image's affine maps a voxel
index (i, j, k) to RAS mm; a transform maps a fixed world point x to the moving world point
T(x) = x + u(x), u being the displacement (X, Y, Z, 3) in mm on the fixed grid.

* Dice per label between the fixed label map and the moving label map warped onto the fixed grid
  (nearest neighbour).
* HD95 per label, in mm: the surface voxels of a label are its voxels with a 6-neighbour outside the
  label (the grid border counts as outside); d(A->B) are the distances from every surface voxel of A
  to the nearest surface voxel of B, measured between voxel centres in physical mm (anisotropic and
  oblique grids included); HD95 = max(95th percentile of d(A->B), 95th percentile of d(B->A)).
* TRE per landmark pair: |T(p_fixed) - p_moving| in mm.
* Jacobian determinant det(I + du/dx) of x -> x + u(x), derivatives in world mm; <= 0 is a fold.
"""

from __future__ import annotations

import csv
import io as _io
import math
from pathlib import Path

import numpy as np

from .errors import ConfigError, ImageError, ImageIOError
from .image import Image, to_numpy

__all__ = [
    "jacobian_determinant",
    "jacobian_stats",
    "foreground_mask",
    "label_array",
    "dice_per_label",
    "hd95_per_label",
    "label_metrics",
    "read_points",
    "target_registration_error",
    "sample_displacement",
    "learn2reg_displacement",
    "assess_registration",
    "stage_warnings",
    "jacobian_warnings",
]

# Thresholds of the warnings attached to every registration (see assess_registration).
FOLD_INSIDE_WARN = 0.0          # any folded voxel inside the mask / foreground
FOLD_OUTSIDE_WARN = 1e-3        # more than 0.1 % of the voxels outside it
FOLD_ALL_WARN = 1e-4            # no mask and no foreground: 0.01 % of the grid
METRIC_RISE_TOL = 0.05          # metric_end and metric_end_mean10 above metric_start by > 5 % of |start|
CLIPPED_WARN = 0.25             # more than a quarter of the steps clipped
LARGE_DISPLACEMENT_FRACTION = 0.15  # deformable part above 15 % of the smallest field-of-view extent
AFFINE_SCALE_RANGE = (0.5, 2.0)     # volume change of the affine part


# --------------------------------------------------------------------------------------------
# Jacobian determinant
# --------------------------------------------------------------------------------------------
def _check_field(field, affine):
    u = to_numpy(field)
    if u.ndim != 4 or u.shape[-1] != 3:
        raise ConfigError(f"displacement field has shape {u.shape}: it must be (X, Y, Z, 3) in mm")
    if min(u.shape[:3]) < 2:
        raise ConfigError(f"displacement field grid {u.shape[:3]} is too small: every axis needs 2 voxels for derivatives")
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)) or abs(np.linalg.det(a[:3, :3])) < 1e-12:
        raise ConfigError("the field's affine must be a finite, non-singular 4x4 matrix (voxel index -> mm)")
    return u, a


def jacobian_determinant(field, affine) -> np.ndarray:
    """det(I + du/dx) at every voxel of a displacement field u.

    field : (X, Y, Z, 3) displacement in world mm (any world frame, RAS or LPS alike, as long as
        ``affine`` maps indices into the same frame) on the grid of ``affine``.
    affine : (4, 4) voxel index -> world mm; may be oblique, flipped, sheared or anisotropic.
    Derivatives along the index axes are central differences (one-sided at the grid border, as
    ``numpy.gradient``); the chain rule ``du/dx = du/di . di/dx`` with ``di/dx`` the inverse of the
    affine's 3x3 part gives them in world mm. Returns (X, Y, Z) float64. A Numba kernel (parallel
    over the first axis); :func:`jacobian_determinant_numpy` is the reference it is tested against.
    """
    u, a = _check_field(field, affine)
    inv = np.ascontiguousarray(np.linalg.inv(a[:3, :3]))
    out = np.empty(u.shape[:3], dtype=np.float64)
    uu = u if u.dtype in (np.float32, np.float64) else u.astype(np.float64)
    _jacobian_kernel()(uu, inv, out)
    return out


def jacobian_determinant_numpy(field, affine, *, chunk: int = 16) -> np.ndarray:
    """The NumPy reference of :func:`jacobian_determinant` (slabs of ``chunk`` planes)."""
    u, a = _check_field(field, affine)
    inv = np.linalg.inv(a[:3, :3])  # inv[a, d] = d index_a / d world_d
    X = u.shape[0]
    out = np.empty(u.shape[:3], dtype=np.float64)
    for s in range(0, X, chunk):
        e = min(s + chunk, X)
        lo, hi = max(s - 1, 0), min(e + 1, X)
        sub = np.asarray(u[lo:hi], dtype=np.float64)
        keep = slice(s - lo, s - lo + (e - s))
        m = [[None] * 3 for _ in range(3)]  # m[c][d]: delta_cd + du_c / dx_d
        for c in range(3):
            g = [gi[keep] for gi in np.gradient(sub[..., c], axis=(0, 1, 2))]
            for d in range(3):
                m[c][d] = g[0] * inv[0, d] + g[1] * inv[1, d] + g[2] * inv[2, d] + (1.0 if c == d else 0.0)
        out[s:e] = (m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
                    - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
                    + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0]))
    return out


_KERNELS: dict = {}


def _jacobian_kernel():
    if "jac" not in _KERNELS:
        import numba

        @numba.njit(parallel=True, cache=True, nogil=True)
        def jac(u, inv, out):  # pragma: no cover - compiled
            X, Y, Z = out.shape
            for i in numba.prange(X):
                i0 = max(i - 1, 0)
                i1 = min(i + 1, X - 1)
                hi = 1.0 / (i1 - i0)
                g = np.empty((3, 3))
                for j in range(Y):
                    j0 = max(j - 1, 0)
                    j1 = min(j + 1, Y - 1)
                    hj = 1.0 / (j1 - j0)
                    for k in range(Z):
                        k0 = max(k - 1, 0)
                        k1 = min(k + 1, Z - 1)
                        hk = 1.0 / (k1 - k0)
                        for c in range(3):
                            di = (u[i1, j, k, c] - u[i0, j, k, c]) * hi
                            dj = (u[i, j1, k, c] - u[i, j0, k, c]) * hj
                            dk = (u[i, j, k1, c] - u[i, j, k0, c]) * hk
                            for d in range(3):
                                g[c, d] = di * inv[0, d] + dj * inv[1, d] + dk * inv[2, d]
                            g[c, c] += 1.0
                        out[i, j, k] = (g[0, 0] * (g[1, 1] * g[2, 2] - g[1, 2] * g[2, 1])
                                        - g[0, 1] * (g[1, 0] * g[2, 2] - g[1, 2] * g[2, 0])
                                        + g[0, 2] * (g[1, 0] * g[2, 1] - g[1, 1] * g[2, 0]))

        _KERNELS["jac"] = jac
    return _KERNELS["jac"]


def _magnitudes_kernel():
    if "mag" not in _KERNELS:
        import numba

        @numba.njit(parallel=True, cache=True, nogil=True)
        def mag(u, lin, total, deform):  # pragma: no cover - compiled
            X, Y, Z = total.shape
            for i in numba.prange(X):
                for j in range(Y):
                    for k in range(Z):
                        t = 0.0
                        s = 0.0
                        for r in range(3):
                            v = u[i, j, k, r]
                            a = v - (lin[r, 0] * i + lin[r, 1] * j + lin[r, 2] * k + lin[r, 3])
                            t += v * v
                            s += a * a
                        total[i, j, k] = np.sqrt(t)
                        deform[i, j, k] = np.sqrt(s)

        _KERNELS["mag"] = mag
    return _KERNELS["mag"]


def _percentile(v: np.ndarray, q, limit: int = 2_000_000):
    """np.percentile, on an even subsample (stride) of at most ``limit`` values for big arrays."""
    v = v.ravel()
    if v.size > limit:
        v = v[:: -(-v.size // limit)]
    return np.percentile(v, q)


def _region_stats(det: np.ndarray) -> dict | None:
    if det.size == 0:
        return None
    logj = np.log(np.clip(det, 1e-9, 1e9))
    folded = int(np.count_nonzero(det <= 0))
    return {
        "n_voxels": int(det.size),
        "min": float(det.min()),
        "max": float(det.max()),
        "mean": float(det.mean()),
        "p1": float(_percentile(det, 1)),
        "p99": float(_percentile(det, 99)),
        "std_log_jacobian": float(logj.std()),
        "folded_voxels": folded,
        "folding_fraction": folded / det.size,
    }


def jacobian_stats(det: np.ndarray, mask=None, region: str = "mask") -> dict:
    """Statistics of a Jacobian-determinant map, over the grid and inside / outside ``mask``.

    det : (X, Y, Z). mask : (X, Y, Z) bool or None. Each region holds n_voxels, min, max, mean, p1,
    p99 (from an even subsample of at most 2e6 voxels in larger regions), std_log_jacobian (std of log det, det clipped to [1e-9, 1e9], as Learn2Reg reports it),
    folded_voxels (det <= 0) and folding_fraction (folded_voxels / n_voxels). ``inside`` and
    ``outside`` are None without a mask (or when a region is empty).
    """
    det = np.asarray(det)
    out = {"region": region if mask is not None else "none", "all": _region_stats(det.ravel()),
           "inside": None, "outside": None}
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        if m.shape != det.shape:
            raise ConfigError(f"mask of shape {m.shape} does not match the field grid {det.shape}: "
                              "give a mask on the fixed grid")
        out["inside"] = _region_stats(det[m])
        out["outside"] = _region_stats(det[~m])
    return out


def foreground_mask(data, fraction: float = 0.1) -> np.ndarray | None:
    """A rough foreground of an image with no mask: voxels above ``fraction`` of the 1-99 percentile
    range (above the 1st percentile), holes filled. None when the image is too flat to tell."""
    from scipy import ndimage

    v = np.asarray(to_numpy(data), dtype=np.float32)
    step = max(1, v.size // 2_000_000)
    lo, hi = np.percentile(v.ravel()[::step], [1, 99])
    if not hi > lo:
        return None
    fg = v > lo + fraction * (hi - lo)
    if fg.size > 1_000_000:  # fill the holes at half resolution: a rough region, 8x faster
        half = ndimage.binary_fill_holes(fg[::2, ::2, ::2])
        up = half.repeat(2, 0).repeat(2, 1).repeat(2, 2)[: fg.shape[0], : fg.shape[1], : fg.shape[2]]
        fg |= up
    else:
        fg = ndimage.binary_fill_holes(fg)
    if not fg.any() or fg.all():
        return None
    return fg


# --------------------------------------------------------------------------------------------
# labels: Dice and HD95
# --------------------------------------------------------------------------------------------
def label_array(obj, role: str = "label map") -> np.ndarray:
    """An integer (X, Y, Z) array from an Image or array; float data must hold whole numbers."""
    data = to_numpy(obj.data if isinstance(obj, Image) else obj)
    data = np.asarray(data)
    if data.ndim != 3:
        raise ImageError(f"{role} has shape {data.shape}: a 3-D label map is required")
    if data.dtype.kind in "iub":
        return data.astype(np.int64, copy=False)
    if data.dtype.kind != "f" or not np.all(np.isfinite(data)):
        raise ImageError(f"{role} holds non-finite or non-numeric values: give a label map of whole numbers")
    r = np.rint(data)
    bad = np.abs(data - r) > 1e-3
    if bad.any():
        raise ImageError(f"{role} holds non-integer values (e.g. {float(data[bad].flat[0]):g}): it looks like an "
                         "intensity image; give a label map (one whole number per structure, 0 = background)")
    return r.astype(np.int64)


def _labels_to_use(labels, *arrays) -> list[int]:
    if labels is not None:
        return [int(v) for v in labels]
    found = set()
    for a in arrays:
        found.update(int(v) for v in np.unique(a))
    found.discard(0)
    return sorted(found)


def dice_per_label(fixed_labels, warped_labels, labels=None) -> dict[int, float]:
    """Dice 2|A n B| / (|A| + |B|) per label (0 = background is skipped) on one grid.

    labels: which labels (default: every non-zero value of either map). A label absent from both
    maps gives NaN; absent from one of them, 0.
    """
    a, b = label_array(fixed_labels, "fixed labels"), label_array(warped_labels, "warped labels")
    if a.shape != b.shape:
        raise ImageError(f"label maps have shapes {a.shape} and {b.shape}: warp the moving labels onto the fixed grid first")
    out = {}
    for lab in _labels_to_use(labels, a, b):
        ma, mb = a == lab, b == lab
        na, nb = int(np.count_nonzero(ma)), int(np.count_nonzero(mb))
        out[lab] = float("nan") if na + nb == 0 else 2.0 * np.count_nonzero(ma & mb) / (na + nb)
    return out


def _surface(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    inner = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1), border_value=0)
    return mask & ~inner


def _orthogonal(lin: np.ndarray) -> bool:
    cols = lin / np.linalg.norm(lin, axis=0)
    return np.allclose(cols.T @ cols, np.eye(3), atol=1e-6)


def _directed_distances(sa: np.ndarray, sb: np.ndarray, affine: np.ndarray, lo: np.ndarray) -> tuple:
    """Distances (mm) from each voxel of sa to the nearest voxel of sb and back (same crop)."""
    lin = affine[:3, :3]
    if _orthogonal(lin):
        from scipy import ndimage

        spacing = np.linalg.norm(lin, axis=0)
        da = ndimage.distance_transform_edt(~sb, sampling=spacing)[sa]
        db = ndimage.distance_transform_edt(~sa, sampling=spacing)[sb]
        return da, db
    # a sheared grid: voxel-centre distances are not separable; nearest neighbours in world mm
    from scipy.spatial import cKDTree

    pa = (np.argwhere(sa) + lo) @ lin.T
    pb = (np.argwhere(sb) + lo) @ lin.T
    return cKDTree(pb).query(pa)[0], cKDTree(pa).query(pb)[0]


def hd95_per_label(fixed_labels, warped_labels, affine, labels=None, percentile: float = 95.0) -> dict[int, float | None]:
    """HD95 in mm per label (see the module docstring); None where a label is empty in one map.

    affine: (4, 4) voxel -> mm of the common grid; anisotropic and oblique spacings are measured
    exactly (sheared grids through a k-d tree in world mm).
    """
    a, b = label_array(fixed_labels, "fixed labels"), label_array(warped_labels, "warped labels")
    if a.shape != b.shape:
        raise ImageError(f"label maps have shapes {a.shape} and {b.shape}: warp the moving labels onto the fixed grid first")
    affine = np.asarray(affine, dtype=np.float64)
    out = {}
    for lab in _labels_to_use(labels, a, b):
        ma, mb = a == lab, b == lab
        if not ma.any() or not mb.any():
            out[lab] = None
            continue
        # crop to both labels' bounding box plus one voxel: every surface voxel lies inside, so the
        # nearest-surface distances are those of the whole grid
        idx = np.argwhere(ma | mb)
        lo = np.maximum(idx.min(axis=0) - 1, 0)
        hi = np.minimum(idx.max(axis=0) + 2, a.shape)
        box = tuple(slice(int(l), int(h)) for l, h in zip(lo, hi))
        ca, cb = ma[box], mb[box]
        sa, sb = _surface(ca), _surface(cb)
        da, db = _directed_distances(sa, sb, affine, lo)
        out[lab] = float(max(np.percentile(da, percentile), np.percentile(db, percentile)))
    return out


def label_metrics(fixed_labels, warped_labels, affine, labels=None) -> dict:
    """Dice and HD95 per label plus their means: {'labels': [{label, dice, hd95_mm, fixed_voxels,
    warped_voxels}], 'dice_mean', 'hd95_mean_mm'} (means over labels with a defined value)."""
    a, b = label_array(fixed_labels, "fixed labels"), label_array(warped_labels, "warped labels")
    labs = _labels_to_use(labels, a, b)
    if not labs:
        raise ImageError("the label maps hold no label other than 0 (background): give label maps with structures")
    dice = dice_per_label(a, b, labs)
    hd = hd95_per_label(a, b, affine, labs)
    rows = [{"label": lab, "dice": dice[lab], "hd95_mm": hd[lab], "fixed_voxels": int(np.count_nonzero(a == lab)),
             "warped_voxels": int(np.count_nonzero(b == lab))} for lab in labs]
    dv = [r["dice"] for r in rows if not math.isnan(r["dice"])]
    hv = [r["hd95_mm"] for r in rows if r["hd95_mm"] is not None]
    return {"labels": rows, "dice_mean": float(np.mean(dv)) if dv else None,
            "hd95_mean_mm": float(np.mean(hv)) if hv else None}


# --------------------------------------------------------------------------------------------
# landmarks
# --------------------------------------------------------------------------------------------
def _declared_convention(line: str) -> str | None:
    s = line.lstrip("#").strip().lower().replace(" ", "")
    for key in ("coordinatesystem=", "coordinates=", "coordinates:", "convention=", "convention:", "space=", "space:"):
        if s.startswith(key):
            v = s[len(key):]
            if v in ("ras", "0", "world", "ras+"):
                return "RAS"
            if v in ("lps", "1", "lps+"):
                return "LPS"
    if s in ("ras", "lps"):
        return s.upper()
    return None


def read_points(path, *, lps: bool | None = None) -> tuple[np.ndarray, str]:
    """Read landmarks (world mm) from a CSV/TSV/text file; return (N, 3) RAS mm and the convention read.

    Format: one point per row. A header row naming columns ``x, y, z`` selects them (other columns,
    e.g. a name, are ignored); without a header the rows must be 3 numbers, or 3D Slicer ``.fcsv``
    rows (id, x, y, z, ...). Lines starting with ``#`` are comments; a comment such as
    ``# CoordinateSystem = LPS`` (Slicer) or ``# coordinates: RAS`` declares the convention.
    Points are RAS+ mm (fastimpact's convention, nibabel's, Slicer's before 4.11) unless the file
    declares LPS (ITK, ANTs, elastix, Slicer 4.11+) or ``lps=True`` says so (``--points-lps``); a
    file declaring one and ``lps`` saying the other is an error.
    """
    p = Path(path)
    if not p.is_file():
        raise ImageIOError(f"landmark file '{p}' does not exist: give a CSV of x,y,z world mm points")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ImageIOError(f"landmark file '{p}' cannot be read ({type(exc).__name__}): give a text CSV") from None
    declared = None
    rows = []
    for line in text.splitlines():
        st = line.strip()
        if not st:
            continue
        if st.startswith("#"):
            conv = _declared_convention(st)
            if conv:
                declared = conv
            continue
        rows.append(st)
    if not rows:
        raise ImageError(f"landmark file '{p}' holds no points: one row x,y,z (world mm) per landmark")
    delim = "\t" if "\t" in rows[0] else ("," if "," in rows[0] else None)
    if delim is None:
        table = [r.split() for r in rows]
    else:
        table = list(csv.reader(_io.StringIO("\n".join(rows)), delimiter=delim))
    table = [[c.strip() for c in r] for r in table]

    def numeric(cells):
        try:
            [float(c) for c in cells]
            return True
        except ValueError:
            return False

    fcsv = p.suffix.lower() == ".fcsv"
    first = table[0]
    cols = [1, 2, 3] if fcsv else None
    if (fcsv and not numeric(first[1:4])) or (not fcsv and not numeric(first)):
        header = [c.lower() for c in first]
        try:
            cols = [header.index(k) for k in ("x", "y", "z")]
        except ValueError:
            raise ImageError(f"landmark file '{p}' has a header {first} without columns x, y, z: name them "
                             "x,y,z or drop the header") from None
        table = table[1:]
        if not table:
            raise ImageError(f"landmark file '{p}' holds a header but no points")
    pts = []
    for n, r in enumerate(table):
        try:
            vals = [r[c] for c in cols] if cols else r
            if cols is None and len(vals) != 3:
                raise ValueError
            pts.append([float(v) for v in vals])
        except (ValueError, IndexError):
            raise ImageError(f"landmark file '{p}', point {n + 1}: {','.join(r)!r} is not 3 numbers x,y,z (mm)") from None
    pts = np.asarray(pts, dtype=np.float64)
    if not np.all(np.isfinite(pts)):
        raise ImageError(f"landmark file '{p}' holds NaN/Inf coordinates: fix the file")
    if lps is not None and declared is not None and declared != ("LPS" if lps else "RAS"):
        raise ConfigError(f"landmark file '{p}' declares {declared} coordinates but "
                          f"{'--points-lps' if lps else '--points-ras'} was given: drop the option or fix the file")
    conv = declared or ("LPS" if lps else "RAS")
    if conv == "LPS":
        pts = pts * np.array([-1.0, -1.0, 1.0])
    return pts, conv


def target_registration_error(fixed_points, moving_points, mapping) -> dict:
    """TRE = |T(p_fixed) - p_moving| (mm) for paired landmarks (N, 3) RAS mm.

    mapping: callable (N, 3) fixed world -> (N, 3) moving world. Returns per-point errors, their
    mean, std, median, p95 and max, and the same for the distances before registration
    (|p_fixed - p_moving|).
    """
    f = np.asarray(fixed_points, dtype=np.float64)
    m = np.asarray(moving_points, dtype=np.float64)
    if f.shape != m.shape:
        raise ImageError(f"the landmark files hold {len(f)} fixed and {len(m)} moving points: they must be paired row by row")
    mapped = np.asarray(mapping(f), dtype=np.float64).reshape(f.shape)
    err = np.linalg.norm(mapped - m, axis=1)
    before = np.linalg.norm(f - m, axis=1)

    def summary(e):
        return {"mean": float(e.mean()), "std": float(e.std()), "median": float(np.median(e)),
                "p95": float(np.percentile(e, 95)), "max": float(e.max())}

    return {"n_points": int(len(f)), "per_point_mm": [float(v) for v in err], **summary(err),
            "before": summary(before)}


def sample_displacement(field, affine, points) -> tuple[np.ndarray, np.ndarray]:
    """Trilinear u at world points (N, 3) from a field (X, Y, Z, 3) on the grid of ``affine``.

    Returns (u (N, 3), inside (N,) bool: the point lies within the grid; outside ones take the
    nearest border value)."""
    from scipy import ndimage

    u = to_numpy(field)
    inv = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    q = np.asarray(points, dtype=np.float64) @ inv[:3, :3].T + inv[:3, 3]
    shape = np.asarray(u.shape[:3])
    inside = np.all((q >= -0.5) & (q <= shape - 0.5), axis=1)
    out = np.stack([ndimage.map_coordinates(np.asarray(u[..., c], dtype=np.float64), q.T, order=1, mode="nearest")
                    for c in range(3)], axis=1)
    return out, inside


# --------------------------------------------------------------------------------------------
# Learn2Reg export
# --------------------------------------------------------------------------------------------
def learn2reg_displacement(field, fixed_affine, moving_affine) -> np.ndarray:
    """The Learn2Reg convention: displacement in voxels, (X, Y, Z, 3) float32 on the fixed grid.

    For fixed voxel i the value is ``q - i`` with ``q = M^-1 (F i + u(F i))`` the continuous moving
    voxel index: sampling the moving image at ``i + d(i)`` (``scipy.ndimage.map_coordinates`` on
    the identity grid plus the field, as the challenge's evaluation does) gives the warped image.
    When fixed and moving share one grid this is ``F_lin^-1 u``.
    """
    u = np.asarray(to_numpy(field), dtype=np.float64)
    F = np.asarray(fixed_affine, dtype=np.float64)
    Minv = np.linalg.inv(np.asarray(moving_affine, dtype=np.float64))
    vox = Minv @ F  # index -> moving index without u
    out = np.empty(u.shape, dtype=np.float32)
    axes = [np.arange(n, dtype=np.float64) for n in u.shape[:3]]
    base = vox[:3, :3] - np.eye(3)
    for r in range(3):
        lin = (base[r, 0] * axes[0][:, None, None] + base[r, 1] * axes[1][None, :, None]
               + base[r, 2] * axes[2][None, None, :] + vox[r, 3])
        out[..., r] = lin + u[..., 0] * Minv[r, 0] + u[..., 1] * Minv[r, 1] + u[..., 2] * Minv[r, 2]
    return out


# --------------------------------------------------------------------------------------------
# the checks attached to every registration
# --------------------------------------------------------------------------------------------
def _pct(v: float) -> str:
    return f"{100 * v:.3g}%"


def stage_warnings(stages) -> list[str]:
    """Warnings from report['stages']: a level whose metric rose, a level with many clipped steps."""
    out = []
    for s in stages or ():
        try:
            start, end = float(s["metric_start"]), float(s.get("metric_end_mean10", s["metric_end"]))
            it = int(s.get("iterations", 0))
        except (KeyError, TypeError, ValueError):
            continue
        where = f"{s.get('stage', '?')} level {s.get('level', '?')}"
        # the values are stochastic (a new sample set every step): a rise counts when both the last
        # value and the mean of the last ten lie above the first by more than a fraction of |start|
        end = min(end, float(s.get("metric_end", end)))
        if np.isfinite(start) and np.isfinite(end) and end > start + METRIC_RISE_TOL * abs(start) + 1e-12:
            out.append(f"{where}: the metric rose ({start:.6g} -> {end:.6g} at the end): the optimiser "
                       "made the match worse; the metric probably does not suit these images (for different contrasts "
                       "try --metric mi or impact, or a --preset such as multimodal-brain), or give masks")
        clipped = s.get("clipped_steps")
        if it and clipped is not None and clipped > CLIPPED_WARN * it:
            out.append(f"{where}: {clipped} of {it} steps were clipped by the step-length safeguard: the "
                       "optimisation was unstable; try another metric, fewer --iterations or a larger --grid-spacing")
    return out


def jacobian_warnings(jac: dict, displacement: dict | None = None, affine_det: float | None = None) -> list[str]:
    """Warnings from jacobian_stats (and the displacement / affine figures of assess_registration)."""
    out = []
    region = jac.get("region", "none")
    inside, outside, whole = jac.get("inside"), jac.get("outside"), jac.get("all")
    fix = ("use a --fixed-mask, a larger --bending-weight or --grid-spacing, another metric or a --preset "
           "(fastimpact presets list)")
    if inside is not None and inside["folding_fraction"] > FOLD_INSIDE_WARN:
        out.append(f"folding: {inside['folded_voxels']} voxels ({_pct(inside['folding_fraction'])}) inside the {region} "
                   f"have a Jacobian determinant <= 0 (min {inside['min']:.3g}): the transform folds there and the "
                   f"result is not anatomically plausible; {fix}")
    if outside is not None and outside["folding_fraction"] > FOLD_OUTSIDE_WARN:
        out.append(f"folding: {_pct(outside['folding_fraction'])} of the voxels outside the {region} have a Jacobian "
                   f"determinant <= 0 (min {outside['min']:.3g}): the field folds in the background; {fix}")
    if inside is None and whole is not None and whole["folding_fraction"] > FOLD_ALL_WARN:
        out.append(f"folding: {_pct(whole['folding_fraction'])} of the voxels have a Jacobian determinant <= 0 "
                   f"(min {whole['min']:.3g}); {fix}")
    if displacement and displacement.get("deformable_max_mm") is not None:
        lim = displacement.get("large_limit_mm")
        if lim and displacement["deformable_max_mm"] > lim:
            where = f" inside the {region}" if region != "none" else ""
            out.append(f"large deformation: the B-spline part moves a voxel{where} by {displacement['deformable_max_mm']:.1f} mm "
                       f"(limit {lim:.0f} mm, {_pct(LARGE_DISPLACEMENT_FRACTION)} of the smallest field-of-view extent): "
                       "check the warped image; try another metric, a mask or a larger --bending-weight")
    if affine_det is not None and not (AFFINE_SCALE_RANGE[0] <= affine_det <= AFFINE_SCALE_RANGE[1]):
        out.append(f"affine: the affine stage changes volumes by a factor {affine_det:.3g}: the images were probably "
                   "matched wrongly; check orientations and masks, or try --init geometry / another metric")
    return out


def assess_registration(displacement, grid_affine, *, stages=(), fixed_mask=None, fixed_data=None,
                        affine_matrix=None, mask_name: str = "fixed mask") -> tuple[dict, list[str], np.ndarray]:
    """Jacobian figures and warnings of a registration.

    displacement : (X, Y, Z, 3) u(x) = T(x) - x in mm on the fixed grid (affine part included).
    grid_affine : (4, 4) voxel -> RAS mm of that grid. stages : report['stages'].
    fixed_mask : (X, Y, Z) bool or None; without it a foreground of ``fixed_data`` (see
        foreground_mask) separates inside from outside; ``mask_name`` names it in the figures and
        warnings. affine_matrix : 4x4 world map of the affine
        part; the deformable part u - (A(x) - x) is then measured separately.
    Returns (quality dict, warnings, Jacobian-determinant map).
    """
    u = to_numpy(displacement)
    det = jacobian_determinant(u, grid_affine)
    region_mask, region = None, "none"
    if fixed_mask is not None:
        region_mask, region = np.asarray(to_numpy(fixed_mask)) > 0, mask_name
    elif fixed_data is not None:
        region_mask = foreground_mask(fixed_data)
        if region_mask is not None:
            region = "fixed-image foreground"
    jac = jacobian_stats(det, region_mask, region)
    ga = np.asarray(grid_affine, dtype=np.float64)
    am = np.eye(4) if affine_matrix is None else np.asarray(affine_matrix, dtype=np.float64)
    lin = np.ascontiguousarray((am @ ga)[:3] - ga[:3])  # A(x) - x as an affine map of the index
    mag = np.empty(u.shape[:3], np.float32)
    dmag = np.empty(u.shape[:3], np.float32)
    _magnitudes_kernel()(u if u.dtype in (np.float32, np.float64) else u.astype(np.float64), lin, mag, dmag)
    disp = {"max_mm": float(mag.max()), "p99_mm": float(_percentile(mag, 99))}
    aff_det = None
    if affine_matrix is not None:
        aff_det = float(np.linalg.det(am[:3, :3]))
        sel = dmag[region_mask] if region_mask is not None else dmag.ravel()
        fov = np.asarray(u.shape[:3]) * np.linalg.norm(ga[:3, :3], axis=0)
        disp.update({"deformable_max_mm": float(sel.max()), "deformable_p99_mm": float(_percentile(sel, 99)),
                     "deformable_max_all_mm": float(dmag.max()),
                     "large_limit_mm": float(LARGE_DISPLACEMENT_FRACTION * fov.min())})
    quality = {
        "jacobian": jac,
        "displacement": disp,
        "affine_determinant": aff_det,
        "thresholds": {"fold_inside": FOLD_INSIDE_WARN, "fold_outside": FOLD_OUTSIDE_WARN,
                       "metric_rise": METRIC_RISE_TOL, "clipped": CLIPPED_WARN,
                       "large_displacement_fov_fraction": LARGE_DISPLACEMENT_FRACTION},
    }
    warnings = stage_warnings(stages) + jacobian_warnings(jac, disp, aff_det)
    return quality, warnings, det
