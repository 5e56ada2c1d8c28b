"""Transforms: an affine about a centre plus an optional cubic B-spline FFD, in world RAS mm.

The composite maps a fixed point x to the moving point ``T(x) = A(x) + u(x)``: the B-spline
displacement ``u`` lives on a control grid over the fixed image and adds to the affine map.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .affine import AffineTransform
from .bspline import BendingEnergy, BSplineGrid, refine_coefficients

__all__ = ["AffineTransform", "BSplineGrid", "BendingEnergy", "CompositeTransform", "refine_coefficients"]


@dataclass
class CompositeTransform:
    affine: AffineTransform
    grid: BSplineGrid | None = None
    coef: np.ndarray | None = None  # (gx, gy, gz, 3) mm

    def map_world(self, points: np.ndarray, backend: str = "cpu") -> np.ndarray:
        """Map world points (N, 3) (fixed space) to world points in moving space."""
        pts = np.ascontiguousarray(points, dtype=np.float64).reshape(-1, 3)
        y = self.affine(pts)
        if self.coef is not None:
            from ..kernels import get_kernel

            w2g = self.grid.world_to_grid()
            t = np.ascontiguousarray(pts @ w2g[:3, :3].T + w2g[:3, 3])
            y += get_kernel("bspline_eval", backend)(self.coef, t)
        return y.reshape(np.shape(points))

    def displacement_field(self, shape, affine, backend: str = "cpu", dtype=np.float32) -> np.ndarray:
        """Dense displacement u(x) = T(x) - x (X, Y, Z, 3) in world mm on a voxel grid.

        The B-spline part uses the separable dense kernel when the grid's axes are aligned with
        the voxel grid (always true on the fixed grid), else per-voxel evaluation.
        """
        from ..kernels import get_kernel

        shape = tuple(int(s) for s in shape)
        affine = np.asarray(affine, dtype=np.float64)
        # Affine part: T_A(x) - x is affine in the voxel index: D idx + e.
        ta = self.affine.as_matrix() @ affine
        disp = np.eye(4)
        disp[:3] = ta[:3] - affine[:3]
        field = get_kernel("affine_grid", backend)(shape, disp, dtype=dtype)
        if self.coef is not None:
            i2g = self.grid.world_to_grid() @ affine
            lin_g = i2g[:3, :3]
            if np.allclose(lin_g, np.diag(np.diag(lin_g)), atol=1e-9 * np.abs(lin_g).max()):
                field += get_kernel("bspline_dense", backend)(self.coef, shape, i2g[:3, 3].copy(),
                                                               np.diag(lin_g).copy(), dtype=dtype)
            else:
                axes = [np.arange(n, dtype=np.float64) for n in shape]
                idx = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
                t = np.ascontiguousarray(idx @ lin_g.T + i2g[:3, 3])
                field += get_kernel("bspline_eval", backend)(self.coef, t).reshape(field.shape).astype(dtype, copy=False)
        return field

    def to_dict(self) -> dict:
        d = {"type": "affine+bspline" if self.coef is not None else "affine", "affine": self.affine.to_dict()}
        if self.coef is not None:
            d["bspline"] = {
                "grid_shape": list(self.grid.shape),
                "grid_spacing_mm": self.grid.spacing.tolist(),
                "image_affine": self.grid.image_affine.tolist(),
                "grid_to_world": self.grid.grid_to_world().tolist(),
                "coefficient_layout": "C-order array (gx, gy, gz, 3), displacement in world RAS mm",
                "coefficients": [float(f"{v:.9g}") for v in np.asarray(self.coef).ravel()],
            }
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CompositeTransform":
        aff = AffineTransform.from_dict(d["affine"])
        bs = d.get("bspline")
        if not bs:
            return cls(aff)
        grid = BSplineGrid(
            shape=tuple(int(s) for s in bs["grid_shape"]),
            spacing=np.asarray(bs["grid_spacing_mm"], dtype=np.float64),
            image_affine=np.asarray(bs["image_affine"], dtype=np.float64),
        )
        coef = np.asarray(bs["coefficients"], dtype=np.float64).reshape(tuple(grid.shape) + (3,))
        return cls(aff, grid, coef)
