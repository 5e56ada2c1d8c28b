"""A tiny 2-D feature model built with onnx.helper (no torch): Conv 3x3 (4 channels, padding 1)
then Tanh, with its Jacobian-mode patch graph (centre voxel, [B, 4]) and VJP graph, and a manifest.

    write_tiny2d(folder, input_channels=1) -> path of the .onnx file (manifest beside it)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

OPSET = 17
CHANNELS = 4


def weights(input_channels: int, seed: int = 3):
    """Fixed seeded Conv weights (4, C_in, 3, 3) and bias (4,), float32."""
    rng = np.random.default_rng(seed)
    w = (rng.normal(size=(CHANNELS, input_channels, 3, 3)) / (3.0 * input_channels)).astype(np.float32)
    b = (0.1 * rng.normal(size=CHANNELS)).astype(np.float32)
    return w, b


def _model(nodes, inputs, outputs, inits):
    from onnx import helper

    used = {name for node in nodes for name in node.input}
    graph = helper.make_graph(nodes, "tiny2d", inputs, outputs, [t for t in inits if t.name in used])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    return model


def _io(name, shape):
    from onnx import TensorProto, helper

    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _centre_nodes(src, out):
    """Nodes slicing the centre voxel (P // 2 on both spatial axes, P dynamic) of ``src``
    [B, 4, P, P] into ``out`` [B, 4, 1, 1]; also define 'c' (start) and 'c1' (end = c + 1)."""
    from onnx import helper

    return [
        helper.make_node("Shape", [src], ["hw"], start=2, end=4),
        helper.make_node("Div", ["hw", "two"], ["c"]),
        helper.make_node("Add", ["c", "one"], ["c1"]),
        helper.make_node("Slice", [src, "c", "c1", "axes23"], [out]),
    ]


def _consts(w, b):
    from onnx import numpy_helper as nh

    return [nh.from_array(w, "W"), nh.from_array(b, "Bias"), nh.from_array(np.array([2, 2], np.int64), "two"),
            nh.from_array(np.array([1, 1], np.int64), "one"), nh.from_array(np.array([2, 3], np.int64), "axes23"),
            nh.from_array(np.array([0, 0], np.int64), "zeros2"), nh.from_array(np.array([1.0], np.float32), "f1"),
            nh.from_array(np.array([-1, CHANNELS, 1, 1], np.int64), "cshape")]


def build_graphs(input_channels: int = 1):
    """(full, patch, vjp) ONNX models of the network."""
    from onnx import helper

    w, b = weights(input_channels)
    conv = helper.make_node("Conv", ["x", "W", "Bias"], ["z"], pads=[1, 1, 1, 1])
    full = _model([helper.make_node("Identity", ["input"], ["x"]), conv, helper.make_node("Tanh", ["z"], ["conv"])],
                  [_io("input", ["B", input_channels, "H", "W"])], [_io("conv", ["B", CHANNELS, "H", "W"])],
                  _consts(w, b))
    patch_nodes = [helper.make_node("Identity", ["patches"], ["x"]), conv, helper.make_node("Tanh", ["z"], ["t"]),
                   *_centre_nodes("t", "tc"), helper.make_node("Flatten", ["tc"], ["centre_0"], axis=1)]
    patch = _model(patch_nodes, [_io("patches", ["B", input_channels, "P", "P"])], [_io("centre_0", ["B", CHANNELS])],
                   _consts(w, b))
    # VJP: g = cot * (1 - tanh^2) at the centre, zero elsewhere; d/dx = ConvTranspose(g, W) (the
    # adjoint of the padded stride-1 Conv, same weight tensor)
    vjp_nodes = [
        helper.make_node("Identity", ["patches"], ["x"]), conv, helper.make_node("Tanh", ["z"], ["t"]),
        *_centre_nodes("t", "tc"),
        helper.make_node("Mul", ["tc", "tc"], ["tc2"]),
        helper.make_node("Sub", ["f1", "tc2"], ["dt"]),
        helper.make_node("Reshape", ["cotangent_0", "cshape"], ["cot4"]),
        helper.make_node("Mul", ["cot4", "dt"], ["gc"]),
        # pads: begin (0, 0, c, c), end (0, 0, P - 1 - c, P - 1 - c)
        helper.make_node("Sub", ["hw", "c1"], ["after"]),
        helper.make_node("Concat", ["zeros2", "c", "zeros2", "after"], ["pads"], axis=0),
        helper.make_node("Pad", ["gc", "pads"], ["g"]),
        helper.make_node("ConvTranspose", ["g", "W"], ["grad"], pads=[1, 1, 1, 1]),
    ]
    vjp = _model(vjp_nodes, [_io("patches", ["B", input_channels, "P", "P"]), _io("cotangent_0", ["B", CHANNELS])],
                 [_io("grad", ["B", input_channels, "P", "P"])], _consts(w, b))
    return full, patch, vjp


def write_tiny2d(folder, input_channels: int = 1, patch_size: int = 5) -> Path:
    """Write tiny2d_c{C}.onnx, its patch / VJP graphs and the JSON manifest into ``folder``;
    return the .onnx path (what ``model=`` takes)."""
    import onnx

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"tiny2d_c{input_channels}"
    full, patch, vjp = build_graphs(input_channels)
    for model, suffix in ((full, ""), (patch, "_patch"), (vjp, "_vjp")):
        onnx.checker.check_model(model)
        onnx.save(model, str(folder / f"{stem}{suffix}.onnx"))
    manifest = {
        "name": stem, "file": f"{stem}.onnx", "description": "tiny 2-D test model: Conv 3x3 + Tanh",
        "dimension": 2, "input_channels": input_channels,
        "layers": [{"name": "conv", "channels": CHANNELS, "stride": 1}], "receptive_field": 3,
        "normalization": "zscore", "patch_file": f"{stem}_patch.onnx", "vjp_file": f"{stem}_vjp.onnx",
        "patch_layers": [0], "patch_size": patch_size,
    }
    (folder / f"{stem}.json").write_text(json.dumps(manifest, indent=1))
    return folder / f"{stem}.onnx"
