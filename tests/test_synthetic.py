"""Tests of fastimpact.synthetic: known-truth cases (fields, warping, intensity changes, errors)."""

import numpy as np
import pytest
from scipy import ndimage
from scipy.stats import spearmanr

from fastimpact import synthetic as S
from fastimpact.errors import ConfigError, FastImpactError

SHAPE = (45, 63, 37)


def oblique_affine():
    """2 x 2 x 2.5 mm voxels, rotated 0.3 rad about z and flipped in k: exercises the affine."""
    c, s = np.cos(0.3), np.sin(0.3)
    return np.array(
        [[2 * c, -2 * s, 0, -40], [2 * s, 2 * c, 0, -60], [0, 0, -2.5, 30], [0, 0, 0, 1.0]]
    )


def world_grid(shape, affine):
    idx = np.indices(shape, dtype=np.float64).reshape(3, -1)
    return (affine[:3, :3] @ idx + affine[:3, 3:]).T.reshape(shape + (3,))


# --- smooth_displacement ----------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_field_has_the_stated_maximum_and_is_smooth(seed):
    u = S.smooth_displacement(SHAPE, oblique_affine(), max_mm=7.0, seed=seed, smoothness_mm=40.0)
    assert u.shape == SHAPE + (3,) and u.dtype == np.float32
    norm = np.linalg.norm(u, axis=-1)
    assert norm.max() == pytest.approx(7.0, rel=1e-5)
    # Smooth: a 1-voxel Gaussian blur barely changes it (white noise would change by ~max).
    blurred = np.stack([ndimage.gaussian_filter(u[..., k], 1.0) for k in range(3)], axis=-1)
    inner = (slice(3, -3),) * 3
    assert np.abs(blurred - u)[inner].max() < 0.02 * 7.0
    # Not trivially small anywhere on average: a real deformation.
    assert norm.mean() > 0.15 * 7.0


def test_field_maximum_is_taken_inside_the_mask():
    mask = np.zeros(SHAPE, bool)
    mask[10:30, 20:40, 10:25] = True
    u = S.smooth_displacement(SHAPE, oblique_affine(), max_mm=5.0, seed=4, mask=mask)
    norm = np.linalg.norm(u, axis=-1)
    assert norm[mask].max() == pytest.approx(5.0, rel=1e-5)
    assert norm.max() >= norm[mask].max()


@pytest.mark.parametrize("seed", [0, 3])
def test_jacobian_determinant_positive_and_matches_finite_differences(seed):
    affine = oblique_affine()
    u, min_det = S.smooth_displacement(
        SHAPE, affine, max_mm=8.0, seed=seed, return_min_jacobian=True
    )
    assert min_det > S.MIN_JACOBIAN
    det = S.jacobian_determinant(u, affine)
    assert det.min() > 0
    assert det.min() == pytest.approx(min_det, abs=0.02)


def test_folding_field_is_rejected():
    with pytest.raises(ConfigError, match="folds"):
        S.smooth_displacement(SHAPE, oblique_affine(), max_mm=40.0, seed=0, smoothness_mm=10.0)


def test_same_seed_same_field_other_seed_other_field():
    a = S.smooth_displacement(SHAPE, oblique_affine(), seed=7)
    b = S.smooth_displacement(SHAPE, oblique_affine(), seed=7)
    c = S.smooth_displacement(SHAPE, oblique_affine(), seed=8)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1.0


@pytest.mark.parametrize(
    "kwargs",
    [dict(max_mm=0.0), dict(max_mm=-1.0), dict(smoothness_mm=0.0), dict(mask=np.zeros(SHAPE, bool))],
)
def test_invalid_field_parameters_are_rejected(kwargs):
    with pytest.raises(ConfigError):
        S.smooth_displacement(SHAPE, oblique_affine(), **kwargs)


def test_singular_affine_is_rejected():
    with pytest.raises(FastImpactError, match="affine"):
        S.smooth_displacement(SHAPE, np.zeros((4, 4)))


