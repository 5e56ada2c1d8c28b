"""Parameterisations of the linear (affine) part for the optimiser: the affine stage's 12
parameters and the rigid stage's 6.

Both act on an :class:`~fastimpact.transforms.affine.AffineTransform` ``T(x) = M (x - c) + c + t``
and give the optimiser one interface: ``get()`` / ``set(theta)``, ``gradient_from_points`` (the
chain from gradients at world points to the parameters), ``jacobian_at`` (dT/dtheta at probe
points, for ASGD's estimation) and ``jacobian_apply`` (the displacement a parameter step causes).
Rotation-like parameters are multiplied by the RMS radius ``R`` (mm) of the fixed image about
``c``, so every parameter moves points by about 1 mm per unit (elastix's automatic scales).

Rigid: ``M = Rz(gamma) Ry(beta) Rx(alpha) M0`` with ``M0`` the matrix when the parameterisation was
made (the identity, or an initial transform's) and ``theta = [R alpha, R beta, R gamma, t]``;
rotations about the world x, y, z axes (RAS), angles in radians.
"""

from __future__ import annotations

import numpy as np

from .affine import AffineTransform


class AffineParameters:
    """The 12 parameters ``[R (M - I).ravel(), t]`` (matrix entry (r, c) is parameter 3 r + c)."""

    name = "affine"
    n_params = 12

    def __init__(self, affine: AffineTransform, radius: float):
        self.affine = affine
        self.radius = float(radius)

    def get(self) -> np.ndarray:
        return self.affine.get_parameters(self.radius)

    def set(self, theta: np.ndarray) -> None:
        self.affine.set_parameters(theta, self.radius)

    def gradient_from_points(self, points: np.ndarray, g: np.ndarray) -> np.ndarray:
        return self.affine.gradient_from_points(points, g, self.radius)

    def jacobian_apply(self, points: np.ndarray, v: np.ndarray) -> np.ndarray:
        return self.affine.jacobian_apply(points, v, self.radius)

    def gradient_from_index_sums(self, s1: np.ndarray, s0: np.ndarray, fixed_affine: np.ndarray) -> np.ndarray:
        """The gradient from the sums ``S1 = sum_n g_n i_n^T`` (3, 3) and ``S0 = sum_n g_n`` (3,) over
        gradients ``g_n`` at fixed voxel indices ``i_n`` (world points ``x_n = F i_n + b``): the
        same chain as :meth:`gradient_from_points`, from 12 sums (the GPU loop's reduction)."""
        fa = fixed_affine
        gm = (s1 @ fa[:3, :3].T + np.outer(s0, fa[:3, 3] - self.affine.center)) / self.radius
        return np.r_[gm.ravel(), s0]

    def jacobian_at(self, points: np.ndarray) -> np.ndarray:
        """(P, 3, 12) dT/dtheta at world points."""
        d = (points - self.affine.center) / self.radius
        vals = np.zeros((len(points), 3, 12))
        for r in range(3):
            vals[:, r, 3 * r: 3 * r + 3] = d
            vals[:, r, 9 + r] = 1.0
        return vals


def _rot(axis: int, a: float) -> tuple[np.ndarray, np.ndarray]:
    """(rotation by ``a`` about world axis ``axis``, its derivative w.r.t. ``a``)."""
    c, s = np.cos(a), np.sin(a)
    i, j = [(1, 2), (2, 0), (0, 1)][axis]
    r, d = np.eye(3), np.zeros((3, 3))
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    d[i, i], d[i, j], d[j, i], d[j, j] = -s, -c, c, -s
    return r, d


class RigidParameters:
    """The 6 parameters ``[R alpha, R beta, R gamma, t]`` of ``M = Rz Ry Rx M0``."""

    name = "rigid"
    n_params = 6

    def __init__(self, affine: AffineTransform, radius: float):
        self.affine = affine
        self.radius = float(radius)
        self.base = affine.matrix.copy()
        self.angles = np.zeros(3)

    def _factors(self):
        return [_rot(k, a) for k, a in enumerate(self.angles)]

    def rotation(self) -> np.ndarray:
        (rx, _), (ry, _), (rz, _) = self._factors()
        return rz @ ry @ rx

    def _derivatives(self) -> list[np.ndarray]:
        """d(Rz Ry Rx)/d angle_k, k = x, y, z."""
        (rx, dx), (ry, dy), (rz, dz) = self._factors()
        return [rz @ ry @ dx, rz @ dy @ rx, dz @ ry @ rx]

    def get(self) -> np.ndarray:
        return np.r_[self.radius * self.angles, self.affine.translation]

    def set(self, theta: np.ndarray) -> None:
        theta = np.asarray(theta, dtype=np.float64)
        self.angles = theta[:3] / self.radius
        self.affine.matrix = self.rotation() @ self.base
        self.affine.translation = theta[3:6].copy()

    def _columns(self, points: np.ndarray) -> list[np.ndarray]:
        p = (points - self.affine.center) @ self.base.T
        return [p @ (d / self.radius).T for d in self._derivatives()]

    def gradient_from_points(self, points: np.ndarray, g: np.ndarray) -> np.ndarray:
        return np.r_[[float(np.sum(g * col)) for col in self._columns(points)], g.sum(axis=0)]

    def jacobian_apply(self, points: np.ndarray, v: np.ndarray) -> np.ndarray:
        cols = self._columns(points)
        return v[0] * cols[0] + v[1] * cols[1] + v[2] * cols[2] + v[3:6]

    def jacobian_at(self, points: np.ndarray) -> np.ndarray:
        """(P, 3, 6) dT/dtheta at world points."""
        vals = np.zeros((len(points), 3, 6))
        for k, col in enumerate(self._columns(points)):
            vals[:, :, k] = col
        vals[:, [0, 1, 2], [3, 4, 5]] = 1.0
        return vals


LINEAR_STAGES = {"affine": AffineParameters, "rigid": RigidParameters}


def linear_parameters(stage: str, affine: AffineTransform, radius: float):
    """The parameterisation of a linear ``stage`` ("affine" or "rigid"), or None for another stage."""
    cls = LINEAR_STAGES.get(stage)
    return None if cls is None else cls(affine, radius)


__all__ = ["AffineParameters", "LINEAR_STAGES", "RigidParameters", "linear_parameters"]
