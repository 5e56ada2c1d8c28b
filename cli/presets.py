"""``fastimpact presets list|show NAME``: the shipped settings files for common tasks."""

from __future__ import annotations

import json
from typing import Annotated

import typer

app = typer.Typer(help="Presets: complete settings for common tasks (use with register --preset NAME).",
                  no_args_is_help=True, add_completion=False)

JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]


@app.command("list")
def list_presets(as_json: JsonOption = False):
    """List the presets, one line each."""
    from fastimpact.presets import preset_names, preset_summary

    if as_json:
        typer.echo(json.dumps({"status": "ok", "presets": [{"name": n, "summary": preset_summary(n)}
                                                           for n in preset_names()]}))
        return
    for name in preset_names():
        typer.echo(f"{name:18s} {preset_summary(name)}")


@app.command("show")
def show(name: Annotated[str, typer.Argument(help="Preset name (fastimpact presets list).")], as_json: JsonOption = False):
    """Print a preset's TOML file (usable as --config, and overridable by any option)."""
    from fastimpact.presets import load_preset, preset_path

    settings = load_preset(name)  # validates
    if as_json:
        typer.echo(json.dumps({"status": "ok", "name": name, "path": str(preset_path(name)), "settings": settings}))
        return
    typer.echo(preset_path(name).read_text(), nl=False)
