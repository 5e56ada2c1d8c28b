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
patch_file             optional: the patch-forward graph of Jacobian mode (below)
vjp_file               optional (needs patch_file): its vector-Jacobian product (below)
patch_layers           with patch_file: indices into ``layers`` of the layers the patch graphs
                       compute, increasing (e.g. deepbet ``[0, 1, 2]``, mind ``[0]``)
patch_size             with patch_file: the default patch size P in voxels (see the centre rule;
                       checked, like the graph files, when Jacobian mode or ``models show``
                       uses them: a model with absent patch graphs still runs in static mode)
patch_size_fixed       true when the patch graphs were exported for ``patch_size`` only; false
                       (default): any valid P runs
vjp_full_file          optional: the full-volume VJP graph of dense Jacobian mode (below);
                       independent of the patch graphs
vjp_full_layers        with vjp_full_file: indices into ``layers`` of the layers whose
                       cotangents it takes, increasing (deepbet ``[0, 1, 2]``, mind ``[0]``);
                       the graph file is checked when dense mode or ``models show`` uses it
=====================  ================================================================

Jacobian mode (IMPACT, paper Sec. III-A-5, Eq. 6-8) runs N patches of P^D voxels around the sample
points through the network each iteration and compares the *centre* voxel of each selected layer.
Two graphs serve it (D = ``dimension``; ``B`` is dynamic; K = ``len(patch_layers)``):