# --- warp ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", [1, 3])
def test_warp_convention_on_a_linear_image(order):
    """out(x) = I(x + u(x)): exact for a linear I (in world mm) away from the border."""
    affine = oblique_affine()
    x = world_grid(SHAPE, affine)
    a = np.array([0.3, -0.7, 1.1])
    image = x @ a
    u = S.smooth_displacement(SHAPE, affine, max_mm=3.0, seed=5)
    out = S.warp(image, affine, u, order=order)
    expected = (x + u) @ a
    inner = (slice(4, -4),) * 3
    np.testing.assert_allclose(out[inner], expected[inner], atol=1e-2)  # values up to ~100
    # The opposite sign convention would be off by ~2 |a.u|: make sure the test can tell.
    assert np.abs((x - u) @ a - expected)[inner].max() > 1.0


def test_warp_of_smooth_image_matches_analytic_resampling():
    affine = oblique_affine()
    x = world_grid(SHAPE, affine)
    centre = x.reshape(-1, 3).mean(axis=0)

    def blob(p):
        return 100.0 * np.exp(-((p - centre) ** 2).sum(-1) / (2 * 15.0**2))

    u = S.smooth_displacement(SHAPE, affine, max_mm=6.0, seed=1)
    out = S.warp(blob(x), affine, u, order=3)
    truth = blob(x + u)
    inner = (slice(4, -4),) * 3
    err = np.abs(out - truth)[inner]
    assert err.max() < 0.05  # cubic interpolation of a 15 mm blob on 2-2.5 mm voxels
    # and it is a real warp, whose sign matters: both alternatives are off by > 100x that
    assert np.abs(blob(x) - truth)[inner].max() > 2.0
    assert np.abs(S.warp(blob(x), affine, -u) - truth)[inner].max() > 2.0


def test_warp_is_deterministic_and_identity_preserves_image():
    rng = np.random.default_rng(0)
    img = ndimage.gaussian_filter(rng.normal(size=SHAPE), 2.0)
    u = S.smooth_displacement(SHAPE, oblique_affine(), seed=2)
    np.testing.assert_array_equal(S.warp(img, oblique_affine(), u), S.warp(img, oblique_affine(), u))
    same = S.warp(img, oblique_affine(), np.zeros(SHAPE + (3,), np.float32))
    np.testing.assert_allclose(same, img, atol=1e-5)


def test_warp_rejects_a_field_on_another_grid():
    with pytest.raises(ConfigError, match="grid"):
        S.warp(np.zeros(SHAPE), oblique_affine(), np.zeros((10, 10, 10, 3)))


# --- field_error ---------------------------------------------------------------------------------


def test_field_error_of_itself_is_zero_and_of_an_offset_is_the_offset():
    u = S.smooth_displacement(SHAPE, oblique_affine(), seed=0)
    zero = S.field_error(u, u)
    assert zero == {"mean": 0.0, "p95": 0.0, "max": 0.0}
    shifted = u + np.array([3.0, 4.0, 0.0], np.float32)
    mask = np.zeros(SHAPE, bool)
    mask[5:20, 5:20, 5:20] = True
    err = S.field_error(shifted, u, mask)
    for key in ("mean", "p95", "max"):
        assert err[key] == pytest.approx(5.0, abs=1e-5)


def test_field_error_is_taken_inside_the_mask_only():
    u = np.zeros(SHAPE + (3,), np.float32)
    est = u.copy()
    est[:10, ..., 0] = 2.0
    mask = np.zeros(SHAPE, bool)
    mask[20:] = True
    assert S.field_error(est, u, mask)["max"] == 0.0
    assert S.field_error(est, u)["max"] == pytest.approx(2.0)


def test_field_error_rejects_mismatched_fields():
    with pytest.raises(ConfigError):
        S.field_error(np.zeros((4, 4, 4, 3)), np.zeros((5, 4, 4, 3)))


# --- intensity changes ----------------------------------------------------------------------------


def test_contrast_change_is_non_monotonic_but_keeps_structure():
    rng = np.random.default_rng(1)
    img = ndimage.gaussian_filter(rng.uniform(0, 255, size=SHAPE), 1.5)
    img = (img - img.min()) / np.ptp(img) * 255
    out = S.contrast_change(img, seed=3)
    rho = spearmanr(img.ravel(), out.ravel()).statistic
    assert rho < 0.9  # the order of intensities is partly swapped
    # but the output is a function of the input (plus noise/bias), not an unrelated image:
    # binned means of the output vary strongly with the input intensity
    bins = np.digitize(img, np.linspace(0, 255, 17))
    means = np.array([out[bins == b].mean() for b in np.unique(bins)])
    assert np.ptp(means) > 0.3 * np.ptp(img)
    np.testing.assert_array_equal(out, S.contrast_change(img, seed=3))


