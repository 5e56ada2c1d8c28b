"""Build the chest CT shipped in ``fastimpact/data/`` from pyradiomics' ``lung1_image.nrrd``.

Usage::

    pip download --no-deps --no-build-isolation pyradiomics==3.0.1 -d /tmp/pr   # the sdist
    tar xzf /tmp/pr/pyradiomics-3.0.1.tar.gz -C /tmp/pr
    python -m fastimpact.data.build_ct_data --source /tmp/pr/pyradiomics-3.0.1/data/lung1_image.nrrd

(``--no-build-isolation`` needs numpy, versioneer, setuptools and wheel in the environment: pip
prepares the sdist's metadata with them. The data folder is only in the sdist, not in a wheel.)

Input: a real chest CT, 512 x 512 x 48 voxels of 0.5703 x 0.5703 x 5 mm, int16 HU, NRRD in LPS
with identity direction (axial slices, first slice the most inferior).

Output ``ct_chest_lung1.nii.gz``: the in-plane spacing halved by averaging 2 x 2 voxel blocks (a
box filter matched to the new voxel: voxel centres move to the mean of the four old centres), the
5 mm slices kept as they are, giving 1.1406 x 1.1406 x 5 mm voxels. Rows (the anterior-posterior
axis) that hold no part of the body or the couch (all voxels below -900 HU, with a margin of 8
voxels) are cropped. To keep the file near 2 MB, the air outside the patient (voxels below -900 HU
connected to the image border) is set to exactly -1000 HU (the scanner's air noise there, std
~25 HU, carries no anatomy and does not compress), and the other values are rounded to even HU
(an error of at most 1 HU, far below the CT's noise), clipped to [-1024, 3071], int16. The
file is then about 2.2 MB. Stored as NIfTI with the
RAS affine (ITK's LPS geometry converted by :func:`fastimpact.io.affine_from_itk`), gzip level 9
and a zero timestamp (reproducible bytes).
"""

from __future__ import annotations

import argparse
import gzip
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

OUTPUT = "ct_chest_lung1.nii.gz"
FACTOR = 2
AIR_HU = -900.0
MARGIN = 8
QUANT = 2
OUTSIDE_AIR_HU = -1000


def block_mean(volume: np.ndarray, affine: np.ndarray, factor: int):
    """Average ``factor`` x ``factor`` blocks on the first two axes; returns (array, affine)."""
    nx, ny = (volume.shape[0] // factor) * factor, (volume.shape[1] // factor) * factor
    v = volume[:nx, :ny].astype(np.float64)
    v = v.reshape(nx // factor, factor, ny // factor, factor, volume.shape[2]).mean(axis=(1, 3))
    out_aff = affine.copy()
    out_aff[:3, :2] *= factor
    # new voxel 0 is the mean of old voxels 0..factor-1 on each of the two axes
    out_aff[:3, 3] = affine[:3, :3] @ np.array([(factor - 1) / 2, (factor - 1) / 2, 0.0]) + affine[:3, 3]
    return v, out_aff


def build(source: Path, out_dir: Path) -> Path:
    import nibabel as nib
    import SimpleITK as sitk

    from fastimpact.io import affine_from_itk

    img = sitk.ReadImage(str(source))
    arr = np.transpose(sitk.GetArrayFromImage(img), (2, 1, 0))  # (z, y, x) -> (i, j, k)
    affine = affine_from_itk(img.GetOrigin(), img.GetSpacing(), img.GetDirection())
    v, aff = block_mean(arr, affine, FACTOR)
    rows = np.nonzero((v > AIR_HU).any(axis=(0, 2)))[0]
    j0, j1 = max(int(rows[0]) - MARGIN, 0), min(int(rows[-1]) + MARGIN + 1, v.shape[1])
    v = v[:, j0:j1]
    aff[:3, 3] = aff[:3, :3] @ np.array([0.0, j0, 0.0]) + aff[:3, 3]
    data = np.clip(np.rint(v / QUANT) * QUANT, -1024, 3071).astype(np.int16)
    labels, _ = ndimage.label(data < AIR_HU)
    border = np.unique(
        np.concatenate([labels[0].ravel(), labels[-1].ravel(), labels[:, 0].ravel(), labels[:, -1].ravel()])
    )
    data[np.isin(labels, border[border > 0])] = OUTSIDE_AIR_HU
    nimg = nib.Nifti1Image(data, aff)
    nimg.header.set_xyzt_units("mm")
    nimg.header.set_qform(aff, code=1)
    nimg.header.set_sform(aff, code=1)
    out = out_dir / OUTPUT
    raw = nimg.to_bytes()
    with open(out, "wb") as fh, gzip.GzipFile(fileobj=fh, mode="wb", compresslevel=9, mtime=0) as gz:
        gz.write(raw)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, required=True, help="pyradiomics data/lung1_image.nrrd")
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    args = ap.parse_args(argv)
    if not args.source.is_file():
        print(f"error: '{args.source}' is not a file; pass pyradiomics' data/lung1_image.nrrd", file=sys.stderr)
        return 2
    out = build(args.source, args.out_dir)
    print(f"wrote {out} ({out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
