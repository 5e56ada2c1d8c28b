"""Feature-extractor models: the MIND-SSC ONNX graphs against their NumPy reference, the
manifest registry and its errors."""

import json
import shutil

import numpy as np
import pytest

from fastimpact.errors import ConfigError
from fastimpact.onnx_models import builtin_models, load_model_spec, validate_with_runtime
from fastimpact.onnx_models.mind import VARIANTS, build_graph, mind_ssc, neighbour_pairs

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is part of the test extra")


def run_onnx(path, image):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"image": image[None, None].astype(np.float32)})[0][0]


def smooth_volume(shape, seed):
    from scipy import ndimage

    r = np.random.default_rng(seed)
    return ndimage.gaussian_filter(r.normal(size=shape), 1.5).astype(np.float32) * 10


def test_ssc_pairs_are_the_twelve_non_opposite_neighbour_pairs():
    for d in (1, 2, 3):
        pairs = neighbour_pairs(d)
        assert len(pairs) == 12 == len(set(pairs))
        for a, b in pairs:
            assert sum(x * x for x in a) == sum(x * x for x in b) == d * d
            assert sum((x - y) ** 2 for x, y in zip(a, b)) == 2 * d * d


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_shipped_onnx_matches_the_numpy_reference(name):
    radius, dilation = VARIANTS[name]
    spec = load_model_spec(name)
    img = smooth_volume((23, 30, 17), seed=1)
    ref = mind_ssc(img, radius, dilation)
    out = run_onnx(spec.path, img)
    assert out.shape == (12, 23, 30, 17) and ref.shape == out.shape
    np.testing.assert_allclose(out, ref, atol=2e-5)
    assert 0.0 <= out.min() and out.max() <= 1.0 + 1e-6


def test_shipped_graph_equals_a_fresh_build():
    onnx = pytest.importorskip("onnx", reason="onnx is part of the test extra")
    for name, (r, d) in VARIANTS.items():
        shipped = onnx.load(str(load_model_spec(name).path))
        assert shipped.SerializeToString() == build_graph(r, d).SerializeToString(), name


def test_mind_is_contrast_invariant_and_translation_equivariant():
    img = smooth_volume((24, 26, 22), seed=2).astype(np.float64)
    base = mind_ssc(img, 1, 2)
    np.testing.assert_allclose(mind_ssc(3.0 * img - 7.0, 1, 2), base, atol=1e-9)  # affine intensity map
    shifted = mind_ssc(np.roll(img, 3, axis=1), 1, 2)
    inner = (slice(None), slice(5, -5), slice(8, -5), slice(5, -5))  # away from the wrap and edges
    np.testing.assert_allclose(shifted[inner], np.roll(base, 3, axis=2)[inner], atol=1e-9)


def test_tiles_with_a_halo_equal_the_whole_volume():
    """Every MIND step is local: a tile with a halo of r + d voxels reproduces the whole volume."""
    img = smooth_volume((30, 20, 18), seed=3)
    spec = load_model_spec("mind-r1d2")
    whole = run_onnx(spec.path, img)
    halo = 1 + 2
    tile = run_onnx(spec.path, img[10 - halo:20 + halo])
    np.testing.assert_allclose(tile[:, halo:-halo], whole[:, 10:20], atol=1e-6)


def test_registry_lists_and_resolves_models():
    models = builtin_models()
    assert {"mind-r1d2", "mind-r2d1"} <= set(models)
    spec = load_model_spec("mind")
    assert spec.name == "mind-r1d2" and spec.layers[0].channels == 12 and spec.receptive_field == 7
    validate_with_runtime(spec)
    with pytest.raises(ConfigError, match="mind-r1d2"):
        load_model_spec("totalsegmentator")


def test_user_model_with_sidecar_and_bad_manifests(tmp_path):
    src = load_model_spec("mind-r2d1")
    onnx_file = tmp_path / "my.onnx"
    shutil.copy(src.path, onnx_file)
    with pytest.raises(ConfigError, match="no manifest"):
        load_model_spec(onnx_file)
    manifest = dict(src.to_dict(), name="my", file="my.onnx")
    (tmp_path / "my.json").write_text(json.dumps(manifest))
    spec = load_model_spec(onnx_file)
    assert spec.name == "my" and spec.path == onnx_file.resolve()
    validate_with_runtime(spec)
    bad_cases = {
        "dimension": (dict(manifest, dimension=4), "dimension"),
        "normalization": (dict(manifest, normalization="whiten"), "normalization"),
        "missing": ({k: v for k, v in manifest.items() if k != "layers"}, "lacks layers"),
        "file": (dict(manifest, file="nope.onnx"), "does not exist"),
        "channels": (dict(manifest, layers=[{"name": "a", "channels": 0}]), "channels"),
    }
    for name, (data, needle) in bad_cases.items():
        (tmp_path / "my.json").write_text(json.dumps(data))
        with pytest.raises(ConfigError, match=needle) as info:
            load_model_spec(onnx_file)
        assert "\n" not in str(info.value), name
    (tmp_path / "my.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot be read"):
        load_model_spec(onnx_file)
    # a manifest that lists two layers for a one-output graph
    (tmp_path / "my.json").write_text(json.dumps(dict(manifest, layers=[{"name": "a", "channels": 12}] * 2)))
    with pytest.raises(ConfigError, match="1 outputs but the manifest lists 2"):
        validate_with_runtime(load_model_spec(onnx_file))
    (tmp_path / "junk.onnx").write_bytes(b"not an onnx file")
    (tmp_path / "junk.json").write_text(json.dumps(dict(manifest, name="junk", file="junk.onnx")))
    with pytest.raises(ConfigError, match="not a valid ONNX model"):
        validate_with_runtime(load_model_spec(tmp_path / "junk.onnx"))
