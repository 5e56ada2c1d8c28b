"""Hot-loop kernels, looked up by (operation, backend).

>>> from fastimpact.kernels import get_kernel, OPERATIONS
>>> sample = get_kernel("cubic_sample", "cpu")      # Numba, parallel, cached
>>> sample_ref = get_kernel("cubic_sample", "numpy")  # NumPy reference (the specification)

Every backend implements every operation with the same signature and results; the NumPy
reference (``fastimpact.kernels.reference``) documents shapes, dtypes and coordinate conventions.
Backends are imported on first lookup, so ``import fastimpact.kernels`` does not import numba
(and only the ``cuda`` backend imports ``numba.cuda``; without a GPU it needs
``NUMBA_ENABLE_CUDASIM=1``, the simulator the tests use). Compiled ``cache=True`` kernels are cached
in :func:`fastimpact.cache_dir` (a user cache folder, never this package's folder), which
``import fastimpact`` (always run before this module) hands to Numba.

Operations (image ops take voxel indices, transform ops control-grid indices):

=======================  ==================================================================
cubic_sample             (coef, points) -> values (N,), d value / d index (N, 3); mirror edges
cubic_sample_values      (coef, points, fill) -> values; resampling, fill outside
linear_sample            (img, points, fill) -> values; resampling, fill outside
nearest_sample           (img, points, fill) -> values in img's dtype; resampling
bspline_weights          (t) -> base (N, 3) int64, w (N, 3, 4), dw (N, 3, 4)
bspline_eval             (coef, t) -> u (N, 3)
bspline_eval_jacobian    (coef, t) -> J (N, 3, 3), J[n, c, d] = d u_c / d t_d
bspline_scatter          (t, g, grid_shape, out=None) -> (gx, gy, gz, 3); adjoint of bspline_eval
bspline_dense            (coef, shape, t0, dt, dtype) -> (X, Y, Z, 3) on an axis-aligned grid
points_affine            (idx, A) -> (N, 3) = idx @ A[:3, :3].T + A[:3, 3]
warp_sample              fused: affine + B-spline warp of fixed voxels, then cubic_sample
affine_grid              (shape, A, field, L) -> (X, Y, Z, 3) = A idx + L field[idx]
sample_pairs             fused iteration: fixed voxels -> kept (f, m, dm/dy, t or idx, keep)
warp_cubic               (coef, shape, A, field, L, fill) -> (X, Y, Z) resampled image
cubic_sample_channels    (coef (X, Y, Z, C), points) -> values (N, C), grads (N, C, 3); features
cubic_sample_channels_values  (coef, points) -> values (N, C): the fixed features
prefilter_channels       (data (X, Y, Z, C)) -> float32 cubic B-spline coefficients per channel
gather_patches           (data, centres (N, 3) int, offsets (V, 3) int) -> (N, V) grid patches
sample_patches           (coef, centres, offsets, w2i, fill) -> values (N, V) float32:
                         patches around world points (Jacobian mode, fixed side); offsets
                         (V, 3) shared or (N, V, 3) per centre (2-D models' oriented planes)
sample_patches_warped    (coef, centres, offsets, affine, bs_coef, w2grid, w2i) -> values
                         (N, V), d value / d world point (N, V, 3); through the transform;
                         offsets as for sample_patches
random_indices           (key, counter, n, n_total) -> (n,) int64 uniform in [0, n_total): the
                         counter-based sample draws (same numbers on every backend)
=======================  ==================================================================
"""

import importlib

from fastimpact.errors import BackendError, ConfigError

__all__ = ["OPERATIONS", "BACKENDS", "get_kernel"]

# The NumPy reference is the specification: its public functions are the operations.
from .reference import __all__ as _reference_ops  # noqa: E402  (numpy only; numba stays unloaded)

OPERATIONS = tuple(_reference_ops)

# backend name -> module inside this package (None: reserved, not implemented yet)
_BACKEND_MODULES = {"numpy": "reference", "cpu": "cpu", "cuda": "cuda"}
BACKENDS = tuple(_BACKEND_MODULES)


def get_kernel(operation, backend="cpu"):
    """Return the function implementing ``operation`` on ``backend`` ('numpy', 'cpu' or 'cuda').

    Raises ConfigError for an unknown operation or backend and BackendError for a backend that
    exists in name only.
    """
    if operation not in OPERATIONS:
        raise ConfigError(
            f"unknown kernel operation {operation!r}; valid operations: {', '.join(OPERATIONS)}"
        )
    if backend not in _BACKEND_MODULES:
        raise ConfigError(
            f"unknown kernel backend {backend!r}; valid backends: {', '.join(BACKENDS)}; "
            "use 'cpu' unless you need the NumPy reference"
        )
    module_name = _BACKEND_MODULES[backend]
    if module_name is None:
        raise BackendError(
            f"kernel backend {backend!r} is not implemented yet; use backend 'cpu' (Numba) or 'numpy'"
        )
    module = importlib.import_module(f"{__name__}.{module_name}")
    return getattr(module, operation)
