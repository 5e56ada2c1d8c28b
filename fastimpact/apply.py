"""Apply a saved transform (transform.json) to another image or label map."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import ConfigError, ImageIOError
from .image import Image
from .transforms import CompositeTransform
from .vocabulary import INTERPOLATIONS


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
    from .interpolation import warp_image

    if interpolation not in INTERPOLATIONS:
        raise ConfigError(f"interpolation={interpolation!r} is invalid: choose cubic, linear or nearest")
    field = transform.displacement_field(reference.shape, reference.affine, backend)
    return warp_image(image, reference, field, interpolation, backend)


#: An integer image with at most this many distinct values is taken for a label map (FreeSurfer's
#: aseg and TotalSegmentator have ~120 labels; a uint8 or int16 grey-level image has more values).
LABEL_MAX_VALUES = 200


def is_label_map(data) -> bool:
    """True for an integer (or bool) array with at most :data:`LABEL_MAX_VALUES` distinct values."""
    data = np.asarray(data)
    if data.dtype.kind not in "biu":
        return False
    if data.dtype.kind == "b":
        return True
    lo, hi = int(data.min()), int(data.max())
    if hi - lo < 65536:  # a histogram of the value range: O(n), no sort
        return int(np.count_nonzero(np.bincount(data.ravel().astype(np.int64) - lo))) <= LABEL_MAX_VALUES
    return np.unique(data).size <= LABEL_MAX_VALUES


def choose_interpolation(image: Image, interpolation: str | None) -> str:
    """The interpolation ``apply`` uses: the given one, else nearest for a label map, else cubic."""
    if interpolation is not None:
        return interpolation
    return "nearest" if is_label_map(image.data) else "cubic"


def apply_transform_file(transform_path, image_path, output, *, reference=None, interpolation=None, force=False):
    """Resample the image file ``image_path`` through ``transform_path`` (transform.json) and write ``output``.

    ``interpolation`` None picks nearest for an integer label map (the output keeps its dtype) and
    cubic otherwise. Returns the interpolation used.
    """
    from .io import ITK_HEADER_EXTENSIONS, atomic_write_path, load_image, output_dir, save_image

    transform, ref = load_transform(transform_path)
    image = load_image(image_path, role="image")
    if reference is not None:
        ref = load_image(reference, role="reference image")
    interpolation = choose_interpolation(image, interpolation)
    out_path = Path(output)
    if out_path.name.lower().endswith(ITK_HEADER_EXTENSIONS):
        # a header and a data file named after it: both written in a temporary folder, then moved
        with output_dir(out_path.parent, force=force, names=[out_path.name]) as tmp:
            save_image(apply_transform(transform, image, ref, interpolation), Path(tmp) / out_path.name)
        return interpolation
    with atomic_write_path(output, force=force) as tmp:
        out = apply_transform(transform, image, ref, interpolation)
        save_image(out, tmp)
    return interpolation
