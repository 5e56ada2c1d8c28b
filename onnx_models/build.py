"""Build the ONNX graphs of a feature extractor: full forward, patch forward and its VJP, and the
full-volume VJP.

Needs ``torch``, ``onnx`` and ``onnxscript`` (the ``models`` extra); the graphs it writes need only
ONNX Runtime. See :mod:`fastimpact.onnx_models` for the graph contract (``patch_file``,
``vjp_file``, ``patch_layers``, ``patch_size``, ``vjp_full_file``, ``vjp_full_layers``).

How the graphs are made:

* the *patch forward* (:func:`centre_module`) runs the network on ``[B, C_in, P, ..., P]``
  patches and keeps the centre voxel ``(P // 2) // stride_k`` of each patch layer: ``[B, C_k]``;
* the *VJP* is ``grad = d(sum_k <centre_k(patches), cotangent_k>) / d patches`` (torch autograd,
  :func:`vjp_reference`);
* the *full-volume VJP* (:func:`export_full_vjp`, dense Jacobian mode) is
  ``grad = d(sum_k <layer_k(image), cotangent_k>) / d image`` on the whole image, the cotangents
  shaped like the layers' outputs. torch.export needs the cotangents' sizes as functions of the
  image's; ``ceil(n / stride)`` cannot be written as a (linear) derived Dim, so they are
  ``Dim.AUTO`` and torch.export relates them itself (and the trace has no duck shaping: a size
  equal to a channel count would otherwise be taken for that constant).

All are traced with ``make_fx`` (symbolic shapes, ``core_aten_decompositions``), which writes
the backward pass as aten operators, and the traced graph is exported by
``torch.onnx.export(dynamo=True, opset 18)``.

TorchScript networks (``torch.jit.script`` or ``torch.jit.trace``; ``torch.export`` takes
neither): make_fx does record the aten operators that the TorchScript interpreter executes, but
the interpreter reads every size as a plain int (``aten::size`` of a traced
``x.view(x.size(0), -1)``, the input checks of a scripted ``InstanceNorm3d``), which fixes batch
and patch size in the traced graph. :func:`torchscript_network` therefore runs the graph's nodes
from Python (aten operators through ``torch.ops``, sizes and their arithmetic as SymInts,
``prim::If`` / ``prim::Loop`` evaluated), which keeps the shapes symbolic and also gives the
outputs of named submodules (the encoder stages of a segmentation network, whose decoder is then
skipped). What a trace itself recorded as a constant (``x.view(2, 16, -1)``, an interpolation to
``int(n)`` voxels) stays constant: :func:`_geometry` runs the network at a second batch and size
and refuses shapes that do not follow, and the checks compare one patch at a time with the
ScriptModule itself.

Some backward operators have no ONNX translation in torch, or a slow one; they get ours
(:func:`_translations`):

  - ``convolution_backward`` (input gradient only): a strided convolution's transpose is written
    as *one* ordinary ``Conv`` of the output gradient with ``stride^D`` polyphase kernels followed
    by an interleaving reshape (ONNX Runtime's CPU ``ConvTranspose`` is slower, see below);
    grouped or dilated convolutions fall back to ``ConvTranspose``; transposed convolutions
    (decoders) are not supported;
  - ``max_pool{2,3}d_with_indices`` and their backward: ONNX ``MaxPool`` indices (flat over the
    whole tensor) are used as they are, by a ``ScatterElements(add)`` on the flattened tensor
    (torch's translation converts them to per-plane indices with a second ``MaxPool``);
  - ``avg_pool{2,3}d_backward``: the transposed box filter, through the same polyphase ``Conv``
    (stride 1: ``AveragePool`` of the zero-padded gradient);
  - ``replication_pad{2,3}d_backward``: a ``ScatterElements(add)`` per axis;
  - ``slice_scatter`` (the backward of slicing): ``Slice`` + ``Concat`` instead of the
    exporter's ``ScatterND`` with transposes;
  - ``mul.Scalar`` / ``div.Scalar`` with a symbolic float (the backward of a mean or variance
    over a dynamic size), which the exporter's translation takes for a constant;

  shapes stay dynamic (batch and patch size); the kernel transforms are constant-folded into
  initializers, and every graph is checked against torch with ONNX Runtime before it is kept
  (:func:`check_graphs`: two patch sizes, three patches compared one by one with torch, and the
  full graph's centre voxel on the same patches).

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
from fastimpact.vocabulary import TORCHSCRIPT_SUFFIXES

OPSET = 18

__all__ = [
    "centre_module", "export_patch_forward", "export_vjp", "export_full_forward", "vjp_reference",
    "check_graphs", "export_patch_graphs", "time_graphs", "build_model", "load_user_network", "torchscript_network",
    "export_full_vjp", "check_full_vjp", "full_vjp_example", "time_full_vjp",
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
            margins = [k - 1 - p for k, p in zip(kernel, padding)]
            if all(s == 1 for s in stride) and not divisor_override and (count_include_pad or not any(padding)) \
                    and min(margins) >= 0:
                # stride 1 (MIND's box mean): the transpose is the same box over the gradient padded
                # with k - 1 - p zeros, i.e. ONNX AveragePool (5x faster than a Conv with k^3 taps)
                g = op.Pad(grad_output, ints([0, 0, *margins, 0, 0, *margins]))
                return op.AveragePool(g, kernel_shape=kernel, strides=[1] * nd, count_include_pad=1)
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

    def scalar_operand(fn):
        # the backward of a mean or variance over a dynamic size multiplies by a symbolic float,
        # which the exporter's own translation (a constant) cannot take
        def translate(self, other):
            if isinstance(other, (bool, int, float)):
                other = op.Constant(value=onnxscript.ir.tensor(other, dtype=self.dtype))
            else:
                other = op.CastLike(other, self)
            return fn(self, other)
        return translate

    aten = torch.ops.aten
    return {
        aten.mul.Scalar: scalar_operand(op.Mul),
        aten.div.Scalar: scalar_operand(op.Div),
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
# TorchScript networks, run node by node in Python
# ----------------------------------------------------------------------------------------------
#
# make_fx records the aten operators that a ScriptModule executes (the TorchScript interpreter
# dispatches them like eager code), but the interpreter turns every size it reads (aten::size in
# a traced `x.view(x.size(0), -1)`, the input checks of a scripted InstanceNorm) into a plain int,
# which fixes the batch and patch size of the traced graph. Running the graph's nodes from Python
# instead keeps sizes symbolic; it also lets a named submodule's output be taken (TorchScript has
# no forward hooks) and the rest of the network skipped.

_FLOAT_DTYPE_CODES = (5, 6, 7, 15)  # TorchScript ScalarType codes of half, float, double, bfloat16


class _Unsupported(Exception):
    """A TorchScript node kind that :class:`TorchScriptNetwork` does not run."""


class _Stop(Exception):
    """Raised when every requested submodule output has been taken: the rest of the network is skipped."""


class _Scalar:
    """A number that a traced graph holds as a 0-dim tensor (``prim::NumToTensor`` of a size):
    kept as a Python number (a SymInt under make_fx) so that the sizes computed from it stay
    symbolic; made a tensor only where a tensor operator takes it."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


