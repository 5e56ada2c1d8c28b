"""What the optimiser sees of a transform stage: its parameter vector and everything tied to the
parameter layout.

A parameterisation wraps the :class:`~fastimpact.transforms.CompositeTransform` of a registration
for one stage at one pyramid level and owns:

* ``get()`` / ``set(theta)`` and ``n_params`` (the layout: 3 r + c for the affine matrix entries,
  3 n + d for B-spline node n, component d);
* ``enter_level`` (class method): what the stage does to the transform when a level starts (the
  B-spline grid follows the level's spacing; the linear stages do nothing);
* ``view()``: the read-only transform a cost term sees;
* ``map_index`` / ``map_world``: fixed points to moving points under the current parameters, and the
  stage's own coordinates of the points (what the chain rule takes);
* ``gradient(coords, g)``: the chain from d value / d moving point at points to d value / d theta;
* ``probe(idx)``: dT/dtheta at probe voxels as a sparse Jacobian (ASGD's estimation);
* ``max_displacement(direction)``: a bound of how far a parameter step moves any point;
* ``device_session(...)``: the same step on GPU-resident parameters (where ``has_device_form``).

``PARAMETERISATIONS`` maps the stage names of :data:`fastimpact.vocabulary.STAGES` to the classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..kernels import get_kernel
from ..optimizers import SparseJacobian
from . import CompositeTransform
from .bspline import BendingEnergy, BSplineGrid, refine_coefficients
from .linear import AffineParameters, RigidParameters

__all__ = ["TransformView", "LinearParameterisation", "AffineParameterisation", "RigidParameterisation",
           "BSplineParameterisation", "PARAMETERISATIONS"]


@dataclass(frozen=True)
class TransformView:
    """The current transform as a cost term reads it: ``T(x) = A x + u(x)`` with ``affine`` the
    4x4 world -> world matrix of A, ``coef`` the B-spline coefficients (None: no B-spline part, or
    its coefficients are not the stage's parameters) and ``world_to_grid`` the world -> control
    grid matrix (None with ``coef``)."""

    affine: np.ndarray
    coef: np.ndarray | None = None
    world_to_grid: np.ndarray | None = None


def _index_to_world(idx: np.ndarray, fa: np.ndarray) -> np.ndarray:
    return idx @ fa[:3, :3].T + fa[:3, 3]


class _Parameterisation:
    """Shared by both kinds: the transform, the level's fixed grid, the backend."""

    stage = ""
    has_device_form = False

    def __init__(self, transform: CompositeTransform, fixed_affine: np.ndarray, radius: float, backend: str):
        self.transform = transform
        self.fixed_affine = np.asarray(fixed_affine, dtype=np.float64)
        self.radius = float(radius)
        self.backend = backend
        self.k_eval = get_kernel("bspline_eval", backend)

    @classmethod
    def enter_level(cls, transform: CompositeTransform, fixed_shape, fixed_affine, grid_spacing_mm: float) -> None:
        """Adapt ``transform`` to a new pyramid level (nothing for the linear stages)."""

    @classmethod
    def bending_energy(cls, transform: CompositeTransform, fixed_shape) -> BendingEnergy | None:
        """The bending energy of this stage's parameters (None: the stage has none)."""
        return None

    def map_world(self, x: np.ndarray) -> np.ndarray:
        """Moving points T(x) (K, 3) of world points ``x`` (K, 3)."""
        a = self.transform.affine.as_matrix()
        return x @ a[:3, :3].T + a[:3, 3]


class LinearParameterisation(_Parameterisation):
    """Parameters of the affine part (see :mod:`fastimpact.transforms.linear`); the coordinates of
    a point are its fixed voxel index. Subclasses name the parameter set."""

    parameters = AffineParameters

    def __init__(self, transform, fixed_affine, radius, backend):
        super().__init__(transform, fixed_affine, radius, backend)
        self.linear = self.parameters(transform.affine, radius)
        self._corners = None

    @property
    def n_params(self) -> int:
        return self.linear.n_params

    def get(self) -> np.ndarray:
        return self.linear.get()

    def set(self, theta: np.ndarray) -> None:
        self.linear.set(theta)

    def view(self) -> TransformView:
        return TransformView(self.transform.affine.as_matrix())

    def pair_arguments(self):
        """(coefficients, fixed index -> grid) for ``sample_pairs``: none in a linear stage."""
        return None, None

    def map_index(self, idx: np.ndarray):
        """(x world, y = T(x) world, coordinates) of fixed voxel indices ``idx`` (K, 3) float."""
        x = _index_to_world(idx, self.fixed_affine)
        return x, self.map_world(x), idx

    def coords_from_world(self, x: np.ndarray) -> np.ndarray:
        fi = np.linalg.inv(self.fixed_affine)
        return x @ fi[:3, :3].T + fi[:3, 3]

    def gradient(self, coords: np.ndarray, g: np.ndarray) -> np.ndarray:
        return self.linear.gradient_from_points(_index_to_world(coords, self.fixed_affine), g)

    def probe(self, idx: np.ndarray) -> SparseJacobian:
        vals = self.linear.jacobian_at(_index_to_world(idx, self.fixed_affine))
        n = self.linear.n_params
        return SparseJacobian(np.broadcast_to(np.arange(n), (len(idx), n)), vals, n)

    def max_displacement(self, direction: np.ndarray, fixed_shape=None) -> float:
        """The displacement is affine in x, so its maximum over the fixed box is at a corner."""
        if self._corners is None:
            shape = np.asarray(fixed_shape, dtype=np.float64) - 1.0
            corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], dtype=np.float64) * shape
            self._corners = _index_to_world(corners, self.fixed_affine)
        return float(np.linalg.norm(self.linear.jacobian_apply(self._corners, direction), axis=1).max())

    def device_session(self, moving_inv: np.ndarray, fixed_shape):  # pragma: no cover - has_device_form
        raise NotImplementedError(f"the {self.stage} stage has no device form")


