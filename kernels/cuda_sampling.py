"""CUDA random sampling: the counter-based index draws of ``_counter_rng``, one thread per draw.

The same (key, counter) gives the same indices as the NumPy reference and the CPU kernel, so a
CPU and a GPU registration with one seed use the same sample points.
"""

from __future__ import annotations

import numpy as np
from numba import cuda

from . import _counter_rng as _rng
from . import reference as _ref
from .cuda_common import device_out, grid_1d

__all__ = ["random_indices"]

_draw_index = cuda.jit(device=True)(_rng.draw_index)


@cuda.jit
def _k_random_indices(key, counter, n_total, out):
    i = cuda.grid(1)
    if i < out.shape[0]:
        out[i] = _draw_index(key, counter, np.uint64(i), n_total)


def random_indices(key, counter, n, n_total, *, to_host: bool = True):
    """``n`` int64 indices in [0, n_total): host NumPy (default) or, with ``to_host=False``, a
    device array that stays on the GPU (the registration's sample set)."""
    key, counter, n, n_total = _ref._random_args(key, counter, n, n_total)
    out = device_out(n, np.int64)
    if n:
        blocks, threads = grid_1d(n)
        _k_random_indices[blocks, threads](key, counter, np.uint64(n_total), out)
    return out.copy_to_host() if to_host else out
