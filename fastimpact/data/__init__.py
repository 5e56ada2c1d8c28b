"""Built-in demo data: the MNI152 2009a template (T1, grey and white matter) at 2 mm.

``demo_paths()`` gives the files shipped with fastimpact (99 x 117 x 95 voxels of 2 mm, uint8,
about 0.7 MB in all; see ``LICENSE_MNI152.txt`` for the notice and provenance, and
``build_demo_data.py`` for how they were made). ``mni152_1mm_paths()`` finds the 1 mm originals in
an installed nilearn, for benchmarks on full-resolution anatomy.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..errors import ImageIOError

__all__ = ["demo_paths", "mni152_1mm_paths", "DEMO_FILES", "NILEARN_FILES"]

#: key -> file name in this package (T1 intensities 0-255; gm/wm probabilities 0-255).
DEMO_FILES = {
    "t1": "mni152_t1_2mm.nii.gz",
    "gm": "mni152_gm_2mm.nii.gz",
    "wm": "mni152_wm_2mm.nii.gz",
}

#: key -> file name under nilearn/datasets/data/ (197 x 233 x 189 voxels of 1 mm, uint8).
NILEARN_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}


def demo_paths() -> dict[str, Path]:
    """Paths of the shipped 2 mm demo images: ``{"t1": ..., "gm": ..., "wm": ...}``.

    The files live inside the installed package (regular files for wheel and editable installs).
    """
    root = resources.files(__name__)
    out = {}
    for key, name in DEMO_FILES.items():
        entry = root.joinpath(name)
        if not entry.is_file():
            raise ImageIOError(
                f"demo file '{name}' is missing from the fastimpact installation; reinstall "
                "fastimpact (the package data *.nii.gz was not installed)"
            )
        out[key] = Path(str(entry))
    return out


def mni152_1mm_paths() -> dict[str, Path]:
    """Paths of nilearn's 1 mm MNI152 2009a files ``{"t1", "gm", "wm"}`` (for benchmarks).

    Only nilearn's data files are used, so ``pip install --no-deps nilearn`` is enough; nilearn
    is found without importing it.
    """
    import importlib.util

    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise ImageIOError(
            "the 1 mm MNI152 template comes from nilearn, which is not installed; run "
            "`pip install --no-deps nilearn`"
        )
    for loc in spec.submodule_search_locations:
        folder = Path(loc) / "datasets" / "data"
        paths = {k: folder / n for k, n in NILEARN_FILES.items()}
        if all(p.is_file() for p in paths.values()):
            return paths
    raise ImageIOError(
        f"nilearn is installed but {NILEARN_FILES['t1']} (or gm/wm) is missing from its "
        "datasets/data folder; reinstall it with `pip install --no-deps --force-reinstall nilearn`"
    )
