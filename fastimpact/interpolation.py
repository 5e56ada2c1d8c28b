"""Image interpolation: cubic B-spline coefficients and resampling a moving image on a reference
grid through a displacement field (``warp_image``)."""

from __future__ import annotations

import numpy as np

from .errors import ConfigError
from .image import Image
from .kernels import get_kernel
from .vocabulary import INTERPOLATIONS

__all__ = ["prefilter", "warp_image"]


def prefilter(data: np.ndarray) -> np.ndarray:
    """Cubic B-spline coefficients (float32, mirror boundary) of a 3-D image."""
    from scipy import ndimage

    return np.ascontiguousarray(
        ndimage.spline_filter(np.asarray(data, dtype=np.float32), order=3, mode="mirror", output=np.float32)
    )


def warp_image(moving: Image, reference: Image, displacement: np.ndarray, interpolation: str,
               backend: str = "cpu", coef: np.ndarray | None = None, fill: float = 0.0) -> Image:
    """Resample ``moving`` at x + u(x) for every voxel x of ``reference``.

    interpolation: cubic (B-spline, prefiltered), linear or nearest (keeps integer label dtypes).
    """
    if interpolation not in INTERPOLATIONS:
        raise ConfigError(f"interpolation={interpolation!r} is invalid: choose {', '.join(INTERPOLATIONS)}")
    minv = np.linalg.inv(moving.affine)
    # q = Minv (x + u) with x = R i: an affine map of the index plus Minv_lin u.
    vox = minv @ reference.affine
    data = moving.data
    if interpolation == "cubic":
        if coef is None:
            coef = prefilter(data)
        out = get_kernel("warp_cubic", backend)(coef, reference.shape, vox, displacement, minv[:3, :3], fill)
        return Image(np.asarray(out, dtype=np.float32), np.array(reference.affine))
    q = get_kernel("affine_grid", backend)(reference.shape, vox, displacement, minv[:3, :3])
    if interpolation == "nearest":
        out = get_kernel("nearest_sample", backend)(np.ascontiguousarray(data), q, fill)
    else:
        src = np.ascontiguousarray(data, dtype=np.float32 if data.dtype != np.float64 else np.float64)
        out = get_kernel("linear_sample", backend)(src, q, fill)
    if interpolation != "nearest" and np.issubdtype(data.dtype, np.integer):
        out = np.asarray(out, dtype=np.float32)
    return Image(np.asarray(out), np.array(reference.affine))
