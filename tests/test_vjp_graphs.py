"""Jacobian-mode patch graphs (patch_file / vjp_file of the built-in models): the patch forward
against the full graph at the centre voxel, the VJP against finite differences and stored torch
autograd, and the manifest fields. Dense Jacobian mode's full-volume VJP graphs (vjp_full_file):
against finite differences of the full graph (and, MIND, of the float64 NumPy reference and the
sum of the patch VJPs), linearity, sizes, the manifest fields. Runs with ONNX Runtime alone; the
torch checks skip without it."""

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
    for p in (src.path, src.patch_path, src.vjp_path, src.vjp_full_path):
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


# ---------------------------------------------------------------------------- full-volume VJP

FULL_LAYERS = {"mind-r1d2": (0,), "mind-r2d1": (0,), "deepbet": (0, 1, 2)}


@pytest.fixture(scope="module")
def full_sessions():
    """name -> (full, vjp_full) sessions."""
    return {name: (session(load_model_spec(name).path), session(load_model_spec(name).vjp_full_path))
            for name in MODELS}


def smooth_volume(shape, seed, sigma=1.5):
    """z-scored smooth random images of ``shape`` [B, 1, X, Y, Z] (float32)."""
    rng = np.random.default_rng(seed)
    b, _, *sizes = shape
    vol = ndimage.gaussian_filter(rng.normal(size=(b, *[n + 8 for n in sizes])), (0, sigma, sigma, sigma))
    vol = vol[:, 4:-4, 4:-4, 4:-4]
    return ((vol - vol.mean()) / vol.std())[:, None].astype(np.float32)


def full_vjp(sess, image, cotangents):
    return sess.run(None, {"image": image, **{f"cotangent_{k}": c for k, c in enumerate(cotangents)}})[0]


def full_cotangents(spec, maps, seed):
    """Random cotangents shaped like the full graph's outputs ``maps`` of the VJP layers."""
    rng = np.random.default_rng(seed)
    return [rng.normal(size=maps[i].shape).astype(np.float32) for i in spec.vjp_full_layers]


