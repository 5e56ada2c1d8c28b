"""CUDA feature-map and patch kernels (kernels/cuda_features.py) against the NumPy reference.

On a CPU-only machine these run in Numba's CUDA simulator (tests/conftest.py sets
NUMBA_ENABLE_CUDASIM=1), one Python thread per CUDA thread, so shapes stay small here; the `gpu`
tests at the end repeat the comparisons at full size on a real GPU only.
"""

import numpy as np
import pytest
from numba import cuda
from scipy import ndimage as ndi

from fastimpact.errors import ConfigError
from fastimpact.kernels import cuda_common
from fastimpact.kernels import cuda_features as kf
from fastimpact.kernels import reference as ref

pytestmark = pytest.mark.cudasim

DTYPES = (np.float32, np.float64)


def to_dev(a):
    return cuda.to_device(np.ascontiguousarray(a))


def from_dev(a):
    assert cuda_common.is_device(a) and not isinstance(a, np.ndarray), type(a)
    return a.copy_to_host()


def smooth(shape, seed=0, channels=None):
    """Smooth random data scaled to about [-50, 50] (channel-last when ``channels`` is given)."""
    r = np.random.default_rng(seed)
    full = shape + ((channels,) if channels else ())
    sigma = (1.2,) * 3 + ((0,) if channels else ())
    v = ndi.gaussian_filter(r.standard_normal(full), sigma, mode="wrap")
    return 50.0 * v / np.abs(v).max()


def probe_points(shape, n, seed):
    """Points inside, in the mirror band outside, more than a period away, on the grid, and
    non-finite."""
    r = np.random.default_rng(seed)
    hi = np.array(shape) - 1.0
    p = r.uniform(-3.0, hi + 3.0, size=(n, 3))
    p[0] = 0.0
    p[1] = hi
    p[2] = np.round(p[2])  # a grid point
    p[3] = [-2.0 * hi[0] - 0.7, hi[1] + 2.3 * hi[1], 0.4]  # beyond one mirror period
    p[4, 1] = np.nan
    p[5, 2] = np.inf
    return p


def oblique_w2i(shape, spacing=(1.5, 2.0, 1.2), angle=0.2):
    """world (mm) -> voxel index of an image with ``spacing`` rotated by ``angle`` about z."""
    c, s = np.cos(angle), np.sin(angle)
    R = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    i2w = np.eye(4)
    i2w[:3, :3] = R @ np.diag(spacing)
    i2w[:3, 3] = [-3.0, 5.0, 1.0]
    return np.linalg.inv(i2w), i2w


def cube_offsets(radius=1, step=1.5):
    r = np.arange(-radius, radius + 1) * step
    return np.stack(np.meshgrid(r, r, r, indexing="ij"), axis=-1).reshape(-1, 3)


# ----------------------------------------------------------------------------- channels
@pytest.mark.parametrize("dtype", DTYPES)
def test_cubic_sample_channels_matches_reference(dtype):
    coef = smooth((7, 9, 6), seed=1, channels=3).astype(dtype)
    pts = probe_points(coef.shape[:3], 37, seed=2)
    v, g = kf.cubic_sample_channels(coef, pts)
    vr, gr = ref.cubic_sample_channels(coef, pts)
    assert v.dtype == np.float64 and g.dtype == np.float64
    assert v.shape == (37, 3) and g.shape == (37, 3, 3)
    scale = np.nanmax(np.abs(vr))
    np.testing.assert_allclose(v, vr, rtol=1e-12, atol=1e-12 * scale)
    np.testing.assert_allclose(g, gr, rtol=1e-12, atol=1e-12 * scale)
    assert np.isnan(v[4:6]).all() and np.isnan(g[4:6]).all()
    assert np.isfinite(v[:4]).all() and np.isfinite(v[6:]).all()
    vo = kf.cubic_sample_channels_values(coef, pts)
    np.testing.assert_array_equal(vo, v)  # same arithmetic, values only


def test_cubic_sample_channels_gradient_matches_finite_differences():
    coef = smooth((8, 7, 9), seed=3, channels=2)
    r = np.random.default_rng(4)
    pts = r.uniform(-1.5, 7.5, size=(12, 3))  # includes the mirrored band below 0
    _, g = kf.cubic_sample_channels(coef, pts)
    eps = 1e-5
    for d in range(3):
        e = np.zeros(3)
        e[d] = eps
        fd = (kf.cubic_sample_channels_values(coef, pts + e) - kf.cubic_sample_channels_values(coef, pts - e)) / (
            2 * eps
        )
        np.testing.assert_allclose(g[:, :, d], fd, rtol=1e-6, atol=1e-6 * np.abs(g).max())


