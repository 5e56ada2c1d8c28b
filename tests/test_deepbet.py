"""The built-in deepbet encoder (onnx_models/deepbet.onnx): manifest, ONNX Runtime outputs against
the torch outputs stored by the build script, shapes, batching; with torch installed, the rebuilt
encoder against deepbet's TorchScript model."""

import numpy as np
import pytest

from fastimpact.onnx_models import load_model_spec, validate_with_runtime
from fastimpact.onnx_models.deepbet import CHECK_SHAPE, RECEPTIVE_FIELDS, STAGES

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is part of the test extra")

NAMES = [name for name, _, _ in STAGES]


@pytest.fixture(scope="module")
def spec():
    return load_model_spec("deepbet")


@pytest.fixture(scope="module")
def session(spec):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(str(spec.path), opts, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def stored(spec):
    with np.load(spec.path.with_name("deepbet_check.npz")) as f:
        return {k: f[k] for k in f.files}


def rel_error(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_manifest_matches_the_graph(spec, session):
    validate_with_runtime(spec)
    assert spec.name == "deepbet" and spec.dimension == 3 and spec.input_channels == 1
    assert [(l.name, l.channels, l.stride) for l in spec.layers] == list(STAGES)
    assert spec.receptive_field == RECEPTIVE_FIELDS[-1] == 435
    assert spec.normalization == "zscore" and spec.global_normalization and spec.size_multiple == 1
    assert spec.voxel_size_mm == pytest.approx(0.7)
    assert [i.name for i in session.get_inputs()] == ["image"]
    outputs = session.get_outputs()
    assert [o.name for o in outputs] == NAMES
    assert [o.shape[1] for o in outputs] == [c for _, c, _ in STAGES]
    assert all(isinstance(d, str) for o in outputs for d in (o.shape[0], *o.shape[2:]))  # dynamic axes
    licence = spec.path.with_name("LICENSE_deepbet.txt").read_text()
    assert "MIT License" in licence and "University of Münster" in licence and "deepbet" in spec.license


def test_onnx_reproduces_the_stored_torch_outputs(session, stored):
    image = stored["image"]
    assert image.shape == CHECK_SHAPE and image.dtype == np.float32
    got = session.run(None, {"image": image})
    for name, out in zip(NAMES, got):
        ref = stored[name]
        assert out.shape == ref.shape, name
        assert np.abs(ref).max() > 0.1, name  # a stage of zeros would prove nothing
        assert rel_error(out, ref) < 1e-4, name


def test_output_shapes_follow_the_strides_on_odd_sizes(session):
    shape = (45, 63, 37)
    image = np.random.default_rng(3).normal(size=(1, 1, *shape)).astype(np.float32)
    for (name, channels, stride), out in zip(STAGES, session.run(None, {"image": image})):
        assert out.shape == (1, channels, *[-(-n // stride) for n in shape]), name
        assert np.isfinite(out).all() and out.min() >= 0.0, name  # every stage ends in a ReLU or a max pool


def test_batch_items_are_normalised_independently(session, stored):
    """Instance norm uses each item's own statistics: a batch of two gives the single-item results."""
    first = stored["image"]
    second = np.ascontiguousarray(3.0 * first[:, :, ::-1] - 1.0)  # other content and intensity range
    batch = session.run(None, {"image": np.concatenate([first, second])})
    singles = zip(session.run(None, {"image": first}), session.run(None, {"image": second}))
    for name, b, (one, two) in zip(NAMES, batch, singles):
        assert b.shape[0] == 2, name
        assert rel_error(b[:1], one) < 1e-5 and rel_error(b[1:], two) < 1e-5, name
        assert rel_error(one, two) > 1e-2, name  # the two items differ, so the check can fail


def test_rebuilt_encoder_equals_the_deepbet_torchscript(stored):
    torch = pytest.importorskip("torch", reason="torch (the models extra) is needed to run deepbet's TorchScript")
    from importlib import metadata

    from fastimpact.onnx_models import deepbet

    try:  # not imported: deepbet's own modules need packages the weights do not
        metadata.version("deepbet")
    except metadata.PackageNotFoundError:
        pytest.skip("the deepbet wheel holds the TorchScript weights: pip install --no-deps deepbet==1.0.2")

    scripted = deepbet.load_torchscript()
    encoder = deepbet.load_encoder(scripted)  # load_state_dict(strict=True) inside
    errors = deepbet.compare_with_torchscript(shape=(1, 1, 45, 63, 37), encoder=encoder, scripted=scripted)
    assert max(errors) < 1e-6, errors
    # the stored fixture comes from these weights with the in-graph input map
    with torch.no_grad():
        outs = deepbet.with_input_map(encoder)(torch.from_numpy(stored["image"]))
    for name, out in zip(NAMES, outs):
        assert rel_error(out.numpy(), stored[name]) < 1e-5, name
    # output voxel j of every stage is centred on input voxel stride * j
    assert deepbet.check_alignment() == [(name, 0.0, rf) for name, rf in zip(NAMES, RECEPTIVE_FIELDS)]
