"""Affine transform about a fixed centre, in world (RAS) mm.

``T(x) = M (x - c) + c + t`` with a 3x3 matrix ``M``, translation ``t`` (mm) and centre ``c``
(mm, fixed during optimisation: the fixed image's centre of mass or centre). The optimiser sees
the 12 parameters ``theta = [R * (M - I).ravel(), t]`` where ``R`` (mm) is the RMS radius of the
fixed image about ``c``: the derivative of a point's position w.r.t. every parameter is then
of order 1 mm, the scaling elastix gets from its automatic scales estimation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class AffineTransform:
    matrix: np.ndarray = field(default_factory=lambda: np.eye(3))
    translation: np.ndarray = field(default_factory=lambda: np.zeros(3))
    center: np.ndarray = field(default_factory=lambda: np.zeros(3))

    def __post_init__(self):
        self.matrix = np.asarray(self.matrix, dtype=np.float64).reshape(3, 3).copy()
        self.translation = np.asarray(self.translation, dtype=np.float64).reshape(3).copy()
        self.center = np.asarray(self.center, dtype=np.float64).reshape(3).copy()

    def as_matrix(self) -> np.ndarray:
        """4x4 homogeneous matrix of T (world RAS mm -> world RAS mm)."""
        out = np.eye(4)
        out[:3, :3] = self.matrix
        out[:3, 3] = self.center + self.translation - self.matrix @ self.center
        return out

    def __call__(self, points: np.ndarray) -> np.ndarray:
        """Map (..., 3) world points."""
        m = self.as_matrix()
        return points @ m[:3, :3].T + m[:3, 3]

    # --- optimiser view ------------------------------------------------------------------
    def get_parameters(self, radius: float) -> np.ndarray:
        return np.r_[radius * (self.matrix - np.eye(3)).ravel(), self.translation]

    def set_parameters(self, theta: np.ndarray, radius: float) -> None:
        theta = np.asarray(theta, dtype=np.float64)
        self.matrix = np.eye(3) + theta[:9].reshape(3, 3) / radius
        self.translation = theta[9:12].copy()

    def gradient_from_points(self, points: np.ndarray, g: np.ndarray, radius: float) -> np.ndarray:
        """Chain rule: sum_n dT(x_n)/dtheta^T g_n for world points (N,3) and g (N,3)."""
        d = (points - self.center) / radius
        gm = g.T @ d  # (3,3): sum_n g_n (x_n - c)^T / R
        return np.r_[gm.ravel(), g.sum(axis=0)]

    def jacobian_apply(self, points: np.ndarray, v: np.ndarray, radius: float) -> np.ndarray:
        """J(x_n) v for each point: the displacement (N,3) caused by a parameter step v."""
        dm = v[:9].reshape(3, 3) / radius
        return (points - self.center) @ dm.T + v[9:12]

    def to_dict(self) -> dict:
        return {
            "matrix": self.matrix.tolist(),
            "translation": self.translation.tolist(),
            "center": self.center.tolist(),
            "homogeneous": self.as_matrix().tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "AffineTransform":
        return cls(np.array(d["matrix"]), np.array(d["translation"]), np.array(d["center"]))
