"""IMPACT Jacobian mode: patches through the patch graph, cotangents through the VJP graph, the chain
to the transform parameters (exact chain against finite differences), and the registration."""

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
from fastimpact.metrics.impact_jacobian import build_jacobian_impact, patch_offsets  # noqa: E402
from fastimpact.engine.levels import LevelData  # noqa: E402
from fastimpact.samplers import RandomSampler  # noqa: E402
from fastimpact.transforms import AffineTransform, BSplineGrid, CompositeTransform  # noqa: E402

AFF_F = np.array([[1.9, 0.2, 0, -20], [-0.2, 1.9, 0, 5], [0, 0, 2.1, 3], [0, 0, 0, 1]])
AFF_M = np.array([[2.0, 0, 0, -22], [0, 2.0, 0, 4], [0, 0, 2.0, 2], [0, 0, 0, 1]])


def _norms(img):
    return lambda spec: IntensityNormalization.from_image(img.data, None, spec.normalization)


def _cost(stage, chain="exact", n=300, **options):
    rng = np.random.default_rng(5)
    fixed = Image(blob_volume(seed=1), AFF_F)
    mov = blob_volume(seed=1, shift=(0.7, -0.4, 0.3))
    moving = Image((np.sqrt(mov + 1.0) * 10).astype(np.float32), AFF_M)
    lv = LevelData(fixed, moving, None, None)
    from scipy import ndimage

    lv.moving_coef = ndimage.spline_filter(moving.data.astype(np.float64), order=3, mode="mirror")
    cfg = RegistrationConfig(metric="impact", mode="jacobian", levels=1, jacobian_chain=chain, **options)
    term = build_jacobian_impact(impact_settings(cfg, 0), fixed, moving, _norms(fixed), _norms(moving),
                                 moving_coef=lv.moving_coef, chain=chain, seed=1)
    grid = BSplineGrid.for_image(fixed.shape, fixed.affine, 14.0)
    tr = CompositeTransform(AffineTransform(np.eye(3) + 0.01 * rng.normal(size=(3, 3)), rng.normal(size=3),
                                            fixed.center()), grid, 0.8 * rng.normal(size=tuple(grid.shape) + (3,)))
    sampler = RandomSampler(fixed.shape, None, n, seed=3)
    cost = make_cost(lv, term, sampler, tr, stage, "cpu", radius=30.0)
    flat, idx = sampler.draw()
    q = moving.world_to_index(tr.map_world(fixed.index_to_world(idx)))
    inner = np.all((q > 1.0) & (q < np.array(moving.shape) - 2.0), axis=1)
    return cost, flat[inner]


def _fd(cost, flat, stage):
    _, grad, num, scale = cost_gradient_check(cost, flat, stage, eps=1e-3 if stage == "affine" else 1e-2,
                                              n_picks=8, threshold=1e-2)
    return grad, num, scale


@pytest.mark.parametrize("stage", ["affine", "bspline"])
@pytest.mark.parametrize("options", [
    {"model": "mind", "distance": "l2"},
    {"model": "mind", "distance": "cosine", "feature_norm": "l2"},
    {"model": "mind-r2d1", "distance": "ncc", "patch_size": 5},
    {"model": "mind", "distance": "l1cosine", "feature_norm": "standardized"},
    {"model": "mind", "distance": "dice"},
    {"model": "mind", "distance": "dotproduct"},
    {"model": "deepbet", "layers": "11", "distance": "l1 l2", "patch_size": 9},
    {"model": "deepbet", "layers": "101", "distance": "cosine ncc", "patch_size": 9},
])
def test_exact_chain_gradient_matches_finite_differences(stage, options):
    # float32 networks: central differences of a float32 forward pass are accurate to ~1e-3
    cost, flat = _cost(stage, **options)
    g, num, scale = _fd(cost, flat, stage)
    np.testing.assert_allclose(g, num, rtol=3e-2, atol=3e-3 * scale)


@pytest.mark.parametrize("stage", ["affine", "bspline"])
def test_centre_chain_approximates_the_exact_gradient(stage):
    exact, flat = _cost(stage, chain="exact", distance="l2")
    centre, _ = _cost(stage, chain="centre", distance="l2")
    ve, ge = exact.evaluate_at(flat)
    ge = ge.copy()
    vc, gc = centre.evaluate_at(flat)
    assert ve == pytest.approx(vc, rel=1e-6)  # the same value: only the chain differs
    if stage == "affine":
        # dT/dt is the identity at every patch voxel: the translation gradient is exact
        np.testing.assert_allclose(gc[9:], ge[9:], rtol=1e-6, atol=1e-9 * np.abs(ge).max())
        assert not np.allclose(gc[:9], ge[:9], rtol=1e-3)
    else:
        cos = ge @ gc / (np.linalg.norm(ge) * np.linalg.norm(gc))
        assert 0.8 < cos < 0.99999  # close but not the same vector