def _number(v):
    return v.value if isinstance(v, _Scalar) else v


def _as_tensor(v):
    import torch

    if isinstance(v, _Scalar):
        is_float = isinstance(v.value, (float, torch.SymFloat))
        return torch.scalar_tensor(v.value, dtype=torch.float64 if is_float else torch.int64)
    if isinstance(v, (list, tuple)) and any(isinstance(e, _Scalar) for e in v):
        return type(v)(_as_tensor(e) for e in v)
    return v


def _py_ops():
    """Operators on numbers, lists and strings (and the size queries), in Python: SymInts stay
    symbolic. Each takes the node's inputs in schema order."""
    import operator

    import torch

    def div(a, b, mode=None):
        if mode == "floor":
            return a // b
        if mode == "trunc":
            q = a / b
            return torch.sym_int(q) if isinstance(q, (float, torch.SymFloat)) else q
        return a / b

    def to(v, *args):  # the dtype is the first int argument (to.dtype, to.device, to.prim_dtype)
        code = next((a for a in args if isinstance(a, int) and not isinstance(a, bool)), None)
        if code is None:
            return v
        return torch.sym_float(v) if code in _FLOAT_DTYPE_CODES else torch.sym_int(v)

    def pick(fn2, fn_list):
        return lambda a, b=None: fn_list(a) if b is None else fn2(a, b)

    def size(x, dim=None):
        if isinstance(x, _Scalar):
            return []
        return list(x.shape) if dim is None else x.shape[dim]

    def list_slice(x, start=None, end=None, step=1):
        return x[start:end:step]

    return {
        # always in Python (never tensor operators)
        "size": size, "sym_size": size, "dim": lambda x: 0 if isinstance(x, _Scalar) else x.dim(),
        "len": lambda x: len(x) if isinstance(x, (list, tuple, str, dict)) else x.shape[0],
        "__getitem__": lambda x, i: x[i], "append": lambda x, v: (x.append(v), x)[1],
        "insert": lambda x, i, v: x.insert(i, v), "extend": lambda x, y: x.extend(y),
        "_set_item": lambda d, k, v: d.__setitem__(k, v), "list": list, "str": str,
        "format": lambda fmt, *args: fmt.format(*args), "warn": lambda *args: None,
        "__range_length": lambda lo, hi, step: max(0, -((lo - hi) // step)),
        "__derive_index": lambda i, start, step: start + i * step,
        "__is__": operator.is_, "__isnot__": operator.is_not, "__not__": operator.not_,
        "__contains__": lambda container, item: item in container,
        "Int": lambda v: torch.sym_int(_number(v)) if not isinstance(v, torch.Tensor) else int(v),
        "Float": lambda v: torch.sym_float(_number(v)) if not isinstance(v, torch.Tensor) else float(v),
        "Bool": lambda v: bool(_number(v)), "ScalarImplicit": lambda v: _number(v),
        "item": lambda v: _number(v) if not isinstance(v, torch.Tensor) else v.item(),
        "keys": lambda d: list(d.keys()), "values": lambda d: list(d.values()),
        # also tensor operators: in Python only when no argument is a tensor
        "add": lambda a, b, alpha=1: a + b if alpha == 1 else a + alpha * b,
        "sub": lambda a, b, alpha=1: a - b if alpha == 1 else a - alpha * b,
        "rsub": lambda a, b, alpha=1: b - a if alpha == 1 else b - alpha * a,
        "mul": operator.mul, "div": div, "true_divide": operator.truediv, "floordiv": operator.floordiv,
        "floor_divide": operator.floordiv, "remainder": operator.mod, "pow": operator.pow,
        "neg": operator.neg, "abs": abs, "floor": math.floor, "ceil": math.ceil,
        "eq": operator.eq, "ne": operator.ne, "lt": operator.lt, "le": operator.le, "gt": operator.gt,
        "ge": operator.ge, "__and__": operator.and_, "__or__": operator.or_, "__xor__": operator.xor,
        "min": pick(torch.sym_min, min), "max": pick(torch.sym_max, max), "slice": list_slice,
        "to": to, "type_as": lambda a, b: a, "detach": lambda a: a, "clone": lambda a, *m: a,
        "contiguous": lambda a, *m: a,
    }


_ALWAYS_PY = {"size", "sym_size", "dim", "len", "__getitem__", "append", "insert", "extend", "_set_item", "list",
              "str", "format", "warn", "__range_length", "__derive_index", "__is__", "__isnot__", "__not__",
              "__contains__", "Int", "Float", "Bool", "ScalarImplicit", "item", "keys", "values"}
_NORM_OPS = {"instance_norm", "group_norm", "batch_norm"}  # dropped for the receptive-field probe


class _Op:
    """One operator node with a schema: how its inputs are passed and where its result goes."""

    def __init__(self, node, py_ops):
        import torch

        schema = node.schema()
        if schema == "(no schema)":
            raise _Unsupported(node.kind())
        parsed = torch._C.parse_schema(schema)
        namespace, self.name = parsed.name.split("::")
        self.py = py_ops.get(self.name)
        self.always_py = self.name in _ALWAYS_PY
        self.op = None
        if not self.always_py:
            try:
                packet = getattr(getattr(torch.ops, namespace), self.name)
                self.op = getattr(packet, parsed.overload_name or "default")
            except (AttributeError, RuntimeError):
                if self.py is None:
                    raise _Unsupported(f"{parsed.name}.{parsed.overload_name}") from None
        self.kwargs = [a.name if a.kwarg_only else None for a in parsed.arguments]
        self.tensor_args = ["Tensor" in str(a.type) for a in parsed.arguments]
        self.returns_tensor = len(parsed.returns) == 1 and str(parsed.returns[0].type) == "Tensor"

    def __call__(self, values, drop_norms: bool):
        import torch

        if self.always_py:
            return self.py(*values)
        if drop_norms and self.name in _NORM_OPS and (self.name != "batch_norm" or values[5]):
            return values[0]  # instance/group norm, or batch norm on the input's statistics
        if self.py is not None and not any(isinstance(v, torch.Tensor) for v in values):
            out = self.py(*[_number(v) for v in values])
            return _Scalar(out) if self.returns_tensor else out
        args, kwargs = [], {}
        for v, key, is_tensor in zip(values, self.kwargs, self.tensor_args):
            v = _as_tensor(v) if is_tensor else _number(v) if not isinstance(v, list) else [_number(e) for e in v]
            if key is None:
                args.append(v)
            else:
                kwargs[key] = v
        return self.op(*args, **kwargs)


class _Block:
    """A TorchScript block compiled for :class:`TorchScriptNetwork`: input and output value ids
    and one step per node."""

    _STRUCTURAL = {"prim::Constant", "prim::GetAttr", "prim::CallMethod", "prim::ListConstruct",
                   "prim::TupleConstruct", "prim::DictConstruct", "prim::ListUnpack", "prim::TupleUnpack",
                   "prim::TupleIndex", "prim::If", "prim::Loop", "prim::RaiseException", "prim::Uninitialized",
                   "prim::unchecked_cast", "prim::NumToTensor", "prim::dtype", "prim::device", "prim::is_cuda",
                   "prim::Print", "prim::layout"}

    def __init__(self, block, py_ops):
        self.inputs = [v.unique() for v in block.inputs()]
        self.outputs = [v.unique() for v in block.outputs()]
        self.steps = []
        for node in block.nodes():
            kind = node.kind()
            ins = [v.unique() for v in node.inputs()]
            outs = [v.unique() for v in node.outputs()]
            if kind == "prim::Constant":
                try:
                    extra = node.output().toIValue() if node.outputsSize() else None
                except RuntimeError:  # e.g. a function constant of an inlined call: never read
                    extra = None
            elif kind in ("prim::GetAttr", "prim::CallMethod"):
                extra = node.s("name")
            elif kind in ("prim::If", "prim::Loop"):
                extra = [_Block(b, py_ops) for b in node.blocks()]
            elif kind in self._STRUCTURAL:
                extra = None
            else:
                extra, kind = _Op(node, py_ops), "op"
            self.steps.append((kind, ins, outs, extra))


_DTYPE_CODES = {"uint8": 0, "int8": 1, "int16": 2, "int32": 3, "int64": 4, "float16": 5, "float32": 6,
                "float64": 7, "complex64": 9, "complex128": 10, "bool": 11, "bfloat16": 15}


def torchscript_network(script):
    """``script`` (a ``torch.jit.ScriptModule``, scripted or traced) as an ``nn.Module`` that runs
    the nodes of its graphs one by one from Python: every aten operator is called through
    ``torch.ops`` (so make_fx records it with symbolic sizes), sizes and the arithmetic on them are
    Python numbers (SymInts under make_fx), ``prim::If`` / ``prim::Loop`` are evaluated, and
    ``prim::CallMethod`` recurses into the submodule, where :meth:`run` can take its output.

    Attributes: ``unsupported`` (``None``, or the first node kind it cannot run: then, like with
    ``direct = True``, ``forward`` calls the ScriptModule itself), ``drop_norms`` (instance and
    group norms, and batch norms on the input's statistics, become the identity: receptive-field
    probe only)."""
    import copy

    import torch
    from torch import nn

    py_ops = _py_ops()
    codes = {getattr(torch, k): v for k, v in _DTYPE_CODES.items()}

    class TorchScriptNetwork(nn.Module):
        is_torchscript_network = True

        def __init__(self, module):
            super().__init__()
            self.script = module
            self.direct = False
            self.drop_norms = False
            self._blocks = {}
            self.names = {id(m): n for n, m in module.named_modules()}
            try:  # every node kind of the whole network, before any run
                _Block(module.inlined_graph, py_ops)
                self.unsupported = None
            except _Unsupported as exc:
                self.unsupported = str(exc)

        def __deepcopy__(self, memo):
            other = TorchScriptNetwork(copy.deepcopy(self.script, memo))
            other.direct, other.drop_norms = self.direct, self.drop_norms
            return other

        def forward(self, *args):
            if self.direct or self.unsupported:
                return self.script(*args)
            return self._call(self.script, "forward", list(args), None)

        def run(self, x, names, stop: bool):
            """``(outputs, {name: output of submodule name})``; with ``stop`` the network stops once
            every submodule in ``names`` has returned (``outputs`` is then ``None``)."""
            captured = {}
            try:
                out = self._call(self.script, "forward", [x], (set(names), captured, stop))
            except _Stop:
                out = None
            return out, captured

        def _block(self, obj, method: str):
            key = (obj._c._type().qualified_name(), method)
            if key not in self._blocks:
                graph = obj._c._get_method(method).graph
                if graph.findAllNodes("prim::CallFunction", True):
                    graph = graph.copy()  # functions inline; called submodules are inlined with them
                    torch._C._jit_pass_inline(graph)
                self._blocks[key] = _Block(graph, py_ops)
            return self._blocks[key]

        def _call(self, obj, method: str, args, capture):
            block = self._block(obj, method)
            if len(block.inputs) != len(args) + 1:
                raise TypeError(f"{method} of '{self.names.get(id(obj)) or obj.original_name}' takes "
                                f"{len(block.inputs) - 1} inputs, not {len(args)}")
            env = dict(zip(block.inputs, [obj, *args]))
            (out,) = self._run(block, env, capture)
            if capture is not None and (method == "forward" or method.startswith("forward") and method[7:].isdigit()):
                # traced modules call a submodule's n-th use `forward<n>`: the last call wins, as with hooks
                name = self.names.get(id(obj))
                names, captured, stop = capture
                if name in names:
                    # a copy: the rest of the network may write into this tensor in place
                    captured[name] = out.clone() if isinstance(out, torch.Tensor) else out
                    if stop and len(captured) == len(names):
                        raise _Stop
            return out

        def _run(self, block, env, capture):
            for kind, ins, outs, extra in block.steps:
                if kind == "op":
                    res = extra([env[i] for i in ins], self.drop_norms)
                    if len(outs) == 1:
                        env[outs[0]] = res
                    else:
                        env.update(zip(outs, res))
                elif kind == "prim::Constant":
                    if outs:
                        env[outs[0]] = extra
                elif kind == "prim::GetAttr":
                    env[outs[0]] = getattr(env[ins[0]], extra)
                elif kind == "prim::CallMethod":
                    env[outs[0]] = self._call(env[ins[0]], extra, [env[i] for i in ins[1:]], capture)
                elif kind == "prim::ListConstruct":
                    env[outs[0]] = [env[i] for i in ins]
                elif kind == "prim::TupleConstruct":
                    env[outs[0]] = tuple(env[i] for i in ins)
                elif kind == "prim::DictConstruct":
                    env[outs[0]] = {env[k]: env[v] for k, v in zip(ins[0::2], ins[1::2])}
                elif kind in ("prim::ListUnpack", "prim::TupleUnpack"):
                    env.update(zip(outs, env[ins[0]]))
                elif kind == "prim::TupleIndex":
                    env[outs[0]] = env[ins[0]][env[ins[1]]]
                elif kind == "prim::If":
                    branch = extra[0] if bool(env[ins[0]]) else extra[1]
                    env.update(zip(outs, self._run(branch, env, capture)))
                elif kind == "prim::Loop":
                    body, trips, cond, carried = extra[0], env[ins[0]], env[ins[1]], [env[i] for i in ins[2:]]
                    i = 0
                    while bool(cond) and i < trips:
                        env.update(zip(body.inputs, [i, *carried]))
                        cond, *carried = self._run(body, env, capture)
                        i += 1
                    env.update(zip(outs, carried))
                elif kind == "prim::RaiseException":
                    raise RuntimeError(f"the TorchScript network raised: {env[ins[0]]}")
                elif kind == "prim::Uninitialized":
                    env[outs[0]] = None
                elif kind == "prim::unchecked_cast":
                    env[outs[0]] = env[ins[0]]
                elif kind == "prim::NumToTensor":
                    env[outs[0]] = _Scalar(env[ins[0]])
                elif kind == "prim::dtype":
                    v = env[ins[0]]
                    is_float = isinstance(_number(v), (float, torch.SymFloat))
                    env[outs[0]] = (7 if is_float else 4) if isinstance(v, _Scalar) else codes[v.dtype]
                elif kind == "prim::device":
                    env[outs[0]] = torch.device("cpu") if isinstance(env[ins[0]], _Scalar) else env[ins[0]].device
                elif kind == "prim::is_cuda":
                    env[outs[0]] = False
                elif kind == "prim::layout":
                    env[outs[0]] = 0  # strided
                # prim::Print: nothing
            return [env[u] for u in block.outputs]

    return TorchScriptNetwork(script)


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


def _trace(fn, args, duck_shape: bool = True):
    """``fn`` as an FX graph of core aten operators, shapes symbolic (dynamic batch and size).
    ``duck_shape=False``: every input size gets its own symbol even where two are equal (by default
    equal sizes share one, and a size equal to a channel count becomes that constant)."""
    import torch
    import torch.fx.experimental._config as fx_config
    from torch._decomp import core_aten_decompositions
    from torch.fx.experimental.proxy_tensor import make_fx

    def convolution(x, w, b, stride, padding, dilation, transposed, output_padding, groups, *backend_flags):
        # traced TorchScript records `_convolution` (with cuDNN flags), which has no ONNX translation
        return torch.ops.aten.convolution.default(x, w, b, stride, padding, dilation, transposed, output_padding,
                                                  groups)

    table = {**core_aten_decompositions(), torch.ops.aten._convolution.default: convolution}
    with _quiet(), fx_config.patch(use_duck_shape=duck_shape):
        return make_fx(fn, decomposition_table=table, tracing_mode="symbolic", _allow_non_fake_inputs=True)(*args)


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
    InstanceNormalization nodes, as ``deepbet.onnx``. Where it fails (a Python wrapper around a
    TorchScript, a list output) and for TorchScript submodule outputs: make_fx + dynamo (opset
    18), the TorchScript run node by node."""
    import onnx
    import torch

    dyn = {"image": {0: "B", **{a: f"D{a - 2}" for a in range(2, example.dim())}}}
    for name in layer_names:
        dyn[name] = {0: "B", **{a: f"{name}_D{a - 2}" for a in range(2, example.dim())}}
    base = getattr(features, "base", None)
    script = base.script if getattr(base, "is_torchscript_network", False) else None
    if script is not None and getattr(features, "indices", None) is not None:
        try:
            _export_torchscript_outputs(script, features.indices, path, example, layer_names, dyn, doc)
            return
        except Exception:  # e.g. a list output, which the TorchScript exporter makes one sequence: dynamo below
            pass
    if script is None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(features.eval(), (example,), str(path), dynamo=False, opset_version=17,
                                  input_names=["image"], output_names=list(layer_names), dynamic_axes=dyn,
                                  do_constant_folding=True)
            _finish(onnx.load(str(path)), Path(path), doc or "feature extractor: one output per layer")
            return
        except Exception:  # e.g. a TorchScript network inside a Python wrapper: dynamo below
            pass
    # through make_fx: a TorchScript network runs node by node in Python here (the TorchScript
    # exporter would trace that Python and keep its size arithmetic as constants)
    batch = torch.export.Dim("B", min=1, max=1 << 20)
    dims = {0: batch, **{a: torch.export.Dim(f"D{a - 2}", min=1, max=1 << 14) for a in range(2, example.dim())}}
    example = example.expand(2, *example.shape[1:]).contiguous()  # a size of 1 would be traced as a constant
    gm = _trace(lambda image: tuple(features(image)), (example,))
    _export(gm, (example,), Path(path), ["image"], list(layer_names), ({**dims},),
            doc or "feature extractor: one output per layer")


def _export_torchscript_outputs(script, indices, path, example, layer_names, dyn, doc: str):
    """The TorchScript exporter on the ScriptModule itself (plain Conv / InstanceNormalization
    nodes); outputs ``indices`` of its forward are picked in the ONNX graph."""
    import onnx
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            n_out = len(_as_tuple(script(example)))
        raw = [f"raw_{i}" for i in range(n_out)]
        dyn_raw = {"image": dyn["image"], **{r: {0: "B"} for r in raw}}
        torch.onnx.export(script, (example,), str(path), dynamo=False, opset_version=17, input_names=["image"],
                          output_names=raw, dynamic_axes=dyn_raw, do_constant_folding=True)
    model = onnx.load(str(path))
    outs = {o.name: o for o in model.graph.output}
    picked = [raw[i] for i in indices]
    del model.graph.output[:]
    for src, name in zip(picked, layer_names):
        model.graph.node.append(onnx.helper.make_node("Identity", [src], [name]))
        vi = onnx.ValueInfoProto()
        vi.CopyFrom(outs[src])
        vi.name = name
        model.graph.output.append(vi)
    _finish(model, Path(path), doc or "feature extractor: one output per layer")


def _ort_session(path, threads: int = 2):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def check_graphs(centre, patch_path, vjp_path, sizes, in_channels: int, channels, n_spatial: int = 3,
                 batch: int = 3, seed: int = 0, reference=None, full=None) -> dict:
    """ONNX Runtime against torch on ``batch`` random patches of each size in ``sizes``: max
    relative error (max |a - b| / max |b|) of the patch outputs and of the VJP. The torch values
    come from ``reference`` (default ``centre``; for a TorchScript network the ScriptModule
    itself) run on one patch at a time, so a network that mixes the batch items (a batch size
    fixed in a reshape) fails too. ``full = (full_path, patch_layers, strides)`` also compares the
    full graph's voxel ``(P // 2) // stride`` on the same patches with the patch outputs
    (``"full_centre"``). Raises RuntimeError above 1e-4."""
    import torch

    reference = centre if reference is None else reference
    g = torch.Generator().manual_seed(seed)
    worst = {"forward": 0.0, "vjp": 0.0, **({"full_centre": 0.0} if full else {})}
    fwd, vjp = _ort_session(patch_path), _ort_session(vjp_path) if vjp_path else None
    whole = _ort_session(full[0]) if full else None
    for size in sizes:
        x = torch.randn(batch, in_channels, *[size] * n_spatial, generator=g)
        cots = [torch.randn(batch, int(c), generator=g) for c in channels]
        with torch.no_grad():
            ref = [torch.cat(r) for r in zip(*[reference(x[i:i + 1]) for i in range(batch)])]
        got = fwd.run(None, {"patches": x.numpy()})
        for a, b in zip(got, ref):
            worst["forward"] = max(worst["forward"], _rel(a, b.numpy()))
        if vjp is not None:
            feeds = {"patches": x.numpy(), **{f"cotangent_{k}": c.numpy() for k, c in enumerate(cots)}}
            want = torch.cat([vjp_reference(reference, x[i:i + 1], [c[i:i + 1] for c in cots]) for i in range(batch)])
            worst["vjp"] = max(worst["vjp"], _rel(vjp.run(None, feeds)[0], want.numpy()))
        if whole is not None:
            maps = whole.run(None, {"image": x.numpy()})
            for a, k, s in zip(got, full[1], full[2]):
                centre_voxel = maps[k][(slice(None), slice(None)) + ((size // 2) // s,) * n_spatial]
                worst["full_centre"] = max(worst["full_centre"], _rel(a, centre_voxel))
    if max(worst.values()) > 1e-4:
        raise RuntimeError(f"the exported patch graphs do not reproduce torch (max rel. errors {worst})")
    return worst


def _rel(a, b) -> float:
    return float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-30))


def export_patch_graphs(centre, folder, name: str, patch_size: int, in_channels: int, channels, layer_names,
                        check_sizes=(), n_spatial: int = 3, doc: str = "", reference=None, full=None) -> dict:
    """Write ``<name>_patch.onnx`` and ``<name>_vjp.onnx`` (dynamic batch and patch size) of the
    centre module and check them with ONNX Runtime on ``patch_size`` and ``check_sizes``
    (:func:`check_graphs`: ``reference``, ``full``). Returns ``{"patch_file", "vjp_file", "errors"}``."""
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
    errors = check_graphs(centre, patch_path, vjp_path, [patch_size, *check_sizes], in_channels, channels, n_spatial,
                          reference=reference, full=full)
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
# the full-volume VJP (dense Jacobian mode)
# ----------------------------------------------------------------------------------------------

def full_vjp_example(in_channels: int, n_spatial: int, base: int, size_multiple: int = 1, seed: int = 1):
    """An example input for :func:`export_full_vjp`: ``[2, C_in, n_0, n_1, ...]`` random normal,
    sizes ``size_multiple * (ceil(base / size_multiple) + a)`` on axis a: batch 2 and a distinct size
    per axis, so that the tracer cannot take a size for a constant (1) or tie two axes together."""
    import torch

    m = max(1, int(size_multiple))
    first = max(2, -(-int(base) // m))
    sizes = [m * (first + a) for a in range(n_spatial)]
    return torch.randn(2, in_channels, *sizes, generator=torch.Generator().manual_seed(seed))


def _full_vjp_dims(n_spatial: int, size_multiple: int, n_cotangents: int):
    """Dynamic shapes of the full VJP's inputs: batch ``B`` shared; the image's spatial axes
    ``Dim.DYNAMIC`` (the network may need a minimum size, which a plain Dim would have to state)
    or, with a ``size_multiple``, ``size_multiple * d<a>``; the cotangents' spatial sizes
    ``Dim.AUTO``: torch.export relates them to the image's itself (``ceil(n / stride)`` and the
    like cannot be written as a derived Dim, which is linear)."""
    import torch

    batch = torch.export.Dim("B", min=1, max=1 << 20)
    m = int(size_multiple)
    if m > 1:
        image = {a: m * torch.export.Dim(f"d{a - 2}", min=1, max=(1 << 14) // m) for a in range(2, 2 + n_spatial)}
    else:
        image = {a: torch.export.Dim.DYNAMIC for a in range(2, 2 + n_spatial)}
    auto = torch.export.Dim.AUTO
    return ({0: batch, **image},) + tuple({0: batch, **{a: auto for a in range(2, 2 + n_spatial)}}
                                          for _ in range(n_cotangents))


def _name_full_vjp_axes(model, n_spatial: int) -> None:
    """Name the symbolic spatial axes after the contract (the exporter calls them s0, s1, ...):
    the image's ``D<a>``, a cotangent's ``D<a>_c<k>`` where it is not the image's own (a stride-1
    layer's is); also inside the size expressions of the intermediate values."""
    import re

    def dims(value):
        return value.type.tensor_type.shape.dim

    symbol = re.compile(r"^s\d+$")
    renames = {}
    for a, d in enumerate(dims(model.graph.input[0])[2:2 + n_spatial]):
        if symbol.match(d.dim_param) and d.dim_param not in renames:
            renames[d.dim_param] = f"D{a}"
    for k, inp in enumerate(model.graph.input[1:]):
        for a, d in enumerate(dims(inp)[2:2 + n_spatial]):
            if symbol.match(d.dim_param) and d.dim_param not in renames:
                renames[d.dim_param] = f"D{a}_c{k}"
    if not renames:
        return
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, renames)) + r")\b")
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for d in dims(value):
            if d.dim_param:
                d.dim_param = pattern.sub(lambda mt: renames[mt.group(1)], d.dim_param)


