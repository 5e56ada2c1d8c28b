"""Transform files for other tools: ITK (SimpleITK, ANTs, 3D Slicer) and elastix/transformix.

Every file written here maps a fixed-image point to the moving-image point, as the
:class:`~fastimpact.transforms.CompositeTransform` it comes from: ``T(x) = A(x) + u(x)`` with the
B-spline displacement ``u`` evaluated at the fixed point ``x`` (not at ``A(x)``). That is ITK's and
elastix's "resampling" direction, so transformix's ``-def`` and SimpleITK's ``TransformPoint`` map
fixed points to moving points exactly as fastimpact's displacement field does.

Both tools work in LPS millimetres; fastimpact's world is RAS. The conversion uses
:func:`fastimpact.io.ras_to_lps` / :func:`fastimpact.io.ras_matrix_to_lps` only.

How the composite is expressed exactly
--------------------------------------
fastimpact's control grid is an ITK B-spline grid: node ``k`` sits at
``grid_to_world @ k`` (an origin one grid spacing before the first fixed voxel centre, the grid
spacing along the fixed image's direction cosines), and the displacement is
``sum_k c_k beta3(t - k)`` with ``t`` the continuous grid index: the cubic ITK/elastix
``BSplineTransform`` with the same nodes, whose coefficients are physical (world) vectors.

* ITK has only composition, ``CompositeTransform([A, B])(x) = A(B(x))``. With
  ``B(x) = x + L^-1 u(x)`` (``L`` the affine's linear part: coefficients ``L^-1 c_k``, the same
  grid) ``A(B(x)) = A(x) + u(x)`` holds exactly.
* elastix combines an initial transform ``T0`` and the current ``T1`` either by composition or by
  addition, ``T(x) = T0(x) + T1(x) - x`` (``HowToCombineTransforms "Add"``). With ``T0 = A`` and
  ``T1`` the B-spline with coefficients ``c_k``, addition is ``A(x) + u(x)`` exactly.

ITK evaluates a B-spline only at grid indices in ``[1, size - 3]`` (elastix similarly) and gives
zero displacement elsewhere, while the last fixed voxel can lie at index ``size - 2`` of
fastimpact's grid. The exported grids therefore carry one zero node more on each side
(:data:`GRID_PAD`): the displacement is unchanged (fastimpact counts missing nodes as zero) and
every point within one grid spacing of the box of fixed voxel centres is evaluated as fastimpact
does. Further out the tools differ (ITK: zero; fastimpact: the tapering tail of the spline).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from .errors import ConfigError, ImageIOError
from .image import Image
from .io import ras_matrix_to_lps, ras_to_lps
from .transforms import AffineTransform, BSplineGrid, CompositeTransform

__all__ = [
    "ITK_TRANSFORM_NAME",
    "ELASTIX_NAMES",
    "bspline_grid_lps",
    "itk_transform_text",
    "write_itk_transform",
    "elastix_parameter_texts",
    "write_elastix_parameters",
    "read_initial_affine",
    "initial_affine_matrix",
    "write_transform_files",
    "TRANSFORM_FILE_NAMES",
]

#: ITK transform written by ``register`` (HDF5, read by SimpleITK, ITK, ANTs and 3D Slicer).
ITK_TRANSFORM_NAME = "transform.h5"
#: The text twin of the same transform (ITK's "Insight Transform File"), written without SimpleITK.
ITK_TEXT_NAME = "transform.tfm"
#: elastix transform parameter files: the full transform and its initial (affine) transform.
ELASTIX_NAMES = ("TransformParameters.0.txt", "TransformParameters.affine.txt")

_F = np.array([-1.0, -1.0, 1.0])


def _fmt(v) -> str:
    """A float written so that reading it back gives the same double."""
    return repr(float(v))


def _fmts(values) -> str:
    return " ".join(map(repr, np.asarray(values, dtype=np.float64).ravel().tolist()))


# ------------------------------------------------------------------------------------------------
# geometry of the control grid
# ------------------------------------------------------------------------------------------------
def bspline_grid_lps(grid: BSplineGrid, pad: int = 0):
    """(size, origin, spacing, direction) of the control grid in LPS, as ITK's B-spline fixed
    parameters: ``size`` nodes per axis, ``origin`` (3,) mm of node (0, 0, 0), ``spacing`` (3,) mm,
    ``direction`` (3, 3) with column ``d`` the LPS unit vector of grid axis ``d``.

    ``pad`` adds that many nodes before and after the grid along every axis (their coefficients
    are zero, see :func:`_padded_coefficients`): the displacement is unchanged, and the region in
    which ITK and elastix evaluate the B-spline (ITK: grid index in ``[1, size - 3]``) then covers
    the whole box of fixed voxel centres, whose last voxel can lie up to grid index ``size - 2``.
    """
    g2w = grid.grid_to_world()
    lin = g2w[:3, :3]
    spacing = np.linalg.norm(lin, axis=0)
    direction = _F[:, None] * (lin / spacing)
    origin = ras_to_lps(g2w[:3, 3] - lin @ np.full(3, float(pad)))
    return tuple(int(s) + 2 * pad for s in grid.shape), origin, spacing, direction


#: zero nodes added on each side of the exported grids (see :func:`bspline_grid_lps`).
GRID_PAD = 1


def _padded_coefficients(coef: np.ndarray, pad: int) -> np.ndarray:
    return np.pad(np.asarray(coef, dtype=np.float64), [(pad, pad)] * 3 + [(0, 0)])


def _coefficients_itk_order(coef_ras: np.ndarray) -> np.ndarray:
    """ITK/elastix parameter order of (gx, gy, gz, 3) RAS coefficients: all LPS x components
    (x index fastest), then all y, then all z."""
    lps = np.asarray(coef_ras, dtype=np.float64) * _F
    return np.concatenate([lps[..., d].ravel(order="F") for d in range(3)])


def _affine_lps(aff: AffineTransform):
    """(matrix (3, 3), translation (3,), centre (3,)) of ``aff`` in LPS: T(x) = M (x - c) + c + t."""
    m = ras_matrix_to_lps(np.block([[aff.matrix, np.zeros((3, 1))], [np.zeros((1, 3)), np.ones((1, 1))]]))[:3, :3]
    return m, ras_to_lps(aff.translation), ras_to_lps(aff.center)


# ------------------------------------------------------------------------------------------------
# ITK
# ------------------------------------------------------------------------------------------------
def _itk_parts(transform: CompositeTransform):
    """[(ITK class name, parameters, fixed parameters)] of the ITK composite, first = outermost."""
    m, t, c = _affine_lps(transform.affine)
    parts = [("AffineTransform", np.r_[m.ravel(), t], c)]
    if transform.coef is not None:
        size, origin, spacing, direction = bspline_grid_lps(transform.grid, GRID_PAD)
        inv_lin = np.linalg.inv(transform.affine.matrix)
        coef = _padded_coefficients(transform.coef, GRID_PAD) @ inv_lin.T
        fixed = np.r_[np.asarray(size, float), origin, spacing, direction.ravel()]  # direction row-major
        parts.append(("BSplineTransform", _coefficients_itk_order(coef), fixed))
    return parts


def itk_transform_text(transform: CompositeTransform) -> str:
    """The transform as ITK's text format ("#Insight Transform File V1.0"), LPS.

    Affine only: one ``AffineTransform_double_3_3``. Affine + B-spline: a
    ``CompositeTransform_double_3_3`` of the affine and a cubic ``BSplineTransform_double_3_3`` on
    fastimpact's control grid with coefficients ``L^-1 c`` (see the module docstring), so that
    ITK's ``A(B(x))`` is ``A(x) + u(x)``.
    """
    parts = _itk_parts(transform)
    lines = ["#Insight Transform File V1.0"]
    if len(parts) > 1:
        lines += ["#Transform 0", "Transform: CompositeTransform_double_3_3"]
    for k, (name, params, fixed) in enumerate(parts, start=len(parts) > 1):
        lines += [f"#Transform {k}", f"Transform: {name}_double_3_3", f"Parameters: {_fmts(params)}",
                  f"FixedParameters: {_fmts(fixed)}"]
    return "\n".join(lines) + "\n"


def _sitk_transform(transform: CompositeTransform, sitk):
    """The same ITK transform built in SimpleITK (no text round trip)."""
    out = []
    for name, params, fixed in _itk_parts(transform):
        tx = sitk.AffineTransform(3) if name == "AffineTransform" else sitk.BSplineTransform(3, 3)
        tx.SetFixedParameters(np.asarray(fixed, dtype=np.float64).tolist())
        tx.SetParameters(np.asarray(params, dtype=np.float64).tolist())
        out.append(tx)
    return out[0] if len(out) == 1 else sitk.CompositeTransform(out)


def write_itk_transform(transform: CompositeTransform, path) -> None:
    """Write ``transform`` as an ITK transform file chosen by the ending of ``path``.

    ``.tfm`` / ``.txt``: ITK's text format, written directly. ``.h5`` / ``.hdf5`` (and ``.mat`` for
    an affine without B-spline): through SimpleITK (``pip install SimpleITK``).
    """
    p = Path(path)
    ending = p.name.lower()
    if ending.endswith((".tfm", ".txt")):
        p.write_text(itk_transform_text(transform))
        return
    if not ending.endswith((".h5", ".hdf5", ".mat")):
        raise ConfigError(f"ITK transform file '{path}' must end in .h5, .tfm, .txt or .mat")
    if ending.endswith(".mat") and transform.coef is not None:
        raise ConfigError(f"'{path}': a .mat file holds an affine only; write the B-spline as .h5 or .tfm")
    sitk = _simpleitk(f"writing '{p.name}'")
    try:
        sitk.WriteTransform(_sitk_transform(transform, sitk), str(p))
    except RuntimeError as e:
        raise ImageIOError(f"ITK transform '{path}' cannot be written ({' '.join(str(e).split())[:160]})") from None


def _simpleitk(what: str):
    try:
        import SimpleITK as sitk
    except ImportError:
        raise ConfigError(f"{what} needs SimpleITK: pip install SimpleITK") from None
    return sitk


# ------------------------------------------------------------------------------------------------
# elastix
# ------------------------------------------------------------------------------------------------
def _elastix_value(v) -> str:
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, (bool, np.bool_)):
        return '"true"' if v else '"false"'
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return _fmt(v)
    if isinstance(v, np.ndarray) and v.dtype.kind == "f":
        return " ".join(map(repr, v.ravel().tolist()))
    return " ".join(_elastix_value(x) for x in v)


def _elastix_text(entries: list) -> str:
    return "".join(f"({k} {_elastix_value(v)})\n" for k, v in entries)


def _image_entries(fixed: Image) -> list:
    """The fixed-image geometry of a transform parameter file (LPS; Direction column by column,
    elastix's order)."""
    lin = fixed.affine[:3, :3]
    spacing = np.linalg.norm(lin, axis=0)
    direction = _F[:, None] * (lin / spacing)
    return [
        ("FixedImageDimension", 3),
        ("MovingImageDimension", 3),
        ("FixedInternalImagePixelType", "float"),
        ("MovingInternalImagePixelType", "float"),
        ("Size", [int(n) for n in fixed.shape]),
        ("Index", [0, 0, 0]),
        ("Spacing", [float(s) for s in spacing]),
        ("Origin", [float(v) for v in ras_to_lps(fixed.affine[:3, 3])]),
        ("Direction", [float(v) for v in direction.ravel(order="F")]),
        ("UseDirectionCosines", True),
    ]


_RESAMPLE_ENTRIES = [
    ("ResampleInterpolator", "FinalBSplineInterpolator"),
    ("FinalBSplineInterpolationOrder", 3),
    ("Resampler", "DefaultResampler"),
    ("DefaultPixelValue", 0.0),
    ("ResultImageFormat", "nii.gz"),
    ("ResultImagePixelType", "float"),
    ("CompressResultImage", False),
]


def elastix_parameter_texts(transform: CompositeTransform, fixed: Image, initial_name: str = ELASTIX_NAMES[1]) -> dict:
    """{file name: text} of elastix transform parameter files for ``transform``, LPS.

    Affine only: ``TransformParameters.0.txt`` is the ``AffineTransform``. With a B-spline:
    ``TransformParameters.0.txt`` is the cubic ``BSplineTransform`` on fastimpact's control grid
    with ``initial_name`` (the affine) as its initial transform, combined by addition
    (``T(x) = A(x) + u(x)``, exact). transformix reads the initial file relative to the folder of
    ``TransformParameters.0.txt``.
    """
    m, t, c = _affine_lps(transform.affine)
    affine = (
        [("Transform", "AffineTransform"), ("NumberOfParameters", 12),
         ("TransformParameters", [float(v) for v in np.r_[m.ravel(), t]]),
         ("InitialTransformParameterFileName", "NoInitialTransform"),
         ("HowToCombineTransforms", "Compose")]
        + _image_entries(fixed) + _RESAMPLE_ENTRIES
        + [("CenterOfRotationPoint", [float(v) for v in c])]
    )
    if transform.coef is None:
        return {ELASTIX_NAMES[0]: _elastix_text(affine)}
    size, origin, spacing, direction = bspline_grid_lps(transform.grid, GRID_PAD)
    params = _coefficients_itk_order(_padded_coefficients(transform.coef, GRID_PAD))
    bspline = (
        [("Transform", "BSplineTransform"), ("NumberOfParameters", int(params.size)),
         ("TransformParameters", np.asarray(params, dtype=np.float64)),
         ("InitialTransformParameterFileName", initial_name),
         ("HowToCombineTransforms", "Add")]
        + _image_entries(fixed) + _RESAMPLE_ENTRIES
        + [("GridSize", list(size)), ("GridIndex", [0, 0, 0]),
           ("GridSpacing", [float(s) for s in spacing]), ("GridOrigin", [float(v) for v in origin]),
           ("GridDirection", [float(v) for v in direction.ravel(order="F")]),
           ("BSplineTransformSplineOrder", 3), ("UseCyclicTransform", False)]
    )
    return {ELASTIX_NAMES[0]: _elastix_text(bspline), initial_name: _elastix_text(affine)}


def write_elastix_parameters(transform: CompositeTransform, fixed: Image, folder) -> list:
    """Write :func:`elastix_parameter_texts` into ``folder``; returns the paths written."""
    out = []
    for name, text in elastix_parameter_texts(transform, fixed).items():
        p = Path(folder) / name
        p.write_text(text)
        out.append(p)
    return out


# ------------------------------------------------------------------------------------------------
# initial transforms
# ------------------------------------------------------------------------------------------------
def initial_affine_matrix(path) -> np.ndarray:
    """The 4x4 world (RAS mm) matrix of an initial affine transform file, fixed -> moving.

    Reads fastimpact's ``transform.json`` (an affine-only result), an ITK affine (``.tfm`` /
    ``.txt`` text, or ``.h5`` / ``.mat`` through SimpleITK; linear transforms of any ITK type,
    composites of them included) or an elastix transform parameter file with a linear transform
    (affine, Euler, similarity or translation; an initial-transform chain is followed).
    """
    p = Path(path)
    who = f"initial transform '{path}'"
    if not p.is_file():
        raise ImageIOError(f"{who} does not exist or is not a file; check the path")
    name = p.name.lower()
    if name.endswith(".json"):
        return _matrix_from_json(p, who)
    if name.endswith((".h5", ".hdf5", ".mat")):
        return _matrix_from_sitk(p, who)
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ImageIOError(f"{who} cannot be read as text ({type(e).__name__}); give a .json, .tfm, .h5, .mat or elastix .txt file") from None
    if text.lstrip().startswith("#Insight Transform File"):
        return _matrix_from_itk_text(text, p, who)
    if re.search(r"^\s*\(Transform\s", text, re.M):
        return _matrix_from_elastix(p, who, depth=0)
    raise ConfigError(
        f"{who} is neither fastimpact's transform.json, an ITK transform (.tfm/.h5/.mat) nor an elastix "
        "TransformParameters file; give one of those"
    )


def read_initial_affine(path, center=None) -> AffineTransform:
    """:func:`initial_affine_matrix` as an :class:`AffineTransform` about ``center`` (RAS mm;
    default the origin), the parameterisation the affine stage optimises."""
    h = initial_affine_matrix(path)
    c = np.zeros(3) if center is None else np.asarray(center, dtype=np.float64)
    m = h[:3, :3]
    # h x = M (x - c) + c + t  =>  t = h[:3, 3] - c + M c
    return AffineTransform(m, h[:3, 3] - c + m @ c, c)


def _homogeneous(m, offset) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = m
    out[:3, 3] = offset
    return out


def _checked(h: np.ndarray, who: str) -> np.ndarray:
    if not np.all(np.isfinite(h)) or abs(np.linalg.det(h[:3, :3])) < 1e-9:
        raise ConfigError(f"{who} has a singular or non-finite matrix; give an invertible affine")
    return h


def _matrix_from_json(p: Path, who: str) -> np.ndarray:
    try:
        doc = json.loads(p.read_text())
        tdoc = doc.get("transform", doc)
        if tdoc.get("bspline"):
            raise ConfigError(
                f"{who} has a B-spline part; an initial transform must be affine: use the transform.json "
                "of an affine-only run (or its TransformParameters.affine.txt)"
            )
        aff = AffineTransform.from_dict(tdoc["affine"])
    except ConfigError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, OSError):
        raise ConfigError(f"{who} is not a fastimpact transform.json (no 'transform.affine'); give the file register wrote") from None
    return _checked(aff.as_matrix(), who)


