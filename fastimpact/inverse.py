"""Inverse of a registration transform as a displacement field, by fixed-point iteration.

A registration maps fixed points to moving points, ``T(x) = x + u(x)`` (RAS mm). Its inverse maps
moving points back: ``T^-1(y) = y + v(y)`` with ``v(y) = -u(y + v(y))``. On the voxel centres ``y``
of a grid the iteration

    z_0 = L^-1 (y - b),   z_{k+1} = z_k + L^-1 (y - T(z_k)),   v = z - y

solves ``T(z) = y``; ``T(z) ≈ L z + b`` is the transform's affine part (the registration's affine,
or a least-squares fit for a displacement field read from a file). With ``L = I`` it is exactly the
fixed-point iteration ``v <- -u(y + v)``; the affine preconditioner only makes it converge for
large rotations or scalings too. A point whose step would increase its residual takes half the
step (up to 4 halvings). The residual ``|T(y + v(y)) - y|`` (mm) at every grid point is what
``invert`` reports: composing the forward transform with the inverse returns each point to within
it.

The forward transform is either a :class:`~fastimpact.transforms.CompositeTransform` (exact: the
B-spline is evaluated at any point) or a displacement field on a grid, interpolated trilinearly
(as ITK's ``DisplacementFieldTransform`` does) and extended by its edge values outside the grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ConfigError

__all__ = ["FieldMap", "invert", "InverseResult"]


class FieldMap:
    """``x -> x + u(x)`` for a displacement field ``u`` (X, Y, Z, 3) RAS mm on the grid ``affine``,
    trilinear inside the grid, edge values outside."""

    def __init__(self, field: np.ndarray, affine: np.ndarray):
        self.field = np.asarray(field, dtype=np.float64)
        self.affine = np.asarray(affine, dtype=np.float64)
        self.inv = np.linalg.inv(self.affine)

    def displacement(self, points: np.ndarray) -> np.ndarray:
        from scipy import ndimage

        p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        q = (p @ self.inv[:3, :3].T + self.inv[:3, 3]).T
        return np.stack([ndimage.map_coordinates(self.field[..., c], q, order=1, mode="nearest")
                         for c in range(3)], axis=-1)

    def inside(self, points: np.ndarray) -> np.ndarray:
        p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        q = p @ self.inv[:3, :3].T + self.inv[:3, 3]
        hi = np.asarray(self.field.shape[:3], dtype=np.float64) - 1.0
        return np.all((q >= -1e-6) & (q <= hi + 1e-6), axis=1)

    def __call__(self, points: np.ndarray) -> np.ndarray:
        p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        return p + self.displacement(p)

    def linear_fit(self) -> np.ndarray:
        """4x4 least-squares affine fit of ``x + u(x)`` over (a subsample of) the grid."""
        shape = self.field.shape[:3]
        step = max(1, int(round(np.prod(shape) ** (1 / 3) / 24)))
        idx = np.stack(np.meshgrid(*[np.arange(0, n, step) for n in shape], indexing="ij"), -1).reshape(-1, 3)
        x = idx @ self.affine[:3, :3].T + self.affine[:3, 3]
        y = x + self.field[idx[:, 0], idx[:, 1], idx[:, 2]]
        design = np.c_[x, np.ones(len(x))]
        sol, *_ = np.linalg.lstsq(design, y, rcond=None)
        out = np.eye(4)
        out[:3, :3] = sol[:3].T
        out[:3, 3] = sol[3]
        if not np.all(np.isfinite(out)) or abs(np.linalg.det(out[:3, :3])) < 1e-6:
            return np.eye(4)
        return out


@dataclass
class InverseResult:
    """``field``: v (X, Y, Z, 3) RAS mm on the requested grid; ``residual_max_mm`` /
    ``residual_mean_mm``: of ``|T(y + v(y)) - y|`` over the grid; ``iterations`` run;
    ``outside_fraction``: share of grid points whose ``y + v(y)`` lies outside the forward field's
    grid (where a field read from a file is extended by its edge values; 0 for a transform)."""

    field: np.ndarray
    residual_max_mm: float
    residual_mean_mm: float
    iterations: int
    converged: bool
    outside_fraction: float

    def summary(self) -> dict:
        return {"residual_max_mm": self.residual_max_mm, "residual_mean_mm": self.residual_mean_mm,
                "iterations": self.iterations, "converged": self.converged,
                "outside_fraction": self.outside_fraction}


def _forward(transform):
    """(point map, 4x4 linear part, FieldMap or None) of a CompositeTransform or FieldMap."""
    if isinstance(transform, FieldMap):
        return transform, transform.linear_fit(), transform
    if hasattr(transform, "map_world") and hasattr(transform, "affine"):
        return (lambda p: transform.map_world(p)), transform.affine.as_matrix(), None
    raise ConfigError(f"cannot invert a {type(transform).__name__}: give a CompositeTransform or a FieldMap")


def invert(transform, shape, affine, *, iterations: int = 50, tolerance_mm: float = 1e-3,
           chunk: int = 1 << 20) -> InverseResult:
    """Inverse displacement ``v`` of ``transform`` on the grid (``shape``, ``affine``: voxel ->
    RAS mm), by the preconditioned fixed-point iteration of the module docstring.

    ``iterations``: at most this many updates; stops once every point's residual is below
    ``tolerance_mm`` (mm). Points are processed in chunks of ``chunk`` to bound memory.
    """
    if int(iterations) < 1:
        raise ConfigError(f"iterations={iterations!r} is invalid: give a positive number (e.g. 50)")
    if not (float(tolerance_mm) > 0):
        raise ConfigError(f"tolerance {tolerance_mm!r} mm is invalid: give a positive number of mm (e.g. 0.001)")
    fwd, lin, fmap = _forward(transform)
    shape = tuple(int(n) for n in shape)
    affine = np.asarray(affine, dtype=np.float64)
    linv = np.linalg.inv(lin)
    n = int(np.prod(shape))
    # iterate to half the tolerance: the field is stored in float32, whose rounding (~1e-6 of the
    # coordinates) must not push a converged point over the stated tolerance
    target = 0.5 * float(tolerance_mm)
    out = np.empty((n, 3), dtype=np.float32)
    res_all = np.empty(n)
    outside = 0
    used = 0
    for s in range(0, n, chunk):
        flat = np.arange(s, min(n, s + chunk))
        idx = np.stack(np.unravel_index(flat, shape), axis=-1).astype(np.float64)
        y = idx @ affine[:3, :3].T + affine[:3, 3]
        z = (y - lin[:3, 3]) @ linv[:3, :3].T
        r = y - fwd(z)
        rn = np.linalg.norm(r, axis=1)
        k = 0
        while k < iterations and rn.max(initial=0.0) > target:
            step = r @ linv[:3, :3].T
            active = rn > target
            scale = np.ones(len(z))
            for _ in range(5):
                cand = z[active] + scale[active, None] * step[active]
                rc = y[active] - fwd(cand)
                rcn = np.linalg.norm(rc, axis=1)
                better = rcn < rn[active]
                ai = np.flatnonzero(active)
                good = ai[better]
                z[good], r[good], rn[good] = cand[better], rc[better], rcn[better]
                active[good] = False
                if not active.any():
                    break
                scale[active] *= 0.5
            k += 1
        used = max(used, k)
        out[flat] = z - y
        # the residual of the stored (float32) field, so that the reported numbers hold for the file
        z = y + out[flat].astype(np.float64)
        res_all[flat] = np.linalg.norm(y - fwd(z), axis=1)
        if fmap is not None:
            outside += int(np.count_nonzero(~fmap.inside(z)))
    return InverseResult(
        field=out.reshape(shape + (3,)),
        residual_max_mm=float(res_all.max(initial=0.0)),
        residual_mean_mm=float(res_all.mean()) if n else 0.0,
        iterations=used,
        converged=bool(res_all.max(initial=0.0) <= tolerance_mm),
        outside_fraction=outside / max(n, 1),
    )