* ``patch_file``: input ``patches`` [B, C_in, P, ..., P] float32 (normalised as ``normalization``
  says, like the full graph's input); outputs, one per patch layer in ``patch_layers`` order,
  ``[B, C_k]``: the centre voxel of that layer, i.e. what the full graph gives on the patch at
  output index ``(P // 2) // stride_k`` on every spatial axis.
* ``vjp_file``: inputs ``patches`` [B, C_in, P, ..., P] and ``cotangent_0`` ... ``cotangent_{K-1}``
  ``[B, C_k]`` (in ``patch_layers`` order); output ``grad`` [B, C_in, P, ..., P] =
  ``d(sum_k <centre_k(patches), cotangent_k>) / d patches``, computed per batch item (the
  forward is recomputed inside). A layer that a run does not use gets a zero cotangent.

Centre rule: input voxel ``P // 2`` (0-based) is the patch centre, which the registration places
on the sample point (patch offsets ``(i - P // 2) * voxel_size``); layer k's output voxel
``(P // 2) // stride_k`` is centred on input voxel ``stride_k * ((P // 2) // stride_k)``, which is
the patch centre only when ``(P // 2) % stride_k == 0``. A patch size must satisfy this for every
patch layer (:meth:`ModelSpec.patch_centres` checks it and lists the valid sizes). Graphs may be
cropped to what the centre voxels need (MIND computes one voxel); networks with instance norm
need the whole patch (the norms use every voxel's statistics).

Dense Jacobian mode runs the network on the whole (moving) volume and pulls the derivative of the
similarity with respect to each selected layer's feature map back to the image with one graph
(K = ``len(vjp_full_layers)``; B and the spatial sizes are dynamic):

* ``vjp_full_file``: inputs ``image`` [B, C_in, X, Y, Z] float32 (normalised like the full graph's
  input; X, Y, Z multiples of ``size_multiple``, any size when it is 1) and ``cotangent_0`` ...
  ``cotangent_{K-1}`` (in ``vjp_full_layers`` order), each shaped like the full graph's output of
  that layer on this image: ``[B, C_k, X_k, Y_k, Z_k]`` with ``X_k = X / stride_k`` when
  ``size_multiple`` is a multiple of the stride, else the network's own rounding (deepbet:
  ``ceil(X / stride_k)``); output ``grad`` [B, C_in, X, Y, Z] =
  ``d(sum_k <layer_k(image), cotangent_k>) / d image`` (the forward is recomputed inside; batch
  items are independent). A layer that a run does not use gets a zero cotangent. 2-D models: the
  same with two spatial axes (no 2-D model ships one).

:meth:`ModelSpec.vjp_full_slots` checks that a model has this graph and that it covers the
layers a run selects, and gives each selected layer's cotangent index k.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fastimpact.errors import ConfigError

__all__ = ["LayerSpec", "ModelSpec", "builtin_models", "load_model_spec", "validate_with_runtime", "NORMALIZATIONS",
           "valid_patch_sizes"]

NORMALIZATIONS = ("none", "zscore", "minmax", "ct", "imagenet")
ALIASES = {"mind": "mind-r1d2"}  # short names of built-in models
_REQUIRED = ("name", "file", "dimension", "input_channels", "layers", "receptive_field", "normalization")
_PATCH_KEYS = ("vjp_file", "patch_layers", "patch_size", "patch_size_fixed")  # need patch_file
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
    patch_path: Path | None = None
    vjp_path: Path | None = None
    patch_layers: tuple = ()
    patch_size: int | None = None
    patch_size_fixed: bool = False
    vjp_full_path: Path | None = None
    vjp_full_layers: tuple = ()
    manifest_path: Path | None = field(default=None, compare=False)

    @property
    def patch_strides(self) -> tuple:
        """Strides of the patch layers, in ``patch_layers`` order."""
        return tuple(self.layers[i].stride for i in self.patch_layers)

    def patch_centres(self, patch_size: int | None = None, parameter: str = "patch_size",
                      need_vjp: bool = False) -> tuple:
        """The centre output index ``(P // 2) // stride_k`` of each patch layer for patch size ``P``
        (default: the manifest's). Jacobian mode calls this first: it raises ConfigError (naming
        ``parameter``) when the model has no patch graphs or they (or the VJP, with ``need_vjp``)
        are missing, when P is not a valid size (see the module docstring) or, for graphs
        exported for one size, when P is another. These checks wait until here so that a model
        whose patch graphs are absent or mismatched still works in static mode."""
        if self.patch_path is None or (need_vjp and self.vjp_path is None):
            what = "patch graphs (patch_file" if self.patch_path is None else "VJP graph (vjp_file"
            raise ConfigError(f"model '{self.name}' has no {what} in its manifest), so it cannot run in Jacobian "
                              "mode; use static mode or build the graphs with `fastimpact models build`")
        for key, path in (("patch_file", self.patch_path), ("vjp_file", self.vjp_path if need_vjp else None)):
            if path is not None and not path.is_file():
                raise ConfigError(f"model '{self.name}': its manifest names the {key} '{path}', which does not "
                                  f"exist; put the graph there or fix '{key}' in {self.manifest_path}")
        size = self.patch_size if patch_size is None else patch_size
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise ConfigError(f"{parameter}={size!r} for model '{self.name}' must be a positive integer")
        size = int(size)
        bad = [f"{self.layers[i].name} (stride {self.layers[i].stride})" for i in self.patch_layers
               if (size // 2) % self.layers[i].stride]
        if bad:
            raise ConfigError(f"{parameter}={size} for model '{self.name}' puts the centre voxel of {', '.join(bad)} "
                              f"off the patch centre ((P // 2) % stride must be 0); use one of "
                              f"{_sizes_text(self.patch_strides)}")
        if self.patch_size_fixed and size != self.patch_size:
            raise ConfigError(f"{parameter}={size} for model '{self.name}': its patch graphs were exported for "
                              f"patch size {self.patch_size} only; use {self.patch_size} or rebuild the graphs")
        return tuple((size // 2) // s for s in self.patch_strides)

    def vjp_full_slots(self, layers=None, parameter: str = "layers") -> tuple:
        """The cotangent index k (position in ``vjp_full_layers``) of each layer in ``layers``
        (indices into :attr:`layers`; default: all of ``vjp_full_layers``, giving 0 .. K-1).
        Dense Jacobian mode calls this first: it raises ConfigError (naming ``parameter``) when
        the model has no full-volume VJP graph, when its file is missing, or when a layer is not
        one the graph takes a cotangent for. Checked here, not when the manifest is read, so that
        a model without the graph still runs in the other modes."""
        if self.vjp_full_path is None:
            raise ConfigError(f"model '{self.name}' has no full-volume VJP graph (vjp_full_file in its manifest), so "
                              "it cannot run in dense Jacobian mode; use static or Jacobian mode or build the graph "
                              "with `fastimpact models build`")
        if not self.vjp_full_path.is_file():
            raise ConfigError(f"model '{self.name}': its manifest names the vjp_full_file '{self.vjp_full_path}', "
                              f"which does not exist; put the graph there or fix 'vjp_full_file' in "
                              f"{self.manifest_path}")
        if layers is None:
            return tuple(range(len(self.vjp_full_layers)))
        wanted = list(layers)
        bad = [i for i in wanted if isinstance(i, bool) or not isinstance(i, (int, np.integer))
               or int(i) not in self.vjp_full_layers]
        if bad:
            have = ", ".join(f"{i} ({self.layers[i].name})" for i in self.vjp_full_layers)
            raise ConfigError(f"{parameter}={wanted!r} for model '{self.name}': layer(s) {bad} have no cotangent in "
                              f"its full-volume VJP graph, which takes layers {have}; choose among those")
        return tuple(self.vjp_full_layers.index(int(i)) for i in wanted)

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
            # absolute paths: a manifest copied elsewhere still finds the patch graphs
            **({"patch_file": str(self.patch_path), "patch_layers": list(self.patch_layers),
                "patch_size": self.patch_size, "patch_size_fixed": self.patch_size_fixed}
               if self.patch_path is not None else {}),
            **({"vjp_file": str(self.vjp_path)} if self.vjp_path is not None else {}),
            **({"vjp_full_file": str(self.vjp_full_path), "vjp_full_layers": list(self.vjp_full_layers)}
               if self.vjp_full_path is not None else {}),
        }


def valid_patch_sizes(strides, upto: int = 40) -> list:
    """Patch sizes P <= ``upto`` whose centre voxel is on the patch centre in every layer of
    ``strides``: ``(P // 2) % stride == 0`` for all (P = 1 excluded: a single voxel)."""
    step = math.lcm(*[int(s) for s in strides]) if strides else 1
    return [p for p in range(2, upto + 1) if (p // 2) % step == 0]


def _sizes_text(strides) -> str:
    step = math.lcm(*[int(s) for s in strides]) if strides else 1
    sizes = valid_patch_sizes(strides, max(40, 8 * step + 1))
    return ", ".join(str(p) for p in sizes[:8]) + (", ..." if len(sizes) > 8 else "")


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
    patch = _patch_fields(data, manifest_path, specs, where)
    patch.update(_vjp_full_fields(data, manifest_path, specs, where))
    return ModelSpec(
        name=str(data["name"]), path=path, dimension=dim,
        input_channels=positive_int("input_channels", data["input_channels"]), layers=tuple(specs),
        receptive_field=positive_int("receptive_field", data["receptive_field"]), normalization=norm,
        voxel_size_mm=None if vox is None else float(vox),
        size_multiple=positive_int("size_multiple", data.get("size_multiple", 1)),
        global_normalization=bool(data.get("global_normalization", False)),
        description=str(data.get("description", "")), license=str(data.get("license", "")),
        provenance=str(data.get("provenance", "")), manifest_path=manifest_path, **patch,
    )


def _patch_fields(data: dict, manifest_path: Path, layers: list, where: str) -> dict:
    """The optional Jacobian-mode fields of a manifest (see the module docstring), validated."""
    if data.get("patch_file") is None:
        given = [k for k in _PATCH_KEYS if data.get(k) is not None]
        if given:
            raise ConfigError(f"{where}: {', '.join(given)} given without patch_file; add the patch-forward graph "
                              "(patch_file) or remove them")
        return {}

    def graph(key):  # existence is checked when Jacobian mode asks for it (patch_centres)
        value = data[key]
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: {key}={value!r} must be the file name of an ONNX graph")
        return (manifest_path.parent / value).resolve()

    idx = data.get("patch_layers")
    if not _layer_indices(idx, len(layers)):
        raise ConfigError(f"{where}: patch_layers={idx!r} must be a non-empty increasing list of layer indices "
                          f"in 0..{len(layers) - 1} (the layers the patch graphs output, in order)")
    size = data.get("patch_size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"{where}: patch_size={size!r} must be a positive integer (the default patch size in voxels)")
    fixed = data.get("patch_size_fixed", False)
    if not isinstance(fixed, bool):
        raise ConfigError(f"{where}: patch_size_fixed={fixed!r} must be true or false")
    return {"patch_path": graph("patch_file"), "vjp_path": graph("vjp_file") if data.get("vjp_file") is not None else None,
            "patch_layers": tuple(idx), "patch_size": size, "patch_size_fixed": fixed}


def _layer_indices(value, n_layers: int) -> bool:
    """Whether ``value`` is a non-empty increasing list of layer indices in 0 .. n_layers - 1."""
    return (isinstance(value, list) and bool(value)
            and all(not isinstance(i, bool) and isinstance(i, int) and 0 <= i < n_layers for i in value)
            and all(b > a for a, b in zip(value, value[1:])))


def _vjp_full_fields(data: dict, manifest_path: Path, layers: list, where: str) -> dict:
    """The optional dense-Jacobian fields of a manifest (see the module docstring), validated; the
    file's existence is checked when dense mode asks for it (:meth:`ModelSpec.vjp_full_slots`)."""
    value, idx = data.get("vjp_full_file"), data.get("vjp_full_layers")
    if value is None:
        if idx is not None:
            raise ConfigError(f"{where}: vjp_full_layers given without vjp_full_file; add the full-volume VJP graph "
                              "(vjp_full_file) or remove vjp_full_layers")
        return {}
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: vjp_full_file={value!r} must be the file name of an ONNX graph")
    if not _layer_indices(idx, len(layers)):
        raise ConfigError(f"{where}: vjp_full_layers={idx!r} must be a non-empty increasing list of layer indices "
                          f"in 0..{len(layers) - 1} (the layers whose cotangents the full-volume VJP graph takes, "
                          "in order)")
    return {"vjp_full_path": (manifest_path.parent / value).resolve(), "vjp_full_layers": tuple(idx)}


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


def _open_session(path: Path):
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types
        raise ConfigError(f"model file '{path}' is not a valid ONNX model ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:200]})") from None


def _validate_patch_graphs(spec: ModelSpec) -> None:
    """The patch-forward and VJP graphs against the contract (input/output names, ranks, channels,
    a fixed patch size where one is baked in)."""
    rank = spec.dimension + 2
    channels = [spec.layers[i].channels for i in spec.patch_layers]

    def check_patches(sess, path):
        inp = sess.get_inputs()[0]
        dims = inp.shape
        if inp.name != "patches" or len(dims) != rank:
            raise ConfigError(f"model '{spec.name}': '{path.name}' must take 'patches' of rank {rank} as its first "
                              f"input, not '{inp.name}' of rank {len(dims)}")
        fixed = [d for d in dims[2:] if isinstance(d, int)]
        if fixed and (not spec.patch_size_fixed or any(d != spec.patch_size for d in fixed)):
            raise ConfigError(f"model '{spec.name}': '{path.name}' is exported for patches of {dims[2:]} voxels; "
                              f"set patch_size to that size and patch_size_fixed to true, or export a dynamic graph")

    spec.patch_centres(need_vjp=spec.vjp_path is not None)  # files exist, the default size is valid
    sess = _open_session(spec.patch_path)
    check_patches(sess, spec.patch_path)
    outs = sess.get_outputs()
    if len(sess.get_inputs()) != 1 or len(outs) != len(channels):
        raise ConfigError(f"model '{spec.name}': '{spec.patch_path.name}' has {len(sess.get_inputs())} input(s) and "
                          f"{len(outs)} output(s); the contract is one input and one output per patch layer "
                          f"({len(channels)})")
    for o, c in zip(outs, channels):
        if len(o.shape) != 2 or (isinstance(o.shape[1], int) and o.shape[1] != c):
            raise ConfigError(f"model '{spec.name}': patch output '{o.name}' has shape {o.shape}, expected [B, {c}]")
    if spec.vjp_path is None:
        return
    sess = _open_session(spec.vjp_path)
    check_patches(sess, spec.vjp_path)
    names = [i.name for i in sess.get_inputs()]
    expected = ["patches"] + [f"cotangent_{k}" for k in range(len(channels))]
    outs = sess.get_outputs()
    if names != expected or [o.name for o in outs] != ["grad"]:
        raise ConfigError(f"model '{spec.name}': '{spec.vjp_path.name}' takes {names} and gives "
                          f"{[o.name for o in outs]}; the contract is {expected} -> ['grad']")
    for i, c in zip(sess.get_inputs()[1:], channels):
        if len(i.shape) != 2 or (isinstance(i.shape[1], int) and i.shape[1] != c):
            raise ConfigError(f"model '{spec.name}': VJP input '{i.name}' has shape {i.shape}, expected [B, {c}]")


def _validate_vjp_full_graph(spec: ModelSpec) -> None:
    """The full-volume VJP graph against the contract: input and output names, ranks, channels."""
    spec.vjp_full_slots()  # the file exists
    path = spec.vjp_full_path
    sess = _open_session(path)
    rank = spec.dimension + 2
    channels = [spec.layers[i].channels for i in spec.vjp_full_layers]
    names = [i.name for i in sess.get_inputs()]
    expected = ["image"] + [f"cotangent_{k}" for k in range(len(channels))]
    outs = sess.get_outputs()
    if names != expected or [o.name for o in outs] != ["grad"]:
        raise ConfigError(f"model '{spec.name}': '{path.name}' takes {names} and gives {[o.name for o in outs]}; "
                          f"the contract of vjp_full_file is {expected} -> ['grad']")
    wanted = [("image", spec.input_channels), *[(f"cotangent_{k}", c) for k, c in enumerate(channels)],
              ("grad", spec.input_channels)]
    for arg, (name, c) in zip([*sess.get_inputs(), outs[0]], wanted):
        dims = arg.shape
        if len(dims) != rank or (isinstance(dims[1], int) and dims[1] != c):
            raise ConfigError(f"model '{spec.name}': '{path.name}' has {name} of shape {dims}; the manifest asks for "
                              f"rank {rank} with {c} channel(s) [B, {c}, {', '.join(['...'] * spec.dimension)}]")


def validate_with_runtime(spec: ModelSpec) -> None:
    """Check the ONNX file(s) against the manifest with ONNX Runtime (input rank, output count; the
    patch and full-volume VJP graphs' names and shapes, see the module docstring)."""
    sess = _open_session(spec.path)
    inputs, outputs = sess.get_inputs(), sess.get_outputs()
    if len(inputs) != 1 or len(inputs[0].shape) != spec.dimension + 2:
        raise ConfigError(f"model '{spec.name}': the ONNX graph takes {len(inputs)} input(s) of rank "
                          f"{[len(i.shape) for i in inputs]}, the manifest says one input of rank {spec.dimension + 2}")
    if len(outputs) != len(spec.layers):
        raise ConfigError(f"model '{spec.name}': the ONNX graph has {len(outputs)} outputs but the manifest lists "
                          f"{len(spec.layers)} layers; list one layer per output, in order")
    if spec.patch_path is not None:
        _validate_patch_graphs(spec)
    if spec.vjp_full_path is not None:
        _validate_vjp_full_graph(spec)
