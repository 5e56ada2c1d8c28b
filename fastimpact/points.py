"""Landmarks through a registration: reading the transform, point files, mapping fixed -> moving.

Direction: a registration maps FIXED points to MOVING points, ``y = T(x) = x + u(x)``, as
elastix's ``transformix -def points.txt`` does (transformix maps fixed-image points with the
transform that resamples the moving image). Moving-image landmarks go the other way through the
inverse (``fastimpact invert``).

Point files
-----------
* elastix/transformix ``.pts`` / ``.txt``: a first line ``point`` (world coordinates) or ``index``
  (fixed-image voxel indices), a second line with the number of points, then one point per line
  (``x y z``). elastix's world is LPS.
* CSV (``.csv``): a header naming ``x``, ``y``, ``z`` columns (other columns are kept as they are),
  or no header and the first three columns are x, y, z.

World coordinates in point files are LPS (ITK, elastix, 3D Slicer's files) or RAS (nibabel,
FreeSurfer, MNI): the caller states which (``convention``); fastimpact computes in RAS.
"""

from __future__ import annotations

import csv
import io as _io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ConfigError, ImageIOError
from .io import lps_to_ras, ras_to_lps

__all__ = ["Forward", "load_forward", "PointSet", "read_points", "write_points", "map_points", "CONVENTIONS"]

CONVENTIONS = ("lps", "ras")


# ------------------------------------------------------------------------------------------------
# the transform
# ------------------------------------------------------------------------------------------------
@dataclass
class Forward:
    """A fixed -> moving map ``map(points (N, 3) RAS) -> (N, 3) RAS`` with the fixed grid it was
    made on (``shape``, ``affine``; None for an ITK file), ``kind`` and ``transform`` (the
    CompositeTransform or FieldMap, or None for an ITK file)."""

    map: object
    shape: tuple | None
    affine: np.ndarray | None
    kind: str
    transform: object = None
    source: str = ""
    moving_path: str | None = None  # the moving image named by transform.json, if any


def load_forward(path) -> Forward:
    """Read a registration's transform: an output folder of ``register`` or its
    ``transform.json`` (exact), a displacement field ``.nii``/``.nii.gz`` (trilinear), an ITK
    transform ``.h5``/``.tfm`` (through SimpleITK) or an elastix TransformParameters file (linear:
    directly; B-spline: through transformix, itk-elastix)."""
    from .transforms import CompositeTransform

    p = Path(path)
    if p.is_dir():
        if not (p / "transform.json").is_file():
            raise ImageIOError(f"folder '{path}' has no transform.json; give a fastimpact output folder, its "
                               "transform.json or a displacement field")
        p = p / "transform.json"
    if not p.is_file():
        raise ImageIOError(f"transform '{path}' does not exist; give a fastimpact output folder, transform.json, "
                           "displacement.nii.gz or an ITK .h5/.tfm file")
    name = p.name.lower()
    if name.endswith(".json"):
        try:
            doc = json.loads(p.read_text())
            tr = CompositeTransform.from_dict(doc["transform"])
            shape = tuple(int(n) for n in doc["fixed"]["shape"])
            affine = np.asarray(doc["fixed"]["affine"], dtype=np.float64)
        except (ValueError, KeyError, TypeError, OSError):
            raise ConfigError(f"'{path}' is not a fastimpact transform.json; give the file register wrote") from None
        moving = (doc.get("moving") or {}).get("path")
        if moving and not Path(moving).is_absolute() and not Path(moving).exists():
            moving = str(p.parent / moving) if (p.parent / moving).exists() else moving
        return Forward(lambda q: tr.map_world(q), shape, affine, "transform", tr, str(p), moving)
    if name.endswith((".nii", ".nii.gz")):
        from .inverse import FieldMap
        from .io import load_displacement_itk

        fld, ref = load_displacement_itk(p)
        fm = FieldMap(fld, ref.affine)
        return Forward(fm, tuple(ref.shape), ref.affine, "field", fm, str(p))
    if name.endswith((".h5", ".hdf5", ".tfm", ".mat")):
        try:
            import SimpleITK as sitk
        except ImportError:
            raise ConfigError(f"reading ITK transform '{path}' needs SimpleITK: pip install SimpleITK") from None
        try:
            tx = sitk.ReadTransform(str(p))
        except RuntimeError as e:
            raise ImageIOError(f"ITK transform '{path}' cannot be read ({' '.join(str(e).split())[:160]})") from None

        def itk_map(q):
            lps = ras_to_lps(np.asarray(q, dtype=np.float64).reshape(-1, 3))
            return lps_to_ras(np.array([tx.TransformPoint(tuple(v)) for v in lps]).reshape(-1, 3))

        return Forward(itk_map, None, None, "itk", None, str(p))
    if _is_elastix_file(p):
        return _elastix_forward(p)
    raise ConfigError(f"transform '{path}' has an unknown type; give a fastimpact output folder, transform.json, "
                      "a displacement field (.nii.gz), an ITK transform (.h5, .tfm) or an elastix TransformParameters file")


