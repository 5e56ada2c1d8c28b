"""Jacobian-mode patch graphs (patch_file / vjp_file of the built-in models): the patch forward
against the full graph at the centre voxel, the VJP against finite differences and stored torch
autograd, and the manifest fields. Runs with ONNX Runtime alone; the torch checks skip without it."""

import json
import shutil

import numpy as np
import pytest
from scipy import ndimage

from fastimpact.errors import ConfigError
from fastimpact.onnx_models import load_model_spec, valid_patch_sizes, validate_with_runtime
from fastimpact.onnx_models.mind import VARIANTS, mind_ssc

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is part of the test extra")

MODELS = ("mind-r1d2", "mind-r2d1", "deepbet")


def session(path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def sessions():
    """name -> (full, patch, vjp) sessions."""
    out = {}
    for name in MODELS:
        spec = load_model_spec(name)
        out[name] = (session(spec.path), session(spec.patch_path), session(spec.vjp_path))
    return out


def smooth_patches(n, size, seed):
    """z-scored smooth random patches [n, 1, size, size, size] (float32)."""
    rng = np.random.default_rng(seed)
    vol = ndimage.gaussian_filter(rng.normal(size=(n, size + 8, size + 8, size + 8)), (0, 1.5, 1.5, 1.5))
    vol = vol[:, 4:4 + size, 4:4 + size, 4:4 + size]
    vol = (vol - vol.mean()) / vol.std()
    return vol[:, None].astype(np.float32)


def vjp(sess, patches, cotangents):
    return sess.run(None, {"patches": patches, **{f"cotangent_{k}": c for k, c in enumerate(cotangents)}})[0]


def cotangents_for(spec, n, seed):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(n, spec.layers[i].channels)).astype(np.float32) for i in spec.patch_layers]


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


# ---------------------------------------------------------------------------- manifests, contract

@pytest.mark.parametrize("name", MODELS)
def test_builtin_manifests_declare_the_patch_graphs(name):
    spec = load_model_spec(name)
    validate_with_runtime(spec)  # names, ranks, channels of both patch graphs
    assert spec.patch_path.is_file() and spec.vjp_path.is_file() and not spec.patch_size_fixed
    assert spec.patch_path.stat().st_size < 1_000_000 and spec.vjp_path.stat().st_size < 1_000_000
    if name == "deepbet":
        assert spec.patch_layers == (0, 1, 2) and spec.patch_size == 9
        assert spec.patch_centres() == (2, 1, 1) and spec.patch_centres(17) == (4, 2, 2)
    else:
        assert spec.patch_layers == (0,) and spec.patch_size == 7 == spec.receptive_field
        assert spec.patch_centres() == (3,) and spec.patch_centres(4) == (2,)
    d = spec.to_dict()  # absolute graph paths: a copied manifest still finds them
    assert d["patch_file"] == str(spec.patch_path) and d["patch_layers"] == list(spec.patch_layers)


def test_patch_size_rule_and_its_error():
    spec = load_model_spec("deepbet")
    assert valid_patch_sizes([2, 4, 4], 20) == [8, 9, 16, 17]
    assert valid_patch_sizes([1], 5) == [2, 3, 4, 5]
    for bad in (7, 10, 11, 15):
        with pytest.raises(ConfigError, match=r"patch_size=\d+ .*s0 \(stride 2\)|patch_size=\d+ .*s1 \(stride 4\)") as info:
            spec.patch_centres(bad)
        assert "8, 9, 16, 17, 24, 25" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="ImpactPatchSize=11"):
        spec.patch_centres(11, parameter="ImpactPatchSize")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ConfigError, match="positive integer"):
            spec.patch_centres(bad)


def write_variant(tmp_path, **changes):
    """A copy of deepbet's manifest with its graphs beside it, changed as given (None removes)."""
    src = load_model_spec("deepbet")
    for p in (src.path, src.patch_path, src.vjp_path):
        if not (tmp_path / p.name).exists():
            (tmp_path / p.name).symlink_to(p)
    data = json.loads(src.manifest_path.read_text())
    for k, v in changes.items():
        if v is None:
            data.pop(k, None)
        else:
            data[k] = v
    (tmp_path / "m.json").write_text(json.dumps(data))
    return tmp_path / "m.json"


