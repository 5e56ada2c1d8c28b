"""`fastimpact points TRANSFORM POINTS -o OUT`: map landmarks from the fixed to the moving image.

Only Typer and the standard library are imported at module level (``fastimpact --version`` stays light).
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer


class Convention(str, Enum):
    lps = "lps"
    ras = "ras"


def points(
    transform: Annotated[Path, typer.Argument(help="Output folder of `fastimpact register`, its transform.json, a displacement field .nii/.nii.gz, or an ITK transform .h5/.tfm.")],
    points_file: Annotated[Path, typer.Argument(metavar="POINTS", help="Landmarks in the FIXED image: elastix .pts/.txt ('point' or 'index' line, count, then x y z per line) or .csv with x,y,z columns.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Mapped points (.pts/.txt: elastix point file; .csv: the input's columns with x, y, z replaced).")],
    convention: Annotated[Convention, typer.Option("--convention", help="World convention of the input and output coordinates: lps (ITK, elastix, 3D Slicer files) or ras (nibabel, FreeSurfer, MNI).")] = Convention.lps,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON result on stdout.")] = False,
):
    """Map POINTS fixed -> moving (y = x + u(x)), as transformix -def does; moving landmarks need `fastimpact invert`."""
    from fastimpact.cli.output import emit as _emit
    from fastimpact.cli.output import note as _note
    from fastimpact.errors import ConfigError, ImageIOError
    from fastimpact.points import load_forward, map_points, read_points, write_points

    if not output.name.lower().endswith((".pts", ".txt", ".csv")):
        raise ConfigError(f"output '{output}' must end in .pts, .txt (elastix point file) or .csv")
    if output.exists() and not force:
        raise ImageIOError(f"output '{output}' exists; pass --force to overwrite or choose another -o")
    fwd = load_forward(transform)
    ps = read_points(points_file)
    mapped, info = map_points(fwd, ps, convention.value)
    from fastimpact.io import atomic_write_path

    with atomic_write_path(output, force) as tmp:
        write_points(ps, mapped, tmp, convention.value)
    if info.get("outside_fixed_grid"):
        _note(f"{info['outside_fixed_grid']} of {info['points']} points lie outside the fixed image grid "
              "(check --convention: lps or ras?)", as_json)
    if not as_json:
        typer.echo(f"mapped {info['points']} points fixed -> moving ({info['convention']} mm); wrote {output}", err=True)
    _emit({"status": "ok", "outputs": {"points": str(output)}, **info}, as_json)