def _lps_to_ras_h(m_lps, offset_lps) -> np.ndarray:
    return ras_matrix_to_lps(_homogeneous(m_lps, offset_lps))  # the flip is its own inverse


def _matrix_from_sitk(p: Path, who: str) -> np.ndarray:
    sitk = _simpleitk(f"reading {who}")
    try:
        tx = sitk.ReadTransform(str(p))
    except RuntimeError as e:
        raise ImageIOError(f"{who} cannot be read by SimpleITK ({' '.join(str(e).split())[:160]})") from None
    return _checked(_linear_from_points(tx.TransformPoint, who), who)


def _linear_from_points(transform_point, who: str) -> np.ndarray:
    """The LPS affine of a transform known through its point map, converted to RAS; refuses
    transforms that are not affine."""
    base = np.array(transform_point((0.0, 0.0, 0.0)))
    cols = [np.array(transform_point(tuple(e * 100.0))) - base for e in np.eye(3)]
    m = np.stack(cols, axis=1) / 100.0
    rng = np.random.default_rng(0)
    for q in rng.uniform(-150, 150, (8, 3)):
        if np.abs(np.array(transform_point(tuple(q))) - (m @ q + base)).max() > 1e-4:
            raise ConfigError(f"{who} is not an affine transform (it bends space); give an affine or rigid one")
    return _lps_to_ras_h(m, base)