def test_cubic_sample_channels_device_arrays_stay_on_the_device():
    coef = smooth((6, 5, 7), seed=5, channels=2).astype(np.float32)
    pts = probe_points(coef.shape[:3], 20, seed=6).astype(np.float32)
    vh, gh = kf.cubic_sample_channels(coef, pts)  # host float32 points are widened to float64
    vd, gd = kf.cubic_sample_channels(to_dev(coef), to_dev(pts))
    np.testing.assert_array_equal(from_dev(vd), vh)
    np.testing.assert_array_equal(from_dev(gd), gh)
    # a grid of points (X, Y, Z, 3) on the device, values only
    grid = pts[:18].reshape(3, 2, 3, 3)
    vo = kf.cubic_sample_channels_values(to_dev(coef), to_dev(grid))
    np.testing.assert_array_equal(from_dev(vo), vh[:18])
    # one host and one device argument: device output
    assert cuda_common.is_device(kf.cubic_sample_channels_values(coef, to_dev(pts)))


@pytest.mark.parametrize("on_device", [False, True])
def test_cubic_sample_channels_rejects_bad_shapes(on_device):
    put = to_dev if on_device else np.asarray
    coef = np.zeros((4, 4, 4, 2), dtype=np.float32)
    with pytest.raises(ConfigError, match=r"coef must be \(nx, ny, nz, C\)"):
        kf.cubic_sample_channels(put(np.zeros((4, 4, 4))), np.zeros((2, 3)))
    with pytest.raises(ConfigError, match=r"coef must be \(nx, ny, nz, C\)"):
        kf.cubic_sample_channels_values(put(np.zeros((4, 4, 4, 0))), np.zeros((2, 3)))
    with pytest.raises(ConfigError, match="points must have shape"):
        kf.cubic_sample_channels(put(coef), put(np.zeros((5, 2))))


# ----------------------------------------------------------------------------- prefilter
@pytest.mark.parametrize(
    "shape",
    [(9, 8, 7, 2), (40, 3, 2, 1), (2, 5, 1, 3)],  # a line longer than the causal horizon; sizes 1, 2
    ids=["odd", "long-axis", "size1-size2"],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefilter_channels_matches_scipy(shape, dtype):
    data = (np.random.default_rng(8).standard_normal(shape) * 40.0 + 10.0).astype(dtype)
    out = kf.prefilter_channels(data)
    expect = ref.prefilter_channels(data)
    assert out.dtype == np.float32 and out.shape == shape and out.flags.c_contiguous
    scale = np.abs(expect).max()
    assert np.abs(out - expect).max() <= 1e-6 * scale
    # the reference is scipy's spline_filter per channel (float32 storage between the axes)
    for c in range(shape[3]):
        s = ndi.spline_filter(data[..., c].astype(np.float32), order=3, mode="mirror", output=np.float32)
        assert np.abs(out[..., c] - s).max() <= 1e-6 * scale


def test_prefiltered_map_interpolates_the_data_at_grid_points():
    data = smooth((7, 6, 5), seed=9, channels=3).astype(np.float32)
    coef = kf.prefilter_channels(data)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in data.shape[:3]], indexing="ij"), axis=-1).reshape(-1, 3)
    v = kf.cubic_sample_channels_values(coef, idx.astype(np.float64))
    np.testing.assert_allclose(v, data.reshape(-1, 3), rtol=0, atol=1e-5 * np.abs(data).max())


def test_prefilter_channels_inplace_and_device_arrays():
    data = smooth((6, 7, 5), seed=10, channels=2).astype(np.float32)
    expect = ref.prefilter_channels(data)
    tol = 1e-6 * np.abs(expect).max()
    # host, in place: the caller's float32 buffer receives the result
    buf = data.copy()
    out = kf.prefilter_channels(buf, inplace=True)
    assert out is buf and np.abs(out - expect).max() <= tol
    # device float32, in place: filtered where it lies
    d = to_dev(data)
    out = kf.prefilter_channels(d, inplace=True)
    assert out is d and np.abs(from_dev(d) - expect).max() <= tol
    # device float32, not in place: the input is left alone
    d = to_dev(data)
    out = kf.prefilter_channels(d)
    assert np.abs(from_dev(out) - expect).max() <= tol
    np.testing.assert_array_equal(from_dev(d), data)
    # device float64 (converted on the device), even with inplace=True
    d = to_dev(data.astype(np.float64))
    out = kf.prefilter_channels(d, inplace=True)
    assert out.dtype == np.float32 and np.abs(from_dev(out) - expect).max() <= tol
    np.testing.assert_array_equal(from_dev(d), data.astype(np.float64))


