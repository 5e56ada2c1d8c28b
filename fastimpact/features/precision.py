"""Arithmetic of the feature networks: fp32, tf32 or fp16 (``--precision``).

* ``fp32``: the graphs as built; on the GPU, ONNX Runtime's CUDA provider is told not to use
  TensorFloat-32 (``use_tf32 = 0``), so results match the CPU to float32 rounding.
* ``tf32``: the same graphs; the CUDA provider may run convolutions and matrix products with
  TensorFloat-32 tensor cores (10-bit mantissa products, float32 accumulation). No effect on the CPU.
* ``fp16``: weights and activations in float16, inputs and outputs kept float32 (so nothing else
  changes). The conversion is onnxconverter-common's, followed by one fix: casts *to* float32
  inside the graph (e.g. of exported ``.to(float32)`` calls) become casts to float16, since every
  other tensor they meet is now float16. ONNX Runtime's CPU kernels have few float16
  implementations (slow, and some ops such as ScatterElements with ``add`` are missing), so fp16
  runs on the CUDA provider only: :func:`check_precision` refuses it on the CPU before any work
  (the config does so for ``device = cpu``, the driver for a device resolved to the CPU).
"""

from __future__ import annotations

import warnings

from ..errors import ConfigError
from ..vocabulary import PRECISIONS

__all__ = ["PRECISIONS", "check_precision", "cuda_provider_options", "to_float16"]



def check_precision(precision: str, backend: str) -> None:
    """Raise ConfigError when ``precision`` cannot run on ``backend`` ('cpu' or 'cuda').

    fp16 needs the CUDA provider: on the CPU, ONNX Runtime lacks float16 kernels that the
    graphs use (the Jacobian mode's VJP graphs fail at their first run) and is slower than
    float32 where it has them. tf32 only changes the CUDA provider, so on the CPU it is fp32.
    """
    if precision == "fp16" and backend != "cuda":
        raise ConfigError(f"precision=fp16 needs the GPU (device cuda), but the run is on the {backend.upper()}: "
                          "ONNX Runtime's CPU provider lacks float16 kernels these graphs use; use --precision "
                          "fp32 on the CPU, or --device cuda")


def cuda_provider_options(precision: str) -> dict:
    """Options of ONNX Runtime's CUDA execution provider for ``precision``."""
    return {"use_tf32": "1" if precision == "tf32" else "0"}


def _split_consumed_outputs(graph) -> None:
    """Give every graph output that later nodes also read (e.g. a feature layer that feeds the
    next stage) its own Identity node, so the converter's float32 output cast does not retype
    the tensor the float16 nodes consume (a converter limitation)."""
    from onnx import helper

    consumed = {i for n in graph.node for i in n.input}
    for out in graph.output:
        if out.name not in consumed:
            continue
        inner = out.name + "__fp16_inner"
        for n in graph.node:
            for k, name in enumerate(n.output):
                if name == out.name:
                    n.output[k] = inner
            for k, name in enumerate(n.input):
                if name == out.name:
                    n.input[k] = inner
        graph.node.append(helper.make_node("Identity", [inner], [out.name], name=out.name + "__fp16_out"))


def to_float16(model):
    """A float16 copy of an ONNX ``ModelProto`` with float32 inputs and outputs."""
    try:
        from onnxconverter_common import float16
    except ImportError:
        raise ConfigError("precision fp16 needs the onnxconverter-common package: pip install onnxconverter-common "
                          "(part of the 'gpu' extra), or use --precision fp32 / tf32") from None
    from onnx import ModelProto, TensorProto

    src = ModelProto()
    src.CopyFrom(model)
    del src.graph.value_info[:]  # stale float32 annotations would contradict the converted nodes
    _split_consumed_outputs(src.graph)
    # the graph's own casts to float32 (not the ones the converter inserts around blocked ops)
    own_casts = {n.name for n in src.graph.node if n.op_type == "Cast" and n.name
                 and any(a.name == "to" and a.i == TensorProto.FLOAT for a in n.attribute)}
    with warnings.catch_warnings():
        # "the float32 number 5.96e-08 will be truncated to 1e-07", once per tiny constant: the
        # expected effect of float16 (whose accuracy tests/test_precision.py states), not news
        warnings.filterwarnings("ignore", message="the float32 number", category=UserWarning)
        out = float16.convert_float_to_float16(src, keep_io_types=True)
    graph_outputs = {o.name for o in out.graph.output}
    for node in out.graph.node:
        if node.name in own_casts and node.output[0] not in graph_outputs:
            for attr in node.attribute:
                if attr.name == "to":
                    attr.i = TensorProto.FLOAT16
    return out
