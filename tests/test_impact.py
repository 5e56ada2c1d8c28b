"""IMPACT static mode in the registration: exact cost gradients, the moving features read on their
own grid (no double warp), combination with other metrics, masks, configuration errors."""

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from conftest import batch_at, blob_volume, cost_gradient_check, make_cost  # noqa: E402
from fastimpact import register  # noqa: E402
from fastimpact.config import RegistrationConfig  # noqa: E402
from fastimpact.errors import ConfigError  # noqa: E402
from fastimpact.features.maps import IntensityNormalization  # noqa: E402
from fastimpact.features.settings import impact_settings  # noqa: E402
from fastimpact.image import Image  # noqa: E402
from fastimpact.metrics import make_metric  # noqa: E402
from fastimpact.metrics.impact import build_static_impact  # noqa: E402
from fastimpact.engine.levels import LevelData  # noqa: E402
from fastimpact.samplers import RandomSampler  # noqa: E402
from fastimpact.transforms import AffineTransform, BSplineGrid, CompositeTransform  # noqa: E402

AFF_F = np.array([[1.9, 0.2, 0, -20], [-0.2, 1.9, 0, 5], [0, 0, 2.1, 3], [0, 0, 0, 1]])
AFF_M = np.array([[2.0, 0, 0, -22], [0, 2.0, 0, 4], [0, 0, 2.0, 2], [0, 0, 0, 1]])


def _norms(img):
    return lambda spec: IntensityNormalization.from_image(img.data, None, spec.normalization)


def _cost(stage, *, with_mi=False, parts=("impact", "mi"), **impact_options):
    rng = np.random.default_rng(5)
    fixed = Image(blob_volume(seed=1), AFF_F)
    # a different contrast of the same blobs, shifted: a multimodal pair
    mov = blob_volume(seed=1, shift=(0.7, -0.4, 0.3))
    moving = Image((np.sqrt(mov + 1.0) * 10).astype(np.float32), AFF_M)
    lv = LevelData(fixed, moving, None, None)
    cfg = RegistrationConfig(metric="impact", levels=1, **impact_options)
    term = build_static_impact(impact_settings(cfg, 0), fixed, moving, _norms(fixed), _norms(moving), seed=1)
    grid = BSplineGrid.for_image(fixed.shape, fixed.affine, 14.0)
    tr = CompositeTransform(AffineTransform(np.eye(3) + 0.01 * rng.normal(size=(3, 3)), rng.normal(size=3),
                                            fixed.center()), grid, 0.8 * rng.normal(size=tuple(grid.shape) + (3,)))
    metrics = [(1.0, term)] if "impact" in parts else []
    if with_mi:
        from scipy import ndimage

        lv.moving_coef = ndimage.spline_filter(moving.data.astype(np.float64), order=3, mode="mirror")
        mi = make_metric("mi")
        mi.prepare(fixed.data, moving.data)
        if "mi" in parts:
            metrics.insert(0, (0.1, mi))
    sampler = RandomSampler(fixed.shape, None, 3000, seed=3)
    cost = make_cost(lv, metrics, sampler, tr, stage, "cpu", radius=30.0)
    flat, idx = sampler.draw()
    q = moving.world_to_index(tr.map_world(fixed.index_to_world(idx)))
    inner = np.all((q > 1.0) & (q < np.array(moving.shape) - 2.0), axis=1)
    return cost, flat[inner]


def _fd_check(cost, flat, stage):
    value, grad, num, scale = cost_gradient_check(cost, flat, stage, eps=1e-4 if stage == "affine" else 1e-3)
    np.testing.assert_allclose(grad, num, rtol=2e-3, atol=2e-4 * scale)
    return value


@pytest.mark.parametrize("stage", ["affine", "bspline"])
@pytest.mark.parametrize("options", [
    {"distance": "l2"},
    {"distance": "l1", "feature_norm": "l2"},
    {"distance": "cosine"},
    {"distance": "ncc", "pca": 4},
    {"distance": "l1cosine", "feature_norm": "standardized"},
    {"distance": "dice"},
    {"distance": "dotproduct", "model": "mind mind-r2d1", "layer_weights": "1 0.5"},
])
def test_impact_cost_gradient_matches_finite_differences(stage, options):
    cost, flat = _cost(stage, **options)
    _fd_check(cost, flat, stage)