def _is_elastix_file(p: Path) -> bool:
    try:
        head = p.read_text(errors="replace")[:20000]
    except OSError:
        return False
    import re

    return re.search(r"^\s*\(Transform\s+\"", head, re.M) is not None


def _elastix_forward(p: Path) -> Forward:
    """An elastix TransformParameters file: a linear one (with its chain) as its matrix, any other
    through transformix (itk-elastix), which maps the points as ``transformix -def`` does."""
    from .errors import FastImpactError
    from .interchange import initial_affine_matrix

    try:
        h = initial_affine_matrix(p)
    except FastImpactError:
        h = None
    if h is not None:
        return Forward(lambda q: np.asarray(q, dtype=np.float64).reshape(-1, 3) @ h[:3, :3].T + h[:3, 3],
                       None, None, "elastix", None, str(p))
    try:
        import itk

        itk.TransformixFilter  # noqa: B018  (loads the elastix module)
    except (ImportError, AttributeError):
        raise ConfigError(f"mapping points through the elastix transform '{p}' needs itk-elastix: pip install itk-elastix") from None

    def tfx_map(q):
        import re
        import tempfile

        pts = ras_to_lps(np.asarray(q, dtype=np.float64).reshape(-1, 3))
        with tempfile.TemporaryDirectory(prefix="fastimpact-transformix-") as d:
            d = Path(d)
            body = "".join(" ".join(repr(float(v)) for v in row) + "\n" for row in pts)
            (d / "in.pts").write_text(f"point\n{len(pts)}\n{body}")
            tf = itk.TransformixFilter.New(Input=itk.image_from_array(np.zeros((2, 2, 2), np.float32)))
            tf.SetTransformParameterFileName(str(p.resolve()))
            tf.SetFixedPointSetFileName(str(d / "in.pts"))
            tf.SetOutputDirectory(str(d))
            try:
                tf.Update()
            except RuntimeError as e:
                raise ConfigError(f"transformix cannot apply '{p}' ({' '.join(str(e).split())[-160:]})") from None
            text = (d / "outputpoints.txt").read_text()
        out = [[float(v) for v in m.split()] for m in re.findall(r"OutputPoint = \[([^\]]*)\]", text)]
        return lps_to_ras(np.array(out, dtype=np.float64).reshape(-1, 3))

    return Forward(tfx_map, None, None, "elastix", None, str(p))


# ------------------------------------------------------------------------------------------------
# point files
# ------------------------------------------------------------------------------------------------
@dataclass
class PointSet:
    """Points as read: ``coords`` (N, 3) as in the file, ``kind`` "point" (world, in the file's
    convention) or "index" (fixed voxel indices); for CSV the header, the rows and the x/y/z
    column positions, to write the other columns back unchanged."""

    coords: np.ndarray
    kind: str = "point"
    format: str = "pts"
    header: list | None = None
    rows: list = field(default_factory=list)
    columns: tuple = (0, 1, 2)


def _bad(path, what) -> ConfigError:
    return ConfigError(f"point file '{path}' {what}")


def read_points(path) -> PointSet:
    p = Path(path)
    if not p.is_file():
        raise ImageIOError(f"point file '{path}' does not exist; check the path")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ImageIOError(f"point file '{path}' cannot be read as text ({type(e).__name__})") from None
    if p.name.lower().endswith(".csv"):
        return _read_csv(text, path)
    return _read_pts(text, path)


