"""Hot-loop kernels, looked up by (operation, backend).

>>> from fastimpact.kernels import get_kernel, OPERATIONS
>>> sample = get_kernel("cubic_sample", "cpu")      # Numba, parallel, cached
>>> sample_ref = get_kernel("cubic_sample", "numpy")  # NumPy reference (the specification)

Every backend implements every operation with the same signature and results; the NumPy
reference (``fastimpact.kernels.reference``) documents shapes, dtypes and coordinate conventions.
Backends are imported on first lookup, so ``import fastimpact.kernels`` does not import numba.
"""

import importlib

from fastimpact.errors import BackendError, ConfigError

__all__ = ["OPERATIONS", "BACKENDS", "get_kernel"]

OPERATIONS = (
    "cubic_sample",
    "cubic_sample_values",
    "linear_sample",
    "nearest_sample",
    "bspline_weights",
    "bspline_eval",
    "bspline_eval_jacobian",
    "bspline_scatter",
    "bspline_dense",
    "points_affine",
    "warp_sample",
)

# backend name -> module inside this package (None: reserved, not implemented yet)
_BACKEND_MODULES = {"numpy": "reference", "cpu": "cpu", "cuda": None}
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
