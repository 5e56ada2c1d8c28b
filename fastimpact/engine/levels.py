"""The pyramid levels of a registration: the images of each level ready for sampling, built on
first use and shared by every stage, and the sample regions a term's support asks for."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy import ndimage

from ..backend import to_device
from ..errors import ImageError
from ..image import Image
from ..interpolation import prefilter
from ..pyramid import build_pyramid, check_level_shapes, plan_pyramid

__all__ = ["LevelData", "Levels", "erode_mm", "patch_inside_mask", "MIN_SUPPORT_FRACTION"]

# An erosion that would leave less than this fraction of the region is halved until it does not
# (a deep layer's receptive field can exceed a coarse level's field of view).
MIN_SUPPORT_FRACTION = 0.1


class LevelData:
    """The images of one pyramid level, ready for sampling."""

    def __init__(self, fixed: Image, moving: Image, fixed_mask, moving_mask, moving_coef=None):
        self.fixed = fixed
        self.moving = moving
        self.fixed_values = np.ascontiguousarray(fixed.data, dtype=np.float32).ravel()
        self.fixed_mask = fixed_mask
        self.moving_mask = None if moving_mask is None else np.ascontiguousarray(moving_mask, dtype=np.uint8)
        self.moving_coef = prefilter(moving.data) if moving_coef is None else moving_coef
        self.moving_inv = np.linalg.inv(moving.affine)
        self._device = None

    def on_device(self, backend: str):
        """(fixed values, moving coefficients, moving mask) for the kernels of ``backend``: for
        ``cuda`` uploaded once per level and kept on the GPU for every iteration of both stages."""
        if backend != "cuda":
            return self.fixed_values, self.moving_coef, self.moving_mask
        if self._device is None:
            self._device = tuple(to_device(a, backend) for a in (self.fixed_values, self.moving_coef,
                                                                   self.moving_mask))
        return self._device

    def with_masks(self, fixed_mask, moving_mask) -> "LevelData":
        """The same level with other masks: images, coefficients and, where the moving mask is
        the same array, the GPU copies are shared (the fixed mask only steers the sampler)."""
        out = object.__new__(LevelData)
        out.__dict__.update(self.__dict__)
        out.fixed_mask = fixed_mask
        if moving_mask is not self.moving_mask:
            out.moving_mask = None if moving_mask is None else np.ascontiguousarray(moving_mask, dtype=np.uint8)
            out._device = None
        return out


class Levels:
    """The physical-space pyramid of both images (and masks) and each level's :class:`LevelData`
    (made on first use; the finest level reuses its prefilter for the output warp)."""

    def __init__(self, inputs, cfg, timings: dict):
        fixed, moving = inputs.fixed_f32, inputs.moving_f32
        self.plan = plan_pyramid(fixed.spacing, moving.spacing, cfg.levels, cfg.pyramid, cfg.pyramid_schedule,
                                 cfg.pyramid_sigma)
        check_level_shapes(self.plan, fixed.shape, moving.shape)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(2) as pool:  # scipy.ndimage filters release the GIL
            jobs = [pool.submit(build_pyramid, img, levels) for img, levels in ((fixed, self.plan.fixed),
                                                                                (moving, self.plan.moving))]
            self.fixed, self.moving = (job.result() for job in jobs)
        self.fixed_masks = self._masks(inputs.fixed_mask, fixed, self.plan.fixed, cfg.levels)
        self.moving_masks = self._masks(inputs.moving_mask, moving, self.plan.moving, cfg.levels)
        timings["pyramid"] = time.perf_counter() - t0
        self.timings = timings
        self._data: list[LevelData | None] = [None] * cfg.levels
        self._finest_input = self.moving[-1].data is moving.data  # the finest level is the input itself
        self._support: dict = {}

    @staticmethod
    def _masks(mask, img, levels, n):
        return build_pyramid(Image(mask, img.affine), levels, is_mask=True) if mask is not None else [None] * n

    def __getitem__(self, i: int) -> LevelData:
        if self._data[i] is None:
            t = time.perf_counter()
            fm = self.fixed_masks[i].data if self.fixed_masks[i] is not None else None
            mm = self.moving_masks[i].data if self.moving_masks[i] is not None else None
            self._data[i] = LevelData(self.fixed[i], self.moving[i], fm, mm)
            self.timings["prefilter"] = self.timings.get("prefilter", 0.0) + time.perf_counter() - t
        return self._data[i]

    def finest_moving_coef(self):
        """The finest level's moving coefficients when that level is the input image (None otherwise)."""
        finest = self._data[-1]
        return finest.moving_coef if finest is not None and self._finest_input else None

    def receptive_support(self, i: int, radius_mm: float, report: dict) -> LevelData:
        """Level i with the masks a static-feature sample needs: the receptive field around x inside
        the fixed image (and mask) and around T(x) inside the moving image (and mask), i.e. both
        eroded by ``radius_mm`` (made once per level; recorded in ``report['sample_support']``)."""
        if i not in self._support:
            lv = self[i]
            fm, r_f = erode_mm(lv.fixed_mask, lv.fixed, radius_mm)
            mm, r_m = erode_mm(None if lv.moving_mask is None else lv.moving_mask > 0, lv.moving, radius_mm)
            self._support[i] = lv.with_masks(fm, mm)
            report.setdefault("sample_support", []).append(
                {"level": i + 1, "receptive_radius_mm": round(radius_mm, 3), "fixed_erosion_mm": round(r_f, 3),
                 "moving_erosion_mm": round(r_m, 3)})
        return self._support[i]


def erode_mm(mask: np.ndarray | None, image: Image, radius_mm: float):
    """(region, radius used): ``mask`` (None: the whole image box) eroded by ``radius_mm`` along each
    axis of the image grid, the box edges included; the radius is halved while less than
    MIN_SUPPORT_FRACTION of the region would remain."""
    region = np.ones(image.shape, bool) if mask is None else np.asarray(mask, bool)
    total = int(region.sum())
    r = float(radius_mm)
    while r > 0:
        reach = np.floor(r / image.spacing + 1e-6).astype(int)
        if not reach.any():
            break
        out = ndimage.minimum_filter(region.view(np.uint8), size=tuple(2 * reach + 1), mode="constant", cval=0) > 0
        if out.sum() >= MIN_SUPPORT_FRACTION * total:
            return out, r
        r *= 0.5
    return (None if mask is None else region), 0.0


def patch_inside_mask(mask: np.ndarray, affine: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """The voxels of ``mask`` whose whole patch (world ``offsets`` around them) lies inside it: the
    mask eroded by the patch's extent in voxels of the grid."""
    lin_inv = np.linalg.inv(affine[:3, :3])
    reach = np.ceil(np.abs(offsets @ lin_inv.T).max(axis=0) - 1e-6).astype(int)
    out = ndimage.binary_erosion(mask, structure=np.ones(tuple(2 * reach + 1), bool), border_value=0)
    if not out.any():
        raise ImageError(
            f"no voxel of the fixed mask has its whole IMPACT patch (reach {reach.tolist()} voxels) inside the "
            "mask: use a larger mask, a smaller --patch-size or a smaller --voxel-size"
        )
    return out
