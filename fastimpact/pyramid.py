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


def downsample(image: Image, factor: int, *, is_mask: bool = False) -> Image:
    """Smooth and resample ``image`` by an integer ``factor`` (1 returns the image as float32)."""
    from scipy import ndimage

    if factor == 1:
        data = image.data if is_mask else np.asarray(image.data, dtype=np.float32)
        return image.with_data(data)
    shape, affine, to_orig = level_geometry(image.shape, image.affine, factor)
    if is_mask:
        src = np.asarray(image.data > 0, dtype=np.float32)
        order = 0
    else:
        src = ndimage.gaussian_filter(np.asarray(image.data, dtype=np.float32), sigma=0.5 * factor, mode="nearest", truncate=3.0)
        order = 1
    out = ndimage.affine_transform(
        src, np.diag(to_orig[:3, :3]), offset=to_orig[:3, 3], output_shape=shape, order=order, mode="nearest",
    )
    if is_mask:
        out = out > 0.5
    return Image(out, affine)


def build_pyramid(image: Image, factors, *, is_mask: bool = False) -> list[Image]:
    return [downsample(image, f, is_mask=is_mask) for f in factors]
