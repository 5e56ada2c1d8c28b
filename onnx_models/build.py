"""Build the ONNX graphs of a feature extractor: full forward, patch forward and its VJP.

Needs ``torch``, ``onnx`` and ``onnxscript`` (the ``models`` extra); the graphs it writes need only
ONNX Runtime. See :mod:`fastimpact.onnx_models` for the graph contract (``patch_file``,
``vjp_file``, ``patch_layers``, ``patch_size``).

How the graphs are made:

* the *patch forward* (:func:`centre_module`) runs the network on ``[B, C_in, P, ..., P]``
  patches and keeps the centre voxel ``(P // 2) // stride_k`` of each patch layer: ``[B, C_k]``;
* the *VJP* is ``grad = d(sum_k <centre_k(patches), cotangent_k>) / d patches`` (torch autograd,
  :func:`vjp_reference`).

Both are traced with ``make_fx`` (symbolic shapes, ``core_aten_decompositions``; it also takes
TorchScript modules, which ``torch.export`` does not), which writes the backward pass as aten
operators, and the traced graph is exported by ``torch.onnx.export(dynamo=True, opset 18)``. Some
backward operators have no ONNX translation in torch, or a slow one; they get ours
(:func:`_translations`):

  - ``convolution_backward`` (input gradient only): a strided convolution's transpose is written
    as *one* ordinary ``Conv`` of the output gradient with ``stride^D`` polyphase kernels followed
    by an interleaving reshape (ONNX Runtime's CPU ``ConvTranspose`` is slower, see below);
    grouped or dilated convolutions fall back to ``ConvTranspose``; transposed convolutions
    (decoders) are not supported;
  - ``max_pool{2,3}d_with_indices`` and their backward: ONNX ``MaxPool`` indices (flat over the
    whole tensor) are used as they are, by a ``ScatterElements(add)`` on the flattened tensor
    (torch's translation converts them to per-plane indices with a second ``MaxPool``);
  - ``avg_pool{2,3}d_backward``: the transposed box filter, through the same polyphase ``Conv``;
  - ``replication_pad{2,3}d_backward``: a ``ScatterElements(add)`` per axis;
  - ``slice_scatter`` (the backward of slicing): ``Slice`` + ``Concat`` instead of the
    exporter's ``ScatterND`` with transposes;

  shapes stay dynamic (batch and patch size); the kernel transforms are constant-folded into
  initializers, and every graph is checked against torch with ONNX Runtime before it is kept.

Measured (ONNX Runtime 1.32 CPU, 2 threads, B = 2000 patches, one call, best of 5 on a shared
machine): MIND-SSC r1d2 7^3 forward 0.9 ms, VJP 2.5 ms (MIND on the whole 7^3 patch, centre
taken afterwards: 50 ms / 370 ms); deepbet s0-s2 9^3 forward 83 ms, VJP 277 ms; 17^3 369 ms /
1.21 s. torch 2.13 on the same 2 threads: MIND 1.6 / 3.6 ms, deepbet 9^3 31 / 128 ms, 17^3
256 / 943 ms (ONNX Runtime's CPU Conv is slow on many tiny 3-D maps). The ``ConvTranspose``
lowering of the deepbet backward took 430 ms against 277 ms for the polyphase one.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import warnings
from pathlib import Path

import numpy as np

from fastimpact.errors import ConfigError

OPSET = 18

__all__ = [
    "centre_module", "export_patch_forward", "export_vjp", "export_full_forward", "vjp_reference",
    "check_graphs", "export_patch_graphs", "time_graphs", "build_model", "load_user_network",
]


# ----------------------------------------------------------------------------------------------
# ONNX translations of the aten backward operators (onnxscript, traced at export time)
# ----------------------------------------------------------------------------------------------

def _polyphase_table(k: int, s: int, p: int):
    """Per axis: the transposed convolution of stride ``s`` (kernel ``k``, padding ``p``) as ``s``
    phases of an ordinary correlation over the output gradient ``g``.

    Forward: ``y[o] = sum_t w[t] x[s o - p + t]``. Input gradient at ``n = s q + r``:
    ``gx[s q + r] = sum_a w[s a + r + p] g[q - a]``. With ``j = a_max - a`` this is a correlation
    ``sum_j v_r[j] g_pad[q + j]`` with ``v_r[j] = w[s (a_max - j) + r + p]`` (zero outside the
    kernel) and ``a_max`` leading zeros of padding. Returns ``(idx, pad_begin, pad_end)``;
    ``idx[r, j]`` indexes the kernel extended by one zero tap at index ``k``."""
    a_max = max((k - 1 - r - p) // s for r in range(s))
    a_min = min(-((r + p) // s) for r in range(s))
    taps = a_max - a_min + 1
    idx = np.full((s, taps), k, dtype=np.int64)
    for r in range(s):
        for j in range(taps):
            t = s * (a_max - j) + r + p
            if 0 <= t < k:
                idx[r, j] = t
    # trailing zeros so that every input position gets its phase output: an input of n voxels
    # gives m = (n + 2p - k) // s + 1 outputs, so n <= s (m - 1) + k - 2p + s - 1 and
    # ceil(n / s) <= m + extra; the correlation then yields m + extra phase outputs
    extra = max(0, -(-(k - 2 * p + s - 1) // s) - 1)
    return idx, a_max, -a_min + extra


def _translations():
    """The custom translation table for ``torch.onnx.export(dynamo=True)``."""
    import onnxscript
    import torch
    from onnxscript import opset18 as op

    def ints(values):
        return op.Constant(value_ints=[int(v) for v in values])

    def spatial_shape(x, nd):
        return op.Slice(op.Shape(x), ints([2]), ints([2 + nd]))

    def conv_input_grad_polyphase(grad_output, weight, ks, co, ci, stride, padding, nd):
        """Input gradient of an ungrouped, undilated convolution of weight [co, ci, *ks]."""
        tables = [_polyphase_table(ks[i], int(stride[i]), int(padding[i])) for i in range(nd)]
        pads_begin, pads_end = [t[1] for t in tables], [t[2] for t in tables]
        taps = [t[0].shape[1] for t in tables]
        phases = int(np.prod(stride))
        # [Co, Ci, s0, L0, s1, L1, ...] -> [s0, s1, ..., Ci, Co, L0, L1, ...] -> [S Ci, Co, L...]
        perm = [2 + 2 * i for i in range(nd)] + [1, 0] + [3 + 2 * i for i in range(nd)]
        w = weight  # gathers on the kernel: constant-folded at export (see _export)
        for i, (idx, _, _) in enumerate(tables):
            rank, axis = 2 + nd + i, 2 + 2 * i  # each gathered axis becomes two: (phase, tap)
            pads = [0] * (2 * rank)
            pads[rank + axis] = 1  # the zero tap at index k
            w = op.Gather(op.Pad(w, ints(pads)), op.Constant(value=onnxscript.ir.tensor(idx)), axis=axis)
        w = op.Reshape(op.Transpose(w, perm=perm), ints([phases * ci, co, *taps]))
        y = op.Conv(grad_output, w, pads=pads_begin + pads_end)  # [B, S Ci, Q...]
        if phases == 1:
            return y
        shape = op.Shape(y)
        batch = op.Slice(shape, ints([0]), ints([1]))
        q = op.Slice(shape, ints([2]), ints([2 + nd]))
        y = op.Reshape(y, op.Concat(batch, ints([*stride, ci]), q, axis=0))
        # [B, s0.., Ci, Q0..] -> [B, Ci, Q0, s0, Q1, s1, ...]: position q s + r
        y = op.Transpose(y, perm=[0, 1 + nd] + [a for i in range(nd) for a in (2 + nd + i, 1 + i)])
        return op.Reshape(y, op.Concat(batch, ints([ci]), op.Mul(q, ints(stride)), axis=0))

    def convolution_backward(grad_output, input, weight, bias_sizes, stride, padding, dilation, transposed,
                             output_padding, groups, output_mask):
        nd = len(stride)
        stride, padding, dilation = list(stride), list(padding), list(dilation)
        if transposed:
            raise NotImplementedError("the input gradient of a transposed convolution is not translated; "
                                      "use an encoder without ConvTranspose layers")
        if groups == 1 and all(d == 1 for d in dilation):
            gi = conv_input_grad_polyphase(grad_output, weight, [int(k) for k in weight.shape[2:]],
                                           int(weight.shape[0]), int(weight.shape[1]), stride, padding, nd)
        else:  # grouped or dilated: ONNX Runtime's ConvTranspose (slower, rare in encoders)
            gi = op.ConvTranspose(grad_output, weight, strides=stride, pads=padding * 2, dilations=dilation,
                                  group=groups, output_padding=[s - 1 for s in stride])
        # the phase outputs / output_padding may run past the input: keep its size
        gi = op.Slice(gi, ints([0] * nd), spatial_shape(input, nd), ints(range(2, 2 + nd)))
        zero = op.Constant(value_float=0.0)  # weight and bias gradients: not asked for (output_mask)
        return gi, zero, zero

    def max_pool_with_indices(nd):
        def fn(self, kernel_size, stride=(), padding=(0,) * nd, dilation=(1,) * nd, ceil_mode=False):
            kernel = list(kernel_size) * (nd if len(kernel_size) == 1 else 1)
            stride = list(stride) if len(stride) else kernel
            stride = stride * (nd if len(stride) == 1 else 1)
            padding = list(padding) * (nd if len(padding) == 1 else 1)
            dilation = list(dilation) * (nd if len(dilation) == 1 else 1)
            # ONNX indices are flat over the whole tensor (not per plane as torch's): only our
            # backward below reads them, and it scatters into the whole flattened tensor
            return op.MaxPool(self, ceil_mode=bool(ceil_mode), dilations=dilation, kernel_shape=kernel,
                              pads=padding * 2, strides=stride)
        return fn

    def max_pool_backward(grad_output, self, kernel_size, stride, padding, dilation, ceil_mode, indices):
        flat = ints([-1])
        zeros = op.Reshape(op.Mul(self, op.Constant(value_float=0.0)), flat)
        out = op.ScatterElements(zeros, op.Reshape(indices, flat), op.Reshape(grad_output, flat), axis=0,
                                 reduction="add")
        return op.Reshape(out, op.Shape(self))

    def avg_pool_backward(nd):
        def fn(grad_output, self, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override=None):
            kernel = [int(k) for k in kernel_size] * (nd if len(kernel_size) == 1 else 1)
            stride = [int(k) for k in stride] if len(stride) else kernel
            stride = stride * (nd if len(stride) == 1 else 1)
            padding = [int(k) for k in padding] * (nd if len(padding) == 1 else 1)
            ones = op.Constant(value=onnxscript.ir.tensor(np.ones([1, 1, *kernel], dtype=np.float32)))
            if divisor_override:
                g = op.Div(grad_output, op.Constant(value_float=float(divisor_override)))
            elif count_include_pad or not any(padding):
                g = op.Div(grad_output, op.Constant(value_float=float(np.prod(kernel))))
            else:  # each window's divisor is the number of its voxels inside the input
                plane = op.Slice(op.Mul(self, op.Constant(value_float=0.0)), ints([0, 0]), ints([1, 1]), ints([0, 1]))
                counts = op.Conv(op.Add(plane, op.Constant(value_float=1.0)), ones, strides=stride, pads=padding * 2)
                g = op.Div(grad_output, counts)
            # the pooling is a convolution of every channel with a box: transpose it on [B C, 1, ...]
            shape_in, shape_g = op.Shape(self), op.Shape(g)
            g = op.Reshape(g, op.Concat(ints([-1, 1]), op.Slice(shape_g, ints([2]), ints([2 + nd])), axis=0))
            gi = conv_input_grad_polyphase(g, ones, kernel, 1, 1, stride, padding, nd)
            gi = op.Slice(gi, ints([0] * nd), op.Slice(shape_in, ints([2]), ints([2 + nd])), ints(range(2, 2 + nd)))
            return op.Reshape(gi, shape_in)
        return fn

    def replication_pad_backward(nd):
        def fn(grad_output, self, padding):
            # torch lists the pads of the last axis first: (left, right) per axis, last to first
            g = grad_output
            for i in range(nd):
                axis = 2 + nd - 1 - i
                left = int(padding[2 * i])
                n = op.Slice(op.Shape(self), ints([axis]), ints([axis + 1]))
                m = op.Slice(op.Shape(g), ints([axis]), ints([axis + 1]))
                # padded voxel j came from input voxel clip(j - left, 0, n - 1): scatter-add it back
                src = op.Range(op.Constant(value_int=0), op.Squeeze(m, ints([0])), op.Constant(value_int=1))
                src = op.Clip(op.Sub(src, op.Constant(value_int=left)), op.Constant(value_int=0),
                              op.Sub(op.Squeeze(n, ints([0])), op.Constant(value_int=1)))
                view = [1] * (2 + nd)
                view[axis] = -1
                idx = op.Expand(op.Reshape(src, ints(view)), op.Shape(g))
                target = op.Concat(op.Slice(op.Shape(g), ints([0]), ints([axis])), n,
                                   op.Slice(op.Shape(g), ints([axis + 1]), ints([2 + nd])), axis=0)
                zeros = op.Expand(op.Constant(value_float=0.0), target)
                g = op.ScatterElements(zeros, idx, g, axis=axis, reduction="add")
            return g
        return fn

    def slice_scatter(self, src, dim=0, start=None, end=None, step=1):
        # the backward of a slice: a concatenation, not the exporter's ScatterND (10-50x slower)
        if step != 1:
            raise NotImplementedError("slice_scatter with a step is not translated")
        rank = len(self.shape)
        dim = dim % rank
        axes = ints([dim])
        if start is None:
            begin = ints([0])
        elif isinstance(start, int):
            begin = ints([start if start >= 0 else 0])  # torch normalises negative starts before here
        else:
            begin = op.Reshape(op.Cast(start, to=7), ints([1]))
        stop = op.Add(begin, op.Slice(op.Shape(src), ints([dim]), ints([dim + 1])))
        head = op.Slice(self, ints([0]), begin, axes)
        tail = op.Slice(self, stop, ints([np.iinfo(np.int64).max]), axes)
        return op.Concat(head, src, tail, axis=dim)

    aten = torch.ops.aten
    return {
        aten.slice_scatter.default: slice_scatter,
        aten.replication_pad2d_backward.default: replication_pad_backward(2),
        aten.replication_pad3d_backward.default: replication_pad_backward(3),
        aten.avg_pool2d_backward.default: avg_pool_backward(2),
        aten.avg_pool3d_backward.default: avg_pool_backward(3),
        aten.convolution_backward.default: convolution_backward,
        aten.max_pool2d_with_indices.default: max_pool_with_indices(2),
        aten.max_pool3d_with_indices.default: max_pool_with_indices(3),
        aten.max_pool2d_with_indices_backward.default: max_pool_backward,
        aten.max_pool3d_with_indices_backward.default: max_pool_backward,
    }


# ----------------------------------------------------------------------------------------------
# torch modules
# ----------------------------------------------------------------------------------------------

def _as_tuple(out):
    import torch

    if isinstance(out, torch.Tensor):
        return (out,)
    if isinstance(out, (list, tuple)):
        return tuple(out)
    if isinstance(out, dict):
        return tuple(out.values())
    raise ConfigError(f"the network returns a {type(out).__name__}; it must return a tensor or a list/tuple "
                      "of feature maps [B, C, *spatial]")


def centre_module(features, layers, strides):
    """The patch-forward module of ``features`` (``x -> feature maps``):
    ``forward(patches [B, C_in, P, ..., P]) -> tuple of [B, C_k]``, the centre voxel
    ``(P_axis // 2) // stride_k`` of each feature map ``layers[k]`` (indices) of stride
    ``strides[k]``. The index follows the input's size, so the exported graph takes any P."""
    import torch
    from torch import nn

    class CentreFeatures(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = features
            self.layers = tuple(int(i) for i in layers)
            self.strides = tuple(int(s) for s in strides)

        def forward(self, patches):
            maps = _as_tuple(self.features(patches))
            out = []
            for i, s in zip(self.layers, self.strides):
                m = maps[i]
                for axis in range(2, m.dim()):  # each select drops an axis: the next one is axis 2 again
                    m = torch.select(m, 2, (patches.shape[axis] // 2) // s)
                out.append(m)
            return tuple(out)

    return CentreFeatures()


def vjp_reference(centre, patches, cotangents):
    """Torch autograd of the contract: ``d(sum_k <centre(patches)_k, cotangent_k>) / d patches``."""
    import torch

    x = patches.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        outs = centre(x)
        total = sum((o * c).sum() for o, c in zip(outs, cotangents))
        (grad,) = torch.autograd.grad(total, x)
    return grad


# ----------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet():
    """The dynamo exporter prints progress and warns about its own internals: keep the build log
    readable (errors still raise)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _finish(model_proto, path: Path, doc: str):
    import onnx

    for node in model_proto.graph.node:  # the exporter's per-node provenance (FX node, stack): 80 % of the file
        del node.metadata_props[:]
        node.doc_string = ""
    model_proto.producer_name = "fastimpact"
    model_proto.doc_string = doc
    model_proto.ir_version = min(model_proto.ir_version, 8)  # readable by onnxruntime >= 1.15
    onnx.checker.check_model(model_proto)
    onnx.save(model_proto, str(path))


def _dynamic_dims(n_spatial: int, fixed_patch: int | None, n_cotangents: int):
    import torch

    batch = torch.export.Dim("B", min=1, max=1 << 20)
    patch = None if fixed_patch else torch.export.Dim("P", min=1, max=4096)
    spatial = {} if patch is None else {a: patch for a in range(2, 2 + n_spatial)}
    return ({0: batch, **spatial},) + tuple({0: batch} for _ in range(n_cotangents))


def _export(fn, args, path: Path, input_names, output_names, dynamic_shapes, doc: str):
    import onnx
    import torch

    with _quiet():
        prog = torch.onnx.export(fn, tuple(args), dynamo=True, opset_version=OPSET,
                                 custom_translation_table=_translations(), dynamic_shapes=dynamic_shapes,
                                 input_names=list(input_names), output_names=list(output_names), optimize=True,
                                 verify=False, report=False)
    # fold the kernel transforms of the backward convolutions into initializers (the default size
    # limits leave them as nodes; ONNX Runtime would fold them too, but a Conv whose weight is
    # computed in the graph cannot use pre-packed weights: 2x slower)
    import onnxscript.optimizer

    onnxscript.optimizer.optimize(prog.model, input_size_limit=1 << 24, output_size_limit=1 << 24)
    proto = prog.model_proto
    # name the symbolic axes after the contract (the exporter calls them s0, s1, ...)
    _finish(proto, path, doc)
    return onnx.load(str(path))


def export_patch_forward(centre, path, example, layer_names, fixed_patch: bool = False, doc: str = ""):
    """Write the patch forward graph: input ``patches`` [B, C_in, P, ..., P], one output
    ``[B, C_k]`` per patch layer (named ``layer_names``)."""
    n_sp = example.dim() - 2
    dyn = _dynamic_dims(n_sp, example.shape[-1] if fixed_patch else None, 0)
    # traced to aten first (as the VJP): torch.export cannot take TorchScript modules, make_fx can
    gm = _trace(lambda patches: tuple(centre(patches)), (example,))
    return _export(gm, (example,), Path(path), ["patches"], list(layer_names), dyn,
                   doc or "patch forward: centre voxel of each patch layer")


def _trace(fn, args):
    """``fn`` as an FX graph of core aten operators, shapes symbolic (dynamic batch and size)."""
    from torch._decomp import core_aten_decompositions
    from torch.fx.experimental.proxy_tensor import make_fx

    with _quiet():
        return make_fx(fn, decomposition_table=core_aten_decompositions(), tracing_mode="symbolic",
                       _allow_non_fake_inputs=True)(*args)


def _trace_vjp(centre, example, cotangents):
    for p in centre.parameters():
        p.requires_grad_(False)  # input gradient only: no weight gradients in the graph

    def vjp(patches, *cots):
        return vjp_reference(centre, patches, cots)

    return _trace(vjp, (example, *cotangents))


def export_vjp(centre, path, example, channels, fixed_patch: bool = False, doc: str = ""):
    """Write the VJP graph: inputs ``patches`` [B, C_in, P, ..., P] and ``cotangent_k`` [B, C_k]
    (k = 0 .. K-1 in patch-layer order), output ``grad`` [B, C_in, P, ..., P]."""
    import torch

    g = torch.Generator().manual_seed(0)
    cots = [torch.randn(example.shape[0], int(c), generator=g) for c in channels]
    gm = _trace_vjp(centre.eval(), example, cots)
    n_sp = example.dim() - 2
    dyn = _dynamic_dims(n_sp, example.shape[-1] if fixed_patch else None, len(cots))
    names = ["patches"] + [f"cotangent_{k}" for k in range(len(cots))]
    return _export(gm, (example, *cots), Path(path), names, ["grad"], dyn,
                   doc or "VJP: grad = d(sum_k <centre_k(patches), cotangent_k>) / d patches")


def export_full_forward(features, path, example, layer_names, doc: str = ""):
    """Write the full forward graph (input ``image`` [B, C_in, *spatial], one output per layer;
    batch and spatial axes dynamic) with the TorchScript exporter (opset 17): plain Conv /
    InstanceNormalization nodes, as ``deepbet.onnx``."""
    import onnx
    import torch

    dyn = {"image": {0: "B", **{a: f"D{a - 2}" for a in range(2, example.dim())}}}
    for name in layer_names:
        dyn[name] = {0: "B", **{a: f"{name}_D{a - 2}" for a in range(2, example.dim())}}
    base = getattr(features, "base", None)
    if isinstance(base, torch.jit.ScriptModule) and getattr(features, "indices", None) is not None:
        # a TorchScript network: the TorchScript exporter takes it as it is (it cannot be called
        # from a Python wrapper while tracing); the selected outputs are picked in the ONNX graph
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.no_grad():
                n_out = len(_as_tuple(base(example)))
            raw = [f"raw_{i}" for i in range(n_out)]
            dyn_raw = {"image": dyn["image"], **{r: {0: "B"} for r in raw}}
            torch.onnx.export(base, (example,), str(path), dynamo=False, opset_version=17, input_names=["image"],
                              output_names=raw, dynamic_axes=dyn_raw, do_constant_folding=True)
        model = onnx.load(str(path))
        outs = {o.name: o for o in model.graph.output}
        picked = [raw[i] for i in features.indices]
        del model.graph.output[:]
        for src, name in zip(picked, layer_names):
            model.graph.node.append(onnx.helper.make_node("Identity", [src], [name]))
            vi = onnx.ValueInfoProto()
            vi.CopyFrom(outs[src])
            vi.name = name
            model.graph.output.append(vi)
        _finish(model, Path(path), doc or "feature extractor: one output per layer")
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(features.eval(), (example,), str(path), dynamo=False, opset_version=17,
                              input_names=["image"], output_names=list(layer_names), dynamic_axes=dyn,
                              do_constant_folding=True)
    except Exception:  # e.g. a TorchScript network inside a Python wrapper: trace to aten and use dynamo
        batch = torch.export.Dim("B", min=1, max=1 << 20)
        dims = {0: batch, **{a: torch.export.Dim(f"D{a - 2}", min=1, max=1 << 14) for a in range(2, example.dim())}}
        gm = _trace(lambda image: tuple(features(image)), (example,))
        _export(gm, (example,), Path(path), ["image"], list(layer_names), ({**dims},), doc)
        return
    _finish(onnx.load(str(path)), Path(path), doc or "feature extractor: one output per layer")


def _ort_session(path, threads: int = 2):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def check_graphs(centre, patch_path, vjp_path, sizes, in_channels: int, channels, n_spatial: int = 3,
                 batch: int = 3, seed: int = 0) -> dict:
    """ONNX Runtime against torch on random patches of each size in ``sizes``: max relative error
    (max |a - b| / max |b|) of the patch outputs and of the VJP. Raises RuntimeError above 1e-4."""
    import torch

    g = torch.Generator().manual_seed(seed)
    worst = {"forward": 0.0, "vjp": 0.0}
    fwd, vjp = _ort_session(patch_path), _ort_session(vjp_path) if vjp_path else None
    for size in sizes:
        x = torch.randn(batch, in_channels, *[size] * n_spatial, generator=g)
        cots = [torch.randn(batch, int(c), generator=g) for c in channels]
        with torch.no_grad():
            ref = centre(x)
        got = fwd.run(None, {"patches": x.numpy()})
        for a, b in zip(got, ref):
            worst["forward"] = max(worst["forward"], _rel(a, b.numpy()))
        if vjp is not None:
            feeds = {"patches": x.numpy(), **{f"cotangent_{k}": c.numpy() for k, c in enumerate(cots)}}
            worst["vjp"] = max(worst["vjp"], _rel(vjp.run(None, feeds)[0], vjp_reference(centre, x, cots).numpy()))
    if max(worst.values()) > 1e-4:
        raise RuntimeError(f"the exported patch graphs do not reproduce torch (max rel. errors {worst})")
    return worst


def _rel(a, b) -> float:
    return float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-30))


def export_patch_graphs(centre, folder, name: str, patch_size: int, in_channels: int, channels, layer_names,
                        check_sizes=(), n_spatial: int = 3, doc: str = "") -> dict:
    """Write ``<name>_patch.onnx`` and ``<name>_vjp.onnx`` (dynamic batch and patch size) of the
    centre module and check them with ONNX Runtime on ``patch_size`` and ``check_sizes``.
    Returns ``{"patch_file", "vjp_file", "errors"}``."""
    import torch

    folder = Path(folder)
    example = torch.randn(2, in_channels, *[patch_size] * n_spatial, generator=torch.Generator().manual_seed(1))
    patch_path, vjp_path = folder / f"{name}_patch.onnx", folder / f"{name}_vjp.onnx"
    export_patch_forward(centre, patch_path, example, layer_names,
                         doc=f"{doc} patch forward: input patches [B, {in_channels}, P, ..., P], outputs "
                             f"{', '.join(layer_names)}: centre voxel (P // 2) // stride, [B, C]".strip())
    export_vjp(centre, vjp_path, example, channels,
               doc=f"{doc} VJP: inputs patches [B, {in_channels}, P, ..., P], cotangent_k [B, C_k]; output grad = "
                   "d(sum_k <centre_k(patches), cotangent_k>) / d patches".strip())
    errors = check_graphs(centre, patch_path, vjp_path, [patch_size, *check_sizes], in_channels, channels, n_spatial)
    return {"patch_file": patch_path.name, "vjp_file": vjp_path.name, "errors": errors}


def time_graphs(patch_path, vjp_path, patch_size: int, in_channels: int, channels, batches=(250, 1000, 2000),
                threads: int = 2, repeats: int = 3, n_spatial: int = 3) -> list:
    """Seconds per ONNX Runtime call (best of ``repeats``, CPU, ``threads`` threads) of the patch
    forward and the VJP for each batch size: ``[(B, forward_s, vjp_s)]``."""
    import time

    fwd, vjp = _ort_session(patch_path, threads), _ort_session(vjp_path, threads) if vjp_path else None
    rng = np.random.default_rng(0)
    rows = []
    for b in batches:
        feeds = {"patches": rng.normal(size=(b, in_channels, *[patch_size] * n_spatial)).astype(np.float32)}
        cots = {f"cotangent_{k}": rng.normal(size=(b, int(c))).astype(np.float32) for k, c in enumerate(channels)}
        row = [b]
        for sess, extra in ((fwd, {}), (vjp, cots)):
            if sess is None:
                row.append(float("nan"))
                continue
            sess.run(None, {**feeds, **extra})  # warm-up: allocations, thread pool
            best = float("inf")
            for _ in range(repeats):
                t = time.perf_counter()
                sess.run(None, {**feeds, **extra})
                best = min(best, time.perf_counter() - t)
            row.append(best)
        rows.append(tuple(row))
    return rows


# ----------------------------------------------------------------------------------------------
# `fastimpact models build`: a user's network -> <name>.onnx, <name>_patch.onnx, <name>_vjp.onnx,
# <name>.json
# ----------------------------------------------------------------------------------------------

_TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".jit", ".torchscript")


def _import_dotted(name: str):
    import importlib

    module, _, attr = name.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(f"architecture class {name!r} cannot be imported; install the package that defines it "
                          "(nnU-Net networks: pip install dynamic-network-architectures)") from None


def _architecture_from_json(path: Path, configuration: str | None, in_channels: int):
    """An nn.Module from a dynamic-network-architectures description: either nnU-Net v2's
    ``plans.json`` (``configurations[<configuration>].architecture``) or the ``architecture``
    object itself: ``{"network_class_name", "arch_kwargs", "_kw_requires_import"}``."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"architecture file '{path}' cannot be read ({str(exc).splitlines()[0]})") from None
    if "configurations" in data:  # nnU-Net plans
        configs = data["configurations"]
        if configuration is None or configuration not in configs:
            raise ConfigError(f"configuration={configuration!r}: the plans '{path}' hold {', '.join(configs)}; "
                              "pick one with --configuration")
        data = configs[configuration].get("architecture", {})
    if "network_class_name" not in data or "arch_kwargs" not in data:
        raise ConfigError(f"architecture file '{path}' has no network_class_name/arch_kwargs: give an nnU-Net v2 "
                          "plans.json (with --configuration) or its 'architecture' object")
    kwargs = dict(data["arch_kwargs"])
    for key in data.get("_kw_requires_import", []):
        if kwargs.get(key) is not None:
            kwargs[key] = _import_dotted(kwargs[key])
    cls = _import_dotted(data["network_class_name"])
    import inspect

    params = inspect.signature(cls).parameters
    if "input_channels" in params:
        kwargs["input_channels"] = in_channels
    if "num_classes" in params and "num_classes" not in kwargs:
        kwargs["num_classes"] = 2  # the decoder head is not used; its size only matters for loading weights
    return cls(**kwargs)


def _load_weights(model, weights: Path):
    import torch

    try:
        state = torch.load(str(weights), map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for a bad file
        raise ConfigError(f"weights '{weights}' cannot be loaded by torch.load ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:160]})") from None
    for key in ("network_weights", "state_dict", "model_state_dict"):  # nnU-Net / Lightning / common checkpoints
        if isinstance(state, dict) and key in state:
            state = state[key]
    if not isinstance(state, dict):
        raise ConfigError(f"weights '{weights}' hold a {type(state).__name__}, not a state dict")
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ConfigError(f"weights '{weights}' do not fit the architecture ({str(exc).splitlines()[0][:200]}); "
                          "check the architecture, --configuration and --in-channels") from None


def load_user_network(network, *, weights=None, entry: str | None = None, configuration: str | None = None,
                      in_channels: int = 1, random_weights: bool = False):
    """The user's network in eval mode, from (by the file name):

    * ``*.pt|*.pth|*.ts|*.jit`` without ``weights``: a TorchScript file (``torch.jit.load``);
    * ``*.py``: a Python file defining the network: ``entry`` (default ``model``, then
      ``create_model``) names an ``nn.Module`` instance, an ``nn.Module`` class or a factory that
      takes no arguments; ``weights`` (a state dict) is loaded into it with ``strict=True``;
    * ``*.json``: a dynamic-network-architectures description (nnU-Net v2 ``plans.json`` with
      ``configuration``, or its ``architecture`` object), ``weights`` its checkpoint
      (``checkpoint_final.pth``: the ``network_weights`` entry is used); ``random_weights``
      keeps the initial weights instead (tests, timing)."""
    import runpy

    import torch

    path = Path(network)
    if not path.is_file():
        raise ConfigError(f"network '{path}' does not exist; give a TorchScript file, a Python file or an "
                          "architecture JSON")
    suffix = path.suffix.lower()
    weights = None if weights is None else Path(weights)
    if weights is not None and not weights.is_file():
        raise ConfigError(f"weights '{weights}' do not exist")
    if suffix in _TORCHSCRIPT_SUFFIXES and weights is None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise ConfigError(f"network '{path}' is not a TorchScript file ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:160]}); a state dict needs its architecture: give the "
                              "architecture (.py or .json) as the network and this file as --weights") from None
    elif suffix == ".py":
        namespace = runpy.run_path(str(path), run_name="fastimpact_user_network")
        names = [entry] if entry else ["model", "create_model"]
        found = next((namespace[n] for n in names if n in namespace), None)
        if found is None:
            raise ConfigError(f"network '{path}' defines no {' or '.join(names)}; define a module-level `model` "
                              "(an nn.Module), or name the class/factory with --entry")
        model = found if isinstance(found, torch.nn.Module) else found()
        if not isinstance(model, torch.nn.Module):
            raise ConfigError(f"{names[0]} in '{path}' gives a {type(model).__name__}, not a torch.nn.Module")
        if weights is not None:
            _load_weights(model, weights)
    elif suffix == ".json":
        model = _architecture_from_json(path, configuration, in_channels)
        if weights is not None:
            _load_weights(model, weights)
        elif not random_weights:
            raise ConfigError(f"network '{path}' is an architecture without weights; give its checkpoint with "
                              "--weights (random weights are only for tests: --random-weights)")
    else:
        raise ConfigError(f"network '{path}': unknown kind '{suffix}'; use a TorchScript file (.pt), a Python file "
                          "(.py) or an architecture JSON (.json)")
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _select_layers(model, layers, submodule: str | None):
    """``x -> tuple of feature maps``: the outputs of ``submodule`` (e.g. ``encoder``; default
    the whole network), then ``layers``: integers pick outputs by index, dotted names capture
    the output of that submodule by a forward hook (nn.Module only)."""
    import torch
    from torch import nn

    base = model
    if submodule:
        for part in submodule.split("."):
            if not hasattr(base, part):
                raise ConfigError(f"submodule={submodule!r}: the network has no '{part}'; choose one of "
                                  f"{', '.join(n for n, _ in base.named_children())}")
            base = getattr(base, part)
    specs = [str(l).strip() for l in layers]
    hooked = [s for s in specs if not s.lstrip("-").isdigit()]
    named = dict(base.named_modules()) if hooked else {}
    for s in hooked:
        if s not in named:
            raise ConfigError(f"layer {s!r} is neither an output index nor a submodule of the network; submodules: "
                              f"{', '.join(list(n for n in named if n)[:12])}, ...")

    if hooked and isinstance(base, torch.jit.ScriptModule):
        raise ConfigError(f"layers {hooked}: submodule outputs cannot be captured in a TorchScript network; "
                          "give output indices (see its forward's outputs)")

    class Layers(nn.Module):
        def __init__(self):
            super().__init__()
            self.base = base
            self.indices = None if hooked else [int(s) for s in specs]  # outputs of base, when no hooks

        def forward(self, x):
            captured = {}
            handles = [self.base.get_submodule(s).register_forward_hook(  # self.base: deep copies hook their own
                lambda m, i, o, s=s: captured.__setitem__(s, o)) for s in hooked]
            try:
                out = self.base(x)
            finally:
                for h in handles:
                    h.remove()
            outs = _as_tuple(out) if len(hooked) < len(specs) else ()
            result = []
            for s in specs:
                if s in captured:
                    result.append(captured[s])
                else:
                    i = int(s)
                    if not -len(outs) <= i < len(outs):
                        raise ConfigError(f"layer {i} is out of range: the network gives {len(outs)} outputs")
                    result.append(outs[i])
            if not all(isinstance(r, torch.Tensor) for r in result):
                raise ConfigError("every selected layer must be a tensor [B, C, *spatial]")
            return tuple(result)

    return Layers().eval()


def _geometry(features, in_channels: int, n_spatial: int, probe: int):
    """Channels and stride of each layer, from a forward pass on a ``probe``^D input."""
    import torch

    with torch.no_grad():
        outs = features(torch.zeros(1, in_channels, *[probe] * n_spatial))
    geo = []
    for k, o in enumerate(outs):
        if o.dim() != n_spatial + 2:
            raise ConfigError(f"layer {k} has shape {tuple(o.shape)}; a feature map [B, C, *spatial] of rank "
                              f"{n_spatial + 2} is needed")
        sizes = list(o.shape[2:])
        strides = {probe // n if n and probe % n == 0 else None for n in sizes}
        if len(strides) != 1 or None in strides:
            raise ConfigError(f"layer {k}: a {probe}^{n_spatial} input gives {sizes} voxels, not an integer stride; "
                              "use a --probe-size divisible by the network's total stride")
        geo.append((int(o.shape[1]), strides.pop()))
    return geo


def _receptive_fields(features, in_channels: int, n_spatial: int, strides, length: int):
    """Per layer: the width of the input that the centre output voxel sees along the first axis,
    measured by autograd on a thin probe [length, 8, ...] with instance norms replaced by the
    identity (they make every voxel depend on the whole input). ``None`` where the field reaches
    the probe's ends (wider than ``length``) or cannot be measured (TorchScript)."""
    import copy

    import torch
    from torch import nn

    try:
        geo = copy.deepcopy(features)
    except Exception:  # TorchScript modules and some others do not deepcopy
        return [None] * len(strides)
    swapped = 0
    for name, module in list(geo.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.modules.instancenorm._InstanceNorm):
                setattr(module, child_name, nn.Identity())
                swapped += 1
    geo = geo.double().eval()
    fields = []
    for k, s in enumerate(strides):
        x = torch.rand((1, in_channels, length, *[1] * (n_spatial - 1)), dtype=torch.float64, requires_grad=True)
        xe = x.expand(1, in_channels, length, *[8] * (n_spatial - 1))
        with torch.enable_grad():
            try:
                out = geo(xe)[k]
            except Exception:
                fields.append(None)
                continue
            j = out.shape[2] // 2
            idx = (0, slice(None), j) + tuple(o // 2 for o in out.shape[3:])
            (g,) = torch.autograd.grad(out[idx].abs().sum(), x)
        seen = np.nonzero(g[0].abs().sum(0).reshape(length).numpy())[0]
        if len(seen) == 0 or seen.min() == 0 or seen.max() == length - 1:
            fields.append(None)
        else:
            fields.append(int(seen.max() - seen.min() + 1))
    return fields


def _normalises_globally(features, in_channels: int, n_spatial: int) -> bool:
    """Whether the network normalises with statistics over the whole input (instance or group
    norm, as modules or functional calls, TorchScript included): the aten operators of one traced
    forward pass are looked at."""
    import torch
    from torch.fx.experimental.proxy_tensor import make_fx

    try:
        with _quiet(), torch.no_grad():
            gm = make_fx(lambda x: tuple(features(x)))(torch.zeros(1, in_channels, *[8] * n_spatial))
    except Exception:  # cannot tell: say so in the manifest's favour of caution
        return True
    for node in gm.graph.nodes:
        target = str(node.target)
        if "instance_norm" in target or "group_norm" in target or "_native_batch_norm_legit.no_stats" in target:
            return True
        if "native_batch_norm" in target and len(node.args) > 5 and node.args[5] is True:  # training: input stats
            return True
    return False


def build_model(network, out_dir, name: str, layers, *, weights=None, entry: str | None = None,
                configuration: str | None = None, submodule: str | None = None, layer_names=None,
                in_channels: int = 1, dimension: int = 3, normalization: str = "zscore",
                voxel_size_mm: float | None = None, patch_size: int | None = None, patch_layers=None,
                receptive_field: int | None = None, global_normalization: bool | None = None,
                probe_size: int = 64, description: str = "", license: str = "", force: bool = False,
                random_weights: bool = False) -> dict:
    """Convert a user's network into fastimpact's model files in ``out_dir``: ``<name>.onnx``
    (full forward, the selected layers), ``<name>_patch.onnx`` and ``<name>_vjp.onnx`` (Jacobian
    mode, :mod:`fastimpact.onnx_models` contract) and the manifest ``<name>.json``; every graph
    is checked against torch with ONNX Runtime. ``layers``: output indices of the network (or of
    ``submodule``) or dotted submodule names; ``patch_layers``: indices into ``layers`` for patch
    mode (default: all); ``patch_size`` default: the smallest odd valid size with at least
    ``2 * lcm(strides)`` voxels of context. Returns the manifest plus ``"checks"`` (max rel.
    errors) and ``"files"``."""
    import torch

    from . import NORMALIZATIONS, load_model_spec, valid_patch_sizes, validate_with_runtime

    out_dir = Path(out_dir)
    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise ConfigError(f"name={name!r} must be a plain file stem such as 'my-encoder'")
    if dimension not in (2, 3):
        raise ConfigError(f"dimension={dimension!r} must be 2 or 3")
    if normalization not in NORMALIZATIONS:
        raise ConfigError(f"normalization={normalization!r} must be one of {', '.join(NORMALIZATIONS)}")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ConfigError(f"in_channels={in_channels!r} must be a positive integer")
    if not layers:
        raise ConfigError("layers is empty: give the network outputs to expose, e.g. 0,1,2 (indices) or module names")
    files = {k: out_dir / f"{name}{k}" for k in (".onnx", "_patch.onnx", "_vjp.onnx", ".json")}
    existing = [str(p) for p in files.values() if p.exists()]
    if existing and not force:
        raise ConfigError(f"output file(s) {', '.join(existing)} exist; use --force to overwrite or another --name")
    out_dir.mkdir(parents=True, exist_ok=True)

    model = load_user_network(network, weights=weights, entry=entry, configuration=configuration,
                              in_channels=in_channels, random_weights=random_weights)
    features = _select_layers(model, layers, submodule)
    n_sp = dimension
    geo = _geometry(features, in_channels, n_sp, probe_size)
    channels = [c for c, _ in geo]
    strides = [s for _, s in geo]
    names = list(layer_names) if layer_names else [f"layer{i}" for i in range(len(geo))]
    if len(names) != len(geo) or len(set(names)) != len(names):
        raise ConfigError(f"layer_names={names!r}: give {len(geo)} distinct names, one per layer")
    patch_idx = list(range(len(geo))) if patch_layers is None else [int(i) for i in patch_layers]
    if not patch_idx or any(not 0 <= i < len(geo) for i in patch_idx) or sorted(set(patch_idx)) != patch_idx:
        raise ConfigError(f"patch_layers={patch_idx!r} must be increasing indices into the {len(geo)} layers")
    patch_strides = [strides[i] for i in patch_idx]
    valid = valid_patch_sizes(patch_strides, 4 * math.lcm(*patch_strides) + 2)
    if patch_size is None:
        step = math.lcm(*patch_strides)
        patch_size = 2 * step + 1 if step > 1 else 7
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 2 or \
            (patch_size // 2) % math.lcm(*patch_strides):
        raise ConfigError(f"patch_size={patch_size!r} puts a patch layer's centre voxel off the patch centre "
                          f"(strides {patch_strides}: (P // 2) % stride must be 0); use one of "
                          f"{', '.join(map(str, valid[:8]))}, ...")
    fields = _receptive_fields(features, in_channels, n_sp, strides, length=max(4 * probe_size, 128))
    if receptive_field is None:
        known = [f for f in fields if f]
        receptive_field = max(known) if len(known) == len(fields) else max(4 * probe_size, 128)
    if global_normalization is None:
        global_normalization = _normalises_globally(features, in_channels, n_sp)

    g = torch.Generator().manual_seed(0)
    example = torch.randn(1, in_channels, *[probe_size] * n_sp, generator=g)
    export_full_forward(features, files[".onnx"], example, names,
                        doc=f"{name}: {', '.join(names)} (fastimpact models build)")
    centre = centre_module(features, patch_idx, patch_strides).eval()
    following = [v for v in valid if v > patch_size][:1]  # a second size: the graphs must not bake P in
    patch_error = None
    try:
        patch_info = export_patch_graphs(centre, out_dir, name, patch_size, in_channels,
                                         [channels[i] for i in patch_idx], [names[i] for i in patch_idx],
                                         check_sizes=following, n_spatial=n_sp, doc=name)
    except Exception as exc:  # the exporters raise many types; the message says which step failed
        for key in ("_patch.onnx", "_vjp.onnx"):
            files[key].unlink(missing_ok=True)
        message = " ".join(str(exc).split())
        if not isinstance(model, torch.jit.ScriptModule):
            raise ConfigError(f"the patch graphs of '{network}' cannot be exported ({type(exc).__name__}: "
                              f"{message[:300]})") from None
        # TorchScript runs its own interpreter on concrete sizes: tracing it fixes batch and patch
        # size. Static mode still works; Jacobian mode needs the architecture in Python.
        patch_error = ("TorchScript fixes every shape when traced, so no patch graphs with a dynamic batch "
                       "can be made from it; give the architecture as a Python file (or an nnU-Net "
                       "plans.json) with the TorchScript's state_dict as --weights for Jacobian mode")
        patch_info = {"errors": {}}
    # the full graph against torch, on an odd-sized input
    full_err = 0.0
    x = torch.randn(2, in_channels, *[probe_size + 3] * n_sp, generator=g)
    with torch.no_grad():
        ref = features(x)
    for a, b in zip(_ort_session(files[".onnx"]).run(None, {"image": x.numpy()}), ref):
        full_err = max(full_err, _rel(a, b.numpy()))
    if full_err > 1e-4:
        raise RuntimeError(f"the exported full graph does not reproduce torch (max rel. error {full_err:.1e})")

    manifest = {
        "name": name, "file": files[".onnx"].name,
        "description": description or f"{Path(network).name}: {', '.join(names)} (converted by fastimpact models build)",
        "dimension": dimension, "input_channels": in_channels,
        "layers": [{"name": n, "channels": c, "stride": s, **({"receptive_field": f} if f else {})}
                   for n, c, s, f in zip(names, channels, strides, fields)],
        "receptive_field": int(receptive_field), "voxel_size_mm": voxel_size_mm, "size_multiple": 1,
        "normalization": normalization, "global_normalization": bool(global_normalization),
        "license": license, "provenance": f"converted from {Path(network).name}"
                                          + (f" + {Path(weights).name}" if weights else "")
                                          + (" (random weights)" if random_weights else "")
                                          + f" by fastimpact models build (torch {torch.__version__})",
    }
    if patch_error is None:
        manifest.update({"patch_file": patch_info["patch_file"], "vjp_file": patch_info["vjp_file"],
                         "patch_layers": patch_idx, "patch_size": int(patch_size), "patch_size_fixed": False})
    files[".json"].write_text(json.dumps(manifest, indent=2) + "\n")
    validate_with_runtime(load_model_spec(files[".json"]))
    return {**manifest, "checks": {"full": full_err, **patch_info["errors"]}, "patch_error": patch_error,
            "files": [str(p) for p in files.values() if p.exists()]}
