"""`fastimpact models build NETWORK --layers 0,1,2 --name NAME -o DIR`: convert a user's network.

Writes ``NAME.onnx`` (full forward: the chosen layers), ``NAME_patch.onnx`` and ``NAME_vjp.onnx``
(Jacobian mode: centre voxels of patches and their vector-Jacobian product), ``NAME_vjp_full.onnx``
(dense Jacobian mode: the vector-Jacobian product of all chosen layers on the whole image; the
three not with ``--static-only``) and the manifest ``NAME.json``; every graph is checked against
torch with ONNX Runtime before the manifest is written. A network whose patch graphs cannot be made is refused
with the reason and the fix. Needs the ``models`` extra (torch, onnx, onnxscript); the files it
writes need only ONNX Runtime. See ``fastimpact.onnx_models`` for the graph contract and
``fastimpact.onnx_models.build`` for what the network may be (TorchScript, scripted or traced; a
Python file; an nnU-Net plans.json + checkpoint).
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer


class Normalization(str, Enum):
    none = "none"
    zscore = "zscore"
    minmax = "minmax"
    ct = "ct"
    imagenet = "imagenet"


def _int_list(text: Optional[str], option: str) -> Optional[list]:
    from fastimpact.errors import ConfigError

    if text is None:
        return None
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise ConfigError(f"{option}={text!r} must be comma-separated integers, e.g. 0,1,2") from None


def build(
    network: Annotated[Path, typer.Argument(help="TorchScript file (.pt, scripted or traced), Python file defining "
                                                 "the network (.py), or architecture JSON (nnU-Net v2 plans.json).")],
    layers: Annotated[str, typer.Option("--layers", help="Outputs to expose, comma-separated: output indices of the "
                                                         "network (or of --submodule), or submodule names (their "
                                                         "outputs; TorchScript too, e.g. the encoder stages of a "
                                                         "segmentation network).")],
    name: Annotated[str, typer.Option("--name", help="Model name and file stem.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder.")] = Path("."),
    weights: Annotated[Optional[Path], typer.Option("--weights", help="State dict / checkpoint (with a .py or "
                                                                      ".json network).")] = None,
    entry: Annotated[Optional[str], typer.Option("--entry", help="Name of the nn.Module, class or factory in a .py "
                                                                 "network. [default: model, create_model]")] = None,
    configuration: Annotated[Optional[str], typer.Option("--configuration", help="nnU-Net configuration in "
                                                                                 "plans.json, e.g. 3d_fullres.")] = None,
    submodule: Annotated[Optional[str], typer.Option("--submodule", help="Run only this submodule, e.g. encoder "
                                                                         "(nnU-Net: its outputs are the stages).")] = None,
    layer_names: Annotated[Optional[str], typer.Option("--layer-names", help="Names of the layers, comma-separated. "
                                                                             "[default: layer0, layer1, ...]")] = None,
    in_channels: Annotated[int, typer.Option("--in-channels", help="Input channels.")] = 1,
    dimension: Annotated[int, typer.Option("--dimension", help="Spatial dimensions of the network (2 or 3).")] = 3,
    normalization: Annotated[Normalization, typer.Option("--normalization", help="Intensity normalisation the "
                                                                                 "network expects.")] = Normalization.zscore,
    voxel_size: Annotated[Optional[float], typer.Option("--voxel-size", help="Voxel size (mm) the network was "
                                                                             "trained at. [default: any]")] = None,
    patch_size: Annotated[Optional[int], typer.Option("--patch-size", help="Default Jacobian-mode patch size "
                                                                           "(voxels). [default: 2 lcm(strides) + 1]")] = None,
    patch_layers: Annotated[Optional[str], typer.Option("--patch-layers", help="Indices into --layers available "
                                                                               "in Jacobian mode. [default: all]")] = None,
    receptive_field: Annotated[Optional[int], typer.Option("--receptive-field", help="Receptive field (voxels) of "
                                                                                     "the last layer. [default: measured]")] = None,
    probe_size: Annotated[int, typer.Option("--probe-size", help="Edge of the test input used to measure strides "
                                                                 "(a multiple of the total stride).")] = 64,
    description: Annotated[str, typer.Option("--description", help="One-line description.")] = "",
    license: Annotated[str, typer.Option("--license", help="Licence of the weights.")] = "",
    random_weights: Annotated[bool, typer.Option("--random-weights", help="Keep an architecture's initial weights "
                                                                          "(testing and timing only).")] = False,
    static_only: Annotated[bool, typer.Option("--static-only", help="Write only the full graph (static mode); "
                                                                    "no patch/VJP graphs for the Jacobian "
                                                                    "modes.")] = False,
    time_it: Annotated[bool, typer.Option("--time", help="Also time the patch graphs (ONNX Runtime, 2 threads).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing outputs.")] = False,
):
    """Convert a network into fastimpact model files (full, patch, VJP and full-volume VJP graphs + manifest).

    TorchScript files (scripted or traced) are run operator by operator, so their patch graphs keep
    the batch and patch size dynamic; a network that fixes its sizes is refused with the reason."""
    from fastimpact.errors import ConfigError

    try:
        import onnxscript  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"fastimpact models build needs torch, onnx and onnxscript ({exc.name} is missing): "
                          "pip install 'fastimpact[models]' onnxscript") from None
    from fastimpact.onnx_models.build import build_model, time_graphs

    names = None if layer_names is None else [v.strip() for v in layer_names.split(",") if v.strip()]
    info = build_model(network, output, name, [v.strip() for v in layers.split(",") if v.strip()], weights=weights,
                       entry=entry, configuration=configuration, submodule=submodule, layer_names=names,
                       in_channels=in_channels, dimension=dimension, normalization=normalization.value,
                       voxel_size_mm=voxel_size, patch_size=patch_size,
                       patch_layers=_int_list(patch_layers, "--patch-layers"), receptive_field=receptive_field,
                       probe_size=probe_size, description=description, license=license, force=force,
                       random_weights=random_weights, static_only=static_only)
    timings = []
    if time_it and info.get("patch_file"):
        idx = info["patch_layers"]
        timings = time_graphs(output / info["patch_file"], output / info["vjp_file"], info["patch_size"], in_channels,
                              [info["layers"][i]["channels"] for i in idx], n_spatial=dimension)
    if as_json:
        typer.echo(json.dumps({**info, "timings": [dict(zip(("batch", "forward_s", "vjp_s"), t)) for t in timings]},
                              indent=2))
        return
    for path in info["files"]:
        typer.echo(path)
    layers_text = ", ".join(f"{l['name']}:{l['channels']}ch/s{l['stride']}" for l in info["layers"])
    checks = ", ".join(f"{k} {v:.1e}" for k, v in info["checks"].items())
    typer.echo(f"layers {layers_text}; ONNX Runtime vs torch, max rel. error: {checks}")
    if info.get("patch_error"):
        typer.echo(f"static mode only: no patch graphs ({info['patch_error']})")
    else:
        typer.echo(f"Jacobian mode: patch size {info['patch_size']}, patch layers {info['patch_layers']}; "
                   f"dense Jacobian mode: full-volume VJP of layers {info['vjp_full_layers']}")
    for b, f, v in timings:
        typer.echo(f"  B={b}: forward {f * 1e3:.1f} ms, VJP {v * 1e3:.1f} ms")
