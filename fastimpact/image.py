"""The :class:`Image`: a 3-D voxel array plus the 4x4 affine that places it in physical space.

Coordinate conventions (used everywhere in fastimpact):

* ``data`` is indexed ``[i, j, k]`` exactly as nibabel returns it (no transposes).
* ``affine`` maps a voxel index ``(i, j, k)`` (voxel centres at integer indices) to a world point
  ``(x, y, z)`` in **RAS+ millimetres** (x to the Right, y to the Anterior, z to the Superior), the
  NIfTI/nibabel convention. Conversion to ITK's LPS happens only in :mod:`fastimpact.io`.

The affine may be oblique, flipped or permute axes; only non-singular, finite affines are
accepted. This module does not import nibabel.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import ImageError

__all__ = [
    "Image",
    "make_affine",
    "check_affine",
    "check_finite",
    "check_not_constant",
    "describe",
    "to_numpy",
]


def describe(role: str, name: str | None) -> str:
    """How an image is named in messages: ``"fixed image 'a.nii.gz'"`` or just the role."""
    return f"{role} '{name}'" if name else role


def make_affine(spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None) -> np.ndarray:
    """Build a 4x4 voxel-index -> world (RAS+ mm) affine.

    Parameters
    ----------
    spacing : (3,) voxel size in mm along i, j, k (must be > 0).
    origin : (3,) world position (RAS+ mm) of the centre of voxel (0, 0, 0).
    direction : (3, 3) or None; column ``c`` is the world unit vector of voxel axis ``c``
        (identity when None). Columns are normalised.
    """
    spacing = np.asarray(spacing, dtype=np.float64).reshape(3)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise ImageError(
            f"voxel spacing {tuple(spacing.tolist())} mm is invalid: every spacing must be a "
            "finite number > 0; fix the spacing"
        )
    if direction is None:
        direction = np.eye(3)
    direction = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    norms = np.linalg.norm(direction, axis=0)
    if not np.all(np.isfinite(direction)) or np.any(norms < 1e-12):
        raise ImageError("direction matrix has a zero or non-finite column; give 3 unit columns")
    affine = np.eye(4)
    affine[:3, :3] = direction / norms * spacing
    affine[:3, 3] = np.asarray(origin, dtype=np.float64).reshape(3)
    check_affine(affine)
    return affine


def check_affine(affine, role: str = "image", name: str | None = None) -> np.ndarray:
    """Validate and return a 4x4 float64 affine; raise :class:`ImageError` if unusable.

    Rejected: wrong shape, NaN/Inf entries, a last row other than ``[0, 0, 0, 1]``, and a singular
    3x3 part (a zero, NaN or degenerate voxel spacing).
    """
    who = describe(role, name)
    try:
        a = np.array(affine, dtype=np.float64)
    except (TypeError, ValueError):
        raise ImageError(f"{who} has an affine that is not a numeric 4x4 matrix") from None
    if a.shape != (4, 4):
        raise ImageError(f"{who} has an affine of shape {a.shape}; a 4x4 matrix is required")
    if not np.all(np.isfinite(a)):
        raise ImageError(
            f"{who} has NaN/Inf in its affine (voxel spacing or origin); fix the header "
            "(spacing must be finite and > 0)"
        )
    if not np.allclose(a[3], [0.0, 0.0, 0.0, 1.0]):
        raise ImageError(f"{who} has an affine whose last row is {a[3].tolist()}, not [0, 0, 0, 1]")
    lin = a[:3, :3]
    spacing = np.linalg.norm(lin, axis=0)
    # A relative test: the determinant compared with the product of the column lengths is the
    # (signed) volume of the unit-column parallelepiped, 0 for collinear axes.
    if np.any(spacing < 1e-9) or abs(np.linalg.det(lin)) < 1e-6 * np.prod(spacing):
        raise ImageError(
            f"{who} has a singular affine (voxel spacing {tuple(np.round(spacing, 6).tolist())} mm): "
            "spacing must be > 0 along independent axes; fix the header"
        )
    return a


@dataclass(frozen=True, eq=False)
class Image:
    """A 3-D image in physical space.

    Attributes
    ----------
    data : array of shape (X, Y, Z), any numeric dtype, indexed ``[i, j, k]`` as nibabel gives.
        Integer dtypes are kept (label images). May be a NumPy array or an array of another
        backend (e.g. CuPy) that has ``shape``/``dtype``.
    affine : (4, 4) float64, voxel index (i, j, k) -> world (x, y, z) in RAS+ mm.
    name : str, how messages name the image (usually the file path); may be empty.
    """

    data: object
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    name: str = ""

    def __post_init__(self):
        data = self.data
        if not (hasattr(data, "shape") and hasattr(data, "dtype") and hasattr(data, "ndim")):
            data = np.asarray(data)
            object.__setattr__(self, "data", data)
        if data.ndim != 3:
            raise ImageError(
                f"{describe('image', self.name)} is {data.ndim}-D {tuple(data.shape)}; "
                "an Image holds a 3-D array"
            )
        if any(n < 1 for n in data.shape):
            raise ImageError(f"{describe('image', self.name)} has an empty shape {tuple(data.shape)}")
        object.__setattr__(self, "affine", check_affine(self.affine, "image", self.name))
        object.__setattr__(self, "name", str(self.name) if self.name is not None else "")

    # -- geometry -------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        """Voxel grid size (X, Y, Z)."""
        return tuple(int(n) for n in self.data.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.data.dtype)

    @property
    def spacing(self) -> np.ndarray:
        """(3,) voxel size in mm along i, j, k (lengths of the affine's columns)."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def direction(self) -> np.ndarray:
        """(3, 3) unit columns: column c is the RAS world direction of voxel axis c."""
        return self.affine[:3, :3] / self.spacing

    @property
    def origin(self) -> np.ndarray:
        """(3,) RAS mm world position of the centre of voxel (0, 0, 0)."""
        return self.affine[:3, 3].copy()

    @property
    def voxel_volume(self) -> float:
        """Volume of one voxel in mm^3."""
        return float(abs(np.linalg.det(self.affine[:3, :3])))

    @property
    def is_integer(self) -> bool:
        """True for integer / boolean data (label images): resample them with nearest neighbour."""
        return self.dtype.kind in "iub"

    def index_to_world(self, idx) -> np.ndarray:
        """Voxel indices (..., 3) (float allowed) -> world points (..., 3), RAS mm, float64."""
        idx = np.asarray(idx, dtype=np.float64)
        return idx @ self.affine[:3, :3].T + self.affine[:3, 3]

    def world_to_index(self, points) -> np.ndarray:
        """World points (..., 3), RAS mm -> continuous voxel indices (..., 3), float64."""
        pts = np.asarray(points, dtype=np.float64)
        inv = np.linalg.inv(self.affine)
        return pts @ inv[:3, :3].T + inv[:3, 3]

    def world_grid(self, dtype=np.float64) -> np.ndarray:
        """World coordinates (X, Y, Z, 3), RAS mm, of every voxel centre (memory: 3 values/voxel)."""
        a = self.affine.astype(dtype)
        grid = np.empty(self.shape + (3,), dtype=dtype)
        i, j, k = (np.arange(n, dtype=dtype) for n in self.shape)
        for r in range(3):
            grid[..., r] = (
                a[r, 0] * i[:, None, None] + a[r, 1] * j[None, :, None] + a[r, 2] * k[None, None, :]
                + a[r, 3]
            )
        return grid

    def center(self) -> np.ndarray:
        """(3,) world position (RAS mm) of the centre of the voxel grid."""
        return self.index_to_world((np.asarray(self.shape, dtype=np.float64) - 1.0) / 2.0)

    def same_grid(self, other: "Image", atol: float = 1e-4) -> bool:
        """True when ``other`` has the same shape and (to ``atol`` mm) the same affine."""
        return self.shape == other.shape and np.allclose(self.affine, other.affine, atol=atol, rtol=0)

    # -- derived images -------------------------------------------------------------------------
    def with_data(self, data, name: str | None = None) -> "Image":
        """A new Image on the same grid (same affine) holding ``data`` of shape (X, Y, Z)."""
        shape = tuple(getattr(data, "shape", np.shape(data)))
        if shape != self.shape:
            raise ImageError(
                f"new data has shape {shape} but {describe('image', self.name)} has shape "
                f"{self.shape}; with_data keeps the grid, so the shapes must match"
            )
        return Image(data, self.affine.copy(), self.name if name is None else name)

    def astype(self, dtype) -> "Image":
        """Same grid, data converted to ``dtype`` (no rounding or range checks)."""
        return Image(self.data.astype(dtype), self.affine.copy(), self.name)

    def __repr__(self) -> str:
        sp = ", ".join(f"{s:.4g}" for s in self.spacing)
        nm = f", name={self.name!r}" if self.name else ""
        return f"Image(shape={self.shape}, dtype={self.dtype}, spacing=({sp}) mm{nm})"


# -- content checks used by io and by the registration driver ----------------------------------

def to_numpy(a) -> np.ndarray:
    """A NumPy view/copy of a NumPy or CuPy array (CuPy arrays are copied to the host)."""
    if isinstance(a, np.ndarray):
        return a
    get = getattr(a, "get", None)  # CuPy arrays
    return get() if callable(get) else np.asarray(a)


def check_finite(image: Image, role: str = "image") -> None:
    """Raise :class:`ImageError` if a floating-point image holds NaN or Inf voxels.

    Integer images are always finite and pass.
    """
    if image.dtype.kind not in "fc":
        return
    data = to_numpy(image.data)
    bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise ImageError(
            f"{describe(role, image.name)} contains {bad} NaN/Inf voxels; clean it "
            "(e.g. replace NaN with 0) before registering"
        )


def check_not_constant(image: Image, role: str = "image", mask=None) -> None:
    """Raise :class:`ImageError` if the image (inside ``mask``, when given) has a single value.

    A constant image has no gradient and no histogram spread: every metric is flat.
    ``mask``: optional boolean array of the image's shape.
    """
    data = to_numpy(image.data)
    where = ""
    if mask is not None:
        m = to_numpy(mask).astype(bool, copy=False)
        if m.shape != data.shape:
            raise ImageError(
                f"mask of shape {m.shape} does not match {describe(role, image.name)} of shape "
                f"{data.shape}"
            )
        data = data[m]
        where = " inside its mask"
        if data.size == 0:
            raise ImageError(
                f"the mask of {describe(role, image.name)} is empty (no voxel set); give a mask "
                "that covers the region to register"
            )
    lo, hi = np.nanmin(data), np.nanmax(data)
    if not lo < hi:
        raise ImageError(
            f"{describe(role, image.name)} is constant{where} (every voxel = {lo.item():g}); "
            "registration needs contrast: check that the right file was given"
        )
