"""Feature-extractor models: ONNX files plus a manifest, built in or brought by the user.

A model is an ONNX graph with one input ``[B, C_in, *spatial]`` (float32) and one output per
feature layer, in order, ``[B, C_l, *spatial / stride_l]``. Its manifest (``<model>.json`` beside
the ``.onnx`` file; a user model uses the same sidecar) holds:

=====================  ================================================================
name                   model name (built-ins: the key in ``fastimpact models list``)
file                   the ONNX file, relative to the manifest
description            one line
dimension              2 or 3 (spatial dimensions of the input)
input_channels         C_in (1 for grey, 3 for RGB models: grey is replicated)
layers                 list of {name, channels, stride[, receptive_field]}, one per ONNX output,
                       in order (a layer's receptive field defaults to the model's)
receptive_field        voxels of the input that one output voxel of the last layer sees
voxel_size_mm          voxel size the model expects (null: any; the level's spacing is used)
size_multiple          spatial sizes must be multiples of this (1: any size)
normalization          intensity normalisation applied with the image's own statistics inside
                       its mask: none | zscore | minmax | ct | imagenet
global_normalization   true when the network normalises each input by its own statistics
                       (InstanceNorm): tiles then differ slightly from whole-volume features
license, provenance    where the weights come from and under which licence they are shipped
=====================  ================================================================
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from fastimpact.errors import ConfigError

__all__ = ["LayerSpec", "ModelSpec", "builtin_models", "load_model_spec", "validate_with_runtime", "NORMALIZATIONS"]

NORMALIZATIONS = ("none", "zscore", "minmax", "ct", "imagenet")
ALIASES = {"mind": "mind-r1d2"}  # short names of built-in models
_REQUIRED = ("name", "file", "dimension", "input_channels", "layers", "receptive_field", "normalization")
_HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class LayerSpec:
    name: str
    channels: int
    stride: int = 1
    receptive_field: int | None = None


@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: Path
    dimension: int
    input_channels: int
    layers: tuple
    receptive_field: int
    normalization: str
    voxel_size_mm: float | None = None
    size_multiple: int = 1
    global_normalization: bool = False
    description: str = ""
    license: str = ""
    provenance: str = ""
    manifest_path: Path | None = field(default=None, compare=False)

    def to_dict(self) -> dict:
        return {
            "name": self.name, "file": self.path.name, "description": self.description,
            "dimension": self.dimension, "input_channels": self.input_channels,
            "layers": [{"name": l.name, "channels": l.channels, "stride": l.stride,
                        **({"receptive_field": l.receptive_field} if l.receptive_field else {})} for l in self.layers],
            "receptive_field": self.receptive_field, "voxel_size_mm": self.voxel_size_mm,
            "size_multiple": self.size_multiple, "normalization": self.normalization,
            "global_normalization": self.global_normalization, "license": self.license,
            "provenance": self.provenance,
        }


def _spec_from_manifest(data: dict, manifest_path: Path) -> ModelSpec:
    where = f"model manifest '{manifest_path}'"
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must hold a JSON object; see `fastimpact models show mind` for an example")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise ConfigError(f"{where} lacks {', '.join(missing)}; see `fastimpact models show mind` for the format")

    def positive_int(key, value):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{where}: {key}={value!r} must be a positive integer")
        return value

    dim = data["dimension"]
    if dim not in (2, 3):
        raise ConfigError(f"{where}: dimension={dim!r} must be 2 or 3")
    norm = data["normalization"]
    if norm not in NORMALIZATIONS:
        raise ConfigError(f"{where}: normalization={norm!r} must be one of {', '.join(NORMALIZATIONS)}")
    layers = data["layers"]
    if not isinstance(layers, list) or not layers:
        raise ConfigError(f"{where}: layers must be a non-empty list of {{name, channels, stride}}")
    specs = []
    for i, layer in enumerate(layers):
        if not isinstance(layer, dict) or "channels" not in layer:
            raise ConfigError(f"{where}: layer {i} must be an object with name, channels and stride")
        rf = layer.get("receptive_field")
        specs.append(LayerSpec(str(layer.get("name", f"layer{i}")), positive_int(f"layers[{i}].channels", layer["channels"]),
                               positive_int(f"layers[{i}].stride", layer.get("stride", 1)),
                               None if rf is None else positive_int(f"layers[{i}].receptive_field", rf)))
    vox = data.get("voxel_size_mm")
    if vox is not None and (isinstance(vox, bool) or not isinstance(vox, (int, float)) or vox <= 0):
        raise ConfigError(f"{where}: voxel_size_mm={vox!r} must be a positive number or null")
    path = (manifest_path.parent / str(data["file"])).resolve()
    if not path.is_file():
        raise ConfigError(f"{where} names the model file '{path}', which does not exist; fix 'file'")
    return ModelSpec(
        name=str(data["name"]), path=path, dimension=dim,
        input_channels=positive_int("input_channels", data["input_channels"]), layers=tuple(specs),
        receptive_field=positive_int("receptive_field", data["receptive_field"]), normalization=norm,
        voxel_size_mm=None if vox is None else float(vox),
        size_multiple=positive_int("size_multiple", data.get("size_multiple", 1)),
        global_normalization=bool(data.get("global_normalization", False)),
        description=str(data.get("description", "")), license=str(data.get("license", "")),
        provenance=str(data.get("provenance", "")), manifest_path=manifest_path,
    )


def _read_manifest(path: Path) -> ModelSpec:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"model manifest '{path}' cannot be read ({str(exc).splitlines()[0]}); "
                          "give a JSON sidecar as described in `fastimpact models show mind`") from None
    return _spec_from_manifest(data, path)


def builtin_models() -> dict:
    """name -> ModelSpec of the models shipped in this folder."""
    return {spec.name: spec for spec in (_read_manifest(p) for p in sorted(_HERE.glob("*.json")))}


def load_model_spec(name_or_path) -> ModelSpec:
    """A built-in model by name, or a user model: an ``.onnx`` file with a ``.json`` sidecar of the
    same stem (``model.onnx`` + ``model.json``), or the sidecar itself."""
    models = builtin_models()
    key = ALIASES.get(str(name_or_path), str(name_or_path))
    if key in models:
        return models[key]
    path = Path(key)
    if path.suffix.lower() == ".onnx":
        sidecar = path.with_suffix(".json")
        if not path.is_file():
            raise ConfigError(f"model file '{path}' does not exist; give a built-in name ({', '.join(models)}) or an ONNX file")
        if not sidecar.is_file():
            raise ConfigError(f"model '{path}' has no manifest '{sidecar}'; write one as described in "
                              "`fastimpact models show mind`")
        return _read_manifest(sidecar)
    if path.suffix.lower() == ".json" and path.is_file():
        return _read_manifest(path)
    raise ConfigError(f"unknown model {key!r}: choose one of {', '.join([*ALIASES, *models])} or give an .onnx file "
                      "with a .json sidecar")


def validate_with_runtime(spec: ModelSpec) -> None:
    """Check the ONNX file against its manifest with ONNX Runtime (input rank, output count)."""
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(str(spec.path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types
        raise ConfigError(f"model file '{spec.path}' is not a valid ONNX model ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:200]})") from None
    inputs, outputs = sess.get_inputs(), sess.get_outputs()
    if len(inputs) != 1 or len(inputs[0].shape) != spec.dimension + 2:
        raise ConfigError(f"model '{spec.name}': the ONNX graph takes {len(inputs)} input(s) of rank "
                          f"{[len(i.shape) for i in inputs]}, the manifest says one input of rank {spec.dimension + 2}")
    if len(outputs) != len(spec.layers):
        raise ConfigError(f"model '{spec.name}': the ONNX graph has {len(outputs)} outputs but the manifest lists "
                          f"{len(spec.layers)} layers; list one layer per output, in order")
