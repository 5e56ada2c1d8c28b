"""Gaussian smoothing + downsampling pyramid in physical space.

Level ``l`` of an ``L``-level pyramid has shrink factor ``f = 2**(L-1-l)`` (4/2/1 for three
levels) per image axis: the image is smoothed with a Gaussian of sigma ``0.5 f`` voxels (as
elastix's smoothing pyramids; the finest level, f = 1, is left unsmoothed) and resampled on a
grid with ``f`` times the spacing, the same direction cosines and ``ceil(n / f)`` voxels whose
centres are centred on the original box, so every level covers the same physical region.
"""

from __future__ import annotations

import numpy as np

from .errors import ConfigError
from .image import Image


def default_factors(levels: int) -> list[int]:
    if not isinstance(levels, (int, np.integer)) or isinstance(levels, bool) or levels < 1 or levels > 8:
        raise ConfigError(f"levels={levels!r} is invalid: use an integer from 1 to 8 (e.g. --levels 3)")
    return [2 ** (levels - 1 - i) for i in range(levels)]


def level_geometry(shape, affine, factor: float):
    """Shape and affine of the grid with ``factor`` times the spacing over the same box."""
    shape = np.asarray(shape)
    new_shape = np.maximum(1, np.ceil(shape / factor)).astype(int)
    offset = ((shape - 1) - factor * (new_shape - 1)) / 2.0  # in original voxels, >= 0
    to_orig = np.eye(4)
    to_orig[:3, :3] = np.diag([factor] * 3)
    to_orig[:3, 3] = offset
    return tuple(int(n) for n in new_shape), np.asarray(affine, float) @ to_orig, to_orig


def _smooth_sigma(factor: float) -> float:
    """Target Gaussian sigma (original voxels) of a level: 0.5 f, none at the finest level."""
    return 0.5 * factor if factor > 1 else 0.0


def _resample(src: np.ndarray, src_to_orig: np.ndarray, shape, to_orig: np.ndarray, order: int) -> np.ndarray:
    """Sample ``src`` (a level whose voxel i is original voxel src_to_orig i) on a coarser level."""
    from scipy import ndimage

    m = np.linalg.solve(src_to_orig, to_orig)  # coarse voxel -> src voxel (diagonal + offset)
    return ndimage.affine_transform(src, np.diag(m[:3, :3]), offset=m[:3, 3], output_shape=shape,
                                    order=order, mode="nearest")


def build_pyramid(image: Image, factors, *, is_mask: bool = False) -> list[Image]:
    """The levels of ``image`` for shrink ``factors`` (coarse to fine, e.g. [4, 2, 1]).

    Images are computed as a cascade, finest first: each coarser level smooths the next finer
    one by the missing sigma, sqrt(s(f)^2 - s(f_finer)^2), and resamples it (linear), so the
    full-resolution volume is filtered once. Masks are resampled with nearest neighbour from
    the original. Returns float32 images (masks: bool).
    """
    from scipy import ndimage

    order = sorted(range(len(factors)), key=lambda i: factors[i])  # finest first
    out: list[Image | None] = [None] * len(factors)
    prev_data = np.asarray(image.data > 0) if is_mask else np.asarray(image.data, dtype=np.float32)
    prev_to_orig, prev_factor = np.eye(4), 1
    for i in order:
        f = factors[i]
        if f == 1:
            out[i] = image.with_data(prev_data)
            continue
        shape, affine, to_orig = level_geometry(image.shape, image.affine, f)
        if is_mask:
            data = _resample(np.asarray(image.data > 0, dtype=np.float32), np.eye(4), shape, to_orig, 0) > 0.5
        else:
            extra = np.sqrt(max(_smooth_sigma(f) ** 2 - _smooth_sigma(prev_factor) ** 2, 0.0)) / prev_factor
            smoothed = ndimage.gaussian_filter(prev_data, sigma=extra, mode="nearest", truncate=3.0)
            data = _resample(smoothed, prev_to_orig, shape, to_orig, 1)
            prev_data, prev_to_orig, prev_factor = data, to_orig, f
        out[i] = Image(data, affine)
    return out


def downsample(image: Image, factor: int, *, is_mask: bool = False) -> Image:
    """One pyramid level of ``image`` for an integer shrink ``factor``."""
    return build_pyramid(image, [factor], is_mask=is_mask)[0]