def test_manifest_patch_fields_are_validated(tmp_path):
    spec = load_model_spec(write_variant(tmp_path))
    assert spec.patch_path == (tmp_path / "deepbet_patch.onnx").resolve() and spec.patch_layers == (0, 1, 2)
    # a manifest without patch fields stays valid and has no patch mode
    plain = load_model_spec(write_variant(tmp_path, patch_file=None, vjp_file=None, patch_layers=None,
                                          patch_size=None, patch_size_fixed=None))
    assert plain.patch_path is None and plain.vjp_path is None and plain.patch_layers == ()
    with pytest.raises(ConfigError, match="no patch graphs"):
        plain.patch_centres(9)
    # patch-only (no VJP) is valid: forward features of patches
    assert load_model_spec(write_variant(tmp_path, vjp_file=None)).vjp_path is None
    bad = {
        "patch_size 0": (dict(patch_size=0), "patch_size=0 must be a positive integer"),
        "no patch_size": (dict(patch_size=None), "patch_size=None must be a positive integer"),
        "layer range": (dict(patch_layers=[0, 6]), r"patch_layers=\[0, 6\] must be .* 0..5"),
        "layer order": (dict(patch_layers=[1, 0]), "increasing"),
        "layers empty": (dict(patch_layers=[]), "non-empty"),
        "fixed": (dict(patch_size_fixed="yes"), "patch_size_fixed='yes' must be true or false"),
        "graph name": (dict(vjp_file=3), "vjp_file=3 must be the file name of an ONNX graph"),
        "orphans": (dict(patch_file=None), "patch_layers, patch_size, patch_size_fixed given without patch_file"),
        "vjp orphan": (dict(patch_file=None, patch_layers=None, patch_size=None, patch_size_fixed=None),
                       "vjp_file given without patch_file"),
    }
    for case, (changes, needle) in bad.items():
        with pytest.raises(ConfigError, match=needle) as info:
            load_model_spec(write_variant(tmp_path, **changes))
        assert "\n" not in str(info.value), case
    # what only Jacobian mode needs is checked when it is used (static mode keeps working):
    # the default patch size and the graph files, by patch_centres and validate_with_runtime
    late = {
        "patch_size 11": (dict(patch_size=11), r"patch_size=11 for model 'deepbet' puts the centre voxel of s0 "
                                               r"\(stride 2\), s1 \(stride 4\), s2 \(stride 4\) off .*use one of 8, 9, 16, 17"),
        "missing vjp": (dict(vjp_file="nope.onnx"), "vjp_file .*nope.onnx', which does not exist"),
        "missing patch": (dict(patch_file="gone.onnx"), "patch_file .*gone.onnx', which does not exist"),
    }
    for case, (changes, needle) in late.items():
        spec = load_model_spec(write_variant(tmp_path, **changes))
        for check in (lambda: spec.patch_centres(need_vjp=True), lambda: validate_with_runtime(spec)):
            with pytest.raises(ConfigError, match=needle) as info:
                check()
            assert "\n" not in str(info.value), case
    no_vjp = load_model_spec(write_variant(tmp_path, vjp_file=None))
    assert no_vjp.patch_centres() == (2, 1, 1)
    with pytest.raises(ConfigError, match="no VJP graph"):
        no_vjp.patch_centres(need_vjp=True)
    fixed = load_model_spec(write_variant(tmp_path, patch_size_fixed=True))
    assert fixed.patch_centres(9) == (2, 1, 1)
    with pytest.raises(ConfigError, match="exported for patch size 9 only"):
        fixed.patch_centres(17)


def test_runtime_validation_catches_swapped_or_mismatched_graphs(tmp_path):
    swapped = load_model_spec(write_variant(tmp_path, patch_file="deepbet_vjp.onnx"))
    with pytest.raises(ConfigError, match="one input and one output per patch layer"):
        validate_with_runtime(swapped)
    swapped = load_model_spec(write_variant(tmp_path, vjp_file="deepbet_patch.onnx"))
    with pytest.raises(ConfigError, match=r"the contract is \['patches', 'cotangent_0', 'cotangent_1', "):
        validate_with_runtime(swapped)
    fewer = load_model_spec(write_variant(tmp_path, patch_layers=[0, 1]))
    with pytest.raises(ConfigError, match="3 output"):
        validate_with_runtime(fewer)
    wrong_channels = load_model_spec(write_variant(tmp_path, patch_layers=[0, 1, 3], patch_size=16))
    with pytest.raises(ConfigError, match=r"expected \[B, 32\]"):
        validate_with_runtime(wrong_channels)
    shutil.copy(load_model_spec("mind").vjp_path, tmp_path / "other.onnx")  # a 1-layer VJP for a 3-layer model
    with pytest.raises(ConfigError, match="cotangent_0'\\] and gives"):
        validate_with_runtime(load_model_spec(write_variant(tmp_path, vjp_file="other.onnx")))


# ---------------------------------------------------------------------------- MIND