def test_prefilter_channels_rejects_bad_shapes():
    with pytest.raises(ConfigError, match=r"data must be \(X, Y, Z, C\)"):
        kf.prefilter_channels(np.zeros((4, 4, 4)))
    with pytest.raises(ConfigError, match=r"data must be \(X, Y, Z, C\)"):
        kf.prefilter_channels(to_dev(np.zeros((4, 4, 4), dtype=np.float32)))


# ----------------------------------------------------------------------------- gather_patches
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16])
def test_gather_patches_matches_reference(dtype):
    data = (np.random.default_rng(11).standard_normal((7, 6, 5)) * 100).astype(dtype)
    r = np.random.default_rng(12)
    centres = np.concatenate([[[0, 0, 0], [6, 5, 4], [3, 0, 4]], r.integers(0, 5, size=(9, 3))])
    offsets = np.concatenate([cube_offsets(1, 1).astype(np.int64), [[-8, 9, 0], [13, -11, 7]]])  # > a period
    out = kf.gather_patches(data, centres, offsets)
    expect = ref.gather_patches(data, centres, offsets)
    assert out.dtype == np.float32 and out.shape == (12, 29)
    np.testing.assert_array_equal(out, expect)


def test_gather_patches_device_arrays():
    data = np.random.default_rng(13).standard_normal((5, 6, 7))
    centres = np.random.default_rng(14).integers(0, 5, size=(8, 3))
    offsets = cube_offsets(1, 1).astype(np.int64)
    expect = ref.gather_patches(data, centres, offsets)
    out = kf.gather_patches(to_dev(data), to_dev(centres.astype(np.int32)), to_dev(offsets))
    np.testing.assert_array_equal(from_dev(out), expect)
    with pytest.raises(ConfigError, match="data must be a 3-D volume"):
        kf.gather_patches(np.zeros((3, 3)), centres, offsets)
    with pytest.raises(ConfigError, match="data must be a 3-D volume"):
        kf.gather_patches(to_dev(np.zeros((3, 3))), centres, offsets)


# ----------------------------------------------------------------------------- sample_patches
@pytest.fixture(scope="module")
def patch_setup():
    shape = (9, 8, 7)
    w2i, i2w = oblique_w2i(shape)
    r = np.random.default_rng(15)
    idx = np.concatenate([r.uniform(0, np.array(shape) - 1, size=(5, 3)),
                          [[0.2, 0.1, 6.5], [-2.5, 9.0, 3.0], [4.0, 3.0, 3.0]]])  # edge, outside, centre
    centres = idx @ i2w[:3, :3].T + i2w[:3, 3]
    centres[-1] = [np.nan, 0.0, 0.0]
    offsets = cube_offsets(1, 1.5)
    per_centre = r.normal(scale=2.0, size=(len(centres), 5, 3))  # e.g. oriented planes, V = 5
    return shape, w2i, centres, offsets, per_centre


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shared", [True, False], ids=["shared-offsets", "per-centre-offsets"])
def test_sample_patches_matches_reference(patch_setup, dtype, shared):
    shape, w2i, centres, offsets, per_centre = patch_setup
    coef = smooth(shape, seed=16).astype(dtype)
    off = offsets if shared else per_centre
    out = kf.sample_patches(coef, centres, off, w2i, fill=-7.5)
    expect = ref.sample_patches(coef, centres, off, w2i, fill=-7.5)
    assert out.dtype == np.float32 and out.shape == (len(centres), off.shape[-2])
    np.testing.assert_allclose(out, expect, rtol=1e-6, atol=1e-6 * np.abs(expect).max())
    assert np.all(out[-1] == -7.5)  # non-finite centre: fill


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shared", [True, False], ids=["shared-offsets", "per-centre-offsets"])
@pytest.mark.parametrize("with_bspline", [True, False], ids=["bspline", "affine-only"])
def test_sample_patches_warped_matches_reference(patch_setup, dtype, shared, with_bspline):
    shape, w2i, centres, offsets, per_centre = patch_setup
    coef = smooth(shape, seed=17).astype(dtype)
    off = offsets if shared else per_centre
    affine = np.eye(4)
    affine[:3, :3] += np.random.default_rng(18).normal(scale=0.05, size=(3, 3))
    affine[:3, 3] = [0.7, -1.1, 0.4]
    bs = np.random.default_rng(19).normal(scale=2.0, size=(5, 6, 5, 3)) if with_bspline else None
    w2grid = np.diag([0.25, 0.3, 0.35, 1.0])
    w2grid[:3, 3] = [1.0, 1.5, 0.5]
    v, g = kf.sample_patches_warped(coef, centres, off, affine, bs, w2grid, w2i)
    vr, gr = ref.sample_patches_warped(coef, centres, off, affine, bs, w2grid, w2i)
    assert v.dtype == np.float32 and g.dtype == np.float32
    assert v.shape == (len(centres), off.shape[-2]) and g.shape == v.shape + (3,)
    np.testing.assert_allclose(v, vr, rtol=1e-6, atol=1e-6 * np.nanmax(np.abs(vr)))
    np.testing.assert_allclose(g, gr, rtol=1e-5, atol=1e-6 * np.nanmax(np.abs(gr)))
    assert np.isnan(v[-1]).all() and np.isnan(g[-1]).all()  # non-finite centre: NaN
    assert np.isfinite(v[:-1]).all() and np.isfinite(g[:-1]).all()


