"""Static feature maps: normalisation, the model grid, tiled vs whole-volume inference, physical frame."""

import json
import shutil

import numpy as np
import pytest
from scipy import ndimage

pytest.importorskip("onnxruntime")

from fastimpact.errors import ConfigError  # noqa: E402
from fastimpact.features.maps import (  # noqa: E402
    FeatureExtractor,
    IntensityNormalization,
    canonical,
    compute_feature_maps,
    plan_tiles,
    resample_to_voxel_size,
)
from fastimpact.image import Image  # noqa: E402
from fastimpact.onnx_models import load_model_spec  # noqa: E402
from fastimpact.onnx_models.mind import mind_ssc  # noqa: E402


def smooth_volume(shape, seed=0, sigma=2.0):
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.normal(size=shape), sigma).astype(np.float32) * 10 + 100


OBLIQUE = np.array([[1.4, 0.2, 0.0, -30.0], [-0.15, 1.5, 0.1, 12.0], [0.0, -0.1, 2.0, 5.0], [0, 0, 0, 1.0]])


def maps_of(img, model, outputs=(0,), **kw):
    spec = load_model_spec(model)
    norm = IntensityNormalization.from_image(img.data, None, spec.normalization)
    return compute_feature_maps(img, FeatureExtractor(spec, 2), list(outputs), norm, **kw)


def world_to_index(affine, pts):
    inv = np.linalg.inv(affine)
    return pts @ inv[:3, :3].T + inv[:3, 3]


def test_mind_whole_volume_equals_reference_and_tiles_exactly():
    data = smooth_volume((45, 63, 37))
    img = Image(data, np.diag([1.5, 1.5, 2.0, 1.0]))
    whole = maps_of(img, "mind")[0]
    norm = IntensityNormalization.from_image(data, None, "zscore")
    ref = np.moveaxis(mind_ssc(norm(data), 1, 2), 0, -1)
    assert whole.data.shape == (45, 63, 37, 12)
    np.testing.assert_allclose(whole.data, ref, atol=2e-6)
    for tile in (8, 16, 29):
        tiled = maps_of(img, "mind", tile_size=tile)[0]
        np.testing.assert_array_equal(tiled.data, whole.data)
    np.testing.assert_array_equal(whole.affine, img.affine)


def test_memory_budget_forces_tiles_with_the_same_result():
    img = Image(smooth_volume((40, 44, 36)), np.eye(4))
    whole = maps_of(img, "mind")[0]
    # ~300 B / voxel: 0.002 GB admits ~7e3 voxels per tile, far less than the 63360 of the volume
    tiled = maps_of(img, "mind", memory_gb=0.004)[0]
    np.testing.assert_array_equal(tiled.data, whole.data)
    with pytest.raises(ConfigError, match="feature_memory"):
        maps_of(img, "mind", memory_gb=1e-6)


def test_plan_tiles_cover_the_axis_with_aligned_starts():
    axes = plan_tiles((45, 10), align=4, halo=5, tile=16)
    for n, spans in zip((45, 10), axes):
        covered = np.zeros(n, bool)
        for a, b, ia, ib in spans:
            assert a % 4 == 0 and ia % 4 == 0 and ia <= a and ib >= b and ib <= n
            covered[a:b] = True
        assert covered.all()


def test_deepbet_strides_affines_and_tile_tolerance():
    data = smooth_volume((64, 72, 60), sigma=3.0)
    img = Image(data, np.diag([1.2, 1.2, 1.2, 1.0]))
    whole = maps_of(img, "deepbet", outputs=(0, 1, 3))
    for fm, s in zip(whole, (2, 4, 8)):
        assert fm.data.shape[:3] == tuple(int(np.ceil(n / s)) for n in data.shape)
        np.testing.assert_allclose(fm.affine, img.affine @ np.diag([s, s, s, 1.0]))
    # deepbet normalises every input by its own statistics (InstanceNorm): tiles differ from the
    # whole volume. Stated tolerance, with tiles holding ~40% of the volume each: correlation of
    # s0 >= 0.9 (measured 0.97); the whole-volume path is the default whenever it fits the budget.
    tiled = maps_of(img, "deepbet", outputs=(0,), tile_size=48)[0]
    corr = np.corrcoef(tiled.data.ravel(), whole[0].data.ravel())[0, 1]
    assert 0.9 <= corr < 1.0


