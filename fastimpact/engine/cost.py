"""The cost function of one stage at one level: draw samples, map them, hand the batch to the
term, chain its gradients to the stage's parameters."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..backend import to_host
from ..errors import RegistrationError
from ..kernels import get_kernel
from ..metrics.term import SampleBatch, Term, chain_at_points
from .levels import LevelData

__all__ = ["CostFunction", "check_valid_samples", "overlap_region", "MIN_VALID_FRACTION", "MIN_VALID_POINTS"]

# A sample set with fewer valid points than this fraction of those drawn is an error.
MIN_VALID_FRACTION = 0.125
MIN_VALID_POINTS = 16


def check_valid_samples(n_ok: int, n: int, level: LevelData, stage: str, level_index: int) -> None:
    """Refuse an evaluation whose kept samples are too few to mean anything."""
    if n_ok < max(MIN_VALID_POINTS, MIN_VALID_FRACTION * n):
        raise RegistrationError(
            f"only {n_ok} of {n} sample points map inside the moving image"
            f"{' and its mask' if level.moving_mask is not None else ''} ({stage} stage, level "
            f"{level_index + 1}): the images are probably far apart or the masks disjoint; check the "
            "image orientations, keep the affine initialisation on, or fix the masks"
        )


class CostFunction:
    """The term's value and its gradient w.r.t. the stage's parameters at random samples.

    level: the level's images; term: a :class:`~fastimpact.metrics.term.Term` (a weighted sum of
    metrics and penalties is one); sampler: the fixed voxels to draw; param: the stage's
    parameterisation (:mod:`fastimpact.transforms.parameterisation`) of the registration's transform.
    """

    def __init__(self, level: LevelData, term: Term, sampler, param, backend: str, level_index: int = 0):
        self.level = level
        self.term = term
        self.sampler = sampler
        self.param = param
        self.backend = backend
        self.level_index = level_index
        self.k_pairs = get_kernel("sample_pairs", backend)
        self.iteration = 0
        self.last_valid = 0

    @property
    def stage(self) -> str:
        return self.param.stage

    @property
    def transform(self):
        return self.param.transform

    @property
    def n_params(self) -> int:
        return self.param.n_params

    def get_parameters(self) -> np.ndarray:
        return self.param.get()

    def set_parameters(self, theta: np.ndarray) -> None:
        self.param.set(theta)

    def max_displacement(self, direction: np.ndarray) -> float:
        """Upper bound (mm) of how far a parameter step ``direction`` moves any point of the box."""
        return self.param.max_displacement(direction, self.level.fixed.shape)

    # evaluation -----------------------------------------------------------------------------
    def _pairs(self, flat: np.ndarray):
        """(f, m, dm/dy, coords, keep) of fixed voxels ``flat``: see kernels.reference.sample_pairs."""
        lv = self.level
        minv = lv.moving_inv
        f2m = minv @ self.transform.affine.as_matrix() @ self.param.fixed_affine  # fixed voxel -> moving voxel
        coef, idx_to_grid = self.param.pair_arguments()
        fixed_values, moving_coef, moving_mask = lv.on_device(self.backend)
        out = self.k_pairs(flat, fixed_values, lv.fixed.shape, f2m, moving_coef, moving_mask, coef, idx_to_grid,
                           minv[:3, :3])
        if self.backend == "cuda":  # the kept samples come back (a few thousand rows)
            out = tuple(to_host(a) for a in out)
        return out

    def map_points(self, flat: np.ndarray):
        """Fixed voxels -> (kept flat indices, x world (K, 3), y = T(x) world (K, 3), coords (K, 3)) with
        the points mapping outside the moving image (or its mask) dropped, as sample_pairs does; with
        a moving mask, also those whose patch (the term's support) leaves it."""
        lv = self.level
        idx = np.stack(np.unravel_index(flat, lv.fixed.shape), axis=1).astype(np.float64)
        x, y, coords = self.param.map_index(idx)
        keep = self._inside_moving(y)
        if lv.moving_mask is not None and keep.any() and self.term.support.patch_offsets is not None:
            self._patch_in_moving_mask(x, keep)
        return flat[keep], x[keep], y[keep], coords[keep]

    def _inside_moving(self, y: np.ndarray, clip: bool = False) -> np.ndarray:
        lv = self.level
        minv = lv.moving_inv
        q = y @ minv[:3, :3].T + minv[:3, 3]
        hi = np.asarray(lv.moving.shape, dtype=np.float64) - 1.0
        keep = np.all((q >= 0.0) & (q <= hi), axis=1)
        if lv.moving_mask is not None and keep.any():
            if clip:
                r = np.clip(np.floor(q + 0.5), 0, hi).astype(np.intp)
                keep &= lv.moving_mask[r[:, 0], r[:, 1], r[:, 2]] != 0
            else:
                r = np.floor(q[keep] + 0.5).astype(np.intp)
                keep[np.flatnonzero(keep)[lv.moving_mask[r[:, 0], r[:, 1], r[:, 2]] == 0]] = False
        return keep

    def _patch_in_moving_mask(self, x: np.ndarray, keep: np.ndarray) -> None:
        """Drop samples whose patch, mapped by T, leaves the moving image or mask (checked at the
        patch's corners; in place on ``keep``)."""
        offsets = self.term.support.patch_offsets
        norm = np.linalg.norm(offsets, axis=1)
        corners = offsets[norm >= norm.max() - 1e-9]
        for c in corners:
            kk = np.flatnonzero(keep)
            if kk.size == 0:
                return
            inside = self._inside_moving(self.param.map_world(x[kk] + c), clip=True)
            keep[kk[~inside]] = False

    def evaluate(self, *, n_samples: int | None = None, gradient: bool = True):
        """Draw fresh samples; return (value, gradient w.r.t. the parameters or None)."""
        return self.evaluate_at(self.sampler.draw_flat(n_samples), gradient=gradient)

    def evaluate_at(self, flat: np.ndarray, *, gradient: bool = True):
        """Value and gradient at given fixed voxels (flat indices (N,) of the level's fixed image)."""
        n = len(flat)
        term = self.term
        x = y = f = m = dm_dy = None
        if term.needs_points:
            flat, x, y, coords = self.map_points(np.asarray(flat, dtype=np.int64))
        if term.needs_pairs:
            f, m, dm_dy, coords, keep = self._pairs(flat)
            if term.needs_points and not keep.all():
                flat, x, y = flat[keep], x[keep], y[keep]
        n_ok = len(coords)
        self.last_valid = n_ok
        check_valid_samples(n_ok, n, self.level, self.stage, self.level_index)
        out = term.evaluate(SampleBatch(flat, x, y, f, m, dm_dy, self.param.view(), gradient))
        if not gradient:
            return float(out.value), None
        g = chain_at_points(out, dm_dy, n_ok)
        if out.points is not None:  # gradients beyond the batch points: every point scatters at its own place
            coords = np.concatenate([coords, self.param.coords_from_world(out.points)])
            g = np.concatenate([g, out.point_gradient])
        grad = self.param.gradient(coords, g)
        if out.parameter_gradient is not None:
            grad += out.parameter_gradient
        return float(out.value), grad


def overlap_region(cost: CostFunction, sample_mask: np.ndarray | None) -> np.ndarray | None:
    """The part of the fixed sample region that the cost function's current transform maps into
    the moving image (and its mask), found on a coarse grid of about 200k voxels and widened by
    one coarse cell; None when that is (almost) everything or too little to sample from."""
    shape = cost.level.fixed.shape
    stride = max(1, int(round((np.prod(shape) / 200_000) ** (1 / 3))))
    axes = [np.arange(0, n, stride) for n in shape]
    idx = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    if sample_mask is not None:
        idx = idx[sample_mask[idx[:, 0], idx[:, 1], idx[:, 2]]]
    if len(idx) == 0:
        return None
    kept = cost.map_points(np.ravel_multi_index(tuple(idx.T), shape).astype(np.int64))[0]
    if len(kept) >= 0.98 * len(idx) or len(kept) < 0.01 * len(idx) or len(kept) < 64:
        return None
    coarse = np.zeros(tuple(len(a) for a in axes), bool)
    k = np.stack(np.unravel_index(kept, shape), axis=1) // stride
    coarse[k[:, 0], k[:, 1], k[:, 2]] = True
    coarse = ndimage.binary_dilation(coarse, iterations=1)
    region = coarse.repeat(stride, 0).repeat(stride, 1).repeat(stride, 2)[: shape[0], : shape[1], : shape[2]]
    return region if sample_mask is None else region & sample_mask