def test_sample_patches_warped_gradient_matches_finite_differences():
    """d value / d y chained through the transform equals the finite difference w.r.t. the centre:
    d value / d p = g^T (A + J_u(w2grid p) w2grid[:3, :3])."""
    shape = (10, 9, 8)
    w2i, i2w = oblique_w2i(shape)
    coef = ndi.spline_filter(smooth(shape, seed=20), order=3, mode="mirror")
    r = np.random.default_rng(21)
    idx = r.uniform(1.0, np.array(shape) - 2.0, size=(6, 3))
    centres = idx @ i2w[:3, :3].T + i2w[:3, 3]
    off = cube_offsets(1, 1.0)[::4]  # 7 offsets
    affine = np.eye(4)
    affine[:3, :3] += r.normal(scale=0.05, size=(3, 3))
    bs = r.normal(scale=1.0, size=(6, 6, 6, 3))
    w2grid = np.diag([0.3, 0.3, 0.3, 1.0])
    w2grid[:3, 3] = [1.5, 1.0, 2.0]
    _, g = kf.sample_patches_warped(coef, centres, off, affine, bs, w2grid, w2i)
    p = (centres[:, None, :] + off[None]).reshape(-1, 3)
    J = ref.bspline_eval_jacobian(bs, p @ w2grid[:3, :3].T + w2grid[:3, 3])  # d u / d t
    dy_dp = affine[:3, :3][None] + J @ w2grid[:3, :3][None]
    analytic = np.einsum("na,nab->nb", g.reshape(-1, 3).astype(np.float64), dy_dp)
    eps = 1e-2  # mm; float32 outputs limit the usable step
    for d in range(3):
        e = np.zeros(3)
        e[d] = eps
        vp, _ = kf.sample_patches_warped(coef, centres + e, off, affine, bs, w2grid, w2i)
        vm, _ = kf.sample_patches_warped(coef, centres - e, off, affine, bs, w2grid, w2i)
        fd = (vp.astype(np.float64) - vm).ravel() / (2 * eps)
        np.testing.assert_allclose(analytic[:, d], fd, rtol=0, atol=3e-3 * np.abs(analytic).max())


def test_patches_device_arrays_stay_on_the_device(patch_setup):
    shape, w2i, centres, offsets, per_centre = patch_setup
    coef = smooth(shape, seed=22).astype(np.float32)
    bs = np.random.default_rng(23).normal(scale=2.0, size=(5, 6, 5, 3))
    w2grid = np.diag([0.25, 0.3, 0.35, 1.0])
    affine = np.eye(4)
    for off in (offsets, per_centre):
        vh = kf.sample_patches(coef, centres, off, w2i)
        vd = kf.sample_patches(to_dev(coef), to_dev(centres), to_dev(off), w2i)
        np.testing.assert_array_equal(from_dev(vd), vh)
        vh, gh = kf.sample_patches_warped(coef, centres, off, affine, bs, w2grid, w2i)
        vd, gd = kf.sample_patches_warped(to_dev(coef), to_dev(centres), to_dev(off), to_dev(affine),
                                          to_dev(bs), w2grid, w2i)
        np.testing.assert_array_equal(from_dev(vd), vh)
        np.testing.assert_array_equal(from_dev(gd), gh)