@pytest.mark.parametrize("name", MODELS)
def test_builtin_manifests_declare_the_full_vjp_graph(name):
    spec = load_model_spec(name)
    validate_with_runtime(spec)  # names, ranks and channels of the full VJP graph too
    assert spec.vjp_full_layers == FULL_LAYERS[name] and spec.vjp_full_path.name == f"{name}_vjp_full.onnx"
    assert spec.vjp_full_path.stat().st_size < 1_000_000
    assert spec.vjp_full_slots() == tuple(range(len(FULL_LAYERS[name])))
    d = spec.to_dict()  # absolute path, as the patch graphs
    assert d["vjp_full_file"] == str(spec.vjp_full_path) and d["vjp_full_layers"] == list(FULL_LAYERS[name])
    if name == "deepbet":
        assert spec.vjp_full_slots([2, 0]) == (2, 0)
        with pytest.raises(ConfigError, match=r"ImpactLayers=\[0, 3\] for model 'deepbet': layer\(s\) \[3\] have no "
                                              r"cotangent .* takes layers 0 \(s0\), 1 \(s1\), 2 \(s2\)") as info:
            spec.vjp_full_slots([0, 3], parameter="ImpactLayers")
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["mind-r1d2", "deepbet"])
def test_full_vjp_equals_finite_differences_of_the_full_graph(full_sessions, name):
    """Central differences (h = 3e-4, float64 sums of the float32 graph) along random directions,
    two volume sizes (odd: deepbet's cotangents are ceil(n / stride)), batch 2. Kinks (ReLU, max
    pool; MIND's channel minimum) and float32 rounding leave a few 1e-3 of the directional
    derivatives' RMS (measured medians: MIND 6e-3, deepbet 2.5e-3; MIND's exact check is the
    float64 one below); the VJP of channel-reversed cotangents is off by O(1) (the test can fail)."""
    spec = load_model_spec(name)
    full, vjp_sess = full_sessions[name]
    sigma = 1.0 if name.startswith("mind") else 1.5  # MIND is very nonlinear on smoother images
    shapes = [(2, 1, 14, 11, 12), (2, 1, 19, 16, 13)] if name.startswith("mind") else [(2, 1, 21, 18, 23),
                                                                                        (2, 1, 30, 27, 25)]
    h = 3e-4
    err, bad = [], []
    for shape in shapes:
        x = smooth_volume(shape, seed=sum(shape), sigma=sigma)
        maps = full.run(None, {"image": x})
        cots = full_cotangents(spec, maps, seed=shape[2])
        for i, c in zip(spec.vjp_full_layers, cots):  # the graph's own rounding of n / stride
            assert c.shape[2:] == tuple(-(-n // spec.layers[i].stride) for n in shape[2:])
        grad = full_vjp(vjp_sess, x, cots).astype(np.float64)
        assert grad.shape == x.shape
        wrong = [c[:, ::-1].copy() for c in cots]
        grad_wrong = full_vjp(vjp_sess, x, wrong).astype(np.float64)

        def f(image):
            out = full.run(None, {"image": image})
            return sum((out[i].astype(np.float64) * c).reshape(len(image), -1).sum(axis=1)
                       for i, c in zip(spec.vjp_full_layers, cots))

        rng = np.random.default_rng(shape[3])
        fd, an, an_wrong = [], [], []
        for _ in range(4):
            v = rng.normal(size=x.shape).astype(np.float32)
            fd.append((f(x + h * v) - f(x - h * v)) / (2 * h))
            an.append((grad * v).reshape(len(x), -1).sum(axis=1))
            an_wrong.append((grad_wrong * v).reshape(len(x), -1).sum(axis=1))
        fd, an, an_wrong = map(np.concatenate, (fd, an, an_wrong))
        scale = np.sqrt(np.mean(an ** 2))
        err.append(np.abs(fd - an) / scale)
        bad.append(np.abs(fd - an_wrong) / scale)
    err, bad = np.concatenate(err), np.concatenate(bad)
    median, worst = (3e-2, 0.25) if name.startswith("mind") else (1.5e-2, 0.1)
    assert np.median(err) < median and err.max() < worst, (np.median(err), err.max())
    assert np.median(bad) > 0.3, np.median(bad)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_mind_full_vjp_equals_float64_finite_differences(full_sessions, name):
    """The float64 NumPy reference with h = 1e-6: the graph's VJP to float32 precision (a
    direction that crosses a kink of the channel minimum within h may be off more: median)."""
    r, d = VARIANTS[name]
    x = smooth_volume((2, 1, 12, 9, 10), seed=4, sigma=1.0)
    u = np.random.default_rng(5).normal(size=(2, 12, 12, 9, 10)).astype(np.float32)
    grad = full_vjp(full_sessions[name][1], x, [u]).astype(np.float64)

    def f(image, i):
        return float((mind_ssc(image, r, d) * u[i]).sum())

    rng = np.random.default_rng(6)
    h, errors = 1e-6, []
    for i in range(2):
        xi = x[i, 0].astype(np.float64)
        for _ in range(3):
            v = rng.normal(size=xi.shape)
            fd = (f(xi + h * v, i) - f(xi - h * v, i)) / (2 * h)
            errors.append(abs(fd - float((grad[i, 0] * v).sum())) / abs(fd))
    assert np.median(errors) < 1e-5 and max(errors) < 1e-2, errors


def test_full_vjp_is_linear_per_layer_and_batch_items_are_independent(full_sessions):
    for name in ("mind-r1d2", "deepbet"):
        spec = load_model_spec(name)
        full, sess = full_sessions[name]
        x = smooth_volume((3, 1, 17, 15, 18), seed=8)
        maps = full.run(None, {"image": x})
        u, w = full_cotangents(spec, maps, seed=1), full_cotangents(spec, maps, seed=2)
        gu, gw = full_vjp(sess, x, u), full_vjp(sess, x, w)
        assert rel(full_vjp(sess, x, [a + 2 * b for a, b in zip(u, w)]), gu + 2 * gw) < 1e-5, name
        assert np.abs(full_vjp(sess, x, [0 * a for a in u])).max() == 0.0, name
        # each layer's cotangent contributes its own part (a layer a run does not use gets zeros)
        parts = [full_vjp(sess, x, [a if j == k else 0 * a for j, a in enumerate(u)]) for k in range(len(u))]
        assert rel(sum(parts), gu) < 1e-5 and min(np.abs(p).max() for p in parts) > 1e-3 * np.abs(gu).max(), name
        one = full_vjp(sess, x[1:2], [a[1:2] for a in u])
        assert one.shape == (1, 1, 17, 15, 18) and rel(one, gu[1:2]) < 1e-5, name
        assert rel(gu[:1], gu[1:2]) > 1e-2, name  # items differ: the check above can fail


def test_mind_full_vjp_is_the_sum_of_the_patch_vjps(full_sessions, sessions):
    """MIND is local: its full-volume VJP is the sum, over all voxels, of the patch VJP of the 7^3
    patch around the voxel (edge-replicated at the border, as the full graph) with that voxel's
    cotangent, scattered back to the voxels the patch was cut from."""
    _, full_sess = full_sessions["mind-r1d2"]
    patch_vjp = sessions["mind-r1d2"][2]
    X, Y, Z = 9, 8, 10
    rng = np.random.default_rng(11)
    image = smooth_volume((1, 1, X, Y, Z), seed=11, sigma=1.0)
    u = rng.normal(size=(1, 12, X, Y, Z)).astype(np.float32)
    P = 7
    centre = np.stack(np.meshgrid(np.arange(X), np.arange(Y), np.arange(Z), indexing="ij"), -1).reshape(-1, 3)
    idx = [np.clip(centre[:, a, None] + np.arange(P) - P // 2, 0, n - 1) for a, n in enumerate((X, Y, Z))]
    ix, iy, iz = idx[0][:, :, None, None], idx[1][:, None, :, None], idx[2][:, None, None, :]
    patches = image[0, 0][ix, iy, iz][:, None]
    grads = vjp(patch_vjp, patches, [np.ascontiguousarray(u[0][:, centre[:, 0], centre[:, 1], centre[:, 2]].T)])
    total = np.zeros((X, Y, Z))
    g = grads[:, 0]
    np.add.at(total, tuple(np.broadcast_to(i, g.shape) for i in (ix, iy, iz)), g)
    got = full_vjp(full_sess, image, [u])[0, 0]
    assert rel(got, total) < 1e-5 and np.abs(total).max() > 0.1


def test_manifest_full_vjp_fields_are_validated(tmp_path):
    spec = load_model_spec(write_variant(tmp_path))
    assert spec.vjp_full_path == (tmp_path / "deepbet_vjp_full.onnx").resolve() and spec.vjp_full_layers == (0, 1, 2)
    # without the fields: static and patch modes stay available, dense mode says what is missing
    plain = load_model_spec(write_variant(tmp_path, vjp_full_file=None, vjp_full_layers=None))
    assert plain.vjp_full_path is None and plain.vjp_full_layers == () and "vjp_full_file" not in plain.to_dict()
    validate_with_runtime(plain)
    with pytest.raises(ConfigError, match="model 'deepbet' has no full-volume VJP graph .* dense Jacobian mode"):
        plain.vjp_full_slots()
    # independent of the patch graphs
    alone = load_model_spec(write_variant(tmp_path, patch_file=None, vjp_file=None, patch_layers=None,
                                          patch_size=None, patch_size_fixed=None))
    assert alone.patch_path is None and alone.vjp_full_slots([1]) == (1,)
    bad = {
        "orphan layers": (dict(vjp_full_file=None), "vjp_full_layers given without vjp_full_file"),
        "no layers": (dict(vjp_full_layers=None), r"vjp_full_layers=None must be a non-empty increasing list"),
        "range": (dict(vjp_full_layers=[0, 6]), r"vjp_full_layers=\[0, 6\] must be .* in 0..5"),
        "order": (dict(vjp_full_layers=[2, 1]), r"vjp_full_layers=\[2, 1\] must be a non-empty increasing"),
        "bool": (dict(vjp_full_layers=[True]), r"vjp_full_layers=\[True\]"),
        "empty": (dict(vjp_full_layers=[]), r"vjp_full_layers=\[\] must be a non-empty"),
        "name": (dict(vjp_full_file=3), "vjp_full_file=3 must be the file name of an ONNX graph"),
    }
    for case, (changes, needle) in bad.items():
        with pytest.raises(ConfigError, match=needle) as info:
            load_model_spec(write_variant(tmp_path, **changes))
        assert "\n" not in str(info.value), case
    # a missing file is reported when dense mode (or models show) uses it
    missing = load_model_spec(write_variant(tmp_path, vjp_full_file="nope.onnx"))
    for check in (missing.vjp_full_slots, lambda: validate_with_runtime(missing)):
        with pytest.raises(ConfigError, match="vjp_full_file '.*nope.onnx', which does not exist") as info:
            check()
        assert "\n" not in str(info.value)
    # graphs that break the contract
    cases = {
        "deepbet_vjp.onnx": r"takes \['patches', .*the contract of vjp_full_file is \['image', 'cotangent_0', "
                            r"'cotangent_1', 'cotangent_2'\] -> \['grad'\]",
        "mind.onnx": r"takes \['image', 'cotangent_0'\] and gives",
    }
    shutil.copy(load_model_spec("mind").vjp_full_path, tmp_path / "mind.onnx")
    for graph, needle in cases.items():
        with pytest.raises(ConfigError, match=needle):
            validate_with_runtime(load_model_spec(write_variant(tmp_path, vjp_full_file=graph)))
    with pytest.raises(ConfigError, match=r"cotangent_2 of shape .* 32 channel\(s\)"):
        validate_with_runtime(load_model_spec(write_variant(tmp_path, vjp_full_layers=[0, 1, 3])))


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


def test_shipped_full_vjp_graphs_match_torch_autograd(full_sessions):
    torch = pytest.importorskip("torch", reason="torch (the models extra) builds the VJP graphs")
    from importlib import metadata

    from fastimpact.onnx_models import build, deepbet
    from fastimpact.onnx_models.mind import full_module

    modules = {name: full_module(*VARIANTS[name]) for name in VARIANTS}
    try:
        metadata.version("deepbet")
        modules["deepbet"] = deepbet.full_module(deepbet.load_encoder())
    except metadata.PackageNotFoundError:  # the wheel holds deepbet's weights
        pass
    x = torch.from_numpy(smooth_volume((2, 1, 13, 10, 11), seed=3))
    for name, module in modules.items():
        with torch.no_grad():
            maps = module(x)
        g = torch.Generator().manual_seed(4)
        cots = [torch.randn(m.shape, generator=g) for m in maps]
        want = build.vjp_reference(module, x, cots).numpy()
        got = full_vjp(full_sessions[name][1], x.numpy(), [c.numpy() for c in cots])
        assert rel(got, want) < 1e-4, name
