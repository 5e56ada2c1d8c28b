"""``fastimpact presets list|show NAME``: the shipped settings files for common tasks."""

from __future__ import annotations

from typing import Annotated

import typer

app = typer.Typer(help="Presets: complete settings for common tasks (use with register --preset NAME).",
                  no_args_is_help=True, add_completion=False)


@app.command("list")
def list_presets():
    """List the presets, one line each."""
    from fastimpact.presets import preset_names, preset_summary

    for name in preset_names():
        typer.echo(f"{name:18s} {preset_summary(name)}")


@app.command("show")
def show(name: Annotated[str, typer.Argument(help="Preset name (fastimpact presets list).")]):
    """Print a preset's TOML file (usable as --config, and overridable by any option)."""
    from fastimpact.presets import load_preset, preset_path

    load_preset(name)  # validates
    typer.echo(preset_path(name).read_text(), nl=False)