def export_full_vjp(features, path, example, channels, strides, size_multiple: int = 1, doc: str = ""):
    """Write the full-volume VJP graph of dense Jacobian mode (contract: ``vjp_full_file`` in
    :mod:`fastimpact.onnx_models`): inputs ``image`` [B, C_in, *spatial] and ``cotangent_k`` shaped
    like layer k's output, output ``grad`` [B, C_in, *spatial] =
    ``d(sum_k <features(image)_k, cotangent_k>) / d image``; batch and spatial sizes dynamic
    (multiples of ``size_multiple``).

    ``features``: ``image -> tuple of the K feature maps`` (the ``vjp_full_layers``, in order),
    ``channels`` / ``strides`` theirs (checked on ``example``). ``example``: ``[B >= 2, C_in, ...]``
    with a distinct size (>= 2, a multiple of ``size_multiple``) per axis (see
    :func:`full_vjp_example`). Traced with make_fx (the backward as aten operators) and exported
    by ``torch.onnx.export(dynamo=True)`` like the patch VJP (:func:`_trace`, :func:`_export`).
    Returns the ONNX model."""
    import torch

    n_sp = example.dim() - 2
    sizes = [int(n) for n in example.shape[2:]]
    m = int(size_multiple)
    if example.shape[0] < 2 or len(set(sizes)) < n_sp or min(sizes) < 2 or any(n % m for n in sizes):
        raise ValueError(f"example {list(example.shape)}: give batch >= 2 and distinct spatial sizes >= 2, multiples "
                         f"of size_multiple={m} (full_vjp_example makes one)")
    for p in features.parameters():
        p.requires_grad_(False)  # input gradient only: no weight gradients in the graph

    def layers(image):
        return _as_tuple(features(image))

    with torch.no_grad():
        outs = layers(example)
    if len(outs) != len(channels) or len(strides) != len(channels):
        raise RuntimeError(f"the network gives {len(outs)} feature maps for {len(channels)} channels and "
                           f"{len(strides)} strides")
    for k, (o, c, s) in enumerate(zip(outs, channels, strides)):
        # floor or ceil of n / s: the network's own rounding, which the cotangents follow
        if o.dim() != n_sp + 2 or o.shape[1] != int(c) or any(abs(int(s) * j - n) >= int(s)
                                                               for j, n in zip(o.shape[2:], sizes)):
            raise RuntimeError(f"layer {k} gives {list(o.shape)} on {list(example.shape)}, not {c} channels at "
                               f"stride {s}")
    g = torch.Generator().manual_seed(0)
    cots = [torch.randn(o.shape, generator=g) for o in outs]
    # no duck shaping: image and cotangent sizes may coincide with each other or a channel count
    gm = _trace(lambda image, *c: vjp_reference(layers, image, c), (example, *cots), duck_shape=False)
    names = ["image"] + [f"cotangent_{k}" for k in range(len(cots))]
    text = doc or "full-volume VJP: grad = d(sum_k <layer_k(image), cotangent_k>) / d image"
    model = _export(gm, (example, *cots), Path(path), names, ["grad"], _full_vjp_dims(n_sp, m, len(cots)), text)
    _name_full_vjp_axes(model, n_sp)
    _finish(model, Path(path), text)
    return model


