"""Apply a saved transform (transform.json) to another image or label map."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import ConfigError, ImageIOError
from .image import Image
from .transforms import CompositeTransform


def load_transform(path) -> tuple[CompositeTransform, Image]:
    """Read transform.json; return the transform and the fixed grid (data-less Image)."""
    path = Path(path)
    if not path.is_file():
        raise ImageIOError(f"transform file '{path}' does not exist: pass the transform.json written by `fastimpact register`")
    try:
        doc = json.loads(path.read_text())
        if doc.get("format") != "fastimpact-transform":
            raise ValueError("not a fastimpact transform")
        transform = CompositeTransform.from_dict(doc["transform"])
        fixed = doc["fixed"]
        ref = Image(np.zeros(tuple(fixed["shape"]), dtype=np.uint8), np.asarray(fixed["affine"], dtype=np.float64))
    except (ValueError, KeyError, TypeError) as exc:
        raise ImageIOError(
            f"transform file '{path}' is not a valid fastimpact transform.json ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'bad content'}): pass the file written by `fastimpact register`"
        ) from None
    return transform, ref


def apply_transform(transform: CompositeTransform, image: Image, reference: Image, interpolation: str = "cubic",
                    backend: str = "cpu") -> Image:
    """Resample ``image`` (moving space) on the grid of ``reference`` (fixed space)."""
    from .registration import warp_image

    if interpolation not in ("cubic", "linear", "nearest"):
        raise ConfigError(f"interpolation={interpolation!r} is invalid: choose cubic, linear or nearest")
    field = transform.displacement_field(reference.shape, reference.affine, backend)
    return warp_image(image, reference, field, interpolation, backend)


def apply_transform_file(transform_path, image_path, output, *, reference=None, interpolation="cubic", force=False):
    from .io import atomic_write_path, load_image, save_image

    transform, ref = load_transform(transform_path)
    image = load_image(image_path, role="image")
    if reference is not None:
        ref = load_image(reference, role="reference image")
    with atomic_write_path(output, force=force) as tmp:
        out = apply_transform(transform, image, ref, interpolation)
        save_image(out, tmp)
    return output
