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
