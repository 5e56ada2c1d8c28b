"""Build the 2 mm demo images shipped in ``fastimpact/data/`` from nilearn's 1 mm MNI152 files.

Usage::

    pip download --no-deps nilearn -d /tmp/nl && unzip -q /tmp/nl/nilearn-*.whl -d /tmp/nl/x
    python -m fastimpact.data.build_demo_data --nilearn-dir /tmp/nl/x/nilearn/datasets/data

(or ``--nilearn-dir`` pointing at an installed ``nilearn`` package / its ``datasets/data``.)

Inputs (ICBM 2009a nonlinear symmetric template, 197 x 233 x 189 voxels of 1 mm, uint8):
``mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz``.

Resampling: the 2 mm grid keeps the origin (centre of voxel 0) and the axes of the 1 mm grid, so
its voxel centres are the even 1 mm voxel centres and it covers the same field of view:
99 x 117 x 95 voxels. Each image is low-pass filtered with a Gaussian of
sigma = sqrt(2**2 - 1**2) / (2 sqrt(2 ln 2)) = 0.735 mm (it widens a 1 mm-FWHM voxel response to
the 2 mm FWHM of the new voxels, removing what the coarser grid cannot represent), then sampled
at the even voxels, rounded and stored as uint8 (T1 intensities 0-255 and tissue probabilities
0-255 as in the originals), gzip level 9 with a zero timestamp (reproducible bytes).
"""

from __future__ import annotations

import argparse
import gzip
import math
import sys
from pathlib import Path

import numpy as np

SOURCES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
OUTPUTS = {
    "t1": "mni152_t1_2mm.nii.gz",
    "gm": "mni152_gm_2mm.nii.gz",
    "wm": "mni152_wm_2mm.nii.gz",
}
FACTOR = 2
#: Gaussian sigma in input voxels: FWHM grows from 1 to FACTOR voxels.
SIGMA = math.sqrt(FACTOR**2 - 1.0) / (2.0 * math.sqrt(2.0 * math.log(2.0)))


def find_source_dir(path: Path) -> Path:
    """Accept the data folder itself, an unpacked wheel, or the nilearn package folder."""
    candidates = [path, path / "datasets" / "data", path / "nilearn" / "datasets" / "data"]
    for c in candidates:
        if all((c / f).is_file() for f in SOURCES.values()):
            return c
    raise SystemExit(
        f"no MNI152 2009a files under '{path}'; expected {SOURCES['t1']} (and gm, wm) in it or in "
        "nilearn/datasets/data below it"
    )


def downsample(volume: np.ndarray, factor: int = FACTOR, sigma: float = SIGMA) -> np.ndarray:
    """Gaussian anti-aliasing then sampling every ``factor``-th voxel (starting at voxel 0).

    volume: (X, Y, Z) array; returns float64 of shape ceil(X / factor), ... .
    Borders use 'nearest' extension (the template's border is background).
    """
    from scipy import ndimage

    smooth = ndimage.gaussian_filter(volume.astype(np.float64), sigma=sigma, mode="nearest", truncate=4.0)
    return smooth[::factor, ::factor, ::factor]


def build(source_dir: Path, out_dir: Path) -> dict:
    import nibabel as nib

    out = {}
    for key, fname in SOURCES.items():
        src = nib.load(str(source_dir / fname))
        data = np.asanyarray(src.dataobj)
        affine = src.affine.copy()
        small = np.clip(np.rint(downsample(data)), 0, 255).astype(np.uint8)
        new_affine = affine.copy()
        new_affine[:3, :3] = affine[:3, :3] * FACTOR
        header = nib.Nifti1Header()
        header.set_data_dtype(np.uint8)
        img = nib.Nifti1Image(small, new_affine, header=header)
        # Keep the source's sform code (2, aligned anatomical, in nilearn 0.14.1); the qform gets
        # the same matrix so readers that prefer the qform agree.
        code = int(src.header["sform_code"]) or 2
        img.set_sform(new_affine, code=code)
        img.set_qform(new_affine, code=code)
        img.header.set_xyzt_units(xyz="mm")
        img.header.set_slope_inter(np.nan, np.nan)
        img.header["descrip"] = f"ICBM152 2009a sym {key} 2mm (fastimpact demo)".encode()[:80]
        target = out_dir / OUTPUTS[key]
        # gzip level 9 and mtime 0: smallest file, byte-identical on every rebuild.
        target.write_bytes(gzip.compress(img.to_bytes(), compresslevel=9, mtime=0))
        out[key] = target
        print(f"{key}: {data.shape} -> {small.shape}, {target.stat().st_size / 1024:.0f} KiB -> {target}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nilearn-dir", required=True, type=Path,
                    help="nilearn's datasets/data folder (or the nilearn package / unpacked wheel)")
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent,
                    help="where to write the 2 mm files (default: this package folder)")
    args = ap.parse_args(argv)
    build(find_source_dir(args.nilearn_dir), args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