_ITK_LINEAR = re.compile(r"^(AffineTransform|MatrixOffsetTransformBase|TranslationTransform)_(double|float)_3_3$")


def _matrix_from_itk_text(text: str, p: Path, who: str) -> np.ndarray:
    blocks = []
    current = None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "Transform":
            current = {"type": value.strip()}
            blocks.append(current)
        elif key in ("Parameters", "FixedParameters") and current is not None:
            current[key] = np.array([float(v) for v in value.split()], dtype=np.float64)
    blocks = [b for b in blocks if not b["type"].startswith("CompositeTransform")]
    if blocks and all(_ITK_LINEAR.match(b["type"]) for b in blocks):
        h = np.eye(4)
        for b in blocks:  # composite: the first listed is applied last
            h = h @ _itk_block_matrix(b, who)
        return _checked(ras_matrix_to_lps(h), who)
    try:
        import SimpleITK  # noqa: F401  (other ITK types: let SimpleITK evaluate them)
    except ImportError:
        kinds = ", ".join(b["type"] for b in blocks) or "none"
        raise ConfigError(f"{who} holds {kinds}; without SimpleITK only AffineTransform/TranslationTransform are read: pip install SimpleITK") from None
    return _matrix_from_sitk(p, who)


def _itk_block_matrix(b: dict, who: str) -> np.ndarray:
    """LPS 4x4 of one ITK text block (AffineTransform / MatrixOffsetTransformBase / Translation)."""
    par = b.get("Parameters", np.zeros(0))
    fixed = b.get("FixedParameters", np.zeros(3))
    if b["type"].startswith("TranslationTransform"):
        if par.size != 3:
            raise ConfigError(f"{who}: a TranslationTransform needs 3 parameters, got {par.size}")
        return _homogeneous(np.eye(3), par)
    if par.size != 12:
        raise ConfigError(f"{who}: an {b['type']} needs 12 parameters, got {par.size}")
    m = par[:9].reshape(3, 3)
    c = fixed[:3] if fixed.size >= 3 else np.zeros(3)
    return _homogeneous(m, c + par[9:12] - m @ c)


