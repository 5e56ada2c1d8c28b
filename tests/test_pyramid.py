"""Pyramid geometry: levels cover the same physical box; smoothing; masks."""

import numpy as np
import pytest

from fastimpact.errors import ConfigError
from fastimpact.image import Image
from fastimpact.pyramid import build_pyramid, default_factors, level_geometry


def test_factors():
    assert default_factors(3) == [4, 2, 1]
    with pytest.raises(ConfigError):
        default_factors(0)


def test_levels_cover_the_same_box_and_keep_direction():
    aff = np.array([[0, -1.5, 0, 10], [1.2, 0, 0, -5], [0, 0, 2.0, 3], [0, 0, 0, 1]], dtype=float)
    shape = (45, 63, 37)
    for f in (2, 4):
        s, a, _ = level_geometry(shape, aff, f)
        assert s == tuple(int(np.ceil(n / f)) for n in shape)
        # box centre preserved
        c0 = aff[:3, :3] @ ((np.array(shape) - 1) / 2) + aff[:3, 3]
        c1 = a[:3, :3] @ ((np.array(s) - 1) / 2) + a[:3, 3]
        np.testing.assert_allclose(c0, c1, atol=1e-9)
        np.testing.assert_allclose(a[:3, :3], aff[:3, :3] * f)


def test_pyramid_samples_a_linear_ramp_exactly_and_masks_stay_binary():
    shape = (45, 63, 37)
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    i, j, k = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    ramp = 2 * i + 3 * j - k
    pyr = build_pyramid(Image(ramp, aff), [4, 2, 1])
    for level in pyr:
        idx = np.stack(np.meshgrid(*[np.arange(n) for n in level.shape], indexing="ij"), -1).astype(float)
        x = idx @ level.affine[:3, :3].T + level.affine[:3, 3]  # world == original index
        expect = 2 * x[..., 0] + 3 * x[..., 1] - x[..., 2]
        inner = (slice(3, -3),) * 3  # away from the smoothing boundary
        np.testing.assert_allclose(level.data[inner], expect[inner], atol=1e-3)
    mask = np.zeros(shape, bool)
    mask[10:30, 10:40, 5:30] = True
    mp = build_pyramid(Image(mask, aff), [4, 2, 1], is_mask=True)
    assert all(m.data.dtype == bool for m in mp)
    assert 0 < mp[0].data.sum() < mp[0].data.size


def test_smoothing_matches_the_gaussian_of_each_level():
    """A sinusoid of wavelength L voxels loses exp(-2 pi^2 s^2 / L^2) of its amplitude under a
    Gaussian of sigma s: the cascade must give s = 0.5 f original voxels at shrink factor f."""
    n, wavelength = 65, 16.0  # 65 voxels: every level samples original voxel centres exactly
    x = np.arange(n, dtype=np.float64)
    wave = np.cos(2 * np.pi * x / wavelength)
    img = np.broadcast_to(wave[:, None, None], (n, 9, 9)).astype(np.float32)
    pyr = build_pyramid(Image(img, np.eye(4)), [4, 2, 1])
    for level, f in zip(pyr, (4, 2, 1)):
        xs = level.affine[0, 0] * np.arange(level.shape[0]) + level.affine[0, 3]  # original x of voxels
        inner = slice(4, -4)  # away from the boundary
        profile = level.data[:, level.shape[1] // 2, level.shape[2] // 2].astype(np.float64)
        amp = np.linalg.lstsq(np.cos(2 * np.pi * xs / wavelength)[inner, None], profile[inner], rcond=None)[0][0]
        sigma = 0.5 * f if f > 1 else 0.0
        np.testing.assert_allclose(amp, np.exp(-2 * np.pi**2 * sigma**2 / wavelength**2), rtol=0.01)


# --- physical-space pyramid: per-axis factors, one target spacing for both images --------------
from fastimpact.pyramid import axis_factors, check_level_shapes, plan_pyramid  # noqa: E402


def _oblique(spacing, angle_deg=20.0, origin=(3.0, -7.0, 11.0)):
    from fastimpact.image import make_affine

    a = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1.0]])
    tilt = np.array([[1, 0, 0], [0, np.cos(a / 2), -np.sin(a / 2)], [0, np.sin(a / 2), np.cos(a / 2)]])
    return make_affine(spacing, origin, rot @ tilt)