def test_impact_plus_mi_gradient_and_value_is_the_weighted_sum():
    cost, flat = _cost("bspline", with_mi=True, distance="l2")
    both = _fd_check(cost, flat, "bspline")
    impact_only = _cost("bspline", with_mi=True, parts=("impact",), distance="l2")[0].evaluate_at(flat, gradient=False)[0]
    mi_only = _cost("bspline", with_mi=True, parts=("mi",), distance="l2")[0].evaluate_at(flat, gradient=False)[0]
    assert both == pytest.approx(impact_only + mi_only, rel=1e-9)


def test_subset_draws_channels_per_evaluation():
    cost, flat = _cost("bspline", distance="l2", subset=3)
    values = {round(cost.evaluate_at(flat, gradient=False)[0], 12) for _ in range(6)}
    assert len(values) > 1  # a different random subset each call


def test_static_mode_recovers_a_pure_translation_at_every_level():
    """Moving = fixed content displaced by 10 mm along x (through its affine). Moving features are
    computed on the moving grid and read at T(x): every level must keep T(x) - x = (10, 0, 0); a
    double warp (features of the warped image read at T(x) again) would drift from it."""
    data = blob_volume(shape=(44, 48, 40), seed=7)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    aff_m = aff.copy()
    aff_m[0, 3] = 10.0
    seen = []

    def callback(event, info):
        if event == "level_end":
            tr = info["transform"]
            pts = np.argwhere(np.ones((44, 48, 40), bool))[::97].astype(np.float64) * 2.0
            inner = np.all((pts > 16) & (pts < np.array([72, 80, 64])), axis=1)
            seen.append((info["stage"], info["level"], tr.map_world(pts[inner]) - pts[inner]))

    register((data, aff), (data, aff_m), metric="impact", init="none", levels=3, iterations=150,
             affine_iterations=150, samples=1500, seed=0, callback=callback, threads=2)
    assert len(seen) == 6
    for stage, level, disp in seen:
        err = np.linalg.norm(disp - np.array([10.0, 0.0, 0.0]), axis=1)
        assert err.mean() < (1.0 if (stage, level) == ("affine", 1) else 0.5), (stage, level, err.mean())


def test_impact_with_masks_and_combination_recovers_a_shift():
    data = blob_volume(shape=(36, 40, 32), seed=2)
    shifted = blob_volume(shape=(36, 40, 32), seed=2, shift=(1.0, 0.0, -0.5))
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    mask = np.zeros(data.shape, np.uint8)
    mask[4:-4, 4:-4, 4:-4] = 1
    res = register((data, aff), (shifted, aff), metric="impact+0.1*mi", fixed_mask=(mask, aff),
                   moving_mask=(mask, aff), levels=2, iterations=0, affine_iterations=150, samples=1000, threads=2)
    assert res.report["timings_s"]["features"] > 0
    # the true displacement is +1 voxel (2 mm) in x and -0.5 voxel (-1 mm) in z at every point
    u = res.displacement[8:-8, 8:-8, 8:-8]
    err = np.linalg.norm(u - np.array([2.0, 0.0, -1.0]), axis=-1)
    assert err.mean() < 0.05


@pytest.mark.parametrize("options, needle", [
    ({"model": "nosuchmodel"}, "unknown model"),
    ({"layers": "0"}, "layers"),
    ({"layers": "11"}, "at most 1"),
    ({"distance": "l3"}, "distance"),
    ({"pca": 13}, "pca"),
    ({"distance": "l2 l1"}, "distance has 2 values"),
    ({"feature_norm": "max"}, "feature_norm"),
    ({"mode": "jacobian", "patch_size": 4}, "odd"),
    ({"model": "mind", "moving_model": "deepbet"}, "same number of channels"),
])
def test_bad_impact_settings_are_rejected_before_any_work(options, needle):
    data = blob_volume(seed=0)
    with pytest.raises(ConfigError, match=needle):
        register((data, np.eye(4)), (data, np.eye(4)), metric="impact", **options)


@pytest.mark.parametrize("expr, needle", [("impact+", "unknown metric"), ("0*mi", "positive"),
                                          ("x*mi", "not a number"), ("mi+mi", "twice")])
def test_metric_expressions_are_validated(expr, needle):
    with pytest.raises(ConfigError, match=needle):
        RegistrationConfig(metric=expr)


