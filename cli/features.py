"""`fastimpact features IMAGE --model M -o DIR`: write what the IMPACT metric sees.

Per kept layer: ``<model>_<layer>.nii.gz`` (X, Y, Z, C float32 on the layer's own grid: affine =
image grid at the model's voxel size, scaled by the stride) and ``<model>_<layer>.png``, the first
three principal components of the central axial slice as RGB (as in the IMPACT paper's Fig. 6).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def features(
    image: Annotated[Path, typer.Argument(help="Image (NIfTI) to compute features of.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder.")] = Path("fastimpact-features"),
    model: Annotated[str, typer.Option(help="Built-in model name or .onnx file with a .json manifest.")] = "mind",
    layers: Annotated[Optional[str], typer.Option(help="Layer bit mask, e.g. 011. [default: all layers]")] = None,
    voxel_size: Annotated[Optional[float], typer.Option("--voxel-size", help="Voxel size (mm) of the grid the model sees. [default: the image's spacing]")] = None,
    mask: Annotated[Optional[Path], typer.Option("--mask", help="Mask on the image grid: intensity statistics are taken inside it.")] = None,
    tile_size: Annotated[int, typer.Option("--tile-size", help="Tile edge in voxels (0 = automatic).")] = 0,
    feature_memory: Annotated[float, typer.Option("--feature-memory", help="Memory budget of one inference, GB.")] = 4.0,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads. [default: all cores]")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing outputs.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
):
    """Compute a model's feature maps of IMAGE; write them as NIfTI plus a PCA-to-RGB PNG per layer."""
    from fastimpact.features.export import write_feature_maps

    written = write_feature_maps(image, output, model=model, layers=layers, voxel_size=voxel_size, mask=mask,
                                 tile_size=tile_size, memory_gb=feature_memory, threads=threads, force=force)
    if as_json:
        import json

        typer.echo(json.dumps({"status": "ok", "outputs": [str(p) for p in written]}))
        return
    for path in written:
        typer.echo(str(path))