def check_full_vjp(features, path, shapes, seed: int = 0, reference=None) -> float:
    """ONNX Runtime's full-volume VJP (``path``) against torch autograd of ``reference`` (default
    ``features``; ``image -> tuple of the K feature maps``) on random normal images of each shape in
    ``shapes`` (``[B, C_in, *spatial]``), torch run one batch item at a time (a graph that mixes
    the items fails). Returns the max relative error (max |a - b| / max |b|); raises RuntimeError
    above 1e-4 or on a wrong output shape."""
    import torch

    reference = features if reference is None else reference

    def layers(image):
        return _as_tuple(reference(image))

    sess = _ort_session(path)
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    for shape in shapes:
        x = torch.randn(*shape, generator=g)
        with torch.no_grad():
            outs = layers(x)
        cots = [torch.randn(o.shape, generator=g) for o in outs]
        want = torch.cat([vjp_reference(layers, x[i:i + 1], [c[i:i + 1] for c in cots]) for i in range(len(x))])
        got = sess.run(None, {"image": x.numpy(), **{f"cotangent_{k}": c.numpy() for k, c in enumerate(cots)}})[0]
        if got.shape != tuple(x.shape):
            raise RuntimeError(f"the full-volume VJP graph gives {list(got.shape)} for an image of {list(x.shape)}")
        worst = max(worst, _rel(got, want.numpy()))
    if worst > 1e-4:
        raise RuntimeError(f"the exported full-volume VJP graph does not reproduce torch (max rel. error {worst:.1e})")
    return worst