def _read_elastix_map(p: Path, who: str) -> dict:
    out = {}
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ImageIOError(f"{who} cannot be read ({type(e).__name__})") from None
    text = re.sub(r"//[^\n]*", "", text)
    for m in re.finditer(r"\(\s*(\w+)((?:\s+(?:\"[^\"]*\"|[^\s()\"]+))*)\s*\)", text):
        vals = re.findall(r"\"([^\"]*)\"|([^\s\"]+)", m.group(2))
        out[m.group(1)] = [a if a else b for a, b in vals]
    return out


def _euler_matrix(rx, ry, rz, zyx: bool) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    rot_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    rot_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rot_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rot_z @ rot_y @ rot_x if zyx else rot_z @ rot_x @ rot_y


def _versor_matrix(v) -> np.ndarray:
    x, y, z = v
    w = np.sqrt(max(0.0, 1.0 - (x * x + y * y + z * z)))
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def _matrix_from_elastix(p: Path, who: str, depth: int) -> np.ndarray:
    """LPS elastix transform (with its initial chain) -> RAS 4x4."""
    if depth > 16:
        raise ConfigError(f"{who}: the InitialTransformParameterFileName chain is longer than 16 files (a loop?)")
    pm = _read_elastix_map(p, who)
    kind = (pm.get("Transform") or [""])[0]
    try:
        par = np.array([float(v) for v in pm.get("TransformParameters", [])])
        center = np.array([float(v) for v in pm.get("CenterOfRotationPoint", ["0", "0", "0"])])
    except ValueError:
        raise ConfigError(f"{who} has non-numeric TransformParameters or CenterOfRotationPoint") from None
    need = {"AffineTransform": 12, "EulerTransform": 6, "SimilarityTransform": 7, "TranslationTransform": 3}
    if kind not in need:
        raise ConfigError(
            f"{who} holds an elastix {kind or 'unknown'} transform; an initial transform must be linear "
            "(AffineTransform, EulerTransform, SimilarityTransform or TranslationTransform; of a fastimpact "
            "output give TransformParameters.affine.txt)"
        )
    if par.size != need[kind] or center.size != 3:
        raise ConfigError(f"{who}: a {kind} needs {need[kind]} TransformParameters and a 3-D CenterOfRotationPoint, got {par.size}")
    if kind == "AffineTransform":
        m, t = par[:9].reshape(3, 3), par[9:12]
    elif kind == "EulerTransform":
        zyx = (pm.get("ComputeZYX") or ["false"])[0].lower() == "true"
        m, t = _euler_matrix(*par[:3], zyx), par[3:6]
    elif kind == "SimilarityTransform":
        m, t = par[6] * _versor_matrix(par[:3]), par[3:6]
    else:
        m, t = np.eye(3), par
    h = _homogeneous(m, center + t - m @ center)
    init = (pm.get("InitialTransformParameterFileName") or ["NoInitialTransform"])[0]
    if init != "NoInitialTransform":
        ip = Path(init)
        if not ip.is_absolute() and not ip.is_file():
            ip = p.parent / ip
        if not ip.is_file():
            raise ImageIOError(f"{who}: its initial transform '{init}' does not exist; put it next to the file")
        h0 = ras_matrix_to_lps(_matrix_from_elastix(ip, f"initial transform '{ip}'", depth + 1))
        how = (pm.get("HowToCombineTransforms") or ["Compose"])[0]
        h = h @ h0 if how == "Compose" else _homogeneous(h[:3, :3] + h0[:3, :3] - np.eye(3), h[:3, 3] + h0[:3, 3])
    return _checked(ras_matrix_to_lps(h), who)


