"""IMPACT dense Jacobian mode: the helpers' adjoints, the whole-volume chain against finite
differences (every voxel's own dT/dtheta, so the gradient is exact), and a short registration."""

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from nibabel.orientations import apply_orientation, io_orientation  # noqa: E402

from conftest import batch_at, blob_volume, cost_gradient_check, make_cost  # noqa: E402
from fastimpact.config import RegistrationConfig  # noqa: E402
from fastimpact.errors import ConfigError  # noqa: E402
from fastimpact.features.maps import IntensityNormalization  # noqa: E402
from fastimpact.features.settings import impact_settings  # noqa: E402
from fastimpact.image import Image  # noqa: E402
from fastimpact.metrics import impact_dense as dense  # noqa: E402
from fastimpact.engine.levels import LevelData  # noqa: E402
from fastimpact.metrics.term import TransformView  # noqa: E402
from fastimpact.samplers import RandomSampler  # noqa: E402
from fastimpact.transforms import AffineTransform, BSplineGrid, CompositeTransform  # noqa: E402

# a fixed grid stored in a permuted, flipped order (the model runs on the RAS-ordered copy)
AFF_F = np.array([[0, 0, -2.0, 20], [1.9, 0.2, 0, -25], [-0.2, 1.9, 0, 3], [0, 0, 0, 1]])
AFF_M = np.array([[2.0, 0, 0, -22], [0, 2.0, 0, 4], [0, 0, 2.0, 2], [0, 0, 0, 1]])


def test_orientation_helpers_invert_each_other():
    rng = np.random.default_rng(0)
    vol = rng.normal(size=(5, 6, 7))
    ornt = io_orientation(AFF_F)
    canon = apply_orientation(vol, ornt)
    np.testing.assert_array_equal(dense._from_canon(canon, ornt), vol)
    p = np.stack([rng.integers(0, n, 40) for n in vol.shape], 1)
    pc = dense._canon_index(p, ornt, vol.shape)
    np.testing.assert_array_equal(canon[tuple(pc.T)], vol[tuple(p.T)])


def test_padding_and_interpolation_adjoints():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 6, 7))
    padded = dense._pad_edge(x, 4)
    assert padded.shape == (8, 8, 8)
    y = rng.normal(size=padded.shape)
    assert np.sum(padded * y) == pytest.approx(np.sum(x * dense._pad_edge_adjoint(y, x.shape)), rel=1e-12)
    data = rng.normal(size=(6, 5, 7, 3))
    pos = rng.uniform(-0.5, 7.5, size=(30, 3))
    vals = rng.normal(size=(30, 3))
    lhs = np.sum(dense.trilinear_gather(data, pos) * vals)
    rhs = np.sum(data * dense.trilinear_scatter(vals, pos, data.shape[:3]))
    assert lhs == pytest.approx(rhs, rel=1e-12)
    ints = np.array([[1, 2, 3], [5, 4, 6], [0, 0, 0]], dtype=float)
    np.testing.assert_allclose(dense.trilinear_gather(data, ints), data[tuple(ints.astype(int).T)])


def _norms(img):
    return lambda spec: IntensityNormalization.from_image(img.data, None, spec.normalization)


def _cost(stage, model="mind", n=300, **options):
    rng = np.random.default_rng(5)
    fixed = Image(blob_volume(seed=1), AFF_F)
    mov = blob_volume(seed=1, shift=(0.7, -0.4, 0.3))
    moving = Image((np.sqrt(mov + 1.0) * 10).astype(np.float32), AFF_M)
    lv = LevelData(fixed, moving, None, None)
    from scipy import ndimage

    lv.moving_coef = ndimage.spline_filter(moving.data.astype(np.float64), order=3, mode="mirror")
    cfg = RegistrationConfig(metric="impact", mode="jacobian-dense", levels=1, model=model, **options)
    term = dense.build_dense_impact(impact_settings(cfg, 0), fixed, moving, _norms(fixed), _norms(moving),
                                    moving_coef=lv.moving_coef, seed=1)
    grid = BSplineGrid.for_image(fixed.shape, fixed.affine, 14.0)
    tr = CompositeTransform(AffineTransform(np.eye(3) + 0.01 * rng.normal(size=(3, 3)), rng.normal(size=3),
                                            fixed.center()), grid, 0.8 * rng.normal(size=tuple(grid.shape) + (3,)))
    sampler = RandomSampler(fixed.shape, None, n, seed=3)
    cost = make_cost(lv, term, sampler, tr, stage, "cpu", radius=30.0)
    flat, idx = sampler.draw()
    q = moving.world_to_index(tr.map_world(fixed.index_to_world(idx)))
    inner = np.all((q > 1.0) & (q < np.array(moving.shape) - 2.0), axis=1)
    return cost, flat[inner]


