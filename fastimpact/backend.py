"""Compute backend: chosen once per registration (cpu | cuda | auto).

``cuda`` without a usable GPU is an error; only ``auto`` falls back to the CPU, and says so.
The CPU path never imports CuPy or numba.cuda.
"""

from __future__ import annotations

import os

from .errors import BackendError, ConfigError
from .vocabulary import DEVICES


def simulator_requested() -> bool:
    """True when Numba's CUDA simulator is switched on (``NUMBA_ENABLE_CUDASIM=1``): the CUDA
    kernels then run, very slowly, on the CPU. Used by the tests of machines without a GPU."""
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")


def cuda_available() -> tuple[bool, str]:
    """(available, reason): an NVIDIA driver and a GPU that Numba's CUDA target can use.

    Imports ``numba.cuda`` only when a driver is visible, so the CPU path never loads it.
    """
    if simulator_requested():
        return False, "NUMBA_ENABLE_CUDASIM=1 replaces the GPU by Numba's simulator"
    if not (os.path.exists("/dev/nvidiactl") or os.environ.get("CUDA_VISIBLE_DEVICES")):
        return False, "no NVIDIA GPU driver found on this machine"
    try:
        from numba import cuda

        if not cuda.is_available():
            return False, "Numba finds no usable CUDA GPU (driver or toolkit missing)"
    except Exception as exc:  # pragma: no cover - depends on the machine
        return False, f"numba.cuda is not usable ({type(exc).__name__}): install the 'gpu' extra"
    return True, ""


def onnx_providers(backend: str) -> tuple[tuple[str, ...], str]:
    """ONNX Runtime execution providers for a backend, and a note when CUDA's is missing."""
    if backend != "cuda" or simulator_requested():
        return ("CPUExecutionProvider",), ""
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()  # cuDNN / cuBLAS from the NVIDIA Python packages
        except Exception:  # pragma: no cover - depends on the machine
            pass
    if "CUDAExecutionProvider" in ort.get_available_providers():
        return ("CUDAExecutionProvider", "CPUExecutionProvider"), ""
    return ("CPUExecutionProvider",), ("ONNX Runtime has no CUDA provider (install onnxruntime-gpu): the feature "
                                       "networks run on the CPU")


def resolve_device(device: str) -> tuple[str, str]:
    """Return (backend, note) for ``device`` in cpu | cuda | auto.

    ``cuda`` needs a usable GPU (or the simulator, switched on explicitly); ``auto`` takes the GPU
    when there is one, else the CPU, and says why in the note.
    """
    if device not in DEVICES:
        raise ConfigError(f"device={device!r} is invalid: choose cpu, cuda or auto")
    if device == "cpu":
        return "cpu", ""
    ok, why = cuda_available()
    if ok:
        return "cuda", ""
    if device == "cuda":
        if simulator_requested():
            return "cuda", "device cuda: running the CUDA kernels in Numba's simulator (NUMBA_ENABLE_CUDASIM=1), very slowly"
        raise BackendError(f"--device cuda was requested but {why}: use --device cpu (or auto)")
    return "cpu", f"device auto: {why}; running on the CPU"


def set_threads(threads: int | None) -> None:
    """Set the number of CPU threads used by the Numba kernels (None: all cores)."""
    if threads is None:
        return
    import numba

    numba.set_num_threads(min(int(threads), numba.config.NUMBA_NUM_THREADS))


def to_device(array, backend: str):
    """``array`` as a GPU array for the ``cuda`` backend (uploaded once, C-contiguous, its dtype
    kept); unchanged for the CPU backends. The CUDA kernels take such arrays without copying and
    return their results on the GPU, so a level's images and feature maps cross the bus once."""
    if backend != "cuda" or array is None:
        return array
    import numpy as np
    from numba import cuda

    if hasattr(array, "copy_to_host"):
        return array
    return cuda.to_device(np.ascontiguousarray(array))


def to_host(array):
    """A NumPy array from a GPU array (Numba device array or CuPy), or ``array`` itself."""
    if hasattr(array, "copy_to_host"):
        return array.copy_to_host()
    if hasattr(array, "__cuda_array_interface__") and hasattr(array, "get"):
        return array.get()
    return array
