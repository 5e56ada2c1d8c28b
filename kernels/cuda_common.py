"""Shared pieces of the CUDA backend (Numba CUDA): device functions and host/device plumbing.

Imported only when the ``cuda`` backend is asked for; the CPU path never imports this module
(nor ``numba.cuda``). On a machine without a GPU the same kernels run in Numba's CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``, set before numba is imported), which is how CPU-only CI tests them.

Device functions
----------------
The scalar cubic B-spline weights, boundary helpers, the cubic spline of an image at one point and
the B-spline transform at one point are compiled from the one Python source in ``_bspline1d`` and
``_scalar`` (the CPU backend compiles the same functions with ``numba.njit``), so the two backends
cannot drift apart.

Arrays in and out
-----------------
Every CUDA operation accepts NumPy arrays or device arrays (anything with
``__cuda_array_interface__``: CuPy arrays, Numba device arrays). :func:`device_in` turns an input
into a Numba device array without a copy when it already lives on the GPU. :class:`Returns`
decides the output side once per call: host NumPy arrays when every array input was a host
array (so the kernels are tested against the NumPy reference like any other backend), else
Numba device arrays (wrap them with ``cupy.asarray`` for a zero-copy CuPy view). Data that stays
on the GPU for a whole level is therefore passed in as device arrays and never crosses the bus.
"""

from __future__ import annotations

import numpy as np
from numba import cuda

from . import _bspline1d as _b1
from . import _scalar

__all__ = [
    "THREADS",
    "affine3",
    "axis_mirror",
    "cubic_point",
    "cubic_value",
    "eval_point",
    "finite3",
    "taps",
    "Returns",
    "bspline3_weights",
    "bspline3_weights_d1",
    "clamp_taps",
    "device_in",
    "device_out",
    "grid_1d",
    "is_device",
    "mirror_coord",
    "mirror_index",
    "mirror_taps",
    "simulated",
]

#: Threads per block of the 1-D launches. 256 keeps occupancy high on every sm_70+ card; the
#: kernels use few registers and no shared memory unless stated.
THREADS = 256

_dev = cuda.jit(device=True)

# the scalar functions, compiled from the same source as the CPU backend's (kernels/_scalar.py)
_S = _scalar.build(_dev)
bspline3_weights, bspline3_weights_d1 = _S.w4, _S.dw4
mirror_taps, mirror_coord, clamp_taps = _S.mirror_taps, _S.mirror_coord, _S.clamp_taps
finite3, axis_mirror, cubic_point, cubic_value = _S.finite3, _S.axis_mirror, _S.cubic_point, _S.cubic_value
taps, eval_point = _S.taps, _S.eval_point
inside, linear_value, jac_component = _S.inside, _S.linear_value, _S.jac_component
mirror_index = _dev(_b1.mirror_index)


def _simulator_array_type():
    """The simulator's device-array class (it has no ``__cuda_array_interface__``), else a dummy."""
    from numba import config

    if config.ENABLE_CUDASIM:
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        return FakeCUDAArray
    return type(None)


_SIM_ARRAY = _simulator_array_type()


def simulated() -> bool:
    """True when Numba's CUDA simulator stands in for a GPU (``NUMBA_ENABLE_CUDASIM=1``)."""
    from numba import config

    return bool(config.ENABLE_CUDASIM)


def is_device(a) -> bool:
    """True for arrays that live on the GPU (CuPy, Numba device arrays, anything exposing
    ``__cuda_array_interface__``)."""
    return hasattr(a, "__cuda_array_interface__") or isinstance(a, _SIM_ARRAY)


def grid_1d(n: int, threads: int = THREADS) -> tuple[int, int]:
    """(blocks, threads) covering ``n`` work items with one thread each (at least one block)."""
    n = max(int(n), 1)
    threads = min(threads, n) if simulated() else threads  # the simulator runs one Python thread per CUDA thread
    return (n + threads - 1) // threads, threads


def device_in(a, dtype=None, name: str = "array"):
    """A Numba device array holding ``a`` (no copy if ``a`` is already on the GPU with ``dtype``).

    Host inputs are made C-contiguous (and cast to ``dtype`` when given) before the upload.
    Device inputs of another dtype or layout are rejected rather than silently copied, so a
    caller that keeps data on the GPU learns about the conversion it forgot.
    """
    if is_device(a):
        # Numba device arrays (real or simulated) have copy_to_host; CuPy arrays are wrapped
        # zero-copy through their __cuda_array_interface__.
        d = a if hasattr(a, "copy_to_host") else cuda.as_cuda_array(a)
        if dtype is not None and d.dtype != np.dtype(dtype):
            raise TypeError(f"{name} on the GPU has dtype {d.dtype}, the CUDA kernel needs {np.dtype(dtype)}; "
                            f"convert it once with .astype before the loop")
        if not d.is_c_contiguous():
            raise TypeError(f"{name} on the GPU is not C-contiguous; pass a contiguous copy")
        return d
    h = np.ascontiguousarray(a, dtype=dtype)
    return cuda.to_device(h)


def device_out(shape, dtype):
    """An uninitialised device array (the kernels write every element they return)."""
    return cuda.device_array(shape, dtype=np.dtype(dtype))


class Returns:
    """Output side of one call: host when every array argument was a host array.

    >>> ret = Returns(coef, points)     # inspects the inputs
    >>> return ret(values_dev, grads_dev)  # NumPy arrays or the device arrays themselves
    """

    def __init__(self, *arrays):
        self.host = not any(is_device(a) for a in arrays if a is not None)

    def __call__(self, *device_arrays):
        if self.host:
            out = tuple(None if d is None else d.copy_to_host() for d in device_arrays)
        else:
            out = device_arrays
        return out[0] if len(out) == 1 else out


# ----------------------------------------------------------------------------- shared device functions
# (cuda.py and cuda_features.py) beyond _scalar's: points through a 4x4 matrix given as 12 floats


@cuda.jit(device=True)
def affine3(A, x, y, z):
    """A[:3, :3] (x, y, z) + A[:3, 3] for A given as 12 floats (rows of a 4x4)."""
    return (
        A[0] * x + A[1] * y + A[2] * z + A[3],
        A[4] * x + A[5] * y + A[6] * z + A[7],
        A[8] * x + A[9] * y + A[10] * z + A[11],
    )
