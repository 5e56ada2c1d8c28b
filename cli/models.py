"""`fastimpact models list | show NAME`: the feature-extractor models and their manifests."""

from __future__ import annotations

import json
from typing import Annotated

import typer

app = typer.Typer(help="Feature-extractor models (ONNX + manifest) for the IMPACT metric.", no_args_is_help=True)


@app.command("list")
def list_models():
    """List the built-in models (name, layers, description)."""
    from fastimpact.onnx_models import ALIASES, builtin_models

    for name, spec in builtin_models().items():
        layers = ", ".join(f"{l.name}:{l.channels}ch/s{l.stride}" for l in spec.layers)
        alias = [a for a, target in ALIASES.items() if target == name]
        label = f"{name} ({', '.join(alias)})" if alias else name
        typer.echo(f"{label:24s} {spec.dimension}-D  {layers:28s} {spec.description}")


@app.command("show")
def show_model(
    name: Annotated[str, typer.Argument(help="A built-in model name, or an .onnx file with a .json sidecar.")],
    check: Annotated[bool, typer.Option("--check/--no-check", help="Open the ONNX file and check it against the manifest.")] = True,
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
    typer.echo(json.dumps(spec.to_dict(), indent=2))


def _register_build():
    from fastimpact.cli.models_build import build

    app.command("build")(build)


_register_build()