@pytest.mark.parametrize("model", ["mind", "deepbet"])
def test_features_follow_the_physical_frame(model):
    data = smooth_volume((33, 41, 29), seed=3)
    a = Image(data, OBLIQUE)
    # the same anatomy stored flipped along x and with y/z swapped: data and affine change together
    flip = np.array([[-1, 0, 0, 32], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    b = Image(np.ascontiguousarray(data[::-1]), OBLIQUE @ flip)
    perm = np.array([[1, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1.0]])
    c = Image(np.ascontiguousarray(np.transpose(data, (0, 2, 1))), OBLIQUE @ perm)
    fa = maps_of(a, model)[0]
    idx = np.argwhere(np.ones(fa.shape, bool))[::7].astype(np.float64)
    pts = idx @ fa.affine[:3, :3].T + fa.affine[:3, 3]
    va = fa.data[tuple(idx.astype(int).T)]
    for other in (b, c):
        fo = maps_of(other, model)[0]
        q = world_to_index(fo.affine, pts)
        np.testing.assert_allclose(q, np.round(q), atol=1e-6)  # the same grid, reordered
        vo = fo.data[tuple(np.round(q).astype(int).T)]
        np.testing.assert_allclose(vo, va, rtol=1e-5, atol=1e-5)


def test_canonical_keeps_every_voxel_in_place():
    data = smooth_volume((9, 11, 7))
    aff = np.array([[0, 0, -2.0, 10], [1.5, 0, 0, -3], [0, -1.0, 0, 4], [0, 0, 0, 1]])
    img = Image(data, aff)
    can = canonical(img)
    # every voxel of the original is found at the same world point in the canonical image
    idx = np.argwhere(np.ones(data.shape, bool)).astype(np.float64)
    pts = idx @ aff[:3, :3].T + aff[:3, 3]
    q = np.round(world_to_index(can.affine, pts)).astype(int)
    np.testing.assert_array_equal(can.data[tuple(q.T)], data.ravel())
    # and its axes point to +R, +A, +S
    assert np.all(np.argmax(np.abs(can.affine[:3, :3]), axis=0) == [0, 1, 2])
    assert np.all(np.diag(can.affine[:3, :3]) > 0)


def test_resample_to_voxel_size_keeps_physical_positions():
    shape = (30, 26, 22)
    aff = np.diag([1.0, 1.25, 2.0, 1.0])
    aff[:3, 3] = (5, -4, 2)
    i, j, k = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    world = np.stack([i, j, k], -1) @ aff[:3, :3].T + aff[:3, 3]
    ramp = (0.5 * world[..., 0] - 0.2 * world[..., 1] + 0.1 * world[..., 2]).astype(np.float32)
    img = Image(ramp, aff)
    out = resample_to_voxel_size(img, 2.5)
    np.testing.assert_allclose(out.spacing, [2.5, 2.5, 2.5])
    np.testing.assert_allclose(out.affine[:3, 3], aff[:3, 3])
    idx = np.argwhere(np.ones(out.shape, bool)).astype(np.float64)
    w = idx @ out.affine[:3, :3].T + out.affine[:3, 3]
    expect = 0.5 * w[:, 0] - 0.2 * w[:, 1] + 0.1 * w[:, 2]
    # a linear ramp survives smoothing (away from the edges) and linear interpolation
    inner = np.all((idx > 1) & (idx < np.array(out.shape) - 2), axis=1)
    np.testing.assert_allclose(out.data.ravel()[inner], expect[inner], atol=1e-3)
    assert resample_to_voxel_size(img, None) is img


def test_intensity_normalization_uses_statistics_inside_the_mask():
    rng = np.random.default_rng(1)
    data = rng.normal(50, 5, size=(20, 20, 20)).astype(np.float32)
    mask = np.zeros(data.shape, bool)
    mask[5:15, 5:15, 5:15] = True
    data[~mask] = 1000.0
    z = IntensityNormalization.from_image(data, mask, "zscore")(data)
    assert abs(z[mask].mean()) < 1e-4 and abs(z[mask].std() - 1) < 1e-4
    mm = IntensityNormalization.from_image(data, mask, "minmax")(data)
    assert mm[mask].min() == pytest.approx(0) and mm[mask].max() == pytest.approx(1)
    ct = IntensityNormalization.from_image(np.where(mask, data, -3000.0), mask, "ct")
    assert ct.lo >= -1024 and ct.hi <= 3071 and ct.hi > ct.lo
    assert IntensityNormalization.from_image(data, None, "none")(data) is not None
    with pytest.raises(ConfigError, match="normalization"):
        IntensityNormalization.from_image(data, None, "robust")


def _user_model(tmp_path, **changes):
    spec = load_model_spec("mind")
    shutil.copy(spec.path, tmp_path / "m.onnx")
    manifest = json.loads(spec.manifest_path.read_text())
    manifest.update(file="m.onnx", name="user")
    manifest.update(changes)
    (tmp_path / "m.json").write_text(json.dumps(manifest))
    return str(tmp_path / "m.onnx")


def test_a_manifest_stride_that_does_not_match_the_graph_is_an_error(tmp_path):
    img = Image(smooth_volume((16, 18, 14)), np.eye(4))
    wrong_stride = _user_model(tmp_path, layers=[{"name": "mind", "channels": 12, "stride": 2}])
    with pytest.raises(ConfigError, match="stride"):
        maps_of(img, wrong_stride)


def test_wrong_manifest_stride_or_channels_is_an_error(tmp_path):
    img = Image(smooth_volume((16, 18, 14)), np.eye(4))
    d1 = tmp_path / "a"
    d1.mkdir()
    with pytest.raises(ConfigError, match="channels"):
        maps_of(img, _user_model(d1, layers=[{"name": "mind", "channels": 8, "stride": 1}]))
    d2 = tmp_path / "b"
    d2.mkdir()
    with pytest.raises(ConfigError, match="outputs"):
        maps_of(img, _user_model(d2, layers=[{"name": "a", "channels": 12}, {"name": "b", "channels": 12}]),
                outputs=(0,))
    d3 = tmp_path / "c"
    d3.mkdir()
    path = _user_model(d3)
    (d3 / "m.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(ConfigError, match="cannot be loaded"):
        maps_of(img, path)
