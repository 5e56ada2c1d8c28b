"""Clinical-like pairs: the moving image on its own oblique grid with thick slices and a cut field
of view (built from the MNI152 anatomy under a known deformation), the physical-space pyramid,
one feature grid for both images, and receptive fields inside the images and masks."""

import numpy as np
import pytest

from fastimpact.image import Image, make_affine
from fastimpact.synthetic import field_error, make_cross_grid_case, resample_thick_slices


@pytest.fixture(scope="module")
def case():
    return make_cross_grid_case("2mm", seed=0)


def test_cross_grid_case_geometry_and_truth(case):
    m = case.moving
    np.testing.assert_allclose(m.spacing, (1.8, 1.8, 6.0), rtol=1e-9)
    assert not np.allclose(m.affine[:3, :3] / m.spacing, np.eye(3), atol=0.05)  # oblique
    assert case.fixed.shape != m.shape
    # the truth: the moving brain sampled at x + u(x) is the fixed brain
    idx = np.argwhere(case.mask)[::50].astype(float)
    x = idx @ case.fixed.affine[:3, :3].T + case.fixed.affine[:3, 3]
    y = x + case.u_true[tuple(idx.astype(int).T)]
    q = np.rint((y - m.affine[:3, 3]) @ np.linalg.inv(m.affine[:3, :3]).T).astype(int)
    inside = np.all((q >= 0) & (q < np.array(m.shape)), axis=1)
    hit = case.moving_mask[tuple(q[inside].T)].mean()
    q0 = np.rint((x - m.affine[:3, 3]) @ np.linalg.inv(m.affine[:3, :3]).T).astype(int)
    assert inside.mean() > 0.6 and hit > 0.93  # brain lands in brain (thick slices blur the edge)
    assert case.initial_error()["mean"] > 2.5 and q0.shape == q.shape


def test_thick_slice_profile_averages_across_the_slice():
    """A slab thinner than the slice is seen at a fraction of its intensity (partial volume)."""
    vol = np.zeros((40, 40, 80), np.float32)
    vol[:, :, 40] = 1.0  # a 1 mm sheet
    aff = np.eye(4)
    shape, m_aff = (20, 20, 10), make_affine((2.0, 2.0, 4.0), (0, 0, 40 - 4 * 5))
    out = resample_thick_slices(vol, aff, shape, m_aff, order=1)
    k = int(np.argmax(out[10, 10]))
    assert 0.15 < out[10, 10, k] < 0.5  # 1 mm of a 4 mm FWHM profile
    assert out[10, 10].sum() == pytest.approx(1.0 / 4.0 * 4.0 / 4.0 * 4.0 / 4.0 * 1.0, rel=0.35)


@pytest.mark.slow
def test_mi_recovers_the_cross_grid_deformation(case):
    from fastimpact.engine import register

    r = register(case.fixed, case.moving, metric="mi", iterations=150, affine=False, threads=2)
    err = field_error(r.displacement, case.u_true, case.mask)
    assert err["mean"] < 1.7, err  # from 3.43; the pyramid shrinks in-plane axes only at 6 mm slices
    pyr = r.report["pyramid"]
    assert pyr[0]["moving_factors"][2] == pytest.approx(1.2) and pyr[1]["moving_factors"][2] == 1.0  # 6 mm slices: only to 7.2 mm


@pytest.mark.slow
def test_static_impact_converges_on_the_cross_grid_pair(case):
    """Before the physical-space pyramid and the common feature grid this diverged (19 mm)."""
    from fastimpact.engine import register

    r = register(case.fixed, case.moving, metric="impact", iterations=150, affine=False, threads=2)
    err = field_error(r.displacement, case.u_true, case.mask)
    assert err["mean"] < 2.6, err  # from 3.43
    sup = r.report["sample_support"]
    assert [s["level"] for s in sup] == [1, 2, 3] and all(s["receptive_radius_mm"] > 0 for s in sup)


def test_receptive_field_erosion_in_mm_on_an_anisotropic_grid():
    from fastimpact.engine.levels import erode_mm

    img = Image(np.zeros((30, 30, 10), np.float32), make_affine((1.0, 1.0, 3.0)))
    region, r = erode_mm(None, img, 6.0)
    assert r == 6.0
    # 6 voxels off each in-plane edge, 2 slices off each end
    assert region.sum() == (30 - 12) * (30 - 12) * (10 - 4)
    assert region[6, 6, 2] and not region[5, 6, 2] and not region[6, 6, 1]
    mask = np.zeros(img.shape, bool)
    mask[10:26, 10:26, 2:8] = True
    region, r = erode_mm(mask, img, 3.0)
    assert r == 3.0 and region.sum() == 10 * 10 * 4
    # an erosion that would leave almost nothing is halved
    region, r = erode_mm(mask, img, 12.0)
    assert r < 12.0 and region.sum() >= 0.1 * mask.sum()