def _read_pts(text: str, path) -> PointSet:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(lines) < 2 or lines[0].lower() not in ("point", "index"):
        raise _bad(path, "is not an elastix point file: its first line must be 'point' or 'index' and the second "
                         "the number of points (or give a .csv with x,y,z columns)")
    try:
        count = int(lines[1])
        coords = np.array([[float(v) for v in ln.split()] for ln in lines[2:]], dtype=np.float64).reshape(-1, 3)
    except ValueError:
        raise _bad(path, "has a line that is not 3 numbers (x y z) or a count that is not an integer") from None
    if count != len(coords):
        raise _bad(path, f"says {count} points but holds {len(coords)}; fix the count on its second line")
    return PointSet(coords, lines[0].lower(), "pts")


def _read_csv(text: str, path) -> PointSet:
    rows = [r for r in csv.reader(_io.StringIO(text)) if any(c.strip() for c in r)]
    if not rows:
        raise _bad(path, "is empty; give one point per row with x, y, z columns")

    def numeric(row):
        try:
            [float(c) for c in row[:3]]
            return len(row) >= 3
        except ValueError:
            return False

    header = None
    cols = (0, 1, 2)
    if not numeric(rows[0]):
        header = [c.strip() for c in rows[0]]
        low = [c.lower() for c in header]
        try:
            cols = tuple(low.index(k) for k in ("x", "y", "z"))
        except ValueError:
            raise _bad(path, f"has the header {header} without x, y and z columns; name them x,y,z") from None
        rows = rows[1:]
    try:
        coords = np.array([[float(r[c]) for c in cols] for r in rows], dtype=np.float64).reshape(-1, 3)
    except (ValueError, IndexError):
        raise _bad(path, "has a row whose x, y, z are not numbers") from None
    return PointSet(coords, "point", "csv", header, rows, cols)


def write_points(ps: PointSet, coords: np.ndarray, path, convention: str) -> None:
    """Write mapped world points in the input's format (.pts: elastix 'point' file; .csv: the
    input's columns with x, y, z replaced). ``convention`` is noted nowhere in a .pts file (elastix
    has none: it is LPS); CSV output names it in its header (``x,y,z`` columns stay)."""
    p = Path(path)
    fmt = "csv" if p.name.lower().endswith(".csv") else "pts"
    if fmt == "pts":
        body = "".join(" ".join(repr(float(v)) for v in row) + "\n" for row in coords)
        p.write_text(f"point\n{len(coords)}\n{body}")
        return
    buf = _io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if ps.format == "csv" and ps.header is not None:
        w.writerow(ps.header)
        for row, c in zip(ps.rows, coords):
            out = list(row)
            for k, v in zip(ps.columns, c):
                out[k] = repr(float(v))
            w.writerow(out)
    else:
        w.writerow(["x", "y", "z"])
        for c in coords:
            w.writerow([repr(float(v)) for v in c])
    p.write_text(buf.getvalue())


def map_points(forward: Forward, ps: PointSet, convention: str) -> tuple[np.ndarray, dict]:
    """Map a point set fixed -> moving; returns (points (N, 3) in ``convention``, info)."""
    conv = str(convention).lower()
    if conv not in CONVENTIONS:
        raise ConfigError(f"coordinate convention {convention!r} is invalid: choose lps or ras")
    if ps.kind == "index":
        if forward.affine is None:
            raise ConfigError("an 'index' point file needs the fixed grid: give a fastimpact output folder, "
                              "transform.json or displacement field rather than an ITK transform file")
        x = ps.coords @ forward.affine[:3, :3].T + forward.affine[:3, 3]
    else:
        x = lps_to_ras(ps.coords) if conv == "lps" else ps.coords.copy()
    y = np.asarray(forward.map(x), dtype=np.float64).reshape(-1, 3)
    info = {"points": int(len(x)), "direction": "fixed -> moving", "convention": conv.upper(),
            "transform": forward.kind}
    if forward.affine is not None and len(x):
        inv = np.linalg.inv(forward.affine)
        q = x @ inv[:3, :3].T + inv[:3, 3]
        hi = np.asarray(forward.shape, dtype=np.float64) - 1.0
        info["outside_fixed_grid"] = int(np.count_nonzero(~np.all((q >= -0.5) & (q <= hi + 0.5), axis=1)))
    return (ras_to_lps(y) if conv == "lps" else y), info