# --- cases from real anatomy (2 mm MNI152 demo data) --------------------------------------------


@pytest.fixture(scope="module")
def mono_case():
    return S.make_case("mono", "2mm", seed=0)


def test_case_geometry_and_truth(mono_case):
    c = mono_case
    assert c.fixed.shape == c.moving.shape == c.mask.shape == c.u_true.shape[:3]
    np.testing.assert_array_equal(c.fixed.affine, c.moving.affine)
    assert c.min_jacobian > S.MIN_JACOBIAN
    norm = np.linalg.norm(c.u_true, axis=-1)
    assert norm[c.moving_mask].max() == pytest.approx(10.0, rel=1e-4)
    init = c.initial_error()
    assert 1.0 < init["mean"] < init["p95"] <= init["max"] <= 10.5
    # A brain mask: a sizeable part of the image, not all of it.
    assert 0.05 < c.mask.mean() < 0.5


def test_moving_resampled_with_truth_reproduces_fixed(mono_case):
    c = mono_case
    fixed = np.asarray(c.fixed.data)
    moving = np.asarray(c.moving.data)
    back = S.warp(moving, c.moving.affine, c.u_true)
    err_truth = np.abs(back - fixed)[c.mask].mean()
    err_identity = np.abs(moving - fixed)[c.mask].mean()
    err_wrong_sign = np.abs(S.warp(moving, c.moving.affine, -c.u_true) - fixed)[c.mask].mean()
    assert err_truth < 0.01 * err_identity
    assert err_wrong_sign > 0.5 * err_identity
    # The fixed brain mask is the moving one carried along by the field.
    carried = S.warp(c.moving_mask.astype(np.float32), c.moving.affine, c.u_true, order=1) > 0.5
    assert (carried ^ c.mask).mean() < 0.01


def test_same_seed_gives_identical_case(mono_case):
    again = S.make_case("mono", "2mm", seed=0)
    np.testing.assert_array_equal(again.u_true, mono_case.u_true)
    np.testing.assert_array_equal(np.asarray(again.fixed.data), np.asarray(mono_case.fixed.data))
    other = S.make_case("mono", "2mm", seed=1)
    assert np.abs(other.u_true - mono_case.u_true).max() > 1.0


def test_contrast_case_changes_intensity_order_in_the_brain(mono_case):
    c = S.make_case("contrast", "2mm", seed=0)
    np.testing.assert_array_equal(c.u_true, mono_case.u_true)  # same field stream
    before = np.asarray(mono_case.moving.data)[c.moving_mask]
    after = np.asarray(c.moving.data)[c.moving_mask]
    rho = spearmanr(before, after).statistic
    assert rho < 0.9
    assert np.array_equal(c.moving.data, S.make_case("contrast", "2mm", seed=0).moving.data)


def test_t2_like_case_has_t2_tissue_order(mono_case):
    c = S.make_case("t2", "2mm", seed=0)
    t2 = np.asarray(c.moving.data)
    t1 = np.asarray(mono_case.moving.data)
    gm, wm = c.moving_gm, c.moving_wm
    csf = (t1 > 0.05 * np.percentile(t1, 99)) & (gm + wm < 0.1)
    assert csf.sum() > 100
    # T2 order CSF > GM > WM, the reverse of T1's
    assert np.median(t2[wm > 0.8]) < np.median(t2[gm > 0.8]) < np.median(t2[csf])
    assert np.median(t1[wm > 0.8]) > np.median(t1[gm > 0.8]) > np.median(t1[csf])
    assert spearmanr(t1[c.moving_mask], t2[c.moving_mask]).statistic < 0


@pytest.mark.parametrize("kind,res", [("ct", "2mm"), ("mono", "3mm")])
def test_make_case_rejects_unknown_kind_or_resolution(kind, res):
    with pytest.raises(ConfigError, match="one of"):
        S.make_case(kind, res)