def test_support_radius_from_the_manifest():
    from fastimpact.config import RegistrationConfig
    from fastimpact.features.settings import impact_settings, with_voxel_default
    from fastimpact.metrics.impact import receptive_radius_mm

    cfg = RegistrationConfig(metric="impact", model="mind")
    s = with_voxel_default(impact_settings(cfg, 0), 2.5)
    assert all(m.voxel_size == 2.5 for m in s.models)
    assert receptive_radius_mm(s) == pytest.approx(3 * 2.5)  # MIND r1d2: receptive field 7 voxels
    cfg = RegistrationConfig(metric="impact", model="mind", voxel_size=1.5)
    s = with_voxel_default(impact_settings(cfg, 0), 2.5)
    assert s.models[0].voxel_size == 1.5  # an explicit voxel size wins


def test_static_features_of_both_images_share_one_voxel_size(monkeypatch):
    """Fixed at 2 mm, moving at 1.5 x 1.5 x 4.5 mm: both feature maps come out at one spacing."""
    from fastimpact.engine import register
    from fastimpact.engine.terms import IMPACT_BUILDERS

    seen = []
    real = IMPACT_BUILDERS["static"]

    def spy(settings, *a, **k):
        seen.append([m.voxel_size for m in settings.models])
        term = real(settings, *a, **k)
        seen.append([(np.linalg.inv(p.fixed_inv), np.linalg.inv(p.moving_inv)) for p in term.pairs])
        return term

    monkeypatch.setitem(IMPACT_BUILDERS, "static", spy)
    rng = np.random.default_rng(0)
    i, j, k = np.meshgrid(*[np.arange(n) for n in (24, 24, 24)], indexing="ij")
    blob = np.exp(-((i - 12) ** 2 + (j - 11) ** 2 + (k - 13) ** 2) / 40.0).astype(np.float32)
    fixed = Image(blob + 0.01 * rng.random(blob.shape, dtype=np.float32), make_affine((2.0, 2.0, 2.0)))
    shape, m_aff = (32, 32, 11), make_affine((1.5, 1.5, 4.5), (-0.25, -0.25, -0.5))
    moving = Image(resample_thick_slices(blob, fixed.affine, shape, m_aff, order=1), m_aff)
    register(fixed, moving, metric="impact", levels=1, iterations=3, affine=False, samples=200, threads=1)
    assert seen[0] == [2.0]
    assert seen[1]
    for fa, ma in seen[1]:
        np.testing.assert_allclose(np.linalg.norm(fa[:3, :3], axis=0), 2.0, rtol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(ma[:3, :3], axis=0), 2.0, rtol=1e-6)


def test_field_of_view_of_a_cbct_like_disc_is_found_and_a_head_is_left_alone():
    from fastimpact.fov import detect_field_of_view
    from fastimpact.synthetic import _load_template

    rng = np.random.default_rng(0)
    vol = rng.normal(0, 50, (50, 52, 20)).astype(np.float32)
    i, j = np.meshgrid(np.arange(50), np.arange(52), indexing="ij")
    disc = (i - 25) ** 2 + (j - 26) ** 2 < 21**2
    vol[~disc] = -1000.0
    region, info = detect_field_of_view(vol)
    assert info["axis"] == 2 and info["background_value"] == -1000.0
    np.testing.assert_array_equal(region, np.broadcast_to(disc[:, :, None], vol.shape))
    # the disc along another axis, and a few cut slices at the ends
    vol2 = np.moveaxis(vol, 2, 0).copy()
    vol2[:2] = -1000.0
    region2, info2 = detect_field_of_view(vol2)
    assert info2["axis"] == 0 and not region2[:2].any()
    # an ordinary head on an exactly-zero background: its outline changes from slice to slice
    t1 = _load_template("2mm")[0]
    assert (t1 == 0).mean() > 0.2 and detect_field_of_view(t1) is None
    assert detect_field_of_view(rng.normal(size=(20, 20, 20))) is None  # no constant background


def test_registration_uses_the_detected_field_of_view_as_moving_mask():
    from fastimpact.engine import register

    rng = np.random.default_rng(1)
    i, j, k = np.meshgrid(*[np.arange(n) for n in (32, 32, 24)], indexing="ij")
    blob = (np.exp(-((i - 15) ** 2 + (j - 16) ** 2 + (k - 12) ** 2) / 60.0) * 100).astype(np.float32)
    moving = blob + rng.normal(0, 1, blob.shape).astype(np.float32)
    moving[(i - 16) ** 2 + (j - 16) ** 2 >= 13**2] = -1000.0
    aff = make_affine((2.0, 2.0, 2.0))
    common = dict(metric="mi", levels=1, iterations=5, affine=False, samples=300, threads=1)
    r = register(Image(blob, aff), Image(moving, aff), **common)
    assert r.report["field_of_view"]["moving"]["axis"] == 2
    assert "fixed" not in r.report["field_of_view"]
    r_off = register(Image(blob, aff), Image(moving, aff), fov_mask="off", **common)
    assert "field_of_view" not in r_off.report
