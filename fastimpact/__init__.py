"""fastimpact: fast deformable 3D medical image registration.

Heavy modules (numba kernels, nibabel) are imported lazily so that ``import fastimpact``
and ``fastimpact --version`` stay fast.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "register", "Result", "Image", "load_image", "save_image"]


def __getattr__(name):
    if name in ("register", "Result"):
        from . import registration

        return getattr(registration, name)
    if name in ("Image",):
        from . import image

        return image.Image
    if name in ("load_image", "save_image"):
        from . import io

        return getattr(io, name)
    raise AttributeError(f"module 'fastimpact' has no attribute {name!r}")