@pytest.mark.parametrize("stage", ["affine", "bspline"])
@pytest.mark.parametrize("options", [
    {"model": "mind", "distance": "l2"},
    {"model": "mind-r2d1", "distance": "cosine", "feature_norm": "l2"},
    {"model": "deepbet", "layers": "11", "distance": "l2"},
])
def test_dense_gradient_matches_finite_differences(stage, options):
    cost, flat = _cost(stage, **options)
    _, g, num, scale = cost_gradient_check(cost, flat, stage, eps=1e-3 if stage == "affine" else 1e-2, n_picks=8,
                                           threshold=1e-2)
    np.testing.assert_allclose(g, num, rtol=3e-2, atol=3e-3 * scale)


def test_dense_value_equals_static_features_at_identity():
    """At the identity the warped moving image is the moving image resampled on the fixed grid:
    with moving = fixed the dense value is exactly zero (L2), and a shift makes it positive."""
    fixed = Image(blob_volume(seed=2), AFF_F)
    lv = LevelData(fixed, fixed, None, None)
    cfg = RegistrationConfig(metric="impact", mode="jacobian-dense", levels=1)
    term = dense.build_dense_impact(impact_settings(cfg, 0), fixed, fixed, _norms(fixed), _norms(fixed),
                                    moving_coef=lv.moving_coef)
    x = fixed.index_to_world(np.array([[5.0, 6, 7], [10, 12, 9], [14, 8, 11]]))
    v0 = term.evaluate(batch_at(None, x, None, TransformView(np.eye(4)), gradient=False)).value
    term.start_stage()
    shift = np.eye(4)
    shift[:3, 3] = [1.5, 0, 0]
    out = term.evaluate(batch_at(None, x, None, TransformView(shift)))
    v1, pts, gy = out.value, out.points, out.point_gradient
    assert v0 == pytest.approx(0.0, abs=1e-6) and v1 > 0
    assert len(pts) > len(x) and np.abs(gy).max() > 0  # the cotangents reach the receptive field


def test_dense_mode_settings_errors():
    with pytest.raises(ConfigError, match="voxel_size"):
        _cost("affine", voxel_size=3.0)
    with pytest.raises(ConfigError, match="jacobian-dense"):
        RegistrationConfig(metric="impact", mode="dense")


def test_dense_mode_recovers_a_shift():
    from fastimpact import register

    data = blob_volume(shape=(36, 40, 32), seed=2)
    shifted = blob_volume(shape=(36, 40, 32), seed=2, shift=(1.0, 0.0, -0.5))
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    mask = np.zeros(data.shape, np.uint8)
    mask[3:-3, 3:-3, 3:-3] = 1
    res = register((data, aff), (shifted, aff), metric="impact", mode="jacobian-dense", fixed_mask=(mask, aff),
                   levels=2, iterations=0, affine_iterations=60, samples=300, threads=2)
    u = res.displacement[8:-8, 8:-8, 8:-8]
    # the same bounds as patch Jacobian mode on this pair
    np.testing.assert_allclose(u.reshape(-1, 3).mean(axis=0), [2.0, 0.0, -1.0], atol=0.1)
    assert np.linalg.norm(u - np.array([2.0, 0.0, -1.0]), axis=-1).mean() < 0.3


@pytest.mark.cudasim
def test_dense_term_on_the_cuda_backend_equals_the_cpu():
    """The warp of dense mode on the cuda backend (simulated without a GPU: a tiny volume)."""
    fixed = Image(blob_volume(shape=(9, 8, 7), seed=3), AFF_F)
    moving = Image(blob_volume(shape=(9, 8, 7), seed=3, shift=(0.5, 0, 0)), AFF_F)
    lv = LevelData(fixed, moving, None, None)
    cfg = RegistrationConfig(metric="impact", mode="jacobian-dense", levels=1)
    grid = BSplineGrid.for_image(fixed.shape, fixed.affine, 8.0)
    coef = 0.5 * np.random.default_rng(0).normal(size=tuple(grid.shape) + (3,))
    x = fixed.index_to_world(np.array([[3.0, 4, 3], [5, 3, 2], [4, 4, 4]]))
    out = {}
    for backend in ("cpu", "cuda"):
        term = dense.build_dense_impact(impact_settings(cfg, 0), fixed, moving, _norms(fixed), _norms(moving),
                                        moving_coef=lv.moving_coef, backend=backend)
        r = term.evaluate(batch_at(None, x, None, TransformView(np.eye(4), coef, grid.world_to_grid())))
        out[backend] = (r.value, r.points, r.point_gradient)
    assert out["cuda"][0] == pytest.approx(out["cpu"][0], rel=1e-6)
    np.testing.assert_allclose(out["cuda"][1], out["cpu"][1])
    np.testing.assert_allclose(out["cuda"][2], out["cpu"][2], rtol=1e-5, atol=1e-9 * np.abs(out["cpu"][2]).max())
