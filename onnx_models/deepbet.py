"""The encoder of deepbet's 3-D LinkNet (T1 brain extraction) as an ONNX feature extractor.

deepbet (Fisch et al., "deepbet: Fast brain extraction of T1-weighted MRI using Convolutional
Neural Networks", Computers in Biology and Medicine 2024; MIT licence) ships its segmentation
network as a TorchScript ``LinkNet3d`` (``site-packages/data/models/model.pt`` of the deepbet 1.0.2
wheel). This script rebuilds the network's *encoder* as a plain PyTorch module, loads the
TorchScript weights into it, checks it against the TorchScript modules and exports it to ONNX.

Architecture, read from the TorchScript code (every conv has no bias; every norm is
``instance_norm`` with the input's own statistics, eps 1e-5, no affine and no running statistics;
every activation is ReLU):

=====  ==============================================================  ===  ======  ====
stage  layers                                                          ch   stride  RF
=====  ==============================================================  ===  ======  ====
s0     ``init.0`` Conv 7^3 stride 2 pad 3 -> norm -> ReLU              16   2       7
s1     ``init.3`` MaxPool 3^3 stride 2 pad 1                           16   4       11
s2     ``down0``: 2 residual blocks (conv3 -> norm -> ReLU -> conv3 ->  16   4       43
       norm, + identity, ReLU)
s3     ``down1``: block 1 with conv3 stride 2 pad 1 and a 1^3 stride-2  32   8       99
       conv -> norm shortcut, then block 2 as in s2
s4     ``down2``, as s3                                                 64   16      211
s5     ``down3``, as s3                                                 128  32      435
=====  ==============================================================  ===  ======  ====

RF is the receptive field in input voxels of the conv/pool path (the norms mix in the statistics of
the whole input, see below). Grid alignment (checked by :func:`check_alignment` on the encoder with
the norms removed): every strided layer has padding ``k // 2`` (7 -> 3, 3 -> 1, 1 -> 0), so output
voxel ``j`` of a stage with stride ``s`` is centred on input voxel ``s * j`` exactly; no stage has a
half-voxel or other offset. Output sizes are ``ceil(n / stride)`` per axis.

Any input size runs, down to 1 voxel per axis (each strided layer maps ``n`` to ``ceil(n / 2)``;
checked with ONNX Runtime on 1^3, 2^3, 3^3 and 1 x 5 x 9 inputs). But s0, s3, s4 and s5 end in an
instance norm, so a stage with a single voxel is all zeros (``x - mean(x) = 0``; s1 and s2 then only
repeat the maximum of s0): s0 needs an axis of at least 3 voxels, s3 at least 9, s4 17 and s5 33 to
carry information, and a few voxels per axis more to carry much.

Intensities: deepbet clips the image to its 0.5 % and 99.5 % quantiles, maps that range to [0, 1],
z-scores the result over the whole (cropped) volume and feeds ``0.226 z + 0.449`` to the network
(``deepbet.utils.normalize``; the ImageNet grey mean and std). The exported graph holds that last
affine map (``image`` -> ``0.226 image + 0.449``, then the encoder), so the manifest asks for
``zscore``. The affine map matters although the first conv is followed by an instance norm: it sets
where the conv's zero padding lies relative to the background, and the padded border shell enters
the instance-norm statistics of the whole volume. Measured on the 1 mm MNI T1 (correlation with
deepbet's own preprocessing over interior voxels, s0 / s3 / s5): zscore with the in-graph map
0.99998 / 0.99984 / 0.99995 (the clipping is the only difference); plain zscore 0.993 / 0.953 /
0.956; minmax 0.991 / 0.952 / 0.953; minmax then ImageNet (x - 0.485) / 0.229 worse still.
deepbet takes its statistics over the head's box, background included: z-scoring with the
statistics inside a brain mask instead gives 0.994 / 0.954 / 0.956, like plain zscore.

Voxel size: deepbet crops the brain's bounding box with a 10 % margin on each side and resamples it
to 256^3 voxels (nearest neighbour), so the network sees voxels of about 0.7 mm (0.66 x 0.84 x 0.68
mm on the MNI template, whose brain is larger than most). The full deepbet network segmenting that
box resampled to other voxel sizes instead (Dice against deepbet's own mask): 0.7 mm 0.993,
0.85 mm 0.990, 1 mm 0.980, 1.2 mm 0.934; hence ``voxel_size_mm`` 0.7.

Instance norm makes every output depend on the statistics of the whole input (global
normalisation): features of a tile differ from the same region of whole-volume features, and a
wider halo does not help, the tile's content does. Measured on the 1 mm MNI T1 (z-scored once with
whole-volume statistics), interior of a cubic tile against the whole-volume run, s0 / s2: tile 96^3
with a 16-voxel margin, correlation 0.63-0.94 / 0.73-0.90 (brain centre / cortex), RMS difference
0.4-0.7 / 0.4-0.5 of the features' RMS; 160^3: 0.95 / 0.93, RMS 0.35 / 0.3; only tiles that hold
nearly the whole head (192^3) reach 0.99. Whole-volume inference is cheap on the CPU (1 mm MNI
brain, 2 threads: 0.3 s and about 0.5 GB above the baseline for all six outputs).

Jacobian mode: ``deepbet_patch.onnx`` / ``deepbet_vjp.onnx`` (contract in
:mod:`fastimpact.onnx_models`) hold s0-s2 (:func:`patch_module`), default patch 9^3 (valid sizes:
``(P // 2) % 4 == 0``: 8, 9, 16, 17, ...; the graphs take any of them). Nothing can be cropped to
the centre's receptive field: every stage ends in or feeds an instance norm over the whole stage,
so the centre voxel depends on all voxels of the patch. 9^3 is the default because 17^3 costs
4.4x more (ONNX Runtime, 2 threads, 2000 patches: forward 83 ms / VJP 277 ms against
369 ms / 1.21 s); ``deepbet_patch_check.npz`` holds torch autograd results for the tests.

Dense Jacobian mode: ``deepbet_vjp_full.onnx`` is the vector-Jacobian product of s0-s2 on the whole
volume (:func:`full_module`; cotangents ``[B, 16, ceil(X / s), ...]``, contract in
:mod:`fastimpact.onnx_models`). ONNX Runtime 1.32, 2 threads, one volume, best of 7:
64^3 0.020 s, 128^3 0.13-0.15 s (``deepbet.onnx``, all six stages: 0.007 / 0.05 s).

Run ``python -m fastimpact.onnx_models.deepbet`` (needs ``torch`` and ``onnx``, the ``models`` extra,
and ``pip install --no-deps deepbet==1.0.2`` for the weights) to rebuild ``deepbet.onnx``, its
manifest, ``LICENSE_deepbet.txt``, the patch and full-volume VJP graphs and the test fixtures ``deepbet_check.npz`` and
``deepbet_patch_check.npz`` (the patch and VJP graphs also need ``onnxscript``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

NAME = "deepbet"
DEEPBET_VERSION = "1.0.2"
STAGES = (("s0", 16, 2), ("s1", 16, 4), ("s2", 16, 4), ("s3", 32, 8), ("s4", 64, 16), ("s5", 128, 32))
RECEPTIVE_FIELDS = (7, 11, 43, 99, 211, 435)  # conv/pool path, input voxels, per stage
VOXEL_SIZE_MM = 0.7  # see the module docstring: brain box + 20 % resampled to 256^3
INPUT_SCALE, INPUT_SHIFT = 0.226, 0.449  # deepbet.utils.normalize: network input = 0.226 z + 0.449
OPSET = 17
CHECK_SHAPE = (1, 1, 68, 20, 16)  # the fixture's input: s5 is 3 x 1 x 1 (not all zeros, well conditioned)
CHECK_SEED = 20240917
PATCH_LAYERS = (0, 1, 2)  # s0-s2 in patch mode: s3 (stride 8) would need P >= 16 and is 2^3 voxels at 17
PATCH_SIZE = 9  # default Jacobian-mode patch; valid sizes: (P // 2) % 4 == 0, i.e. 8, 9, 16, 17, ...
PATCH_CHECK_SIZE = 17
VJP_FULL_LAYERS = (0, 1, 2)  # s0-s2 in dense Jacobian mode, as in patch mode
FULL_VJP_EXAMPLE = 20  # the traced example: [2, 1, 20, 21, 22]
FULL_VJP_CHECKS = ((2, 1, 21, 26, 19), (1, 1, 32, 17, 24))  # ONNX Runtime against torch autograd
_HERE = Path(__file__).resolve().parent
_INSTANCE_NORM_EPS = 1e-5  # the TorchScript's value


def torchscript_path() -> Path:
    """The TorchScript segmentation model of the installed deepbet wheel (``data/models/model.pt``)."""
    import importlib.metadata as md

    try:
        files = md.files("deepbet") or []
    except md.PackageNotFoundError:
        raise SystemExit(f"deepbet is not installed: pip install --no-deps deepbet=={DEEPBET_VERSION}") from None
    version = md.version("deepbet")
    if version != DEEPBET_VERSION:
        raise SystemExit(f"deepbet {version} is installed; this build expects {DEEPBET_VERSION}")
    for f in files:
        if str(f).replace("\\", "/").endswith("data/models/model.pt"):
            return Path(f.locate()).resolve()
    raise SystemExit("the deepbet wheel holds no data/models/model.pt")


def load_torchscript():
    import warnings

    import torch

    with warnings.catch_warnings():  # deepbet ships TorchScript; torch.jit.load is its only loader
        warnings.simplefilter("ignore", DeprecationWarning)
        model = torch.jit.load(str(torchscript_path()), map_location="cpu")
    return model.eval()


def build_encoder(geometry_only: bool = False):
    """The deepbet encoder as a plain ``torch.nn.Module`` (random weights until a state dict is
    loaded); ``forward(x [B, 1, X, Y, Z]) -> (s0, ..., s5)``. ``geometry_only=True`` drops the
    instance norms and replaces the max pool by an average pool of the same geometry, so that every
    input voxel of a receptive field has a non-zero gradient (used only by :func:`check_alignment`)."""
    import torch
    from torch import nn

    def norm(x):
        if geometry_only:
            return x
        # called directly: nn.InstanceNorm3d refuses inputs with one voxel, which small tiles produce
        return torch.instance_norm(x, None, None, None, None, True, 0.1, _INSTANCE_NORM_EPS, True)

    def conv(cin, cout, k, stride):
        return nn.Conv3d(cin, cout, k, stride=stride, padding=k // 2, bias=False)

    class Block(nn.Module):
        """Residual block; the module names reproduce the TorchScript's state-dict keys."""

        def __init__(self, cin, cout, stride):
            super().__init__()
            self.double_conv = nn.ModuleDict({"0": conv(cin, cout, 3, stride), "3": conv(cout, cout, 3, 1)})
            self.downsample = nn.ModuleList([conv(cin, cout, 1, stride)]) if stride != 1 else None

        def forward(self, x):
            y = norm(self.double_conv["3"](torch.relu(norm(self.double_conv["0"](x)))))
            shortcut = x if self.downsample is None else norm(self.downsample[0](x))
            return torch.relu(y + shortcut)

    class Down(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.block1 = Block(cin, cout, stride)
            self.block2 = Block(cout, cout, 1)

        def forward(self, x):
            return self.block2(self.block1(x))

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.init = nn.ModuleList([conv(1, 16, 7, 2)])
            self.down0 = Down(16, 16, 1)
            self.down1 = Down(16, 32, 2)
            self.down2 = Down(32, 64, 2)
            self.down3 = Down(64, 128, 2)

            self.n_stages = len(STAGES)  # forward computes s0 .. s{n_stages - 1} only

        def forward(self, image):
            s0 = torch.relu(norm(self.init[0](image)))
            pool = torch.nn.functional.avg_pool3d if geometry_only else torch.nn.functional.max_pool3d
            stages = [s0, pool(s0, 3, stride=2, padding=1)]
            for down in (self.down0, self.down1, self.down2, self.down3)[: self.n_stages - 2]:
                stages.append(down(stages[-1]))
            return tuple(stages[: self.n_stages])

    return Encoder()


def with_input_map(encoder):
    """The exported module: ``image`` (z-scored) -> ``encoder(0.226 image + 0.449)``, deepbet's own
    input scaling (see the module docstring)."""
    from torch import nn

    class DeepbetFeatures(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = encoder

        def forward(self, image):
            return self.encoder(image * INPUT_SCALE + INPUT_SHIFT)

    return DeepbetFeatures().eval()


def patch_module(encoder):
    """The patch-mode module (contract of ``patch_file``): ``patches`` [B, 1, P, P, P] (z-scored)
    -> the centre voxels ``(P // 2) // stride`` of s0, s1, s2, each [B, 16].

    Nothing can be cropped here: every stage ends in (or feeds) an instance norm over the whole
    stage output, so the centre voxel depends on every voxel of the stage (and the backward pass
    spreads a centre cotangent over all of them); only the stages after s2 are left out."""
    import copy

    from . import build

    stages = copy.deepcopy(encoder)
    stages.n_stages = len(PATCH_LAYERS)
    return build.centre_module(with_input_map(stages), PATCH_LAYERS,
                               [STAGES[i][2] for i in PATCH_LAYERS]).eval()


def full_module(encoder):
    """The dense-mode module: ``image`` [B, 1, X, Y, Z] (z-scored) -> s0, s1, s2 of the whole volume
    (:func:`with_input_map` of the encoder cut after s2), whose VJP is ``deepbet_vjp_full.onnx``:
    with the instance norms every voxel of a stage depends on every input voxel."""
    import copy

    stages = copy.deepcopy(encoder)
    stages.n_stages = len(VJP_FULL_LAYERS)
    return with_input_map(stages)


def build_full_vjp(encoder, folder: Path) -> dict:
    """Write ``deepbet_vjp_full.onnx`` (dynamic batch and size; needs torch and onnxscript) and
    check it against torch autograd on :data:`FULL_VJP_CHECKS` (odd sizes: the cotangents are
    ``ceil(n / stride)``). Returns ``{"vjp_full_file", "error"}`` (max rel. error)."""
    from . import build

    module = full_module(encoder)
    path = Path(folder) / f"{NAME}_vjp_full.onnx"
    layers = [STAGES[i] for i in VJP_FULL_LAYERS]
    build.export_full_vjp(module, path, build.full_vjp_example(1, 3, FULL_VJP_EXAMPLE), [c for _, c, _ in layers],
                          [s for _, _, s in layers],
                          doc=f"deepbet {DEEPBET_VERSION} encoder s0-s2 (MIT, Fisch et al.) full-volume VJP: inputs "
                              "image [B, 1, X, Y, Z], cotangent_k [B, 16, ceil(X / s_k), ...] (s0, s1, s2); output "
                              "grad = d(sum_k <s_k(image), cotangent_k>) / d image")
    return {"vjp_full_file": path.name, "error": build.check_full_vjp(module, path, FULL_VJP_CHECKS)}


def patch_check_data(centre, seed: int = CHECK_SEED, batch: int = 4) -> dict:
    """The torch-free test fixture of the patch graphs: smooth z-scored patches of ``PATCH_SIZE``
    and ``PATCH_CHECK_SIZE``, random cotangents, torch's centre outputs and autograd VJP."""
    import torch

    from . import build

    out = {}
    for size in (PATCH_SIZE, PATCH_CHECK_SIZE):
        vol = check_input((1, 1, 24, 24, 24), seed=seed + size)[0, 0]
        r = np.random.default_rng(seed + size)
        starts = r.integers(0, 24 - size + 1, size=(batch, 3))
        x = np.stack([vol[a:a + size, b:b + size, c:c + size] for a, b, c in starts])[:, None]
        cots = [r.normal(size=(batch, STAGES[i][1])).astype(np.float32) for i in PATCH_LAYERS]
        xt = torch.from_numpy(np.ascontiguousarray(x))
        with torch.no_grad():
            feats = [f.numpy() for f in centre(xt)]
        grad = build.vjp_reference(centre, xt, [torch.from_numpy(c) for c in cots]).numpy()
        out[f"patches_{size}"] = x
        out[f"grad_{size}"] = grad
        for k, (c, f) in enumerate(zip(cots, feats)):
            out[f"cotangent_{k}_{size}"] = c
            out[f"centre_{k}_{size}"] = f
    return out


def encoder_state_dict(scripted) -> dict:
    """The encoder's weights (keys ``init.*`` and ``down*``) of the TorchScript model."""
    keep = ("init", "down0", "down1", "down2", "down3")
    return {k: v for k, v in scripted.state_dict().items() if k.split(".")[0] in keep}


def load_encoder(scripted=None):
    """The encoder with deepbet's weights (``strict=True``: every key must match), in eval mode."""
    scripted = load_torchscript() if scripted is None else scripted
    enc = build_encoder()
    enc.load_state_dict(encoder_state_dict(scripted), strict=True)
    return enc.eval()


def torchscript_stages(scripted, x):
    """s0..s5 computed by the TorchScript submodules themselves (``init`` = conv, norm, ReLU, pool;
    s1 is also checked against the whole ``init`` module)."""
    import torch

    relu = getattr(scripted.conv, "2")  # the ReLU module the TorchScript's forward passes to every stage
    s0 = relu(getattr(scripted.init, "1")(getattr(scripted.init, "0")(x)))
    s1 = getattr(scripted.init, "3")(s0)
    if not torch.equal(s1, scripted.init(relu, x)):
        raise RuntimeError("the TorchScript init stage is not conv -> norm -> ReLU -> max pool")
    s2 = scripted.down0(relu, s1)
    s3 = scripted.down1(relu, s2)
    s4 = scripted.down2(relu, s3)
    s5 = scripted.down3(relu, s4)
    return s0, s1, s2, s3, s4, s5


def compare_with_torchscript(shape=(1, 1, 45, 63, 37), seed: int = 0, encoder=None, scripted=None) -> list:
    """Max relative error (max |a - b| / max |b|) of each stage of the rebuilt encoder against the
    TorchScript modules, on a random input of ``shape``."""
    import torch

    scripted = load_torchscript() if scripted is None else scripted
    encoder = load_encoder(scripted) if encoder is None else encoder
    x = torch.from_numpy(np.random.default_rng(seed).normal(size=shape).astype(np.float32))
    with torch.no_grad():
        ours = encoder(x)
        ref = torchscript_stages(scripted, x.clone())  # the TorchScript ReLUs work in place
    errors = []
    for (name, ch, stride), a, b in zip(STAGES, ours, ref):
        expected = (shape[0], ch, *[-(-n // stride) for n in shape[2:]])
        if tuple(a.shape) != expected or tuple(b.shape) != expected:
            raise RuntimeError(f"{name}: shapes {tuple(a.shape)} / {tuple(b.shape)}, expected {expected}")
        errors.append(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)))
    return errors


def check_alignment(size: int = 96) -> list:
    """For each stage, the input box that an interior output voxel ``j`` sees (the norms removed, so
    the box is the conv/pool receptive field, see :func:`build_encoder`). Returns
    ``[(name, centre_offset, width)]``: ``centre_offset`` = box centre - stride * j (0: aligned) and
    ``width`` the receptive field, both in input voxels."""
    import torch

    enc = build_encoder(geometry_only=True).double().eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in enc.parameters():  # positive weights: no accidental zero gradients
            p.copy_(torch.rand_like(p) + 0.1)
    results = []
    for i, (name, _, stride) in enumerate(STAGES):
        n = max(size, RECEPTIVE_FIELDS[i] + 2 * stride + 2)
        x = torch.rand((1, 1, n, 1, 1), dtype=torch.float64, requires_grad=True)
        x3 = x.expand(1, 1, n, 5, 5)  # thin in y, z: the x axis stands for all (the layers are isotropic)
        out = enc(x3)[i]
        j = out.shape[2] // 2
        out[0, :, j].sum().backward()
        seen = np.nonzero(x.grad[0, 0, :, 0, 0].numpy())[0]
        lo, hi = int(seen.min()), int(seen.max())
        if lo == 0 or hi == n - 1:
            raise RuntimeError(f"{name}: the receptive field reaches the border; use a larger size")
        results.append((name, (lo + hi) / 2 - stride * j, hi - lo + 1))
    return results


def check_input(shape=CHECK_SHAPE, seed: int = CHECK_SEED) -> np.ndarray:
    """The fixture's input: a smooth random field, float32 ``shape``, z-scored (as the manifest asks)."""
    from scipy import ndimage

    r = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(r.normal(size=shape[2:]), 2.0, mode="wrap")
    field = (field - field.mean()) / field.std()
    return field.astype(np.float32).reshape(shape)


def export_onnx(model, path: Path) -> None:
    """ONNX of ``model`` (:func:`with_input_map` of the encoder; TorchScript exporter, opset 17):
    input ``image`` [B, 1, X, Y, Z], outputs s0..s5
    [B, C, ceil(X / s), ceil(Y / s), ceil(Z / s)]; batch and spatial axes dynamic."""
    import warnings

    import onnx
    import torch

    names = [name for name, _, _ in STAGES]
    dynamic = {"image": {0: "B", 2: "X", 3: "Y", 4: "Z"}}
    for name in names:
        dynamic[name] = {0: "B", 2: f"X_{name}", 3: f"Y_{name}", 4: f"Z_{name}"}
    example = torch.from_numpy(check_input())
    with warnings.catch_warnings():  # the legacy (TorchScript) exporter on purpose: plain Conv/InstanceNorm nodes
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*instance_norm.*train=True")  # input statistics: intended
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=OPSET, input_names=["image"],
                          output_names=names, dynamic_axes=dynamic, do_constant_folding=True)
    model = onnx.load(str(path))
    model.ir_version = min(model.ir_version, 8)  # readable by onnxruntime >= 1.15
    model.producer_name = "fastimpact"
    model.doc_string = f"deepbet {DEEPBET_VERSION} LinkNet3d encoder (MIT, Fisch et al.), stages s0..s5"
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def manifest() -> dict:
    """The manifest entry (see fastimpact.onnx_models for the format)."""
    layers = [{"name": n, "channels": c, "stride": s, "receptive_field": rf}
              for (n, c, s), rf in zip(STAGES, RECEPTIVE_FIELDS)]
    return {
        "name": NAME,
        "file": f"{NAME}.onnx",
        "description": "deepbet T1 brain-extraction LinkNet3d encoder, stages s0-s5 (voxel j centred on input "
                       "voxel stride*j; deepbet's input scaling inside the graph)",
        "dimension": 3,
        "input_channels": 1,
        "layers": layers,
        "receptive_field": RECEPTIVE_FIELDS[-1],
        "voxel_size_mm": VOXEL_SIZE_MM,
        "size_multiple": 1,
        "normalization": "zscore",
        "global_normalization": True,
        "license": "MIT (deepbet, Fisch et al.); notice in LICENSE_deepbet.txt",
        "provenance": f"deepbet {DEEPBET_VERSION} (PyPI wheel) data/models/model.pt, encoder converted by "
                      "fastimpact/onnx_models/deepbet.py (torch.onnx.export, opset 17; patch graphs opset 18)",
        "patch_file": f"{NAME}_patch.onnx",
        "vjp_file": f"{NAME}_vjp.onnx",
        "patch_layers": list(PATCH_LAYERS),
        "patch_size": PATCH_SIZE,
        "patch_size_fixed": False,
        "vjp_full_file": f"{NAME}_vjp_full.onnx",
        "vjp_full_layers": list(VJP_FULL_LAYERS),
    }


def write_licence(path: Path) -> None:
    import importlib.metadata as md

    dist = md.distribution("deepbet")
    text = dist.read_text("LICENSE")
    if not text:
        raise SystemExit("the deepbet wheel's metadata holds no LICENSE file")
    header = (f"deepbet.onnx holds weights converted from deepbet {DEEPBET_VERSION} "
              "(https://github.com/wwu-mmll/deepbet), distributed under this licence:\n\n")
    path.write_text(header + text.rstrip() + "\n")


def main() -> None:  # pragma: no cover - build script
    import torch

    scripted = load_torchscript()
    encoder = load_encoder(scripted)
    errors = compare_with_torchscript(encoder=encoder, scripted=scripted)
    print("rebuilt encoder vs TorchScript, max rel. error per stage:", " ".join(f"{e:.1e}" for e in errors))
    if max(errors) > 1e-5:
        raise SystemExit("the rebuilt encoder does not match the TorchScript model")
    for name, offset, width in check_alignment():
        print(f"{name}: receptive field {width}, centre offset {offset:+g} voxels")
        if offset != 0:
            raise SystemExit(f"{name} is not centred on stride * j; update the docstring and manifest")

    onnx_path = _HERE / f"{NAME}.onnx"
    model = with_input_map(encoder)
    export_onnx(model, onnx_path)
    x = check_input()
    with torch.no_grad():
        outs = [o.numpy() for o in model(torch.from_numpy(x))]
    np.savez_compressed(_HERE / f"{NAME}_check.npz", image=x, **{n: o for (n, _, _), o in zip(STAGES, outs)})
    from . import build

    centre = patch_module(encoder)
    info = build.export_patch_graphs(centre, _HERE, NAME, PATCH_SIZE, 1, [STAGES[i][1] for i in PATCH_LAYERS],
                                     [STAGES[i][0] for i in PATCH_LAYERS], check_sizes=(8, PATCH_CHECK_SIZE),
                                     doc=f"deepbet {DEEPBET_VERSION} encoder s0-s2 (MIT, Fisch et al.)")
    print("patch graphs, ONNX Runtime vs torch, max rel. error: forward {forward:.1e}, VJP {vjp:.1e}".format(
        **info["errors"]))
    np.savez_compressed(_HERE / f"{NAME}_patch_check.npz", **patch_check_data(centre))
    full = build_full_vjp(encoder, _HERE)
    print(f"full-volume VJP, ONNX Runtime vs torch, max rel. error {full['error']:.1e}")
    (_HERE / f"{NAME}.json").write_text(json.dumps(manifest(), indent=2) + "\n")
    write_licence(_HERE / f"LICENSE_{NAME}.txt")
    try:
        import onnxruntime as ort
    except ImportError:
        print("onnxruntime is not installed: the export was not checked with it")
    else:
        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        got = sess.run(None, {"image": x})
        rel = [float(np.abs(g - o).max() / max(np.abs(o).max(), 1e-30)) for g, o in zip(got, outs)]
        print("ONNX Runtime vs torch, max rel. error per stage:", " ".join(f"{e:.1e}" for e in rel))
        if max(rel) > 1e-4:
            raise SystemExit("the ONNX graph does not reproduce the torch encoder")
    print(f"wrote {NAME}.onnx ({onnx_path.stat().st_size / 1e6:.1f} MB), {NAME}_patch.onnx, {NAME}_vjp.onnx, "
          f"{NAME}_vjp_full.onnx, "
          f"{NAME}.json, {NAME}_check.npz, {NAME}_patch_check.npz, LICENSE_{NAME}.txt")


if __name__ == "__main__":  # pragma: no cover
    main()