def test_thick_slices_are_not_coarsened_until_the_in_plane_spacing_catches_up():
    plan = plan_pyramid((1.14, 1.14, 5.0), (1.14, 1.14, 5.0), 3)
    np.testing.assert_allclose(plan.target_mm, (4.56, 2.28, 1.14))
    np.testing.assert_allclose([p.factors for p in plan.fixed], [(4, 4, 1), (2, 2, 1), (1, 1, 1)])
    # smoothing only along shrunk axes, sigma 0.5 x the level spacing in mm
    np.testing.assert_allclose(plan.fixed[0].sigma_mm, (2.28, 2.28, 0.0))
    np.testing.assert_allclose(plan.fixed[2].sigma_mm, (0.0, 0.0, 0.0))
    # five levels: the slice axis is shrunk once the target passes 5 mm
    plan5 = plan_pyramid((1.0, 1.0, 5.0), (1.0, 1.0, 5.0), 5)
    np.testing.assert_allclose(plan5.fixed[0].factors, (16, 16, 16 / 5))
    np.testing.assert_allclose(plan5.fixed[1].factors, (8, 8, 8 / 5))
    np.testing.assert_allclose(plan5.fixed[2].factors, (4, 4, 1))


def test_fixed_and_moving_on_different_grids_meet_at_one_spacing_per_level():
    fixed_aff, moving_aff = np.diag([1.0, 1.0, 1.0, 1.0]), _oblique((0.9, 0.9, 4.0))
    fshape, mshape = (60, 70, 50), (70, 80, 14)
    plan = plan_pyramid(np.ones(3), (0.9, 0.9, 4.0), 3)
    np.testing.assert_allclose(plan.target_mm, (3.6, 1.8, 0.9))
    rng = np.random.default_rng(0)
    fpyr = build_pyramid(Image(rng.random(fshape, dtype=np.float32), fixed_aff), plan.fixed)
    mpyr = build_pyramid(Image(rng.random(mshape, dtype=np.float32), moving_aff), plan.moving)
    for li, (f, m) in enumerate(zip(fpyr, mpyr)):
        t = plan.target_mm[li]
        # every axis at the target spacing, or at its own spacing where that is coarser
        np.testing.assert_allclose(f.spacing, np.maximum(t, 1.0), rtol=1e-9)
        np.testing.assert_allclose(m.spacing, np.maximum(t, (0.9, 0.9, 4.0)), rtol=1e-9)
        # the direction cosines and the box centre are kept (oblique grid)
        np.testing.assert_allclose(m.affine[:3, :3] / m.spacing, moving_aff[:3, :3] / (0.9, 0.9, 4.0), atol=1e-12)
        c0 = moving_aff[:3, :3] @ ((np.array(mshape) - 1) / 2) + moving_aff[:3, 3]
        c1 = m.affine[:3, :3] @ ((np.array(m.shape) - 1) / 2) + m.affine[:3, 3]
        np.testing.assert_allclose(c0, c1, atol=1e-9)
    assert mpyr[0].shape[2] == mshape[2]  # 4 mm slices untouched at 3.6 mm
    assert mpyr[-1].data is not None and mpyr[-1].shape == mshape


def test_anisotropic_level_samples_a_ramp_exactly_on_an_oblique_grid():
    aff = _oblique((1.0, 1.0, 3.0))
    shape = (41, 47, 15)
    i, j, k = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    world = np.stack([i, j, k], -1) @ aff[:3, :3].T + aff[:3, 3]
    ramp = (0.5 * world[..., 0] - 0.25 * world[..., 1] + world[..., 2]).astype(np.float32)
    plan = plan_pyramid((1.0, 1.0, 3.0), (1.0, 1.0, 3.0), 3)
    for level in build_pyramid(Image(ramp, aff), plan.fixed):
        idx = np.stack(np.meshgrid(*[np.arange(n) for n in level.shape], indexing="ij"), -1).astype(float)
        x = idx @ level.affine[:3, :3].T + level.affine[:3, 3]
        expect = 0.5 * x[..., 0] - 0.25 * x[..., 1] + x[..., 2]
        inner = (slice(3, -3), slice(3, -3), slice(2, -2))  # away from the smoothing boundary
        np.testing.assert_allclose(level.data[inner], expect[inner], atol=2e-3)


