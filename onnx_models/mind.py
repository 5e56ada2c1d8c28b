"""MIND-SSC, the modality-independent neighbourhood descriptor (self-similarity context), as a
NumPy reference and as an ONNX graph.

Heinrich et al., "MIND: Modality independent neighbourhood descriptor for multi-modal deformable
registration" (MedIA 2012) and "Towards realtime multimodal fusion for image-guided interventions
using self-similarity" (MICCAI 2013, the SSC variant). Definition used here (no learned weights):

* the six neighbours of a voxel at distance ``d`` (the dilation) along the axes; the 12 pairs of
  neighbours that are not opposite each other (distance sqrt(2) d) form the channels;
* for a pair (a, b): ``D_ab(x)`` = mean over the (2r+1)^3 box around x (r the radius) of
  ``(I(y + a) - I(y + b))^2``; the image is extended by edge replication;
* ``D'_ab = D_ab - min_ab D_ab``, ``V = max(mean_ab D'_ab, eps)`` and ``MIND_ab = exp(-D'_ab / V)``.

Every step is local (the receptive field is 2 (d + r) + 1 voxels), so tiled inference with a
halo of d + r voxels equals whole-volume inference exactly. ``eps`` (1e-4) assumes the input is
normalised to unit scale (the model's z-score normalisation); it only matters in flat regions.

Jacobian mode (patch graphs, see :mod:`fastimpact.onnx_models`): ``<name>_patch.onnx`` computes
the descriptor of the centre voxel of each patch only, from the voxels it needs (edge-replicated
where the patch is smaller than the receptive field), and ``<name>_vjp.onnx`` its vector-Jacobian
product; both come from :func:`mind_centre_torch` (torch), traced and exported by :mod:`.build`.

Dense Jacobian mode: ``<name>_vjp_full.onnx`` is the vector-Jacobian product of MIND on the whole
volume (:func:`full_module`, i.e. :func:`mind_ssc_torch`, traced and exported by :mod:`.build`).
ONNX Runtime 1.32, 2 threads, one volume, best of 7: 64^3 0.024 s, 128^3 0.18-0.23 s (r2d1: 0.028 /
0.21 s; the forward graph: 0.006 / 0.06 s).

Run ``python -m fastimpact.onnx_models.mind`` (needs ``onnx``, and ``torch`` + ``onnxscript`` for
the patch and VJP graphs: the ``models`` extra) to rebuild the shipped graphs and manifests.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np

EPS = 1e-4
PATCH_SIZE = 7  # default Jacobian-mode patch: the receptive field 2 (r + d) + 1 of both variants
VARIANTS = {"mind-r1d2": (1, 2), "mind-r2d1": (2, 1)}  # name -> (radius, dilation); "mind" = mind-r1d2


def neighbour_pairs(dilation: int):
    """The 12 (a, b) offset pairs of MIND-SSC, in a fixed order (the channel order)."""
    d = int(dilation)
    six = [(-d, 0, 0), (d, 0, 0), (0, -d, 0), (0, d, 0), (0, 0, -d), (0, 0, d)]
    pairs = [(a, b) for a, b in itertools.combinations(six, 2)
             if sum((p - q) ** 2 for p, q in zip(a, b)) == 2 * d * d]
    assert len(pairs) == 12  # internal invariant of the construction, not user input
    return pairs


def mind_ssc(image: np.ndarray, radius: int = 1, dilation: int = 2) -> np.ndarray:
    """Reference MIND-SSC of a 3-D image: (12, X, Y, Z) float64 (see the module docstring)."""
    from scipy import ndimage

    img = np.asarray(image, dtype=np.float64)
    r, d = int(radius), int(dilation)
    pad = r + d
    p = np.pad(img, pad, mode="edge")
    X, Y, Z = img.shape
    inner = (X + 2 * r, Y + 2 * r, Z + 2 * r)  # the output box plus the box filter's halo

    def shifted(o):
        s = [d + o[k] for k in range(3)]
        return p[s[0]:s[0] + inner[0], s[1]:s[1] + inner[1], s[2]:s[2] + inner[2]]

    dist = np.empty((12, X, Y, Z))
    for c, (a, b) in enumerate(neighbour_pairs(d)):
        sq = (shifted(a) - shifted(b)) ** 2
        box = ndimage.uniform_filter(sq, size=2 * r + 1, mode="nearest")  # only the valid part is kept
        dist[c] = box[r:r + X, r:r + Y, r:r + Z]
    dist -= dist.min(axis=0, keepdims=True)
    var = np.maximum(dist.mean(axis=0, keepdims=True), EPS)
    return np.exp(-dist / var)


def build_graph(radius: int = 1, dilation: int = 2):
    """The ONNX graph (opset 17) of :func:`mind_ssc`: input ``image`` [B, 1, X, Y, Z] float32,
    output ``mind`` [B, 12, X, Y, Z]; spatial sizes are dynamic."""
    import onnx
    from onnx import TensorProto, helper

    r, d = int(radius), int(dilation)
    pad = r + d
    nodes, inits = [], []

    def const(name, values, dtype=np.int64):
        inits.append(onnx.numpy_helper.from_array(np.asarray(values, dtype=dtype), name))
        return name

    const("pads", [0, 0, pad, pad, pad, 0, 0, pad, pad, pad])
    nodes.append(helper.make_node("Pad", ["image", "pads"], ["padded"], mode="edge"))
    big = np.iinfo(np.int64).max
    axes = const("axes", [2, 3, 4])
    names = {}
    for o in sorted({o for pair in neighbour_pairs(d) for o in pair}):
        starts = [d + o[k] for k in range(3)]
        ends = [-(d - o[k]) if d - o[k] > 0 else big for k in range(3)]
        tag = "_".join(str(v) for v in o).replace("-", "m")
        nodes.append(helper.make_node("Slice", ["padded", const(f"st_{tag}", starts), const(f"en_{tag}", ends), axes],
                                      [f"s_{tag}"]))
        names[o] = f"s_{tag}"
    squares = []
    for c, (a, b) in enumerate(neighbour_pairs(d)):
        nodes.append(helper.make_node("Sub", [names[a], names[b]], [f"diff{c}"]))
        nodes.append(helper.make_node("Mul", [f"diff{c}", f"diff{c}"], [f"sq{c}"]))
        squares.append(f"sq{c}")
    nodes.append(helper.make_node("Concat", squares, ["sqs"], axis=1))
    k = 2 * r + 1
    nodes.append(helper.make_node("AveragePool", ["sqs"], ["dist"], kernel_shape=[k, k, k], strides=[1, 1, 1]))
    nodes.append(helper.make_node("ReduceMin", ["dist"], ["dmin"], axes=[1], keepdims=1))
    nodes.append(helper.make_node("Sub", ["dist", "dmin"], ["dshift"]))
    nodes.append(helper.make_node("ReduceMean", ["dshift"], ["dmean"], axes=[1], keepdims=1))
    nodes.append(helper.make_node("Max", ["dmean", const("eps", [EPS], np.float32)], ["var"]))
    nodes.append(helper.make_node("Div", ["dshift", "var"], ["ratio"]))
    nodes.append(helper.make_node("Neg", ["ratio"], ["neg"]))
    nodes.append(helper.make_node("Exp", ["neg"], ["mind"]))
    graph = helper.make_graph(
        nodes, f"mind_ssc_r{r}d{d}",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["B", 1, "X", "Y", "Z"])],
        [helper.make_tensor_value_info("mind", TensorProto.FLOAT, ["B", 12, "X", "Y", "Z"])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="fastimpact")
    model.ir_version = 8  # readable by onnxruntime >= 1.15
    onnx.checker.check_model(model)
    return model


def _edge_pad(x, pad: int):
    """``x`` [B, C, X, Y, Z] extended by ``pad`` voxels of edge replication on every spatial axis,
    written as concatenations of expanded border planes (their backward, a sum and slices, exports
    to cheaper ONNX than that of ``F.pad(mode="replicate")``, a gather)."""
    import torch

    for axis in range(2, x.dim()):
        n = x.shape[axis]
        shape = list(x.shape)
        shape[axis] = pad
        x = torch.cat([x.narrow(axis, 0, 1).expand(shape), x, x.narrow(axis, n - 1, 1).expand(shape)], dim=axis)
    return x


def mind_ssc_torch(image, radius: int = 1, dilation: int = 2):
    """MIND-SSC in torch, the same definition as :func:`mind_ssc` (edge replication, ``EPS``):
    ``image`` [B, 1, X, Y, Z] -> [B, 12, X, Y, Z]. Checked against :func:`mind_ssc`. Written for a
    fast exported backward (the full-volume VJP graph, :func:`full_module`): the six shifted views
    are sliced once, squares are products (``** 2`` exports a ``Pow``, 25 % of the VJP's time)."""
    import torch
    import torch.nn.functional as F

    r, d = int(radius), int(dilation)
    padded = _edge_pad(image, r + d)
    inner = [padded.shape[a] - 2 * d for a in (2, 3, 4)]  # the output box plus the box filter's halo
    views = {}
    for o in sorted({o for pair in neighbour_pairs(d) for o in pair}):
        s = [d + o[k] for k in range(3)]
        views[o] = padded[:, :, s[0]:s[0] + inner[0], s[1]:s[1] + inner[1], s[2]:s[2] + inner[2]]
    diffs = torch.cat([views[a] - views[b] for a, b in neighbour_pairs(d)], dim=1)
    dist = F.avg_pool3d(diffs * diffs, 2 * r + 1, stride=1)  # box mean, valid part
    return _mind_from_distances(dist, dim=1, channel_min=_channel_min())


def _channel_min():
    """``x.amin(dim=1, keepdim=True)`` with the same gradient (ties share it equally), written as
    an autograd Function whose backward counts the ties in float: torch's own counts them in int64,
    which exports to a cast of the whole 12-channel volume to int64 (a quarter of the full-volume
    VJP's time)."""
    import torch

    class ChannelMin(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            m = x.amin(dim=1, keepdim=True)
            ctx.save_for_backward(x, m)
            return m

        @staticmethod
        def backward(ctx, grad):
            x, m = ctx.saved_tensors
            ties = (x == m).to(x.dtype)
            return ties * (grad / ties.sum(dim=1, keepdim=True))

    return ChannelMin.apply


def _mind_from_distances(dist, dim: int, channel_min=None):
    """``exp(-D' / V)`` of the 12 box distances along ``dim`` (see the module docstring);
    ``channel_min``: the minimum over ``dim`` = 1 (default ``amin``)."""
    low = dist.amin(dim=dim, keepdim=True) if channel_min is None else channel_min(dist)
    dist = dist - low
    var = dist.mean(dim=dim, keepdim=True).clamp_min(EPS)
    return (-dist / var).exp()


def mind_centre_torch(patches, radius: int = 1, dilation: int = 2):
    """The MIND-SSC descriptor of the centre voxel ``(X // 2, Y // 2, Z // 2)`` of each patch:
    ``patches`` [B, 1, X, Y, Z] -> [B, 12]; equal to ``mind_ssc_torch(patches)`` at the centre.

    Only the (2r + 1)^3 boxes around the six neighbours ``c + o`` enter (6 (2r + 1)^3 voxels,
    indices clamped to the patch = edge replication), so they are picked from the flattened patch
    by one one-hot matrix [X Y Z, 6 (2r + 1)^3] and the rest works on [B, 12] values: the patch
    graph costs about as much as reading the patches, and its backward is two small matrix
    products. ONNX Runtime, 2 threads, 2000 patches of 7^3: forward 0.9 ms, VJP 2.5 ms, against
    50 ms / 370 ms for MIND on the whole patch with the centre taken afterwards."""
    import torch

    r, d = int(radius), int(dilation)
    dims = patches.shape[2:]
    offsets = sorted({o for pair in neighbour_pairs(d) for o in pair})
    box = torch.arange(-r, r + 1, device=patches.device)
    flat = None
    for axis, n in enumerate(dims):  # flat index of (c + o + t) per offset o and box tap t, one axis at a time
        coord = torch.stack([(box + (n // 2 + o[axis])).clamp(0, n - 1) for o in offsets])  # [6, 2r + 1]
        shape = [len(offsets)] + [1] * 3
        shape[1 + axis] = 2 * r + 1
        coord = coord.reshape(shape)
        flat = coord if flat is None else flat * n + coord
    flat = flat.reshape(-1)  # [6 (2r + 1)^3], offsets major
    total = dims[0] * dims[1] * dims[2]
    pick = (torch.arange(total, device=patches.device)[:, None] == flat[None, :]).to(patches.dtype)
    views = (patches.reshape(patches.shape[0], total) @ pick).reshape(-1, len(offsets), (2 * r + 1) ** 3)
    signs = torch.zeros((12, len(offsets)), dtype=patches.dtype, device=patches.device)
    for c, (a, b) in enumerate(neighbour_pairs(d)):  # pair c: I(. + a) - I(. + b)
        signs[c, offsets.index(a)] = 1.0
        signs[c, offsets.index(b)] = -1.0
    diff = signs @ views  # [B, 12, (2r + 1)^3]
    return _mind_from_distances((diff * diff).mean(dim=2), dim=1)


def centre_module(radius: int, dilation: int):
    """The patch-mode module: ``patches`` [B, 1, P, P, P] -> ``(mind,)`` with ``mind`` [B, 12], the
    descriptor of the centre voxel ``P // 2`` (the contract of ``patch_file``), computed from the
    voxels it needs only (see :func:`mind_centre_torch`)."""
    from torch import nn

    class MindCentre(nn.Module):
        def forward(self, patches):
            return (mind_centre_torch(patches, radius, dilation),)

    return MindCentre().eval()


def full_module(radius: int, dilation: int):
    """The dense-mode module: ``image`` [B, 1, X, Y, Z] -> ``(mind,)`` with ``mind``
    [B, 12, X, Y, Z] (:func:`mind_ssc_torch`), whose VJP is the ``vjp_full_file`` graph."""
    from torch import nn

    class MindVolume(nn.Module):
        def forward(self, image):
            return (mind_ssc_torch(image, radius, dilation),)

    return MindVolume().eval()


FULL_VJP_EXAMPLE = 12  # the traced example: [2, 1, 12, 13, 14]
FULL_VJP_CHECKS = ((2, 1, 13, 9, 11), (1, 1, 20, 17, 23))  # ONNX Runtime against torch autograd


def build_full_vjp(name: str, radius: int, dilation: int, folder: Path) -> dict:
    """Write ``<name>_vjp_full.onnx`` (needs torch and onnxscript; dynamic batch and size) and check
    it against torch autograd on two image sizes (:data:`FULL_VJP_CHECKS`). Returns
    ``{"vjp_full_file", "error"}`` (max rel. error)."""
    from . import build

    module = full_module(radius, dilation)
    path = Path(folder) / f"{name}_vjp_full.onnx"
    build.export_full_vjp(module, path, build.full_vjp_example(1, 3, FULL_VJP_EXAMPLE), [12], [1],
                          doc=f"MIND-SSC r{radius}d{dilation} full-volume VJP: inputs image [B, 1, X, Y, Z], "
                              "cotangent_0 [B, 12, X, Y, Z]; output grad = d<mind(image), cotangent_0> / d image")
    return {"vjp_full_file": path.name, "error": build.check_full_vjp(module, path, FULL_VJP_CHECKS)}


def build_patch_graphs(name: str, radius: int, dilation: int, folder: Path) -> dict:
    """Write ``<name>_patch.onnx`` and ``<name>_vjp.onnx`` (needs torch and onnxscript) and check
    them against torch on patch sizes 3, 7, 8 and 11 (smaller than the receptive field: edge
    replication; even: an asymmetric patch)."""
    from . import build

    return build.export_patch_graphs(centre_module(radius, dilation), folder, name, PATCH_SIZE, 1, [12], ["mind"],
                                     check_sizes=(3, 8, 11), doc=f"MIND-SSC r{radius}d{dilation}")


def manifest(name: str, radius: int, dilation: int) -> dict:
    """The manifest entry of a MIND-SSC variant (see fastimpact.onnx_models for the format)."""
    return {
        "name": name,
        "file": f"{name}.onnx",
        "description": f"MIND-SSC self-similarity context descriptor, radius {radius}, dilation {dilation} "
                       "(handcrafted, no learned weights; robust across modalities)",
        "dimension": 3,
        "input_channels": 1,
        "layers": [{"name": "mind", "channels": 12, "stride": 1}],
        "receptive_field": 2 * (radius + dilation) + 1,
        "voxel_size_mm": None,
        "size_multiple": 1,
        "normalization": "zscore",
        "global_normalization": False,
        "license": "Apache-2.0 (this graph); method: Heinrich et al. 2012/2013",
        "provenance": f"built by fastimpact/onnx_models/mind.py (radius={radius}, dilation={dilation})",
        "patch_file": f"{name}_patch.onnx",
        "vjp_file": f"{name}_vjp.onnx",
        "patch_layers": [0],
        "patch_size": PATCH_SIZE,
        "patch_size_fixed": False,
        "vjp_full_file": f"{name}_vjp_full.onnx",
        "vjp_full_layers": [0],
    }


def main() -> None:  # pragma: no cover - build script
    import onnx

    here = Path(__file__).resolve().parent
    for name, (r, d) in VARIANTS.items():
        onnx.save(build_graph(r, d), str(here / f"{name}.onnx"))
        info = build_patch_graphs(name, r, d, here)
        full = build_full_vjp(name, r, d, here)
        (here / f"{name}.json").write_text(json.dumps(manifest(name, r, d), indent=2) + "\n")
        print(f"wrote {name}.onnx, {info['patch_file']}, {info['vjp_file']}, {full['vjp_full_file']} (ONNX Runtime "
              f"vs torch, max rel. error: forward {info['errors']['forward']:.1e}, VJP {info['errors']['vjp']:.1e}, "
              f"full-volume VJP {full['error']:.1e}) and {name}.json")


if __name__ == "__main__":  # pragma: no cover
    main()
