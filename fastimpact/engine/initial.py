"""The initial transform: an affine about the fixed image's centre (identity, matching centres or
centres of mass, or a file's affine), and the radius that scales the linear parameters."""

from __future__ import annotations

import numpy as np

from ..image import Image
from ..interchange import read_initial_affine
from ..transforms import AffineTransform, CompositeTransform

__all__ = ["initial_transform", "initial_affine", "image_center", "rms_radius"]


def initial_transform(cfg, inputs) -> tuple[CompositeTransform, float]:
    """(transform, RMS radius of the fixed image about the affine's centre)."""
    fixed, moving = inputs.fixed_f32, inputs.moving_f32
    fmask, mmask = inputs.fixed_mask, inputs.moving_mask
    center, translation = initial_affine(fixed, moving, fmask, mmask, "none" if cfg.initial_transform else cfg.init)
    if cfg.initial_transform:  # a file's affine (fixed -> moving) replaces the centring, same centre c
        transform = CompositeTransform(read_initial_affine(cfg.initial_transform, center))
    else:
        transform = CompositeTransform(AffineTransform(np.eye(3), translation, center))
    return transform, rms_radius(fixed, fmask, center)


def initial_affine(fixed: Image, moving: Image, fmask, mmask, mode: str):
    """(centre, translation) of the initial affine: identity about the fixed image's centre
    ("none"), or the translation matching image centres ("geometry") or centres of mass
    ("moments", inside the masks when given)."""
    if mode == "none":
        return image_center(fixed, fmask, "geometry"), np.zeros(3)
    fc = image_center(fixed, fmask, mode)
    mc = image_center(moving, mmask, mode)
    return fc, mc - fc


def image_center(img: Image, mask, mode: str) -> np.ndarray:
    """The world centre of the image box ("geometry") or its (masked) centre of mass ("moments")."""
    if mode == "geometry":
        mid = (np.asarray(img.shape, dtype=np.float64) - 1.0) / 2.0
        return img.affine[:3, :3] @ mid + img.affine[:3, 3]
    data = np.asarray(img.data, dtype=np.float64)
    w = data - data.min()
    if mask is not None:
        w = w * mask
    total = w.sum()
    if total <= 0:
        return image_center(img, mask, "geometry")
    idx = [np.arange(n, dtype=np.float64) for n in img.shape]
    com = np.array([
        (w.sum(axis=(1, 2)) * idx[0]).sum(),
        (w.sum(axis=(0, 2)) * idx[1]).sum(),
        (w.sum(axis=(0, 1)) * idx[2]).sum(),
    ]) / total
    return img.affine[:3, :3] @ com + img.affine[:3, 3]


def rms_radius(img: Image, mask, center) -> float:
    """RMS distance (mm) of the fixed image's (masked) voxels from the centre."""
    shape = img.shape
    step = max(1, int(round(np.prod(shape) ** (1 / 3) / 32)))
    idx = np.stack(np.meshgrid(*[np.arange(0, n, step) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    if mask is not None:
        idx = idx[mask[idx[:, 0], idx[:, 1], idx[:, 2]]]
        if idx.size == 0:
            idx = np.argwhere(mask)
    x = idx @ img.affine[:3, :3].T + img.affine[:3, 3]
    return float(max(np.sqrt(np.mean(np.sum((x - center) ** 2, axis=1))), 1.0))
