"""Field-of-view detection: the disc (cylinder) of real data inside a constant background.

A cone-beam CT, and many reconstructed scans, hold real data only inside a cylinder; outside it the
scanner writes one constant value (0, -1000, -1024, ...). That background is not anatomy: a metric
that compares it with the other image's tissue pulls the registration towards the edge of the
disc. When no mask is given, :func:`detect_field_of_view` finds such a field of view so the driver
can use it as the image's mask (``RegistrationConfig.fov_mask = "auto"``, the default).

The rule, chosen so that ordinary images (a head on an exactly-zero background, whose outline
changes from slice to slice) are left alone:

1. the background value ``v`` is the most common value on the volume's faces;
2. the background is the voxels equal to ``v`` connected to the faces, at least 5 % of the volume;
3. the data region (the rest) has the same cross-section in every slice along one axis (the
   cylinder's axis): across the slices that hold data, the intersection of the slices' data
   regions covers at least 90 % of their union.
"""

from __future__ import annotations

import numpy as np

MIN_BACKGROUND_FRACTION = 0.05
MIN_CYLINDER_IOU = 0.9


def detect_field_of_view(data: np.ndarray) -> tuple[np.ndarray, dict] | None:
    """(mask of the data region, info) when ``data`` (3-D) is a cylinder of data in a constant
    background, else None. info: background value, cylinder axis, fraction of the volume."""
    from scipy import ndimage

    data = np.asarray(data)
    if data.ndim != 3 or min(data.shape) < 4:
        return None
    faces = np.concatenate([data[0].ravel(), data[-1].ravel(), data[:, 0].ravel(), data[:, -1].ravel(),
                            data[:, :, 0].ravel(), data[:, :, -1].ravel()])
    values, counts = np.unique(faces, return_counts=True)
    v = values[np.argmax(counts)]
    if counts.max() < 0.2 * faces.size:
        return None
    bg = data == v
    labels, n = ndimage.label(bg)
    if n == 0:
        return None
    border = np.unique(np.concatenate([labels[0].ravel(), labels[-1].ravel(), labels[:, 0].ravel(),
                                       labels[:, -1].ravel(), labels[:, :, 0].ravel(), labels[:, :, -1].ravel()]))
    border = border[border > 0]
    background = np.isin(labels, border)
    frac = float(background.mean())
    if frac < MIN_BACKGROUND_FRACTION or frac > 0.95:
        return None
    region = ~background
    for axis in range(3):
        slices = np.moveaxis(region, axis, 0)
        held = slices.reshape(slices.shape[0], -1).any(axis=1)
        if held.sum() < 2:
            continue
        inner = slices[held]
        union, inter = inner.any(axis=0), inner.all(axis=0)
        iou = inter.sum() / max(union.sum(), 1)
        if iou >= MIN_CYLINDER_IOU:
            return region, {"background_value": float(v), "axis": axis, "fraction": round(1.0 - frac, 4),
                            "cross_section_iou": round(float(iou), 4)}
    return None


__all__ = ["detect_field_of_view"]
