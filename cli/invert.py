"""`fastimpact invert TRANSFORM -o inverse.nii.gz`: the inverse displacement field of a registration.

Only Typer and the standard library are imported at module level (``fastimpact --version`` stays light).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def invert(
    transform: Annotated[Path, typer.Argument(help="Output folder of `fastimpact register`, its transform.json (exact), or a displacement field .nii/.nii.gz (trilinear).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Inverse displacement field to write (.nii or .nii.gz, ITK convention).")],
    reference: Annotated[Optional[Path], typer.Option("--reference", help="Grid of the inverse field. [default: the moving image named in transform.json when it exists, else the fixed grid]")] = None,
    iterations: Annotated[int, typer.Option(help="Maximum fixed-point iterations.")] = 50,
    tolerance: Annotated[float, typer.Option(help="Stop when every point's residual |T(y + v(y)) - y| is below this, mm.")] = 1e-3,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON result on stdout.")] = False,
):
    """Invert a registration: write v with T(y + v(y)) = y on a grid (moving -> fixed) and report the residual."""
    import numpy as np

    from fastimpact.cli.output import emit as _emit
    from fastimpact.cli.output import note as _note
    from fastimpact.errors import ConfigError
    from fastimpact.image import Image
    from fastimpact.inverse import invert as invert_transform
    from fastimpact.io import atomic_write_path, load_image, save_displacement_itk
    from fastimpact.points import load_forward

    out_name = output.name.lower()
    if not out_name.endswith((".nii", ".nii.gz")):
        raise ConfigError(f"output '{output}' must end in .nii or .nii.gz (an ITK displacement field)")
    if output.exists() and not force:
        from fastimpact.errors import ImageIOError

        raise ImageIOError(f"output '{output}' exists; pass --force to overwrite or choose another -o")
    fwd = load_forward(transform)
    if fwd.transform is None:
        raise ConfigError(f"'{transform}' cannot be inverted here: give a fastimpact output folder, transform.json or "
                          "displacement field")
    if reference is None and fwd.moving_path and Path(fwd.moving_path).is_file():
        reference = Path(fwd.moving_path)
        _note(f"the inverse is written on the grid of the moving image '{reference}' (--reference to choose)", as_json)
    if reference is not None:
        ref = load_image(reference, role="reference image")
        shape, affine = ref.shape, ref.affine
    else:
        shape, affine = fwd.shape, fwd.affine
        _note("the inverse is written on the fixed image grid (the moving image is unknown; --reference to choose)", as_json)
    res = invert_transform(fwd.transform, shape, affine, iterations=iterations, tolerance_mm=tolerance)
    with atomic_write_path(output, force) as tmp:
        grid = np.broadcast_to(np.zeros((), dtype=np.uint8), tuple(shape))  # no memory: only the grid counts
        save_displacement_itk(res.field, Image(grid, affine), tmp)
    summary = res.summary()
    if not res.converged:
        _note(f"the iteration stopped after {res.iterations} iterations with a residual of up to "
              f"{res.residual_max_mm:.3g} mm (> {tolerance:g} mm): the transform may fold or leave the grid there", as_json)
    if fwd.kind == "field" and res.outside_fraction > 0:
        _note(f"{100 * res.outside_fraction:.1f}% of the points map outside the field's grid, where it is extended "
              "by its edge values", as_json)
    if not as_json:
        typer.echo(f"residual |T(y + v(y)) - y|: max {res.residual_max_mm:.3g} mm, mean {res.residual_mean_mm:.3g} mm "
                   f"({res.iterations} iterations)")
        typer.echo(f"wrote {output}", err=True)
    _emit({"status": "ok", "outputs": {"inverse": str(output)}, "direction": "moving -> fixed",
           "source": fwd.kind, **summary}, as_json)