@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("size", [3, 7, 8, 11])
def test_mind_patch_forward_is_the_full_graph_at_the_centre(sessions, name, size):
    """Sizes below the receptive field (3) use edge replication, as the full graph does."""
    full, patch, _ = sessions[name]
    x = smooth_patches(5, size, seed=size)
    centre = size // 2
    ref = full.run(None, {"image": x})[0][:, :, centre, centre, centre]
    got = patch.run(None, {"patches": x})[0]
    assert got.shape == (5, 12)
    np.testing.assert_allclose(got, ref, atol=2e-6)
    r, d = VARIANTS[name]
    np.testing.assert_allclose(got[0], mind_ssc(x[0, 0], r, d)[:, centre, centre, centre], atol=2e-6)
    assert np.ptp(got, axis=0).max() > 0.1  # the patches differ, so the comparison means something


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("size", [5, 7])
def test_mind_vjp_equals_float64_finite_differences(sessions, name, size):
    """Directional derivatives of the float64 NumPy reference (central differences) against the
    float32 VJP graph; a VJP taken with the wrong cotangent would not pass."""
    r, d = VARIANTS[name]
    spec = load_model_spec(name)
    x = smooth_patches(3, size, seed=10 + size)
    u = cotangents_for(spec, 3, seed=size)
    grad = vjp(sessions[name][2], x, u).astype(np.float64)
    wrong = vjp(sessions[name][2], x, [u[0][:, ::-1].copy()]).astype(np.float64)  # channels shuffled
    c = size // 2

    def f(patch, i):
        return float(mind_ssc(patch, r, d)[:, c, c, c] @ u[0][i])

    rng = np.random.default_rng(size)
    h = 1e-5
    for i in range(3):
        for _ in range(3):
            v = rng.normal(size=(size,) * 3)
            xi = x[i, 0].astype(np.float64)
            fd = (f(xi + h * v, i) - f(xi - h * v, i)) / (2 * h)
            an = float((grad[i, 0] * v).sum())
            assert abs(fd - an) <= 1e-4 * abs(fd) + 1e-5, (i, fd, an)
            assert abs(fd - float((wrong[i, 0] * v).sum())) > 1e-3 * abs(fd)
    # a voxel outside the receptive field of the centre has no influence
    if size > 2 * (r + d) + 1:
        assert np.abs(grad[:, 0, 0]).max() == 0.0


def test_vjp_is_linear_in_the_cotangent_and_batch_items_are_independent(sessions):
    for name in ("mind-r1d2", "deepbet"):
        spec = load_model_spec(name)
        sess = sessions[name][2]
        x = smooth_patches(4, spec.patch_size, seed=3)
        u, w = cotangents_for(spec, 4, seed=1), cotangents_for(spec, 4, seed=2)
        gu, gw = vjp(sess, x, u), vjp(sess, x, w)
        mixed = vjp(sess, x, [a + 2 * b for a, b in zip(u, w)])
        assert rel(mixed, gu + 2 * gw) < 1e-5, name
        assert np.abs(vjp(sess, x, [0 * a for a in u])).max() == 0.0, name
        one = vjp(sess, x[2:3], [a[2:3] for a in u])
        assert rel(one, gu[2:3]) < 1e-5, name
        assert rel(gu[:1], gu[1:2]) > 1e-2, name  # items differ: the check above can fail


# ---------------------------------------------------------------------------- deepbet

@pytest.mark.parametrize("size", [8, 9, 17])
def test_deepbet_patch_forward_is_deepbet_onnx_at_the_centre(sessions, size):
    spec = load_model_spec("deepbet")
    full, patch, _ = sessions["deepbet"]
    x = smooth_patches(3, size, seed=size)
    outs = full.run(None, {"image": x})
    got = patch.run(None, {"patches": x})
    assert [o.name for o in patch.get_outputs()] == ["s0", "s1", "s2"]
    for i, g, c in zip(spec.patch_layers, got, spec.patch_centres(size)):
        ref = outs[i][:, :, c, c, c]
        assert g.shape == ref.shape == (3, 16)
        assert rel(g, ref) < 1e-5, (size, i)
        assert np.abs(ref).max() > 0.1


@pytest.fixture(scope="module")
def stored():
    spec = load_model_spec("deepbet")
    with np.load(spec.path.with_name("deepbet_patch_check.npz")) as f:
        return {k: f[k] for k in f.files}


@pytest.mark.parametrize("size", [9, 17])
def test_deepbet_patch_graphs_reproduce_stored_torch_autograd(sessions, stored, size):
    _, patch, vjp_sess = sessions["deepbet"]
    x = stored[f"patches_{size}"]
    cots = [stored[f"cotangent_{k}_{size}"] for k in range(3)]
    for k, out in enumerate(patch.run(None, {"patches": x})):
        assert rel(out, stored[f"centre_{k}_{size}"]) < 1e-5
    grad = vjp(vjp_sess, x, cots)
    ref = stored[f"grad_{size}"]
    assert grad.shape == ref.shape == x.shape and np.abs(ref).max() > 0
    assert rel(grad, ref) < 1e-4


