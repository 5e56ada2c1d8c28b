"""The CT / CBCT-like known-truth case built from the shipped real chest CT (fastimpact.synthetic_ct)."""

from __future__ import annotations

import time
from importlib import resources

import numpy as np
import pytest
from scipy import ndimage

from fastimpact.errors import ConfigError
from fastimpact.synthetic import jacobian_determinant
from fastimpact.synthetic_ct import (
    CT_FILE,
    cbct_artefacts,
    load_chest_ct,
    make_ct_cbct_case,
)


@pytest.fixture(scope="module")
def case():
    return make_ct_cbct_case(seed=0, size="small")


def _world(affine, idx):
    return idx @ affine[:3, :3].T + affine[:3, 3]


def test_shipped_ct_is_the_documented_real_ct():
    sitk = pytest.importorskip("SimpleITK")
    ct = load_chest_ct()
    assert ct.shape == (256, 220, 48)
    assert ct.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(ct.affine[:3, :3], axis=0), (1.140625, 1.140625, 5.0))
    # LPS-style axes of the original DICOM-derived NRRD: RAS x and y decrease along i and j
    np.testing.assert_allclose(np.sign(np.diag(ct.affine[:3, :3])), (-1, -1, 1))
    a = np.asarray(ct.data)
    assert a.min() >= -1024 and a.max() <= 3071 and np.all(a == np.rint(a))
    # independent reader (ITK, LPS) agrees with the RAS affine
    path = resources.files("fastimpact.data").joinpath(CT_FILE)
    im = sitk.ReadImage(str(path))
    np.testing.assert_allclose(im.GetSpacing(), (1.140625, 1.140625, 5.0))
    origin_ras = np.array(im.GetOrigin()) * (-1, -1, 1)
    np.testing.assert_allclose(origin_ras, ct.affine[:3, 3], atol=1e-4)
    np.testing.assert_array_equal(np.transpose(sitk.GetArrayFromImage(im), (2, 1, 0)), a)
    # shipped small, with its licence and provenance
    assert path.stat().st_size < 2.5e6
    lic = resources.files("fastimpact.data").joinpath("LICENSE_pyradiomics.txt").read_text()
    assert "lung1_image.nrrd" in lic and "Redistribution and use in source and binary forms" in lic


def test_grids_as_documented(case):
    ct = load_chest_ct()
    fx, mv = case.fixed, case.moving
    # fixed: the real CT, 3 x 3 in-plane block mean, slices kept
    assert fx.shape == (85, 73, 48)
    np.testing.assert_allclose(np.linalg.norm(fx.affine[:3, :3], axis=0), (3.421875, 3.421875, 5.0))
    np.testing.assert_allclose(fx.data[0, 0, 0], np.asarray(ct.data)[0:3, 0:3, 0].mean(), atol=1e-3)
    np.testing.assert_allclose(fx.data[10, 20, 30], np.asarray(ct.data)[30:33, 60:63, 30].mean(), atol=1e-3)
    centre3 = _world(ct.affine, np.array([31.0, 61.0, 30.0]))  # centre of that block
    np.testing.assert_allclose(_world(fx.affine, np.array([10.0, 20.0, 30.0])), centre3, atol=1e-9)
    # moving: isotropic 3 mm, axis-aligned RAS+ (the CT's x and y axes point the other way)
    np.testing.assert_allclose(mv.affine[:3, :3], np.diag([3.0, 3.0, 3.0]))
    assert mv.dtype == np.float32 and mv.shape != fx.shape
    assert case.info["fixed_spacing_mm"] == (3.421875, 3.421875, 5.0)
    assert case.info["moving_spacing_mm"] == (3.0, 3.0, 3.0)
    # the CBCT is shorter than the CT and lies inside it along z
    z0, z1 = case.fov["z_range_mm"]
    ct_z = fx.affine[2, 3] + 5.0 * np.array([0, fx.shape[2] - 1])
    assert ct_z[0] + 10 < z0 < z1 < ct_z[1] - 10
    np.testing.assert_allclose(z1 - z0, 3.0 * (mv.shape[2] - 1))


def test_field_of_view_is_a_disc_with_constant_outside(case):
    mv = case.moving
    cx, cy = case.fov["centre_ras"]
    r = case.fov["radius_mm"]
    assert 120 <= r <= 135
    ii, jj = np.meshgrid(np.arange(mv.shape[0]), np.arange(mv.shape[1]), indexing="ij")
    w = _world(mv.affine, np.stack([ii, jj, np.zeros_like(ii)], -1).astype(float))
    disc = (w[..., 0] - cx) ** 2 + (w[..., 1] - cy) ** 2 <= r**2
    np.testing.assert_array_equal(case.moving_mask, np.broadcast_to(disc[..., None], mv.shape))
    np.testing.assert_allclose(disc.sum() * 9.0, np.pi * r**2, rtol=0.03)
    data = np.asarray(mv.data)
    outside = data[~case.moving_mask]
    assert np.all(outside == outside[0]) and outside[0] == np.float32(case.info["background"])
    assert data[case.moving_mask].std() > 100  # real anatomy inside
    # the disc truncates the patient: part of the body maps outside it
    assert 0.3 * case.body.sum() < case.mask.sum() < 0.9 * case.body.sum()
    assert not np.any(case.mask & ~case.body)