def test_isotropic_pyramid_is_the_classic_one():
    """Same-spacing isotropic images: factors 4/2/1 and sigma 0.5 f voxels, as before."""
    plan = plan_pyramid((2.0, 2.0, 2.0), (2.0, 2.0, 2.0), 3)
    np.testing.assert_allclose([p.factors for p in plan.fixed], [(4,) * 3, (2,) * 3, (1,) * 3])
    np.testing.assert_allclose([p.sigma_mm for p in plan.fixed], [(4.0,) * 3, (2.0,) * 3, (0.0,) * 3])
    rng = np.random.default_rng(1)
    img = Image(rng.random((33, 30, 27), dtype=np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    a = build_pyramid(img, plan.fixed)
    b = build_pyramid(img, [4, 2, 1])
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.data, y.data)
        np.testing.assert_array_equal(x.affine, y.affine)
    assert a[-1].data is img.data or np.shares_memory(a[-1].data, img.data)


def test_smoothing_pyramid_keeps_the_grid_and_smooths_by_sigma_mm():
    """elastix's smoothing pyramid: every level on the full grid; a sinusoid loses
    exp(-2 pi^2 sigma^2 / L^2) with sigma 0.5 x target spacing in mm (finest level included)."""
    n, wavelength, sp = 97, 24.0, 1.5  # wavelength in mm
    x = np.arange(n) * sp
    img = np.broadcast_to(np.cos(2 * np.pi * x / wavelength)[:, None, None], (n, 7, 7)).astype(np.float32)
    plan = plan_pyramid((sp, sp, sp), (sp, sp, sp), 3, kind="smooth")
    np.testing.assert_allclose([p.factors for p in plan.fixed], [(1, 1, 1)] * 3)
    np.testing.assert_allclose([p.sigma_mm[0] for p in plan.fixed], (3.0, 1.5, 0.75))
    pyr = build_pyramid(Image(img, np.diag([sp, sp, sp, 1.0])), plan.fixed)
    for level, p in zip(pyr, plan.fixed):
        assert level.shape == img.shape
        prof = level.data[15:-15, 3, 3].astype(np.float64)
        amp = np.linalg.lstsq(np.cos(2 * np.pi * x[15:-15] / wavelength)[:, None], prof, rcond=None)[0][0]
        np.testing.assert_allclose(amp, np.exp(-2 * np.pi**2 * p.sigma_mm[0] ** 2 / wavelength**2), rtol=0.01)


def test_explicit_schedule_and_sigmas():
    plan = plan_pyramid((1.0, 1.0, 2.0), (0.5, 0.5, 0.5), 2, schedule=("4 4 2", 1), sigmas=(("3 3 1.5"), 0))
    np.testing.assert_allclose(plan.fixed[0].factors, (4, 4, 2))
    np.testing.assert_allclose(plan.moving[0].factors, (4, 4, 2))  # voxels of each image, as elastix
    np.testing.assert_allclose(plan.fixed[0].sigma_mm, (3, 3, 1.5))
    np.testing.assert_allclose(plan.fixed[1].factors, (1, 1, 1))
    with pytest.raises(ConfigError, match="pyramid_schedule has 3 entries for 2 levels"):
        plan_pyramid(np.ones(3), np.ones(3), 2, schedule=(4, 2, 1))
    with pytest.raises(ConfigError, match="below 1"):
        plan_pyramid(np.ones(3), np.ones(3), 2, schedule=(4, 0.5))
    with pytest.raises(ConfigError, match="one number or three"):
        plan_pyramid(np.ones(3), np.ones(3), 2, schedule=("4 4", 1))
    with pytest.raises(ConfigError, match="pyramid="):
        plan_pyramid(np.ones(3), np.ones(3), 2, kind="gaussian")


def test_config_validates_pyramid_settings():
    from fastimpact.config import RegistrationConfig

    cfg = RegistrationConfig(levels=2, pyramid="smooth", pyramid_schedule=["2 2 1", 1], pyramid_sigma=[2.0, 0.5])
    assert RegistrationConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="pyramid_schedule"):
        RegistrationConfig(levels=3, pyramid_schedule=[4, 2])
    with pytest.raises(ConfigError, match="pyramid="):
        RegistrationConfig(pyramid="recursive")


def test_level_shape_check_names_the_image_and_level():
    plan = plan_pyramid((1.0, 1.0, 1.0), (1.0, 1.0, 1.0), 4)
    with pytest.raises(ConfigError, match="level 1 of the pyramid shrinks the moving image"):
        check_level_shapes(plan, (64, 64, 64), (64, 64, 20))
    assert np.allclose(axis_factors((0.5, 1.0, 3.0), 2.0), (4, 2, 1))