def test_per_level_impact_settings():
    cfg = RegistrationConfig(metric="impact", levels=3, distance=["l1", "l2", "l2 l1"], model=("mind", "mind",
                             "mind mind-r2d1"), pca=[0, 0, "0 4"], voxel_size=[4, 2, None])
    lv0, lv2 = impact_settings(cfg, 0), impact_settings(cfg, 2)
    assert [m.fixed_model for m in lv2.models] == ["mind", "mind-r2d1"]
    assert [u.distance for m in lv2.models for u in m.layers] == ["l2", "l1"]
    assert [u.pca for m in lv2.models for u in m.layers] == [0, 4]
    assert lv0.models[0].layers[0].distance == "l1" and lv0.models[0].voxel_size == 4.0
    assert lv2.models[0].voxel_size is None


def test_fixed_feature_gather_equals_interpolation_on_permuted_grids():
    from fastimpact.features.maps import FeatureMap
    from fastimpact.kernels import get_kernel
    from fastimpact.metrics.impact import grid_lookup, prefilter_channels

    rng = np.random.default_rng(2)
    data = rng.normal(size=(9, 7, 5, 3)).astype(np.float32)
    fmap = FeatureMap(data, np.diag([2.0, 2.0, 3.0, 1.0]))
    # a level grid storing the same voxels with axes permuted and x flipped
    level = fmap.affine @ np.array([[0, 0, -1, 8], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1.0]])
    shape = (7, 5, 9)
    table = grid_lookup(fmap, level, shape)
    assert table is not None and table.shape == (7, 5, 9, 3)
    idx = np.argwhere(np.ones(shape, bool)).astype(np.float64)
    q = idx @ (np.linalg.inv(fmap.affine) @ level)[:3, :3].T + (np.linalg.inv(fmap.affine) @ level)[:3, 3]
    interp = get_kernel("cubic_sample_channels_values", "cpu")(prefilter_channels(data), q)
    np.testing.assert_allclose(table.reshape(-1, 3), interp, atol=1e-5)
    # a grid that is not the map's (stride 2, a half-voxel shift, a wrong size) has no table
    assert grid_lookup(fmap, fmap.affine @ np.diag([2.0, 2, 2, 1]), (5, 4, 3)) is None
    shifted = fmap.affine.copy()
    shifted[0, 3] += 1.0
    assert grid_lookup(fmap, shifted, (9, 7, 5)) is None
    assert grid_lookup(fmap, fmap.affine, (9, 7, 4)) is None


def _truth_vs_identity(kind, model, **options):
    """IMPACT value with the true moving points T(x) = x + u_true(x) over its value at T = id."""
    from fastimpact.synthetic import make_case

    case = make_case(kind, resolution="2mm", seed=0)
    cfg = RegistrationConfig(metric="impact", levels=1, model=model, **options)
    term = build_static_impact(impact_settings(cfg, 0), case.fixed, case.moving, _norms(case.fixed),
                               _norms(case.moving), seed=0)
    flat = np.flatnonzero(case.mask.ravel())[::7]
    idx = np.stack(np.unravel_index(flat, case.mask.shape), axis=1).astype(np.float64)
    x = idx @ case.fixed.affine[:3, :3].T + case.fixed.affine[:3, 3]
    y = x + case.u_true.reshape(-1, 3)[flat]
    term.evaluate(batch_at(flat, x, y, gradient=False))
    at_truth = term.last_layer_values[0]  # the raw distance (the returned value is normalised)
    term.evaluate(batch_at(flat, x, x, gradient=False))
    return at_truth / term.last_layer_values[0]


@pytest.mark.slow
def test_features_have_their_minimum_at_the_known_alignment():
    """Features are trusted only where the loss is clearly lower at the true alignment than at the
    identity (3.9 mm away on average). MIND on the multimodal T1 / T2-like pair and deepbet on a
    T1 / T1 pair pass; deepbet (trained on T1 brain extraction) does not separate T1 from T2-like
    alignments (measured ratios: MIND T1/T2-like 0.23, deepbet s0 T1/T1 0.02 but T1/T2-like 1.13;
    the reference saw 0.89-1.13 for deepbet), which is why deepbet diverges on that pair."""
    assert _truth_vs_identity("t2", "mind") < 0.5
    assert _truth_vs_identity("mono", "deepbet", layers="1", voxel_size=1.0) < 0.2
    assert _truth_vs_identity("t2", "deepbet", layers="1", voxel_size=1.0) > 0.9
