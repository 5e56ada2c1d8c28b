"""The registration's inputs, loaded and checked once: images, masks, fields of view."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ConfigError, ImageError
from .image import Image

__all__ = ["Inputs", "as_image", "check_mask", "check_not_constant", "load_inputs"]


def as_image(obj, role: str, *, mask: bool = False) -> Image:
    """Accept a path, an Image or an (array, affine) pair."""
    from .io import load_image

    if obj is None:
        return None
    if isinstance(obj, Image):
        img = obj
    elif isinstance(obj, (str, Path)):
        img = load_image(obj, role=role)
    elif isinstance(obj, tuple) and len(obj) == 2:
        img = Image(np.asarray(obj[0]), np.asarray(obj[1], dtype=np.float64))
    else:
        raise ConfigError(
            f"{role} must be a file path, a fastimpact.Image or an (array, affine) pair, got {type(obj).__name__}"
        )
    if img.data.ndim != 3:
        raise ImageError(f"{role} has shape {img.data.shape}: fastimpact registers 3-D images")
    if min(img.shape) < 1:
        raise ImageError(f"{role} is empty (shape {img.shape})")
    spacing = img.spacing
    if not np.all(np.isfinite(img.affine)) or np.any(spacing <= 0) or abs(np.linalg.det(img.affine[:3, :3])) < 1e-12:
        raise ImageError(f"{role} has an invalid voxel spacing {np.round(spacing, 6).tolist()}: fix the image header (affine)")
    if mask:
        return img
    data = img.data
    if np.issubdtype(data.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
            raise ImageError(f"{role} contains {bad} NaN/Inf voxels: replace them (e.g. with 0) before registering")
    return img


def check_mask(mask: Image | None, image: Image, role: str) -> np.ndarray | None:
    """The mask as a bool array on ``image``'s grid (None without one); errors for a mask on another
    grid or an empty mask."""
    if mask is None:
        return None
    if mask.shape != image.shape or not np.allclose(mask.affine, image.affine, atol=1e-4):
        raise ImageError(
            f"{role} mask is not on the {role} image grid (shape {mask.shape} vs {image.shape} or a different "
            "affine): resample the mask onto the image first"
        )
    m = np.asarray(mask.data) > 0
    if not m.any():
        raise ImageError(f"{role} mask is empty (no voxel > 0): give a mask that covers the region to register")
    return m


def check_not_constant(data: np.ndarray, mask: np.ndarray | None, role: str) -> None:
    vals = data[mask] if mask is not None else data
    if vals.size == 0 or float(vals.max()) == float(vals.min()):
        raise ImageError(
            f"{role} image is constant (every voxel{' in the mask' if mask is not None else ''} is "
            f"{float(vals.flat[0]) if vals.size else 'n/a'}): nothing to register; check the file"
        )


@dataclass
class Inputs:
    """The checked inputs: ``fixed`` and ``moving`` as given, their float32 copies, the masks as bool
    arrays on their images' grids (a detected field of view where no mask was given), the notes
    on detected fields of view and the memory estimate of the run."""

    fixed: Image
    moving: Image
    fixed_f32: Image
    moving_f32: Image
    fixed_mask: np.ndarray | None
    moving_mask: np.ndarray | None
    memory_estimate: object
    fov_notes: dict = field(default_factory=dict)


def load_inputs(fixed, moving, fixed_mask, moving_mask, cfg, backend: str) -> Inputs:
    """Load and check the images and masks once; refuse a run whose memory estimate is too large
    before any work (see :mod:`fastimpact.memory`)."""
    from .memory import check_run_memory

    with ThreadPoolExecutor(2) as pool:  # gzip inflation releases the GIL
        jobs = [pool.submit(as_image, fixed, "fixed image"), pool.submit(as_image, moving, "moving image")]
        fixed_img, moving_img = (job.result() for job in jobs)
    fmask = check_mask(as_image(fixed_mask, "fixed mask", mask=True), fixed_img, "fixed")
    mmask = check_mask(as_image(moving_mask, "moving mask", mask=True), moving_img, "moving")
    fov_notes: dict = {}
    if cfg.fov_mask == "auto":
        from .fov import detect_field_of_view

        def fov(mask, img, role):
            """An image without a mask gets its detected field of view (if any) as its mask."""
            found = None if mask is not None else detect_field_of_view(np.asarray(img.data))
            if found is None:
                return mask
            fov_notes[role] = found[1]
            return found[0]

        fmask, mmask = fov(fmask, fixed_img, "fixed"), fov(mmask, moving_img, "moving")
    check_not_constant(np.asarray(fixed_img.data), fmask, "fixed")
    check_not_constant(np.asarray(moving_img.data), mmask, "moving")
    memory_estimate = check_run_memory(cfg, fixed_img, moving_img, backend)  # refuse before any work
    fixed_f32 = fixed_img.with_data(np.asarray(fixed_img.data, dtype=np.float32))
    moving_f32 = moving_img.with_data(np.asarray(moving_img.data, dtype=np.float32))
    if min(fixed_img.shape) < 4 or min(moving_img.shape) < 4:
        raise ImageError(
            f"images of shape {fixed_img.shape} / {moving_img.shape} are too small: every axis needs at least 4 voxels"
        )
    return Inputs(fixed_img, moving_img, fixed_f32, moving_f32, fmask, mmask, memory_estimate, fov_notes)