@pytest.mark.parametrize("on_device", [False, True])
def test_patches_reject_bad_arguments(patch_setup, on_device):
    shape, w2i, centres, offsets, _ = patch_setup
    put = to_dev if on_device else np.asarray
    coef = put(np.zeros(shape, dtype=np.float32))
    with pytest.raises(ConfigError, match="offsets must have shape"):
        kf.sample_patches(coef, put(centres), put(np.zeros((len(centres) + 1, 4, 3))), w2i)
    with pytest.raises(ConfigError, match="offsets must have shape"):
        kf.sample_patches_warped(coef, put(centres), put(np.zeros((4, 2))), np.eye(4), None, None, w2i)
    with pytest.raises(ConfigError, match="centres must have shape"):
        kf.sample_patches(coef, put(np.zeros((4, 2))), put(offsets), w2i)
    with pytest.raises(ConfigError, match="w2i must be a 4x4 matrix"):
        kf.sample_patches(coef, put(centres), put(offsets), np.eye(3))
    with pytest.raises(ConfigError, match="coef must be a 3-D array"):
        kf.sample_patches_warped(put(np.zeros((3, 3, 3, 2))), put(centres), put(offsets), np.eye(4), None, None, w2i)
    with pytest.raises(ConfigError, match="B-spline coefficients must have shape"):
        kf.sample_patches_warped(coef, put(centres), put(offsets), np.eye(4), put(np.zeros((4, 4, 4, 2))),
                                 np.eye(4), w2i)


# ----------------------------------------------------------------------------- real GPU, full size
_NO_GPU = cuda_common.simulated() or not cuda.is_available()
gpu = pytest.mark.skipif(_NO_GPU, reason="needs a real CUDA GPU: running under the Numba CUDA simulator "
                                         "(NUMBA_ENABLE_CUDASIM=1) or no CUDA driver")


@pytest.mark.gpu
@gpu
def test_gpu_prefilter_and_channel_sampling_full_size():
    data = np.random.default_rng(30).standard_normal((64, 64, 64, 8)).astype(np.float32) * 30
    coef = kf.prefilter_channels(data)
    expect = ref.prefilter_channels(data)
    assert np.abs(coef - expect).max() <= 1e-6 * np.abs(expect).max()
    from fastimpact.kernels import cpu

    pts = np.random.default_rng(31).uniform(-2, 65, size=(100_000, 3))
    v, g = kf.cubic_sample_channels(to_dev(expect), to_dev(pts))
    vc, gc = cpu.cubic_sample_channels(expect, pts)
    np.testing.assert_allclose(from_dev(v), vc, rtol=1e-12, atol=1e-12 * np.abs(vc).max())
    np.testing.assert_allclose(from_dev(g), gc, rtol=1e-12, atol=1e-12 * np.abs(gc).max())


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("shared", [True, False], ids=["shared-offsets", "per-centre-offsets"])
def test_gpu_patches_full_size(shared):
    from fastimpact.kernels import cpu

    shape = (96, 110, 80)
    w2i, i2w = oblique_w2i(shape)
    coef = ndi.spline_filter(smooth(shape, seed=32).astype(np.float32), order=3, mode="mirror", output=np.float32)
    r = np.random.default_rng(33)
    centres = r.uniform(0, np.array(shape) - 1, size=(2000, 3)) @ i2w[:3, :3].T + i2w[:3, 3]
    off = cube_offsets(3, 1.5) if shared else r.normal(scale=4.0, size=(2000, 49, 3))
    affine = np.eye(4)
    affine[:3, 3] = [1.0, -2.0, 0.5]
    bs = r.normal(scale=2.0, size=(14, 16, 12, 3))
    w2grid = np.diag([0.125, 0.125, 0.125, 1.0])
    w2grid[:3, 3] = 1.0
    np.testing.assert_allclose(kf.sample_patches(coef, centres, off, w2i), cpu.sample_patches(coef, centres, off, w2i),
                               rtol=1e-6, atol=1e-6 * np.abs(coef).max())
    v, g = kf.sample_patches_warped(to_dev(coef), to_dev(centres), to_dev(off), affine, to_dev(bs), w2grid, w2i)
    vc, gc = cpu.sample_patches_warped(coef, centres, off, affine, bs, w2grid, w2i)
    np.testing.assert_allclose(from_dev(v), vc, rtol=1e-6, atol=1e-6 * np.abs(vc).max())
    np.testing.assert_allclose(from_dev(g), gc, rtol=1e-5, atol=1e-6 * np.abs(gc).max())
    if shared:
        ic = np.round(r.uniform(0, np.array(shape) - 1, size=(2000, 3))).astype(np.int64)
        io = cube_offsets(3, 1).astype(np.int64)
        np.testing.assert_array_equal(kf.gather_patches(coef, ic, io), cpu.gather_patches(coef, ic, io))