# ------------------------------------------------------------------------------------------------
# the files register writes
# ------------------------------------------------------------------------------------------------
#: every name :func:`write_transform_files` may write (for the output folder's overwrite check).
TRANSFORM_FILE_NAMES = (ITK_TEXT_NAME, ITK_TRANSFORM_NAME) + ELASTIX_NAMES


def write_transform_files(transform: CompositeTransform, fixed: Image, folder) -> tuple[dict, list]:
    """Write the ITK (``transform.tfm``, ``transform.h5``) and elastix (``TransformParameters.0.txt``
    and, with a B-spline, ``TransformParameters.affine.txt``) versions of ``transform`` into
    ``folder``. Returns ({key: file name}, notes); ``transform.h5`` needs SimpleITK and is left out
    with a note without it (``transform.tfm`` holds the same transform)."""
    folder = Path(folder)
    names = {}
    notes = []
    (folder / ITK_TEXT_NAME).write_text(itk_transform_text(transform))
    names["itk_transform_text"] = ITK_TEXT_NAME
    try:
        import SimpleITK  # noqa: F401
    except ImportError:
        notes.append(f"{ITK_TRANSFORM_NAME} not written (it needs SimpleITK: pip install SimpleITK); "
                     f"{ITK_TEXT_NAME} holds the same ITK transform")
    else:
        write_itk_transform(transform, folder / ITK_TRANSFORM_NAME)
        names["itk_transform"] = ITK_TRANSFORM_NAME
    written = write_elastix_parameters(transform, fixed, folder)
    names["elastix_transform"] = written[0].name
    if len(written) > 1:
        names["elastix_initial_transform"] = written[1].name
    return names, notes