class AffineParameterisation(LinearParameterisation):
    """The 12 affine parameters ``[R (M - I).ravel(), t]`` (matrix entry (r, c) is parameter 3 r + c)."""

    stage = "affine"
    parameters = AffineParameters
    has_device_form = True

    def device_session(self, moving_inv, fixed_shape):
        """12 sums come to the host per iteration, whose update is the CPU's."""
        return _LinearDeviceSession(self, moving_inv, fixed_shape)


class RigidParameterisation(LinearParameterisation):
    """The 6 rigid parameters (rotations scaled by the radius, translation); no device form."""

    stage = "rigid"
    parameters = RigidParameters


class BSplineParameterisation(_Parameterisation):
    """The B-spline coefficients ``coef.ravel()`` of (gx, gy, gz, 3) (node n, component d -> 3 n + d)
    on the fixed affine; the coordinates of a point are its control-grid coordinates."""

    stage = "bspline"
    has_device_form = True

    def __init__(self, transform, fixed_affine, radius, backend):
        super().__init__(transform, fixed_affine, radius, backend)
        self.idx_to_grid = transform.grid.world_to_grid() @ self.fixed_affine
        self.k_scatter = get_kernel("bspline_scatter", backend)
        from ..kernels.cpu import absmax3  # the parameters live on the host (numba, imported on use)

        self.k_absmax3 = absmax3
        self._grad_buf = None

    @classmethod
    def enter_level(cls, transform, fixed_shape, fixed_affine, grid_spacing_mm):
        """The control grid follows every level (also one with 0 iterations): each refinement
        halves the spacing exactly; the coefficients are refined onto the new grid."""
        grid = BSplineGrid.for_image(fixed_shape, fixed_affine, grid_spacing_mm)
        if transform.coef is None:
            transform.grid, transform.coef = grid, np.zeros(tuple(grid.shape) + (3,))
        elif transform.grid.shape != grid.shape or not np.allclose(transform.grid.spacing, grid.spacing):
            transform.coef = refine_coefficients(transform.coef, grid.shape)
            transform.grid = grid

    @classmethod
    def bending_energy(cls, transform, fixed_shape):
        return BendingEnergy(transform.grid, fixed_shape)

    @property
    def n_params(self) -> int:
        return self.transform.coef.size

    def get(self) -> np.ndarray:
        return self.transform.coef.ravel().copy()

    def set(self, theta: np.ndarray) -> None:
        self.transform.coef = theta.reshape(self.transform.coef.shape)

    def view(self) -> TransformView:
        return TransformView(self.transform.affine.as_matrix(), self.transform.coef, self.transform.grid.world_to_grid())

    def pair_arguments(self):
        return self.transform.coef, self.idx_to_grid

    def map_index(self, idx):
        x = _index_to_world(idx, self.fixed_affine)
        a = self.transform.affine.as_matrix()
        y = x @ a[:3, :3].T + a[:3, 3]
        g = self.idx_to_grid
        pts = np.ascontiguousarray(idx @ g[:3, :3].T + g[:3, 3])
        y += self.k_eval(self.transform.coef, pts)
        return x, y, pts

    def map_world(self, x):
        y = super().map_world(x)
        g = self.transform.grid.world_to_grid()
        y += self.k_eval(self.transform.coef, np.ascontiguousarray(x @ g[:3, :3].T + g[:3, 3]))
        return y

    def coords_from_world(self, x):
        g = self.transform.grid.world_to_grid()
        return x @ g[:3, :3].T + g[:3, 3]

    def gradient(self, coords, g):
        shape = tuple(self.transform.grid.shape)
        if self._grad_buf is None or self._grad_buf.shape[:3] != shape:
            self._grad_buf = np.empty(shape + (3,))
        return self.k_scatter(np.ascontiguousarray(coords), np.ascontiguousarray(g), self.transform.grid.shape,
                              out=self._grad_buf).ravel()

    def probe(self, idx):
        g = self.idx_to_grid
        t = np.ascontiguousarray(idx @ g[:3, :3].T + g[:3, 3])
        base, w, _ = get_kernel("bspline_weights", self.backend)(t)
        gx, gy, gz = self.transform.grid.shape
        a = np.arange(4)
        ix = np.clip(base[:, 0, None] + a, 0, gx - 1)
        iy = np.clip(base[:, 1, None] + a, 0, gy - 1)
        iz = np.clip(base[:, 2, None] + a, 0, gz - 1)
        nodes = (ix[:, :, None, None] * gy + iy[:, None, :, None]) * gz + iz[:, None, None, :]
        weights = w[:, 0, :, None, None] * w[:, 1, None, :, None] * w[:, 2, None, None, :]
        return SparseJacobian.kronecker(3 * nodes.reshape(len(idx), 64), weights.reshape(len(idx), 64),
                                        self.n_params, n_dims=3, stride=1)

    def max_displacement(self, direction, fixed_shape=None):
        """The weights are non-negative and sum to one, so |u_d(x)| <= max |dc_d|."""
        return float(np.linalg.norm(self.k_absmax3(direction)))

    def device_session(self, moving_inv, fixed_shape):
        return _BSplineDeviceSession(self, moving_inv)