def time_full_vjp(path, shape, channels, strides, threads: int = 2, repeats: int = 3) -> float:
    """Seconds per ONNX Runtime call (best of ``repeats``, CPU, ``threads`` threads) of the
    full-volume VJP on an image of ``shape`` [B, C_in, *spatial]; the cotangents are sized
    ``ceil(n / stride)`` (the built-in models' rounding)."""
    import time

    sess = _ort_session(path, threads)
    rng = np.random.default_rng(0)
    feeds = {"image": rng.normal(size=shape).astype(np.float32)}
    for k, (c, s) in enumerate(zip(channels, strides)):
        feeds[f"cotangent_{k}"] = rng.normal(size=(shape[0], c, *[-(-n // s) for n in shape[2:]])).astype(np.float32)
    sess.run(None, feeds)  # warm-up: allocations, thread pool
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        sess.run(None, feeds)
        best = min(best, time.perf_counter() - t)
    return best


# ----------------------------------------------------------------------------------------------
# `fastimpact models build`: a user's network -> <name>.onnx, <name>_patch.onnx, <name>_vjp.onnx,
# <name>_vjp_full.onnx, <name>.json
# ----------------------------------------------------------------------------------------------



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

    * ``*.pt|*.pth|*.ts|*.jit`` without ``weights``: a TorchScript file (``torch.jit.load``;
      scripted or traced; returned as the ScriptModule, which :func:`_select_layers` wraps in
      :func:`torchscript_network`);
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
    if suffix in TORCHSCRIPT_SUFFIXES and weights is None:
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


def _select_layers(model, layers, submodule: str | None, direct: bool = False):
    """``x -> tuple of feature maps``: the outputs of ``submodule`` (e.g. ``encoder``; default
    the whole network), then ``layers``: integers pick outputs by index, dotted names capture
    the output of that submodule (by a forward hook; in a TorchScript network, which runs node
    by node through :func:`torchscript_network`, by taking the submodule's return value and
    skipping the rest of the network once every named output is known). ``direct=True``: a
    TorchScript network is called as it is (the torch reference of the checks; output indices
    only, else ``None`` is returned)."""
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
    if isinstance(base, torch.jit.ScriptModule):
        base = torchscript_network(base)
        if hooked and direct:
            return None
        base.direct = direct
        if hooked and base.unsupported:
            raise ConfigError(f"layers {hooked}: the TorchScript holds a node that fastimpact cannot run step by step "
                              f"({base.unsupported}), so submodule outputs cannot be taken; give output indices")
    scripted = getattr(base, "is_torchscript_network", False)

    class Layers(nn.Module):
        def __init__(self):
            super().__init__()
            self.base = base
            self.indices = None if hooked else [int(s) for s in specs]  # outputs of base, when no hooks

        def forward(self, x):
            captured = {}
            if scripted and hooked:
                out, captured = self.base.run(x, hooked, stop=len(hooked) == len(specs))
            else:
                handles = [self.base.get_submodule(s).register_forward_hook(  # self.base: deep copies hook their own
                    lambda m, i, o, s=s: captured.__setitem__(s, o)) for s in hooked]
                try:
                    out = self.base(x)
                finally:
                    for h in handles:
                        h.remove()
            missing = [s for s in hooked if s not in captured]
            if missing:
                raise ConfigError(f"layers {missing}: these submodules are not called by the network's forward")
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


_FIXED_SHAPES = ("either a decoder rounds sizes to a multiple of its total stride (select encoder layers, by "
                 "submodule name in --layers) or the network fixes the batch or input size (a TorchScript trace keeps "
                 "sizes computed with Python ints, e.g. x.view(2, ...) or interpolate(size=(int(n), ...)), as "
                 "constants: re-export it with torch.jit.script or without int() on sizes, or give the architecture "
                 "as a Python file)")


def _run_probe(features, shape, fix: str):
    """``features`` on zeros of ``shape`` (no grad); a failure is the user's network or options."""
    import torch

    try:
        with torch.no_grad():
            return features(torch.zeros(*shape))
    except ConfigError:
        raise
    except Exception as exc:  # whatever the network raises
        text = " ".join(str(exc).split())[:200]
        raise ConfigError(f"the network fails on a {list(shape)} input ({type(exc).__name__}: {text}); {fix}") from None


def _geometry(features, in_channels: int, n_spatial: int, probe: int):
    """Channels and stride of each layer, from a forward pass on a ``probe``^D input; then a
    second pass with batch 2 and another size (``probe`` -+ lcm(strides)) must give every layer
    the batch and the size that its stride predicts: shapes that a TorchScript trace recorded
    as constants (e.g. ``x.view(2, 16, -1)``, an interpolation to a fixed size) fail here, as do
    decoders that need sizes divisible by their total stride."""
    outs = _run_probe(features, (1, in_channels, *[probe] * n_spatial),
                      "check --in-channels, --dimension, --submodule and --probe-size (a multiple of the network's "
                      "total stride)")
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
    step = math.lcm(*[s for _, s in geo])
    other = probe - step if probe - step >= step else probe + step
    shape = (2, in_channels, *[other] * n_spatial)
    outs = _run_probe(features, shape, f"it ran on [1, {in_channels}, {probe}^{n_spatial}]: {_FIXED_SHAPES}")
    for k, (o, (c, s)) in enumerate(zip(outs, geo)):
        want = (2, c, *[other // s] * n_spatial)
        if tuple(o.shape) != want:
            raise ConfigError(f"layer {k}: a {list(shape)} input gives {list(o.shape)}, not {list(want)}: "
                              f"{_FIXED_SHAPES}")
    return geo


def _receptive_fields(features, in_channels: int, n_spatial: int, strides, length: int):
    """Per layer: the width of the input that the centre output voxel sees along the first axis,
    measured by autograd on a thin probe [length, 8, ...] with instance norms replaced by the
    identity (they make every voxel depend on the whole input; in a TorchScript network the
    norm operators). ``None`` where the field reaches the probe's ends (wider than ``length``) or
    cannot be measured (a network that does not deep-copy, or a norm called as a function)."""
    import copy

    import torch
    from torch import nn

    try:
        geo = copy.deepcopy(features)
    except Exception:  # some modules do not deep-copy
        return [None] * len(strides)
    for name, module in list(geo.named_modules()):
        if getattr(module, "is_torchscript_network", False):
            module.drop_norms = True  # a TorchScript's norms are operators, not modules
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.modules.instancenorm._InstanceNorm):
                setattr(module, child_name, nn.Identity())
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


def _check_torchscript_run(net, x):
    """The node-by-node run of a TorchScript network (:func:`torchscript_network`) against the
    ScriptModule on ``x``: every output of the whole network. Skipped where the ScriptModule
    itself fails on ``x`` (e.g. a decoder that needs other sizes than the selected encoder
    layers); the patch checks then compare with the node-by-node run."""
    import torch

    if net.unsupported or net.direct:
        return
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            want = _as_tuple(net.script(x))
        except Exception:
            return
        got = _as_tuple(net(x))
    err = max([_rel(a.numpy(), b.numpy()) for a, b in zip(got, want) if isinstance(b, torch.Tensor)] or [0.0])
    if len(got) != len(want) or err > 1e-5:
        raise RuntimeError(f"the TorchScript network run node by node differs from the ScriptModule (max rel. "
                           f"error {err:.1e}); please report it")


def _patch_failure(network, exc, script_net, what: str = "patch graphs") -> str:
    """The one-line ConfigError message when the patch graphs (or ``what``) of ``network``
    cannot be made."""
    text = " ".join(str(exc).split())
    if "Exception summary" in text:  # torch.onnx's ConversionError: its first cause says what failed
        text = text.split("Exception summary", 1)[1].split("⬆", 1)[0].strip(" #")
    if "Status Message:" in text:  # ONNX Runtime: keep its message, not the source location
        text = text.split("Status Message:", 1)[1].split(" was false. ", 1)[-1].strip()
    reason = f"{type(exc).__name__}: {text[:300]}"
    if any(k in text for k in ("invalid dimensions", "Constraints violated", "specializ", "cannot be reshaped")):
        reason = f"the traced graph fixes the batch or patch size; {reason}"
    fix = "or build a static-mode model with --static-only" if what != "full graph" else ""
    if "transposed convolution" in text:
        fix = f"select encoder layers (submodule names in --layers, or --submodule), {fix}"
    elif script_net is not None and script_net.unsupported:
        reason = (f"the TorchScript holds {script_net.unsupported}, which fastimpact does not run node by node, "
                  f"and run as a whole it reads every size as a fixed int; {reason}")
        fix = f"give the architecture as a Python file with the TorchScript's state_dict as --weights, {fix}"
    elif script_net is not None:
        fix = ("re-export the TorchScript without int() or fixed numbers for sizes (torch.jit.script keeps the size "
               f"arithmetic), or give the architecture as a Python file with its state_dict as --weights, {fix}")
    else:
        fix = f"check that the network's forward uses only sizes read from its input, {fix}"
    return f"the {what} of '{network}' cannot be made ({reason}); {fix.strip(', ')}"


def build_model(network, out_dir, name: str, layers, *, weights=None, entry: str | None = None,
                configuration: str | None = None, submodule: str | None = None, layer_names=None,
                in_channels: int = 1, dimension: int = 3, normalization: str = "zscore",
                voxel_size_mm: float | None = None, patch_size: int | None = None, patch_layers=None,
                receptive_field: int | None = None, global_normalization: bool | None = None,
                probe_size: int = 64, description: str = "", license: str = "", force: bool = False,
                random_weights: bool = False, static_only: bool = False) -> dict:
    """Convert a user's network into fastimpact's model files in ``out_dir``: ``<name>.onnx``
    (full forward, the selected layers), ``<name>_patch.onnx`` and ``<name>_vjp.onnx`` (Jacobian
    mode), ``<name>_vjp_full.onnx`` (dense Jacobian mode: the full-volume VJP of all selected
    layers; :mod:`fastimpact.onnx_models` contract) and the manifest ``<name>.json``; every graph
    is checked against torch with ONNX Runtime. ``layers``: output indices of the network (or of
    ``submodule``) or dotted submodule names; ``patch_layers``: indices into ``layers`` for patch
    mode (default: all); ``patch_size`` default: the smallest odd valid size with at least
    ``2 * lcm(strides)`` voxels of context. A TorchScript network (scripted or traced) runs node
    by node in Python (:func:`torchscript_network`) so that the traced graphs keep the batch and
    patch size dynamic; the checks compare with the ScriptModule itself. ``static_only``: no
    patch or full-volume VJP graphs (the model serves static mode only). A network whose patch graphs cannot be
    made raises ConfigError (with the reason and the fix). Returns the manifest plus
    ``"checks"`` (max rel. errors: ``full``, ``forward``, ``vjp``, ``full_centre``, ``vjp_full``),
    ``"files"`` and ``"patch_error"`` (``None``, or why there are no patch graphs)."""
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
    files = {k: out_dir / f"{name}{k}" for k in (".onnx", "_patch.onnx", "_vjp.onnx", "_vjp_full.onnx", ".json")}
    existing = [str(p) for p in files.values() if p.exists()]
    if existing and not force:
        raise ConfigError(f"output file(s) {', '.join(existing)} exist; use --force to overwrite or another --name")
    out_dir.mkdir(parents=True, exist_ok=True)

    model = load_user_network(network, weights=weights, entry=entry, configuration=configuration,
                              in_channels=in_channels, random_weights=random_weights)
    features = _select_layers(model, layers, submodule)
    scripted = getattr(features.base, "is_torchscript_network", False)
    # the torch values of the checks: a TorchScript network called as it is, when it can be
    reference = _select_layers(model, layers, submodule, direct=True) if scripted else features
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
    if scripted:
        _check_torchscript_run(features.base, example)
    # the full graph, then against torch on an odd-sized input
    full_err = 0.0
    x = torch.randn(2, in_channels, *[probe_size + 3] * n_sp, generator=g)
    with torch.no_grad():
        ref = (features if reference is None else reference)(x)
    try:
        export_full_forward(features, files[".onnx"], example, names,
                            doc=f"{name}: {', '.join(names)} (fastimpact models build)")
        for a, b in zip(_ort_session(files[".onnx"]).run(None, {"image": x.numpy()}), ref):
            if a.shape != tuple(b.shape):
                raise RuntimeError(f"the exported full graph gives {list(a.shape)} where torch gives {list(b.shape)}")
            full_err = max(full_err, _rel(a, b.numpy()))
        if full_err > 1e-4:
            raise RuntimeError(f"the exported full graph does not reproduce torch (max rel. error {full_err:.1e})")
    except Exception as exc:  # the exporters and ONNX Runtime raise many types; the message says which
        files[".onnx"].unlink(missing_ok=True)
        raise ConfigError(_patch_failure(network, exc, features.base if scripted else None, "full graph")) from None

    patch_error, patch_info = ("built with --static-only", {"errors": {}}) if static_only else (None, None)
    if not static_only:
        centre = centre_module(features, patch_idx, patch_strides).eval()
        centre_ref = centre_module(reference, patch_idx, patch_strides).eval() if reference is not None else None
        following = [v for v in valid if v > patch_size][:1]  # a second size: the graphs must not bake P in
        try:
            patch_info = export_patch_graphs(centre, out_dir, name, patch_size, in_channels,
                                             [channels[i] for i in patch_idx], [names[i] for i in patch_idx],
                                             check_sizes=following, n_spatial=n_sp, doc=name, reference=centre_ref,
                                             full=(files[".onnx"], patch_idx, patch_strides))
        except Exception as exc:  # the exporters raise many types; the message says which step failed
            for key in ("_patch.onnx", "_vjp.onnx", ".onnx"):
                files[key].unlink(missing_ok=True)
            raise ConfigError(_patch_failure(network, exc, features.base if scripted else None)) from None
        # dense Jacobian mode: the full-volume VJP of every selected layer, checked at two sizes
        # (batch 2 and 1) that are not the traced example's
        p = int(probe_size)
        shapes = [(2, in_channels, *[p + 3 - a for a in range(n_sp)]),
                  (1, in_channels, *[p + 5 - 2 * a for a in range(n_sp)])]
        try:
            export_full_vjp(features, files["_vjp_full.onnx"], full_vjp_example(in_channels, n_sp, p), channels,
                            strides, doc=f"{name} full-volume VJP: inputs image [B, {in_channels}, ...], cotangent_k "
                                         f"shaped like layer k ({', '.join(names)}); output grad = "
                                         "d(sum_k <layer_k(image), cotangent_k>) / d image")
            patch_info["errors"]["vjp_full"] = check_full_vjp(features, files["_vjp_full.onnx"], shapes,
                                                              reference=reference)
        except Exception as exc:  # as above
            for key in ("_patch.onnx", "_vjp.onnx", "_vjp_full.onnx", ".onnx"):
                files[key].unlink(missing_ok=True)
            raise ConfigError(_patch_failure(network, exc, features.base if scripted else None,
                                             "full-volume VJP graph")) from None

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
                         "patch_layers": patch_idx, "patch_size": int(patch_size), "patch_size_fixed": False,
                         "vjp_full_file": files["_vjp_full.onnx"].name, "vjp_full_layers": list(range(len(geo)))})
    files[".json"].write_text(json.dumps(manifest, indent=2) + "\n")
    validate_with_runtime(load_model_spec(files[".json"]))
    return {**manifest, "checks": {"full": full_err, **patch_info["errors"]}, "patch_error": patch_error,
            "files": [str(p) for p in files.values() if p.exists()]}
