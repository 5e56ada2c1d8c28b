"""The full cost gradient (metric -> cubic interpolation -> transform) against finite differences."""

import numpy as np
import pytest

from conftest import blob_volume, cost_gradient_check, make_cost
from fastimpact.image import Image
from fastimpact.metrics import make_metric
from fastimpact.engine.levels import LevelData
from fastimpact.samplers import RandomSampler
from fastimpact.transforms import AffineTransform, BSplineGrid, CompositeTransform


def _setup(metric, stage, backend, bending_weight=0.0):
    rng = np.random.default_rng(5)
    aff_f = np.array([[1.9, 0.2, 0, -20], [-0.2, 1.9, 0, 5], [0, 0, 2.1, 3], [0, 0, 0, 1]])
    aff_m = np.array([[2.0, 0, 0, -22], [0, 2.0, 0, 4], [0, 0, 2.0, 2], [0, 0, 0, 1]])
    fixed = Image(blob_volume(seed=1), aff_f)
    moving = Image(blob_volume(seed=1, shift=(0.7, -0.4, 0.3)) + 5 * np.sin(np.arange(28))[:, None, None].astype(np.float32), aff_m)
    lv = LevelData(fixed, moving, None, None)
    # float64 coefficients so that finite differences are not drowned by float32 rounding
    from scipy import ndimage

    lv.moving_coef = ndimage.spline_filter(moving.data.astype(np.float64), order=3, mode="mirror")
    m = make_metric(metric)
    m.prepare(fixed.data, moving.data)
    grid = BSplineGrid.for_image(fixed.shape, fixed.affine, 14.0)
    center = fixed.center()
    tr = CompositeTransform(AffineTransform(np.eye(3) + 0.01 * rng.normal(size=(3, 3)), rng.normal(size=3), center),
                            grid, 0.8 * rng.normal(size=tuple(grid.shape) + (3,)))
    sampler = RandomSampler(fixed.shape, None, 3000, seed=3)
    cost = make_cost(lv, m, sampler, tr, stage, backend, radius=30.0, bending_weight=bending_weight)
    flat, idx = sampler.draw()
    # keep points well inside the moving image so no point crosses the boundary under perturbation
    q = moving.world_to_index(tr.map_world(fixed.index_to_world(idx)))
    inner = np.all((q > 1.0) & (q < np.array(moving.shape) - 2.0), axis=1)
    return cost, flat[inner]


@pytest.mark.parametrize("metric", ["mse", "ncc", "mi"])
@pytest.mark.parametrize("stage", ["affine", "bspline"])
def test_cost_gradient_matches_finite_differences(metric, stage):
    cost, flat = _setup(metric, stage, "cpu", bending_weight=0.05 if stage == "bspline" else 0.0)
    _, grad, num, scale = cost_gradient_check(cost, flat, stage, eps=1e-4 if stage == "affine" else 1e-3)
    np.testing.assert_allclose(grad, num, rtol=2e-3, atol=2e-4 * scale)


def test_numpy_and_numba_backends_agree():
    c1, flat = _setup("mi", "bspline", "cpu")
    c2, _ = _setup("mi", "bspline", "numpy")
    v1, g1 = c1.evaluate_at(flat)
    v2, g2 = c2.evaluate_at(flat)
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    np.testing.assert_allclose(g1, g2, rtol=1e-3, atol=1e-5 * np.abs(g2).max())


def test_identical_images_give_zero_update():
    img = Image(blob_volume(seed=4), np.diag([2.0, 2.0, 2.0, 1.0]))
    lv = LevelData(img, img, None, None)
    m = make_metric("mse")
    m.prepare(img.data, img.data)
    grid = BSplineGrid.for_image(img.shape, img.affine, 12.0)
    tr = CompositeTransform(AffineTransform(center=img.center()), grid, np.zeros(tuple(grid.shape) + (3,)))
    cost = make_cost(lv, m, RandomSampler(img.shape, None, 2000, 0), tr, "bspline", "cpu", radius=1.0)
    value, grad = cost.evaluate()
    assert value < 1e-3 and np.abs(grad).max() < 1e-3
