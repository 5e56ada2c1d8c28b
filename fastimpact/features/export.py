"""Write feature maps (NIfTI) and their PCA-to-RGB pictures (PNG) for inspection."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..errors import ConfigError

__all__ = ["write_feature_maps", "save_feature_map", "pca_rgb"]


def pca_rgb(slice_features: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """(X, Y, C) features of a slice -> (Y, X, 3) uint8 RGB of their first three principal
    components (each scaled from its 1st to 99th percentile), image rows = the second axis
    flipped so anterior / superior is up in a RAS-oriented image."""
    x = np.asarray(slice_features, dtype=np.float64)
    flat = x.reshape(-1, x.shape[-1])
    fit = flat[mask.ravel()] if mask is not None and mask.any() else flat
    mean = fit.mean(axis=0)
    k = min(3, x.shape[-1])
    if fit.shape[0] > 1 and np.any(fit.std(axis=0) > 0):
        _, _, vt = np.linalg.svd(fit - mean, full_matrices=False)
        comps = vt[:k]
        comps *= np.sign(comps[np.arange(k), np.abs(comps).argmax(axis=1)])[:, None]
        proj = (flat - mean) @ comps.T
    else:
        proj = np.zeros((flat.shape[0], k))
    rgb = np.zeros((flat.shape[0], 3))
    for c in range(k):
        lo, hi = np.percentile(proj[:, c], [1, 99])
        rgb[:, c] = np.clip((proj[:, c] - lo) / (hi - lo), 0, 1) if hi > lo else 0.5
    if k < 3:
        rgb[:, k:] = rgb[:, :1]
    img = (rgb.reshape(x.shape[0], x.shape[1], 3) * 255 + 0.5).astype(np.uint8)
    return np.ascontiguousarray(np.flip(np.transpose(img, (1, 0, 2)), axis=0))


def save_feature_map(fm, path) -> None:
    """A feature map as a 4-D float32 NIfTI (X, Y, Z, C) with its affine (sform = qform)."""
    import nibabel as nib

    from ..io import XFORM_CODE

    nimg = nib.Nifti1Image(np.asarray(fm.data, dtype=np.float32), fm.affine)
    nimg.set_sform(fm.affine, code=XFORM_CODE)
    nimg.set_qform(fm.affine, code=XFORM_CODE)
    nimg.header.set_intent("vector", name=fm.name[:15])
    nib.save(nimg, str(path))


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def write_feature_maps(image, outdir, *, model="mind", layers=None, voxel_size=None, mask=None, tile_size=0,
                       memory_gb=4.0, threads=None, force=False) -> list:
    """Compute ``model``'s feature maps of ``image`` (a path or Image) and write, per kept layer,
    ``<model>_<layer>.nii.gz`` and ``<model>_<layer>.png`` into ``outdir`` (atomically; existing
    files need ``force``). Returns the written paths."""
    from PIL import Image as PILImage

    from ..image import Image
    from ..io import check_output_dir, output_dir
    from ..onnx_models import load_model_spec
    from ..inputs import as_image, check_mask
    from .maps import FeatureExtractor, IntensityNormalization, compute_feature_maps

    spec = load_model_spec(model)
    if layers is None:
        outputs = list(range(len(spec.layers)))
    else:
        if not layers or any(c not in "01" for c in layers) or "1" not in layers or len(layers) > len(spec.layers):
            raise ConfigError(f"layers={layers!r} is invalid for model '{spec.name}' ({len(spec.layers)} layers: "
                              f"{', '.join(l.name for l in spec.layers)}): use a bit string of at most "
                              f"{len(spec.layers)} bits with at least one 1")
        outputs = [i for i, c in enumerate(layers) if c == "1"]
    names = []
    for i in outputs:
        base = _safe(f"{spec.name}_{spec.layers[i].name}")
        names += [f"{base}.nii.gz", f"{base}.png"]
    check_output_dir(outdir, force=force, names=names)  # before minutes of inference
    img = as_image(image, "image")
    mask_img = as_image(mask, "mask", mask=True)
    m = check_mask(mask_img, img, "image") if mask_img is not None else None
    if voxel_size is not None and not voxel_size > 0:
        raise ConfigError(f"voxel_size={voxel_size!r} is invalid: use a positive number of mm")
    data = np.asarray(img.data, dtype=np.float32)
    norm = IntensityNormalization.from_image(data, m, spec.normalization)
    maps = compute_feature_maps(Image(data, img.affine), FeatureExtractor(spec, threads), outputs, norm,
                                voxel_size=voxel_size, tile_size=tile_size, memory_gb=memory_gb)
    written = []
    with output_dir(outdir, force=force, names=names) as tmp:
        tmp = Path(tmp)
        for fm in maps:
            base = _safe(f"{spec.name}_{fm.name}")
            save_feature_map(fm, tmp / f"{base}.nii.gz")
            z = fm.data.shape[2] // 2
            PILImage.fromarray(pca_rgb(fm.data[:, :, z])).save(tmp / f"{base}.png")
            written += [Path(outdir) / f"{base}.nii.gz", Path(outdir) / f"{base}.png"]
    return written
