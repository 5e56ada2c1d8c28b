"""`fastimpact models list | show NAME`: the feature-extractor models and their manifests."""

from __future__ import annotations

import json
from typing import Annotated

import typer

app = typer.Typer(help="Feature-extractor models (ONNX + manifest) for the IMPACT metric.", no_args_is_help=True)


JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]


@app.command("list")
def list_models(as_json: JsonOption = False):
    """List the built-in models (name, layers, description)."""
    from fastimpact.onnx_models import ALIASES, builtin_models

    if as_json:
        typer.echo(json.dumps({"status": "ok", "models": [
            {"name": name, "aliases": [a for a, t in ALIASES.items() if t == name], **spec.to_dict()}
            for name, spec in builtin_models().items()]}, default=str))
        return
    for name, spec in builtin_models().items():
        layers = ", ".join(f"{l.name}:{l.channels}ch/s{l.stride}" for l in spec.layers)
        alias = [a for a, target in ALIASES.items() if target == name]
        label = f"{name} ({', '.join(alias)})" if alias else name
        typer.echo(f"{label:24s} {spec.dimension}-D  {layers:28s} {spec.description}")


@app.command("show")
def show_model(
    name: Annotated[str, typer.Argument(help="A built-in model name, or an .onnx file with a .json sidecar.")],
    check: Annotated[bool, typer.Option("--check/--no-check", help="Open the ONNX file and check it against the manifest.")] = True,
    as_json: JsonOption = False,
):
    """Print a model's manifest as JSON (the format a user model's sidecar follows)."""
    from fastimpact.onnx_models import load_model_spec, validate_with_runtime

    spec = load_model_spec(name)
    if check:
        try:
            validate_with_runtime(spec)
        except ImportError as exc:
            if not (exc.name or "").startswith("onnxruntime"):
                raise
            from fastimpact.errors import BackendError

            raise BackendError("checking a model needs ONNX Runtime, which is not installed: "
                               'pip install "fastimpact[cpu]" (or pass --no-check to print the manifest only)') from None
    if as_json:  # one line, with the status, as every --json object
        typer.echo(json.dumps({"status": "ok", "model": spec.to_dict()}, default=str))
        return
    typer.echo(json.dumps(spec.to_dict(), indent=2))


def _register_build():
    from fastimpact.cli.models_build import build

    app.command("build")(build)


_register_build()