def test_fixed_patch_gather_equals_interpolation():
    cost, flat = _cost("bspline", distance="l2")
    term = cost.term.terms[0][1]
    x = np.stack(np.unravel_index(flat, cost.level.fixed.shape), 1) @ AFF_F[:3, :3].T + AFF_F[:3, 3]
    t = term.terms[0]
    assert t.grid_offsets is not None  # patch voxels are fixed-grid voxels: the gather path
    gathered = term._fixed_patches(t, x)
    interp = term.k_patches(term.fixed_coef, x, t.offsets, term.fixed_inv, 0.0)
    np.testing.assert_allclose(gathered, interp, atol=1e-3 * np.abs(interp).max())


def test_patch_offsets_follow_the_canonical_axes():
    img = Image(np.zeros((5, 6, 7), np.float32), np.array([[0, 0, -2.0, 0], [1.5, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]]))
    off = patch_offsets(img, 3, None).reshape(3, 3, 3, 3)
    # the first patch axis runs along +R, the second +A, the third +S, in the image's steps
    np.testing.assert_allclose(off[2, 1, 1] - off[1, 1, 1], [2.0, 0, 0])
    np.testing.assert_allclose(off[1, 2, 1] - off[1, 1, 1], [0, 1.5, 0])
    np.testing.assert_allclose(off[1, 1, 2] - off[1, 1, 1], [0, 0, 1.0])
    iso = patch_offsets(img, 5, 0.5)
    np.testing.assert_allclose(np.abs(iso).max(axis=0), [1.0, 1.0, 1.0])


@pytest.mark.parametrize("options, needle", [
    ({"model": "deepbet", "layers": "11", "patch_size": 7}, "patch_size=7"),
    ({"model": "deepbet", "layers": "000001"}, "patch"),
    ({"model": "mind", "patch_size": 6}, "odd"),
])
def test_bad_jacobian_settings(options, needle):
    data = blob_volume(seed=0)
    with pytest.raises(ConfigError, match=needle):
        register((data, np.eye(4) * 2 + np.diag([0, 0, 0, -1])), (data, np.eye(4) * 2 + np.diag([0, 0, 0, -1])),
                 metric="impact", mode="jacobian", levels=1, iterations=5, affine=False, **options)


def test_jacobian_mode_recovers_a_shift():
    data = blob_volume(shape=(36, 40, 32), seed=2)
    shifted = blob_volume(shape=(36, 40, 32), seed=2, shift=(1.0, 0.0, -0.5))
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    mask = np.zeros(data.shape, np.uint8)
    mask[3:-3, 3:-3, 3:-3] = 1
    res = register((data, aff), (shifted, aff), metric="impact", mode="jacobian", fixed_mask=(mask, aff), levels=2,
                   iterations=0, affine_iterations=60, samples=300, threads=2)
    u = res.displacement[8:-8, 8:-8, 8:-8]
    # the translation is found to < 0.1 mm; the affine's linear part to ~0.2 mm over the box
    # (static mode: the same on this small blob image, 0.22 mm)
    np.testing.assert_allclose(u.reshape(-1, 3).mean(axis=0), [2.0, 0.0, -1.0], atol=0.1)
    assert np.linalg.norm(u - np.array([2.0, 0.0, -1.0]), axis=-1).mean() < 0.3


def test_with_a_moving_mask_only_patches_inside_it_are_used():
    cost, flat = _cost("bspline", distance="l2")
    lv = cost.level
    mask = np.zeros(lv.moving.shape, np.uint8)
    mask[8:20, 8:22, 8:18] = 1
    lv.moving_mask = mask
    kept, x, y, _ = cost.map_points(flat)
    assert 0 < len(kept) < len(flat)
    term = cost.term.terms[0][1]
    offsets = term.max_offsets()
    minv = lv.moving_inv
    for xi in x[:: max(1, len(x) // 20)]:
        # every voxel of the kept patches maps inside the mask (nearest voxel)
        pts = cost.transform.map_world(xi + offsets)
        q = np.floor(pts @ minv[:3, :3].T + minv[:3, 3] + 0.5).astype(int)
        assert np.all(mask[q[:, 0], q[:, 1], q[:, 2]] == 1)
