"""Compute backend: chosen once per registration (cpu | cuda | auto).

``cuda`` without a usable GPU is an error; only ``auto`` falls back to the CPU, and says so.
The CPU path never imports CuPy or numba.cuda.
"""

from __future__ import annotations

import os

from .errors import BackendError, ConfigError


def cuda_available() -> tuple[bool, str]:
    """(available, reason) without importing CuPy unless a GPU driver is visible."""
    if not (os.path.exists("/dev/nvidiactl") or os.environ.get("CUDA_VISIBLE_DEVICES")):
        return False, "no NVIDIA GPU driver found on this machine"
    try:
        import cupy  # noqa: F401

        n = cupy.cuda.runtime.getDeviceCount()
        if n < 1:
            return False, "CUDA reports no GPU device"
    except Exception as exc:  # pragma: no cover - depends on the machine
        return False, f"CuPy is not usable ({type(exc).__name__}): install the 'gpu' extra"
    return True, ""


def resolve_device(device: str) -> tuple[str, str]:
    """Return (backend, note). The CUDA kernels are not part of this release yet."""
    if device not in ("cpu", "cuda", "auto"):
        raise ConfigError(f"device={device!r} is invalid: choose cpu, cuda or auto")
    if device == "cpu":
        return "cpu", ""
    ok, why = cuda_available()
    if device == "cuda":
        if not ok:
            raise BackendError(f"--device cuda was requested but {why}: use --device cpu (or auto)")
        raise BackendError("--device cuda: the CUDA backend is not available in this version yet; use --device cpu")
    note = "device auto: " + (why if not ok else "CUDA backend not available in this version") + "; running on the CPU"
    return "cpu", note


def set_threads(threads: int | None) -> None:
    """Set the number of CPU threads used by the Numba kernels (None: all cores)."""
    if threads is None:
        return
    import numba

    numba.set_num_threads(min(int(threads), numba.config.NUMBA_NUM_THREADS))
