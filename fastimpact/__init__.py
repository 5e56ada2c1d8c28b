"""fastimpact: fast deformable 3D medical image registration.

Heavy modules (numba kernels, nibabel) are imported lazily so that ``import fastimpact``
and ``fastimpact --version`` stay fast.
"""

import os as _os

__version__ = "0.1.0"

#: Environment variable naming fastimpact's cache root (compiled kernels go to ``<root>/numba``).
CACHE_ENV = "FASTIMPACT_CACHE_DIR"


def cache_dir() -> str:
    """The folder Numba's on-disk cache of compiled kernels uses (never inside the installed package).

    ``$FASTIMPACT_CACHE_DIR/numba`` when set, else ``$NUMBA_CACHE_DIR`` when the user set it, else
    ``$XDG_CACHE_HOME/fastimpact/numba`` (``~/.cache/fastimpact/numba``); when that folder cannot be
    created, a per-user folder in the temporary directory.
    """
    root = _os.environ.get(CACHE_ENV)
    if root:
        return _os.path.join(_os.path.abspath(_os.path.expanduser(root)), "numba")
    if _os.environ.get("NUMBA_CACHE_DIR"):
        return _os.path.abspath(_os.path.expanduser(_os.environ["NUMBA_CACHE_DIR"]))
    base = _os.environ.get("XDG_CACHE_HOME") or _os.path.join(_os.path.expanduser("~"), ".cache")
    return _os.path.join(_os.path.abspath(base), "fastimpact", "numba")


def _configure_numba_cache() -> str:
    """Point Numba's cache at :func:`cache_dir` (called on ``import fastimpact``, before any kernel compiles).

    Numba keeps ``cache=True`` kernels next to their source (``site-packages/fastimpact/kernels/
    __pycache__``) unless ``NUMBA_CACHE_DIR`` is set; files written there outlive ``pip uninstall``
    and shadow a later editable install. Numba reads the variable when ``numba.core.config`` is
    first imported, so it is set in the environment here (inherited by worker processes too); when
    numba was imported before fastimpact, ``numba.core.config.CACHE_DIR`` is set directly, which
    works because Numba looks the folder up when a ``cache=True`` function is defined, and our
    kernel modules are imported lazily, after this.
    """
    import sys
    import tempfile

    path = cache_dir()
    try:
        _os.makedirs(path, exist_ok=True)
        if not _os.access(path, _os.W_OK | _os.X_OK):
            raise PermissionError(path)
    except OSError:
        uid = getattr(_os, "getuid", lambda: "user")()
        path = _os.path.join(tempfile.gettempdir(), f"fastimpact-{uid}", "numba")
        try:
            _os.makedirs(path, exist_ok=True)
        except OSError:  # pragma: no cover - nowhere writable: Numba compiles without caching then
            pass
    _os.environ["NUMBA_CACHE_DIR"] = path
    config = sys.modules.get("numba.core.config")
    if config is not None:
        config.CACHE_DIR = path
    return path


_configure_numba_cache()

__all__ = ["__version__", "cache_dir", "register", "Result", "Image", "load_image", "save_image"]


def __getattr__(name):
    if name == "register":
        from .engine import register

        return register
    if name == "Result":
        from .result import Result

        return Result
    if name in ("Image",):
        from . import image

        return image.Image
    if name in ("load_image", "save_image"):
        from . import io

        return getattr(io, name)
    raise AttributeError(f"module 'fastimpact' has no attribute {name!r}")
