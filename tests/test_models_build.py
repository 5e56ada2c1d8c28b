"""`fastimpact models build` (cli/models_build.py, onnx_models/build.py): an nnU-Net encoder
(dynamic-network-architectures PlainConvUNet, random weights), a Python-file network and
TorchScript files (scripted and traced: the encoder stages of a segmentation network, run node by
node) converted to ONNX; the graphs (full, patch, VJP, full-volume VJP) against torch (the Python
network the TorchScript came from) and the VJPs against finite differences; networks that fix
their sizes are refused. Needs torch, onnxscript and dynamic-network-architectures (the models
extra): skipped without them."""

import copy
import json
import warnings

import numpy as np
import pytest

from fastimpact.errors import ConfigError

torch = pytest.importorskip("torch", reason="models build needs torch (the models extra)")
pytest.importorskip("onnxscript", reason="models build needs onnxscript (the models extra)")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is part of the test extra")
typer_testing = pytest.importorskip("typer.testing")

from fastimpact.onnx_models import load_model_spec, validate_with_runtime  # noqa: E402
from fastimpact.onnx_models import build  # noqa: E402
from fastimpact.onnx_models.build import (build_model, load_user_network, torchscript_network,  # noqa: E402
                                           vjp_reference)

ARCH = {
    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "arch_kwargs": {
        "n_stages": 3, "features_per_stage": [4, 8, 16], "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]], "n_conv_per_stage": [2, 2, 2],
        "n_conv_per_stage_decoder": [1, 1], "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-5, "affine": True},
        "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    },
    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
}


def run_cli(args):
    import typer

    from fastimpact.cli.models_build import build

    app = typer.Typer()
    app.command()(build)
    app.command("noop")(lambda: None)  # two commands: typer keeps `build` as a subcommand name
    return typer_testing.CliRunner().invoke(app, ["build", *map(str, args)])


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def full_vjp_against_torch(spec, layers_fn, shape, seed=0):
    """The model's full-volume VJP graph against torch autograd of ``layers_fn`` (image -> the
    vjp_full layers) on a random image of ``shape``: max rel. error."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    with torch.no_grad():
        maps = layers_fn(x)
    cots = [torch.randn(m.shape, generator=g) for m in maps]
    grad = session(spec.vjp_full_path).run(None, {"image": x.numpy(),
                                                  **{f"cotangent_{k}": c.numpy() for k, c in enumerate(cots)}})[0]
    assert grad.shape == tuple(shape)
    return rel(grad, vjp_reference(layers_fn, x, cots).numpy())


@pytest.fixture(scope="module")
def nnunet(tmp_path_factory):
    pytest.importorskip("dynamic_network_architectures", reason="pip install dynamic-network-architectures")
    folder = tmp_path_factory.mktemp("nnunet")
    plans = {"configurations": {"3d_fullres": {"architecture": ARCH}}}
    (folder / "plans.json").write_text(json.dumps(plans))
    net = load_user_network(folder / "plans.json", configuration="3d_fullres", random_weights=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random but not initial weights, affine norms included
        for p in net.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    torch.save({"network_weights": net.state_dict()}, folder / "checkpoint_final.pth")
    result = run_cli([folder / "plans.json", "--weights", folder / "checkpoint_final.pth", "--configuration",
                      "3d_fullres", "--submodule", "encoder", "--layers", "0,1,2", "--layer-names", "e0,e1,e2",
                      "--name", "unet", "-o", folder / "out", "--probe-size", "32", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output[result.output.index("{"):])
    return folder, net.eval(), info


def test_nnunet_encoder_manifest(nnunet):
    folder, _, info = nnunet
    spec = load_model_spec(folder / "out" / "unet.json")
    validate_with_runtime(spec)
    assert [(l.name, l.channels, l.stride, l.receptive_field) for l in spec.layers] == [
        ("e0", 4, 1, 5), ("e1", 8, 2, 11), ("e2", 16, 4, 23)]  # two 3^3 convs per stage
    assert spec.global_normalization and spec.receptive_field == 23 and spec.normalization == "zscore"
    assert spec.patch_layers == (0, 1, 2) and spec.patch_size == 9 and spec.patch_centres(17) == (8, 4, 2)
    assert spec.vjp_full_layers == (0, 1, 2) and spec.vjp_full_path == (folder / "out" / "unet_vjp_full.onnx").resolve()
    assert set(info["checks"]) == {"full", "forward", "vjp", "full_centre", "vjp_full"}
    assert max(info["checks"].values()) < 1e-4
    with pytest.raises(ConfigError, match="use one of 8, 9, 16, 17"):
        spec.patch_centres(11)


def test_nnunet_graphs_agree_with_torch(nnunet):
    folder, net, _ = nnunet
    spec = load_model_spec(folder / "out" / "unet.json")
    x = torch.randn(2, 1, 19, 24, 21, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = net.encoder(x)
    full = session(spec.path).run(None, {"image": x.numpy()})
    for a, b in zip(full, ref):
        assert a.shape == tuple(b.shape) and rel(a, b.numpy()) < 1e-4
    for size in (9, 17):
        p = torch.randn(3, 1, size, size, size, generator=torch.Generator().manual_seed(size))
        outs = session(spec.path).run(None, {"image": p.numpy()})
        centre = session(spec.patch_path).run(None, {"patches": p.numpy()})
        for o, c, k in zip(outs, centre, spec.patch_centres(size)):
            assert rel(c, o[:, :, k, k, k]) < 1e-5
        cots = [torch.randn(3, c) for c in (4, 8, 16)]

        def centre_torch(patches, size=size):
            return tuple(f[:, :, k, k, k] for f, k in zip(net.encoder(patches), spec.patch_centres(size)))

        grad = session(spec.vjp_path).run(None, {"patches": p.numpy(),
                                                 **{f"cotangent_{i}": c.numpy() for i, c in enumerate(cots)}})[0]
        assert rel(grad, vjp_reference(centre_torch, p, cots).numpy()) < 1e-4
    # the full-volume VJP at sizes the build did not check (odd: cotangents of ceil(n / stride))
    for shape in ((2, 1, 19, 24, 21), (1, 1, 14, 11, 17)):
        assert full_vjp_against_torch(spec, net.encoder, shape) < 1e-4


NET_PY = '''
import torch
class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv3d(1, 4, 3, padding=1)
        self.c2 = torch.nn.Conv3d(4, 6, 3, stride=2, padding=1)
    def forward(self, x):
        a = torch.relu(torch.instance_norm(self.c1(x), None, None, None, None, True, 0.1, 1e-5, True))
        return a, torch.nn.functional.max_pool3d(torch.nn.functional.gelu(self.c2(a)), 2)
torch.manual_seed(3)
model = Tiny()
'''


def test_python_network_with_a_hooked_submodule_layer(tmp_path):
    (tmp_path / "net.py").write_text(NET_PY)
    info = build_model(tmp_path / "net.py", tmp_path, "tiny", ["0", "c2", "1"], probe_size=16, receptive_field=7)
    # a functional instance norm cannot be swapped out, so the fields are not measured (all global)
    assert [(l["channels"], l["stride"], l.get("receptive_field")) for l in info["layers"]] == [
        (4, 1, None), (6, 2, None), (6, 4, None)]
    assert info["receptive_field"] == 7 and info["global_normalization"] is True  # found in the traced ops
    assert info["patch_size"] == 9 and max(info["checks"].values()) < 1e-4  # 2 lcm(1, 2, 4) + 1
    model = load_user_network(tmp_path / "net.py")
    x = torch.randn(1, 1, 12, 10, 14)
    with torch.no_grad():
        a, pooled = model(x)
        c2 = model.c2(a)
    full = session(tmp_path / "tiny.onnx").run(None, {"image": x.numpy()})
    for got, ref in zip(full, (a, c2, pooled)):
        assert rel(got, ref.numpy()) < 1e-4
    # the full-volume VJP of all three layers; the max pool rounds down (13 -> 7 -> 3)
    spec = load_model_spec(tmp_path / "tiny.json")
    assert spec.vjp_full_layers == (0, 1, 2) and info["checks"]["vjp_full"] < 1e-4

    def layers(image):
        h = model.c1(image)
        a = torch.relu(torch.instance_norm(h, None, None, None, None, True, 0.1, 1e-5, True))
        c2 = model.c2(a)
        return a, c2, torch.nn.functional.max_pool3d(torch.nn.functional.gelu(c2), 2)

    for shape in ((2, 1, 13, 12, 15), (1, 1, 9, 16, 11)):
        assert full_vjp_against_torch(spec, layers, shape) < 1e-4
    with pytest.raises(ConfigError, match="exist; use --force"):
        build_model(tmp_path / "net.py", tmp_path, "tiny", ["0"])


def test_torchscript_static_only_model(tmp_path):
    (tmp_path / "net.py").write_text(NET_PY)
    model = load_user_network(tmp_path / "net.py")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(model, torch.randn(1, 1, 16, 16, 16)).save(str(tmp_path / "tiny.pt"))
    result = run_cli([tmp_path / "tiny.pt", "--layers", "0,1", "--name", "ts", "-o", tmp_path / "o",
                      "--probe-size", "16", "--static-only"])
    assert result.exit_code == 0, result.output
    assert "static mode only" in result.output
    spec = load_model_spec(tmp_path / "o" / "ts.json")
    validate_with_runtime(spec)
    assert spec.patch_path is None and not (tmp_path / "o" / "ts_vjp.onnx").exists()
    assert spec.vjp_full_path is None and not (tmp_path / "o" / "ts_vjp_full.onnx").exists()
    x = torch.randn(2, 1, 13, 18, 11)
    with torch.no_grad():
        ref = model(x)
    for got, r in zip(session(spec.path).run(None, {"image": x.numpy()}), ref):
        assert rel(got, r.numpy()) < 1e-4  # dynamic sizes work for the full graph
    with pytest.raises(ConfigError, match="no patch graphs"):
        spec.patch_centres()


# a segmentation network whose TorchScript returns only the decoder's output (as deepbet's): its
# encoder stages are taken by submodule name; `gn` reads sizes from its input (traced: aten::size
# ops; scripted: so do InstanceNorm3d's input checks)
UNET_PY = '''
import torch
from torch import nn
import torch.nn.functional as F

class Stage(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, 3, stride=stride, padding=1)
        self.norm = nn.InstanceNorm3d(cout, affine=True)

    def forward(self, x):
        return F.leaky_relu(self.norm(self.conv(x)), 0.01)

class GroupNormByHand(nn.Module):
    def forward(self, x):
        g = x.reshape(x.shape[0], 2, -1)
        g = (g - g.mean(-1, keepdim=True)) * torch.rsqrt(g.var(-1, keepdim=True) + 1e-5)
        return g.view(x.shape)

class UNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.s0, self.s1, self.gn = Stage(1, 4, 1), Stage(4, 6, 2), GroupNormByHand()
        self.up, self.head = nn.ConvTranspose3d(6, 4, 2, stride=2), nn.Conv3d(4, 2, 1)

    def forward(self, x):
        a = self.s0(x)
        return torch.softmax(self.head(self.up(self.gn(self.s1(a))) + a), 1)  # even sizes only

torch.manual_seed(5)
model = UNet()
with torch.no_grad():
    for p in model.parameters():
        p.add_(0.1 * torch.randn(p.shape))
'''


@pytest.fixture(scope="module")
def unet(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unet")
    (folder / "unet.py").write_text(UNET_PY)
    model = load_user_network(folder / "unet.py")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(model).save(str(folder / "script.pt"))
        torch.jit.trace(model, torch.randn(1, 1, 8, 8, 8)).save(str(folder / "trace.pt"))
    return folder, model


def encoder_stages(model, x):
    a = model.s0(x)
    return a, model.gn(model.s1(a))


@pytest.mark.parametrize("kind", ["script", "trace"])
def test_torchscript_runs_node_by_node_with_symbolic_shapes(unet, kind):
    folder, model = unet
    script = load_user_network(folder / f"{kind}.pt")
    net = torchscript_network(script)
    assert net.unsupported is None
    x = torch.randn(3, 1, 10, 12, 14)
    with torch.no_grad():
        assert torch.equal(net(x), script(x)) and rel(net(x).numpy(), model(x).numpy()) < 1e-5
        out, captured = net.run(torch.randn(2, 1, 9, 7, 5), ["s0", "gn"], stop=True)
        assert out is None and captured["gn"].shape == (2, 6, 5, 4, 3)  # odd sizes: the decoder never ran
        got, want = net.run(x, ["s0", "gn"], stop=True)[1], encoder_stages(model, x)
        assert all(rel(got[k].numpy(), w.numpy()) < 1e-5 for k, w in zip(("s0", "gn"), want))
    # make_fx through the node-by-node run keeps batch and size symbolic (the ScriptModule's own
    # interpreter reads sizes as ints: scripted InstanceNorm3d checks, traced aten::size)
    gm = build._trace(lambda p: net.run(p, ["gn"], stop=True)[1]["gn"], (torch.randn(2, 1, 9, 9, 9),))
    (placeholder,) = [n for n in gm.graph.nodes if n.op == "placeholder"]
    shape = placeholder.meta["val"].shape
    assert isinstance(shape[0], torch.SymInt) and all(isinstance(d, torch.SymInt) for d in shape[2:])


@pytest.mark.parametrize("kind", ["script", "trace"])
def test_torchscript_encoder_stages_give_patch_graphs(unet, kind, tmp_path):
    folder, model = unet
    result = run_cli([folder / f"{kind}.pt", "--layers", "s0,gn", "--name", "ts", "-o", tmp_path, "--probe-size", "16",
                      "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output[result.output.index("{"):])
    assert set(info["checks"]) == {"full", "forward", "vjp", "full_centre", "vjp_full"}
    assert max(info["checks"].values()) < 1e-4
    spec = load_model_spec(tmp_path / "ts.json")
    validate_with_runtime(spec)
    # fields measured with the norm operators dropped (the hand-made group norm stays: global)
    assert [(l.channels, l.stride, l.receptive_field) for l in spec.layers] == [(4, 1, 3), (6, 2, None)]
    assert spec.patch_size == 5 and spec.global_normalization  # 2 lcm(1, 2) + 1; instance norms
    x = torch.randn(2, 1, 13, 9, 11)  # odd sizes: the whole network would fail, its encoder does not
    with torch.no_grad():
        ref = encoder_stages(model, x)
    for a, b in zip(session(spec.path).run(None, {"image": x.numpy()}), ref):
        assert a.shape == tuple(b.shape) and rel(a, b.numpy()) < 1e-4
    g = torch.Generator().manual_seed(2)
    for size in (5, 9):
        p = torch.randn(3, 1, size, size, size, generator=g)
        cots = [torch.randn(3, c, generator=g) for c in (4, 6)]

        def centre_torch(q, net=model, ks=spec.patch_centres(size)):
            return tuple(f[:, :, k, k, k] for f, k in zip(encoder_stages(net, q), ks))

        with torch.no_grad():
            want = centre_torch(p)
        for c, w in zip(session(spec.patch_path).run(None, {"patches": p.numpy()}), want):
            assert rel(c, w.numpy()) < 1e-4
        feeds = {"patches": p.numpy(), **{f"cotangent_{i}": c.numpy() for i, c in enumerate(cots)}}
        grad = session(spec.vjp_path).run(None, feeds)[0]
        assert rel(grad, vjp_reference(centre_torch, p, cots).numpy()) < 1e-4
    # the VJP against central finite differences of the float64 network, along a random direction
    model64 = copy.deepcopy(model).double()
    v, eps = torch.randn(p.shape, generator=g, dtype=torch.float64), 1e-4

    def objective(q):
        with torch.no_grad():
            return float(sum((f * c.double()).sum() for f, c in zip(centre_torch(q, model64), cots)))

    fd = (objective(p.double() + eps * v) - objective(p.double() - eps * v)) / (2 * eps)
    assert abs(float((torch.from_numpy(grad).double() * v).sum()) - fd) < 1e-4 * max(abs(fd), 1.0)
    # the full-volume VJP: against autograd, and against finite differences of the float64 encoder
    assert full_vjp_against_torch(spec, lambda q: encoder_stages(model, q), (2, 1, 13, 9, 11)) < 1e-4
    x = torch.randn(1, 1, 11, 14, 9, generator=g)
    cots = [torch.randn(m.shape, generator=g) for m in encoder_stages(model, x)]
    grad = session(spec.vjp_full_path).run(None, {"image": x.numpy(),
                                                  **{f"cotangent_{i}": c.numpy() for i, c in enumerate(cots)}})[0]

    def whole(q):
        with torch.no_grad():
            return float(sum((f * c.double()).sum() for f, c in zip(encoder_stages(model64, q), cots)))

    v = torch.randn(x.shape, generator=g, dtype=torch.float64)
    fd = (whole(x.double() + eps * v) - whole(x.double() - eps * v)) / (2 * eps)
    assert abs(float((torch.from_numpy(grad).double() * v).sum()) - fd) < 1e-4 * max(abs(fd), 1.0)


def test_full_vjp_export_with_a_size_multiple(tmp_path):
    """export_full_vjp with size_multiple 4 (derived image Dims 4 d) on a network of strides 2 and
    4 whose cotangents are then n / 2 and n / 4: ONNX Runtime against autograd at sizes and
    batches other than the traced example's."""
    torch.manual_seed(0)
    conv1 = torch.nn.Conv3d(2, 3, 3, stride=2, padding=1)
    conv2 = torch.nn.Conv3d(3, 5, 3, stride=2, padding=1)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = conv1, conv2

        def forward(self, x):
            a = torch.tanh(self.conv1(x))
            return a, self.conv2(a)

    net = Net().eval()
    example = build.full_vjp_example(2, 3, 9, size_multiple=4)
    assert list(example.shape) == [2, 2, 12, 16, 20]
    model = build.export_full_vjp(net, tmp_path / "m.onnx", example, [3, 5], [2, 4], size_multiple=4)
    image_dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert image_dims == ["B", 2, "4*d0", "4*d1", "4*d2"]
    err = build.check_full_vjp(net, tmp_path / "m.onnx", [(3, 2, 8, 28, 12), (1, 2, 16, 4, 24)])
    assert err < 1e-4
    with pytest.raises(ValueError, match="multiples of size_multiple=4"):
        build.export_full_vjp(net, tmp_path / "x.onnx", torch.randn(2, 2, 12, 14, 16), [3, 5], [2, 4], size_multiple=4)
    with pytest.raises(RuntimeError, match="not 4 channels at stride 2"):
        build.export_full_vjp(net, tmp_path / "x.onnx", example, [4, 5], [2, 4], size_multiple=4)


FROZEN_PY = '''
import torch
import torch.nn.functional as F

class Frozen(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 4, 3, stride=2, padding=1)

    def forward(self, x):  # int(): a trace keeps these sizes as constants
        return (F.interpolate(self.conv(x), size=[int(n) for n in x.shape[2:]], mode="trilinear"),)

model = Frozen()
'''


def test_torchscript_networks_that_cannot_give_patch_graphs_are_refused(unet, tmp_path):
    folder, _ = unet
    # the whole segmentation network: its decoder needs even sizes
    with pytest.raises(ConfigError, match=r"fails on a \[2, 1, 15, 15, 15\] input.*select encoder layers") as info:
        build_model(folder / "trace.pt", tmp_path, "x", ["0"], probe_size=16)
    assert "\n" not in str(info.value)
    (tmp_path / "frozen.py").write_text(FROZEN_PY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(load_user_network(tmp_path / "frozen.py"), torch.randn(1, 1, 16, 16, 16)).save(
            str(tmp_path / "frozen.pt"))
    with pytest.raises(ConfigError, match=r"gives \[2, 4, 16, 16, 16\], not \[2, 4, 15, 15, 15\]: either a decoder .* "
                                          "or the network fixes the batch or input size.*torch.jit.script") as info:
        build_model(tmp_path / "frozen.pt", tmp_path, "x", ["0"], probe_size=16)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="'nope' is neither an output index nor a submodule"):
        build_model(folder / "script.pt", tmp_path, "x", ["s0", "nope"], probe_size=16)
    assert not list(tmp_path.glob("x*"))


def test_invalid_requests_are_config_errors(tmp_path):
    (tmp_path / "net.py").write_text(NET_PY)
    cases = [
        (dict(layers=["0", "1"], patch_size=11), r"patch_size=11 .*strides \[1, 4\].*use one of 8, 9, 16, 17"),
        (dict(layers=["0", "nope"]), "'nope' is neither an output index nor a submodule"),
        (dict(layers=["0"], submodule="encoder"), "submodule='encoder': the network has no 'encoder'"),
        (dict(layers=["0"], entry="Nothing"), "defines no Nothing"),
        (dict(layers=["0", "1"], patch_layers=[1, 0]), "patch_layers=\\[1, 0\\] must be increasing"),
        (dict(layers=[]), "layers is empty"),
    ]
    for kwargs, needle in cases:
        with pytest.raises(ConfigError, match=needle) as info:
            build_model(tmp_path / "net.py", tmp_path / "o", "x", probe_size=16, **kwargs)
        assert "\n" not in str(info.value)
    (tmp_path / "arch.json").write_text(json.dumps(ARCH))
    with pytest.raises(ConfigError, match="without weights"):
        build_model(tmp_path / "arch.json", tmp_path / "o", "x", ["0"])
    torch.save({"something": torch.zeros(2)}, tmp_path / "bad.pth")
    pytest.importorskip("dynamic_network_architectures", reason="pip install dynamic-network-architectures")
    with pytest.raises(ConfigError, match="do not fit the architecture"):
        build_model(tmp_path / "arch.json", tmp_path / "o", "x", ["0"], weights=tmp_path / "bad.pth")
    result = run_cli([tmp_path / "missing.pt", "--layers", "0", "--name", "x", "-o", tmp_path / "o"])
    assert result.exit_code != 0 and "does not exist" in str(result.exception)