def test_u_true_is_smooth_invertible_and_the_inverse_of_v(case):
    u = case.u_true
    assert u.shape == case.fixed.shape + (3,) and u.dtype == np.float32
    det = jacobian_determinant(u, case.fixed.affine)
    assert det.min() > 0.3
    assert abs(det.min() - case.min_jacobian) < 1e-6
    norm = np.linalg.norm(u[case.mask], axis=-1)
    assert 7.0 < norm.max() <= 10.5 and 2.0 < norm.mean() < 6.0
    # smooth: voxel-to-voxel change per mm well below 1
    for ax, h in enumerate((3.421875, 3.421875, 5.0)):
        assert np.abs(np.diff(u, axis=ax)).max() / h < 0.5
    # independent inverse check: moving y -> fixed x = y + v(y) -> moving x + u(x) must be y again
    fov = case.moving_mask
    idx = np.argwhere(fov)[::37].astype(np.float64)
    y = _world(case.moving.affine, idx)
    x = y + case.v_moving[fov][::37]
    inv = np.linalg.inv(case.fixed.affine)
    fi = x @ inv[:3, :3].T + inv[:3, 3]
    inside = np.all((fi >= 1) & (fi <= np.array(case.fixed.shape) - 2), axis=1)
    assert inside.sum() > 3000
    ux = np.stack(
        [ndimage.map_coordinates(u[..., c].astype(np.float64), fi[inside].T, order=3) for c in range(3)],
        axis=-1,
    )
    err = np.linalg.norm(x[inside] + ux - y[inside], axis=1)
    assert err.max() < 0.05 and np.median(err) < 0.005
    assert case.info["inverse_residual_mm"] < 0.01


def test_moving_warped_back_by_u_true_matches_the_ct(case):
    """Resample the CBCT onto the CT grid with ITK and u_true (LPS): the anatomy lines up."""
    sitk = pytest.importorskip("SimpleITK")
    from fastimpact.io import itk_from_affine

    def to_sitk(arr, aff):
        im = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(arr, (2, 1, 0))).astype(np.float32))
        o, s, d = itk_from_affine(aff)
        im.SetOrigin(o)
        im.SetSpacing(s)
        im.SetDirection(d)
        return im

    fix = to_sitk(case.fixed.data, case.fixed.affine)
    mov = to_sitk(case.moving.data, case.moving.affine)
    u_lps = case.u_true.astype(np.float64) * np.array([-1.0, -1.0, 1.0])
    disp = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(u_lps, (2, 1, 0, 3))), isVector=True)
    disp.CopyInformation(fix)
    tx = sitk.DisplacementFieldTransform(disp)
    back = np.transpose(sitk.GetArrayFromImage(sitk.Resample(mov, fix, tx, sitk.sitkLinear, -9999.0)), (2, 1, 0))
    ident = np.transpose(
        sitk.GetArrayFromImage(sitk.Resample(mov, fix, sitk.Transform(), sitk.sitkLinear, -9999.0)), (2, 1, 0)
    )
    ct = np.asarray(case.fixed.data)
    m = case.mask
    assert np.all(back[m] > -9000)  # the evaluation mask maps inside the CBCT
    lungs = case.lungs & m & (ident > -9000)
    assert lungs.sum() > 2000
    c_true = np.corrcoef(back[lungs], ct[lungs])[0, 1]
    c_id = np.corrcoef(ident[lungs], ct[lungs])[0, 1]
    assert c_true > 0.85 and c_id < c_true - 0.3, (c_true, c_id)
    body = m & (ident > -9000)
    assert np.corrcoef(back[body], ct[body])[0, 1] > 0.97
    # the intensity scale differs from HU (a linear fit back.gain + offset, not the identity)
    slope = np.polyfit(ct[m], back[m], 1)[0]
    assert 0.6 < slope < 0.95


def test_masks_are_anatomy(case):
    ct = np.asarray(case.fixed.data)
    vox_ml = 3.421875**2 * 5.0 / 1000.0
    assert np.median(ct[case.lungs]) < -700
    assert -200 < np.median(ct[case.body & ~case.lungs]) < 150
    assert not np.any(case.lungs & ~case.body)
    assert 1500 < case.lungs.sum() * vox_ml < 7000  # ml: part of both lungs (240 mm of chest)
    # two lungs, one on each side of the body's centre (RAS x)
    lab, n = ndimage.label(case.lungs)
    assert n >= 2
    sizes = np.bincount(lab.ravel())[1:]
    big = np.argsort(sizes)[-2:] + 1
    xs = [_world(case.fixed.affine, np.array(ndimage.center_of_mass(lab == b)))[0] for b in big]
    cx = _world(case.fixed.affine, np.array(ndimage.center_of_mass(case.body)))[0]
    assert min(xs) < cx < max(xs)