@pytest.mark.parametrize("size", [9, 17])
def test_deepbet_vjp_equals_finite_differences_of_the_patch_graph(sessions, stored, size):
    """float32 graph, so central differences with h = 1e-3 along random directions; ReLU and max
    pool kinks make a few of them off by a few %, the bulk agrees to ~0.2 % of their RMS. The same
    statistics for the VJP of a shuffled cotangent are far off (the test can fail)."""
    _, patch, vjp_sess = sessions["deepbet"]
    x = stored[f"patches_{size}"]
    cots = [stored[f"cotangent_{k}_{size}"] for k in range(3)]
    grad = vjp(vjp_sess, x, cots).astype(np.float64)
    wrong = vjp(vjp_sess, x, [cots[1], cots[0], cots[2]]).astype(np.float64)

    def f(p):
        return sum((o.astype(np.float64) * c).sum(axis=1) for o, c in zip(patch.run(None, {"patches": p}), cots))

    rng = np.random.default_rng(size)
    h = 1e-3
    fd, an, bad = [], [], []
    for _ in range(6):
        v = rng.normal(size=x.shape).astype(np.float32)
        fd.append((f(x + h * v) - f(x - h * v)) / (2 * h))
        an.append((grad * v).reshape(len(x), -1).sum(axis=1))
        bad.append((wrong * v).reshape(len(x), -1).sum(axis=1))
    fd, an, bad = map(np.concatenate, (fd, an, bad))
    scale = np.sqrt(np.mean(an ** 2))
    err = np.abs(fd - an) / scale
    assert np.median(err) < 0.01 and err.max() < 0.1, (np.median(err), err.max())
    assert np.median(np.abs(fd - bad) / scale) > 0.2


# ---------------------------------------------------------------------------- torch (optional)

def test_torch_mind_matches_the_numpy_reference():
    torch = pytest.importorskip("torch", reason="torch (the models extra) builds the patch graphs")
    from fastimpact.onnx_models.mind import mind_centre_torch, mind_ssc_torch

    rng = np.random.default_rng(0)
    for r, d in VARIANTS.values():
        img = rng.normal(size=(11, 9, 13))
        x = torch.from_numpy(img)[None, None]
        np.testing.assert_allclose(mind_ssc_torch(x, r, d)[0].numpy(), mind_ssc(img, r, d), atol=1e-12)
        for shape in [(1, 1, 1), (3, 3, 3), (7, 7, 7), (8, 8, 8), (5, 8, 11)]:
            p = torch.from_numpy(rng.normal(size=(2, 1, *shape)))
            centre = [n // 2 for n in shape]
            full = mind_ssc_torch(p, r, d)[:, :, centre[0], centre[1], centre[2]]
            np.testing.assert_allclose(mind_centre_torch(p, r, d).numpy(), full.numpy(), atol=1e-12)


def test_rebuilt_deepbet_patch_module_matches_the_stored_fixture(stored):
    torch = pytest.importorskip("torch", reason="torch (the models extra) builds the patch graphs")
    from importlib import metadata

    from fastimpact.onnx_models import build, deepbet

    try:
        metadata.version("deepbet")
    except metadata.PackageNotFoundError:
        pytest.skip("the deepbet wheel holds the weights: pip install --no-deps deepbet==1.0.2")
    centre = deepbet.patch_module(deepbet.load_encoder())
    for size in (9, 17):
        x = torch.from_numpy(stored[f"patches_{size}"])
        cots = [torch.from_numpy(stored[f"cotangent_{k}_{size}"]) for k in range(3)]
        with torch.no_grad():
            for k, out in enumerate(centre(x)):
                assert rel(out.numpy(), stored[f"centre_{k}_{size}"]) < 1e-6
        assert rel(build.vjp_reference(centre, x, cots).numpy(), stored[f"grad_{size}"]) < 1e-6


def test_shipped_mind_patch_graphs_equal_a_fresh_build(tmp_path, sessions):
    pytest.importorskip("torch", reason="torch (the models extra) builds the patch graphs")
    pytest.importorskip("onnxscript", reason="onnxscript (the models extra) exports the patch graphs")
    from fastimpact.onnx_models.mind import build_patch_graphs

    r, d = VARIANTS["mind-r1d2"]
    info = build_patch_graphs("fresh", r, d, tmp_path)  # checks ONNX Runtime against torch on 4 sizes too
    assert max(info["errors"].values()) < 1e-4
    _, patch, vjp_sess = sessions["mind-r1d2"]
    x = smooth_patches(4, 9, seed=5)
    u = cotangents_for(load_model_spec("mind-r1d2"), 4, seed=6)
    np.testing.assert_array_equal(session(tmp_path / "fresh_patch.onnx").run(None, {"patches": x})[0],
                                  patch.run(None, {"patches": x})[0])
    np.testing.assert_allclose(vjp(session(tmp_path / "fresh_vjp.onnx"), x, u), vjp(vjp_sess, x, u), atol=1e-6)