class _LinearDeviceSession:
    """Affine parameters on the host; per iteration the 12 sums of the gradient come back."""

    def __init__(self, param: LinearParameterisation, moving_inv, fixed_shape):
        self.param = param
        self.moving_inv = moving_inv
        self.fixed_shape = fixed_shape
        from ..kernels import cuda_loop  # numba.cuda: imported on the cuda backend only

        self.theta = param.get()
        self.k_sums = cuda_loop.affine_sums

    def pair_arguments(self):
        """(fixed voxel -> moving voxel matrix, coefficients, fixed index -> grid) for sample_pairs."""
        f2m = self.moving_inv @ self.param.transform.affine.as_matrix() @ self.param.fixed_affine
        return f2m, None, None

    def step(self, opt, gy, pts, gain: float, guard) -> None:
        s = self.k_sums(gy, pts)
        g = self.param.linear.gradient_from_index_sums(s[:9].reshape(3, 3), s[9:], self.param.fixed_affine)
        scale = guard.scale(gain * self.param.max_displacement(g, self.fixed_shape))
        opt.step_inplace(self.theta, g, scale)
        self.param.set(self.theta)

    def finish(self) -> None:
        """Nothing to copy back: the parameters are the host's."""


class _BSplineDeviceSession:
    """Coefficients, gradient and ASGD's previous gradient stay on the GPU for the level; the step
    bound (per-component maxima) and ASGD's inner product come back per iteration."""

    def __init__(self, param: BSplineParameterisation, moving_inv):
        from numba import cuda  # the device loop runs only on the cuda backend

        from ..kernels import cuda_loop

        tr = param.transform
        self.param = param
        self.coef = cuda.to_device(np.ascontiguousarray(tr.coef, dtype=np.float64))
        self.coef_flat = self.coef.reshape(self.coef.size)
        self.grad = cuda.device_array(self.coef.shape, dtype=np.float64)
        self.prev = cuda.device_array(self.coef.size, dtype=np.float64)
        self.f2m = moving_inv @ tr.affine.as_matrix() @ param.fixed_affine  # the affine part is fixed here
        self.k_scatter = get_kernel("bspline_scatter", "cuda")
        self.k_absmax3 = cuda_loop.absmax3
        self.k_update = cuda_loop.asgd_update
        self.first = True

    def pair_arguments(self):
        return self.f2m, self.coef, self.param.idx_to_grid

    def step(self, opt, gy, pts, gain: float, guard) -> None:
        g = self.k_scatter(pts, gy, tuple(self.param.transform.grid.shape), out=self.grad)
        g_flat = g.reshape(g.size)
        scale = guard.scale(gain * float(np.linalg.norm(self.k_absmax3(g_flat))))
        # fused: theta -= step g, <g, g_prev>, g_prev = g (no previous gradient at the first step)
        inner = self.k_update(self.coef_flat, g_flat, self.prev, gain * scale, not self.first and opt.adaptive)
        opt.advance(None if self.first else inner)
        self.first = False

    def finish(self) -> None:
        self.param.transform.coef = self.coef.copy_to_host()


#: stage name (:data:`fastimpact.vocabulary.STAGES`) -> parameterisation class
PARAMETERISATIONS = {"rigid": RigidParameterisation, "affine": AffineParameterisation,
                     "bspline": BSplineParameterisation}