def test_cbct_artefacts_on_a_water_phantom():
    """Uniform water (0 HU): cupping lowers the centre, gain/offset set the scale, outside is constant."""
    shape = (81, 81, 6)
    aff = np.diag([2.0, 2.0, 3.0, 1.0])
    aff[:3, 3] = (-80.0, -80.0, 0.0)
    out, fov, p = cbct_artefacts(np.zeros(shape), aff, (0.0, 0.0), 78.0, seed=3)
    xs = 2.0 * np.arange(81) - 80.0
    r = np.hypot(xs[:, None], xs[None, :])
    np.testing.assert_array_equal(fov[..., 0], r <= 78.0)
    assert np.all(out[~fov] == np.float32(p["background"])) and p["background"] == np.float32(p["offset"])
    assert 12 <= p["streaks"] <= 24  # 2-4 per slice
    expected = p["gain"] * 1000.0 * (1.0 - p["cupping"] * (1.0 - (r / 78.0) ** 2)) + p["offset"]
    med = np.median(out, axis=2)
    centre, ring = r < 15, (r > 60) & (r < 75)
    for region in (centre, ring):
        assert abs(np.median(med[region]) - np.median(expected[region])) < 10.0
    drop = np.median(expected[ring]) - np.median(expected[centre])  # the cupping, about 60-120
    assert drop > 50 and np.median(med[ring]) - np.median(med[centre]) > 0.7 * drop
    # noise of the documented size (robust estimate from neighbour differences)
    d = np.diff(out, axis=1)[(r[:, 1:] < 60) & (r[:, :-1] < 60)]
    sigma = 1.4826 * np.median(np.abs(d - np.median(d))) / np.sqrt(2)
    white = p["noise_std_hu"] * p["gain"]
    assert 0.8 * white < sigma < 1.6 * white, (sigma, white)
    again = cbct_artefacts(np.zeros(shape), aff, (0.0, 0.0), 78.0, seed=3)[0]
    np.testing.assert_array_equal(out, again)
    with pytest.raises(ConfigError, match="axis-aligned"):
        rot = aff.copy()
        rot[:2, :2] = [[0.0, -2.0], [2.0, 0.0]]
        rot[0, 1], rot[1, 0] = 1.0, 1.9
        cbct_artefacts(np.zeros(shape), rot, (0.0, 0.0), 78.0)


def test_seeds_deterministic_and_small_is_fast(case):
    t0 = time.process_time()
    again = make_ct_cbct_case(seed=0, size="small")
    cpu = time.process_time() - t0
    assert cpu < 5.0, f"small case took {cpu:.1f} s of CPU"
    np.testing.assert_array_equal(again.moving.data, case.moving.data)
    np.testing.assert_array_equal(again.u_true, case.u_true)
    np.testing.assert_array_equal(again.moving.affine, case.moving.affine)
    other = make_ct_cbct_case(seed=1, size="small")
    assert np.abs(other.u_true - case.u_true).max() > 1.0
    assert other.fov != case.fov


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"size": "huge"}, "size must be one of small, full"),
        ({"max_mm": 0.0}, "max_mm must be > 0"),
        ({"smoothness_mm": -5.0}, "smoothness_mm must be > 0"),
        ({"moving_spacing": 0.0}, "moving_spacing must be > 0"),
        ({"max_mm": 60.0, "smoothness_mm": 20.0}, "folds|too short|inverted"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        make_ct_cbct_case(**kwargs)


def test_full_size_keeps_the_real_ct_grid(case):
    """size="full": the fixed image is the shipped CT itself (a coarse CBCT keeps the test short)."""
    ct = load_chest_ct()
    full = make_ct_cbct_case(seed=0, size="full", moving_spacing=4.0)
    np.testing.assert_array_equal(full.fixed.data, ct.data)
    np.testing.assert_array_equal(full.fixed.affine, ct.affine)
    np.testing.assert_allclose(full.moving.affine[:3, :3], np.diag([4.0, 4.0, 4.0]))
    assert full.info["fixed_spacing_mm"] == (1.140625, 1.140625, 5.0)
    assert full.u_true.shape == (256, 220, 48, 3) and full.min_jacobian > 0.3
    assert full.info["inverse_residual_mm"] < 0.01
    # the same seed gives the same world-space field on both sizes: compare at shared world points
    small = case
    assert small.fov["centre_ras"] == full.fov["centre_ras"] and small.fov["radius_mm"] == full.fov["radius_mm"]
    assert small.fov["z_range_mm"][0] == full.fov["z_range_mm"][0]
    # small voxel (i, j, k) is the centre of full voxels 3i..3i+2 (+1 = centre), same slice
    np.testing.assert_allclose(full.u_true[1::3, 1::3][:85, :73], small.u_true, atol=0.01)
