"""Jacobian-mode patch kernels (sample_patches, sample_patches_warped): Numba vs the NumPy reference,
both against the separate kernels they fuse, scipy's mirror boundary and finite differences."""

import numpy as np
import pytest
from scipy import ndimage as ndi

from fastimpact.errors import ConfigError
from fastimpact.kernels import get_kernel

IMG_SHAPE = (45, 63, 37)
GRID_SHAPE = (9, 11, 8)
BACKENDS_RUN = ("numpy", "cpu")
DTYPES = (np.float32, np.float64)


def rotation(rng, scale):
    """A small rotation matrix (exponential of a random skew matrix, by its Taylor series)."""
    w = scale * rng.standard_normal(3)
    K = np.array([[0.0, -w[2], w[1]], [w[2], 0.0, -w[0]], [-w[1], w[0], 0.0]])
    R = np.eye(3) + K + K @ K / 2.0 + K @ K @ K / 6.0
    u, _, vt = np.linalg.svd(R)
    return u @ vt


@pytest.fixture(scope="module")
def geometry():
    """World geometry of the test: image index <-> world, B-spline grid, a near-identity affine."""
    r = np.random.default_rng(21)
    i2w = np.eye(4)
    i2w[:3, :3] = rotation(r, 0.1) @ np.diag([1.2, 0.9, 1.1])  # anisotropic, oblique voxels
    i2w[:3, 3] = [-20.0, 10.0, 5.0]
    w2i = np.linalg.inv(i2w)
    # control grid spacing ~7 mm, axis-aligned, covering the image with a margin
    g_sp = np.array([7.0, 7.0, 6.5])
    g_origin = np.array([-27.0, 2.0, -4.0])
    w2grid = np.eye(4)
    w2grid[:3, :3] = np.diag(1.0 / g_sp)
    w2grid[:3, 3] = -g_origin / g_sp
    affine = np.eye(4)
    affine[:3, :3] = rotation(r, 0.05) @ (np.eye(3) + 0.02 * r.standard_normal((3, 3)))
    affine[:3, 3] = [1.5, -0.8, 0.6]
    bs_coef = 2.0 * r.standard_normal(GRID_SHAPE + (3,))  # displacements in mm
    return dict(i2w=i2w, w2i=w2i, w2grid=w2grid, affine=affine, bs_coef=bs_coef)


@pytest.fixture(scope="module")
def image():
    r = np.random.default_rng(7)
    return ndi.gaussian_filter(r.standard_normal(IMG_SHAPE), 1.5) * 10.0


def coef_of(img, dtype):
    return ndi.spline_filter(img.astype(dtype), order=3, mode="mirror", output=dtype)


def patch_offsets(P, spacing=1.0, R=None):
    """(P^3, 3) offsets (mm) of a P x P x P patch centred on 0, optionally rotated."""
    h = (np.arange(P) - (P - 1) / 2.0) * spacing
    o = np.stack(np.meshgrid(h, h, h, indexing="ij"), axis=-1).reshape(-1, 3)
    return o if R is None else o @ R.T


def centres_world(rng, geometry, n, margin):
    """n world points whose voxel indices lie within ``margin`` voxels of the image box."""
    idx = rng.uniform(-margin, np.array(IMG_SHAPE) - 1 + margin, size=(n, 3))
    return idx @ geometry["i2w"][:3, :3].T + geometry["i2w"][:3, 3]


def flat_points(centres, offsets):
    return (centres[:, None, :] + offsets[None, :, :]).reshape(-1, 3)


def affine_apply(A, p):
    return get_kernel("points_affine", "cpu")(p, A)


def composed_warp(coef, centres, offsets, geometry, bs_coef):
    """The separate kernels: affine + bspline_eval + cubic_sample on the N * V points."""
    p = flat_points(centres, offsets)
    y = affine_apply(geometry["affine"], p)
    if bs_coef is not None:
        y = y + get_kernel("bspline_eval", "cpu")(bs_coef, affine_apply(geometry["w2grid"], p))
    v, gq = get_kernel("cubic_sample", "cpu")(coef, affine_apply(geometry["w2i"], y))
    return v.astype(np.float64), gq.astype(np.float64) @ geometry["w2i"][:3, :3]


def close(a, b, rel=2e-6):
    """Equal up to float32 rounding of the outputs (relative to the largest magnitude)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    np.testing.assert_allclose(a, b, rtol=0, atol=rel * np.abs(b[np.isfinite(b)]).max())


def check_rows(n):
    """Rows (centres) compared with the separate kernels: rows are independent, so every 7th and
    the last one (past the final block boundary) keep the big cases fast; row 1 is the NaN one."""
    return np.unique(np.r_[0, np.arange(2, n, 7), n - 1])


# (N, P): V = 27 and 343; 50 x 27 runs the serial twin, the others the parallel kernel
SIZES = [(50, 3), (50, 7), (5000, 3), (5000, 7)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, P", SIZES)
def test_sample_patches_matches_reference_and_cubic_sample(geometry, image, dtype, n, P):
    rng = np.random.default_rng(n + P)
    coef = coef_of(image, dtype)
    centres = centres_world(rng, geometry, n, margin=2.0)
    centres[1] = np.nan  # a non-finite centre: the whole row is fill
    offsets = patch_offsets(P, 1.1, rotation(rng, 0.3))
    V = P**3
    got = get_kernel("sample_patches", "cpu")(coef, centres, offsets, geometry["w2i"], fill=-7.0)
    assert got.shape == (n, V) and got.dtype == np.float32
    np.testing.assert_array_equal(got[1], -7.0)
    # the separate kernels: world -> index, then cubic_sample (mirror boundary)
    rows = check_rows(n)
    q = affine_apply(geometry["w2i"], flat_points(centres[rows], offsets))
    expected = get_kernel("cubic_sample", "cpu")(coef, q)[0].reshape(len(rows), V)
    close(got[rows], expected)
    # the reference (on a subset of the centres for the big cases: rows are independent)
    sub = np.arange(n) if n * V <= 20000 else np.r_[1, np.arange(0, n, 97)]
    want = get_kernel("sample_patches", "numpy")(coef, centres[sub], offsets, geometry["w2i"], fill=-7.0)
    assert want.shape == (len(sub), V) and want.dtype == np.float32
    close(got[sub], want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, P", SIZES)
def test_sample_patches_warped_matches_reference_and_composition(geometry, image, dtype, n, P):
    rng = np.random.default_rng(3 * n + P)
    coef = coef_of(image, dtype)
    centres = centres_world(rng, geometry, n, margin=2.0)
    centres[1] = np.nan  # a non-finite centre gives NaN, as cubic_sample does
    offsets = patch_offsets(P, 0.9)
    V = P**3
    args = (geometry["affine"], geometry["bs_coef"], geometry["w2grid"], geometry["w2i"])
    vals, grads = get_kernel("sample_patches_warped", "cpu")(coef, centres, offsets, *args)
    assert vals.shape == (n, V) and grads.shape == (n, V, 3)
    assert vals.dtype == np.float32 and grads.dtype == np.float32
    assert np.isnan(vals[1]).all() and np.isnan(grads[1]).all()
    rows = check_rows(n)
    ev, eg = composed_warp(coef, centres[rows], offsets, geometry, geometry["bs_coef"])
    close(vals[rows], ev.reshape(len(rows), V))
    close(grads[rows], eg.reshape(len(rows), V, 3))
    sub = np.arange(n) if n * V <= 20000 else np.r_[1, np.arange(0, n, 97)]
    wv, wg = get_kernel("sample_patches_warped", "numpy")(coef, centres[sub], offsets, *args)
    assert wv.dtype == np.float32 and wg.dtype == np.float32
    assert np.isnan(wv[sub == 1]).all()
    ok = sub != 1
    close(vals[sub][ok], wv[ok])
    close(grads[sub][ok], wg[ok])


@pytest.mark.parametrize("be", BACKENDS_RUN)
@pytest.mark.parametrize("with_grid", [False, True])
def test_warped_gradient_finite_differences(geometry, image, be, with_grid):
    # moving the world point y by h along axis d = shifting the affine translation by h: the
    # B-spline term depends on the fixed point p only
    rng = np.random.default_rng(5)
    coef = coef_of(image, np.float64)
    centres = centres_world(rng, geometry, 40, margin=3.0)  # some patches cross the border (mirror)
    offsets = patch_offsets(3, 1.3)
    bs = geometry["bs_coef"] if with_grid else None
    fn = get_kernel("sample_patches_warped", be)
    _, grads = fn(coef, centres, offsets, geometry["affine"], bs, geometry["w2grid"], geometry["w2i"])
    h = 1e-3  # mm; the outputs are float32, so h is not smaller
    for d in range(3):
        Ap = geometry["affine"].copy()
        Am = geometry["affine"].copy()
        Ap[d, 3] += h
        Am[d, 3] -= h
        vp, _ = fn(coef, centres, offsets, Ap, bs, geometry["w2grid"], geometry["w2i"])
        vm, _ = fn(coef, centres, offsets, Am, bs, geometry["w2grid"], geometry["w2i"])
        fd = (vp.astype(np.float64) - vm.astype(np.float64)) / (2 * h)
        np.testing.assert_allclose(grads[..., d], fd, atol=2e-3 * np.abs(grads).max())
    assert np.abs(grads).max() > 0.1  # the check is not vacuous


@pytest.mark.parametrize("be", BACKENDS_RUN)
def test_no_bspline_equals_zero_coefficients_and_plain_patches(geometry, image, be):
    rng = np.random.default_rng(8)
    coef = coef_of(image, np.float32)
    centres = centres_world(rng, geometry, 60, margin=1.0)
    offsets = patch_offsets(3, 1.0)
    fn = get_kernel("sample_patches_warped", be)
    v0, g0 = fn(coef, centres, offsets, geometry["affine"], None, None, geometry["w2i"])
    vz, gz = fn(coef, centres, offsets, geometry["affine"], np.zeros(GRID_SHAPE + (3,)), geometry["w2grid"],
                geometry["w2i"])
    np.testing.assert_array_equal(v0, vz)
    np.testing.assert_array_equal(g0, gz)
    # without a B-spline the moving patch is the plain patch through w2i @ affine
    plain = get_kernel("sample_patches", be)(coef, centres, offsets, geometry["w2i"] @ geometry["affine"])
    close(v0, plain)
    # and the B-spline matters when present
    vb, _ = fn(coef, centres, offsets, geometry["affine"], geometry["bs_coef"], geometry["w2grid"], geometry["w2i"])
    assert np.abs(vb - v0).max() > 0.1 * np.abs(v0).max()


@pytest.mark.parametrize("be", BACKENDS_RUN)
def test_points_outside_are_mirrored_not_filled(geometry, image, be):
    coef = coef_of(image, np.float64)
    idx = np.array([[-4.3, 10.0, 5.0], [46.7, 70.2, 40.1], [20.0, -8.5, 38.9], [-0.2, 62.4, -1.7]])
    centres = idx @ geometry["i2w"][:3, :3].T + geometry["i2w"][:3, 3]
    offsets = patch_offsets(5, 1.5)  # reaches ~4 voxels further out
    got = get_kernel("sample_patches", be)(coef, centres, offsets, geometry["w2i"], fill=1e6)
    q = affine_apply(geometry["w2i"], flat_points(centres, offsets))
    lo = (q < 0).any(axis=1) | (q > np.array(IMG_SHAPE) - 1).any(axis=1)
    assert lo.mean() > 0.5  # most points are outside the image
    expected = ndi.map_coordinates(coef, q.T, order=3, mode="mirror", prefilter=False)
    close(got.reshape(-1), expected)
    assert (got != 1e6).all()
    # the warped kernel mirrors the same way (identity affine, no B-spline)
    vals, grads = get_kernel("sample_patches_warped", be)(coef, centres, offsets, np.eye(4), None, None,
                                                          geometry["w2i"])
    close(vals.reshape(-1), expected)
    assert np.isfinite(grads).all()


def test_nonfinite_points_fill_and_huge_coordinates(geometry, image):
    coef = coef_of(image, np.float32)
    centres = np.array([[np.inf, 0.0, 0.0], [0.0, 1e300, 0.0], [0.0, 20.0, 20.0]])
    offsets = patch_offsets(3, 1.0)
    for be in BACKENDS_RUN:
        v = get_kernel("sample_patches", be)(coef, centres, offsets, geometry["w2i"], fill=np.nan)
        assert np.isnan(v[:2]).all() and np.isfinite(v[2]).all()
        wv, wg = get_kernel("sample_patches_warped", be)(coef, centres, offsets, np.eye(4), None, None,
                                                         geometry["w2i"])
        assert np.isnan(wv[:2]).all() and np.isnan(wg[:2]).all() and np.isfinite(wg[2]).all()


def test_empty_inputs():
    coef = np.zeros((5, 6, 7), dtype=np.float32)
    for be in BACKENDS_RUN:
        assert get_kernel("sample_patches", be)(coef, np.zeros((0, 3)), np.zeros((27, 3)), np.eye(4)).shape == (0, 27)
        v, g = get_kernel("sample_patches_warped", be)(coef, np.zeros((4, 3)), np.zeros((0, 3)), np.eye(4), None,
                                                       None, np.eye(4))
        assert v.shape == (4, 0) and g.shape == (4, 0, 3)


@pytest.mark.parametrize("be", BACKENDS_RUN)
def test_bad_inputs_raise_config_error(be, geometry):
    coef = np.zeros((5, 6, 7))
    c = np.zeros((4, 3))
    o = np.zeros((8, 3))
    sp = get_kernel("sample_patches", be)
    sw = get_kernel("sample_patches_warped", be)
    with pytest.raises(ConfigError, match="centres must have shape"):
        sp(coef, np.zeros((4, 2)), o, np.eye(4))
    with pytest.raises(ConfigError, match="offsets must have shape"):
        sp(coef, c, np.zeros((2, 2, 2, 3)), np.eye(4))
    with pytest.raises(ConfigError, match="w2i must be a 4x4"):
        sp(coef, c, o, np.eye(3))
    with pytest.raises(ConfigError, match="3-D"):
        sp(np.zeros((5, 6)), c, o, np.eye(4))
    with pytest.raises(ConfigError, match="affine must be a 4x4"):
        sw(coef, c, o, np.eye(3), None, None, np.eye(4))
    with pytest.raises(ConfigError, match="w2grid must be a 4x4"):
        sw(coef, c, o, np.eye(4), geometry["bs_coef"], None, np.eye(4))
    with pytest.raises(ConfigError, match="gx, gy, gz, 3"):
        sw(coef, c, o, np.eye(4), np.zeros((4, 4, 4)), np.eye(4), np.eye(4))


@pytest.mark.parametrize("n", [40, 3000])
def test_gather_patches_equals_interpolation_at_grid_points(n):
    from fastimpact.kernels import get_kernel

    rng = np.random.default_rng(21)
    data = rng.normal(size=(45, 63, 37)).astype(np.float32)
    centres = np.stack([rng.integers(0, s, n) for s in data.shape], axis=1)
    r = np.arange(-3, 4)
    offsets = np.stack(np.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    got = get_kernel("gather_patches", "cpu")(data, centres, offsets)
    want = get_kernel("gather_patches", "numpy")(data, centres, offsets)
    np.testing.assert_array_equal(got, want)
    # the patches of cubic interpolation (mirror boundary) at the same points, near borders too
    from scipy import ndimage

    coef = ndimage.spline_filter(data.astype(np.float64), order=3, mode="mirror")
    pts = (centres[:, None, :] + offsets[None]).reshape(-1, 3).astype(np.float64)
    vals, _ = get_kernel("cubic_sample", "numpy")(coef, pts[:2000])
    np.testing.assert_allclose(got.ravel()[:2000], vals, atol=1e-4)


def random_planes(rng, n, P, spacing):
    """(n, P * P, 3) offsets: a P x P plane of the given spacing, randomly rotated per centre."""
    h = (np.arange(P) - P // 2) * spacing
    plane = np.stack(np.meshgrid(h, h, [0.0], indexing="ij"), axis=-1).reshape(-1, 3)
    return np.stack([plane @ rotation(rng, 2.0).T for _ in range(n)])


@pytest.mark.parametrize("be", BACKENDS_RUN)
@pytest.mark.parametrize("n, P", [(30, 5), (800, 7)])  # 800 x 49 points: the parallel Numba kernel
def test_per_centre_offsets_equal_the_shared_kernel_row_by_row(geometry, image, be, n, P):
    rng = np.random.default_rng(n + 11)
    coef = coef_of(image, np.float32)
    centres = centres_world(rng, geometry, n, margin=2.0)
    centres[1] = np.nan
    offsets = random_planes(rng, n, P, 1.2)
    args = (geometry["affine"], geometry["bs_coef"], geometry["w2grid"], geometry["w2i"])
    sp, sw = get_kernel("sample_patches", be), get_kernel("sample_patches_warped", be)
    vals = sp(coef, centres, offsets, geometry["w2i"], fill=-3.0)
    wv, wg = sw(coef, centres, offsets, *args)
    assert vals.shape == wv.shape == (n, P * P) and wg.shape == (n, P * P, 3)
    for k in np.r_[0, 1, np.arange(2, n, max(1, n // 40)), n - 1]:
        # the shared-offset kernel on one centre gives the same row, bit for bit
        np.testing.assert_array_equal(vals[k], sp(coef, centres[k:k + 1], offsets[k], geometry["w2i"], fill=-3.0)[0])
        v1, g1 = sw(coef, centres[k:k + 1], offsets[k], *args)
        np.testing.assert_array_equal(wv[k], v1[0])
        np.testing.assert_array_equal(wg[k], g1[0])
    np.testing.assert_array_equal(vals[1], -3.0)
    assert np.isnan(wv[1]).all()
    # different planes really give different patches (the offsets are not ignored)
    assert np.abs(vals[2] - sp(coef, centres[2:3], offsets[3], geometry["w2i"])[0]).max() > 1e-3


@pytest.mark.parametrize("bs", [False, True])
def test_per_centre_offsets_numba_matches_reference(geometry, image, bs):
    rng = np.random.default_rng(4)
    n, P = 400, 5
    coef = coef_of(image, np.float64)
    centres = centres_world(rng, geometry, n, margin=3.0)
    offsets = random_planes(rng, n, P, 0.8)
    args = (geometry["affine"], geometry["bs_coef"] if bs else None, geometry["w2grid"], geometry["w2i"])
    close(get_kernel("sample_patches", "cpu")(coef, centres, offsets, geometry["w2i"]),
          get_kernel("sample_patches", "numpy")(coef, centres, offsets, geometry["w2i"]))
    v, g = get_kernel("sample_patches_warped", "cpu")(coef, centres, offsets, *args)
    rv, rg = get_kernel("sample_patches_warped", "numpy")(coef, centres, offsets, *args)
    close(v, rv)
    close(g, rg)
    # and the composition of the separate kernels, centre by centre
    for k in (0, 7, n - 1):
        ev, eg = composed_warp(coef, centres[k:k + 1], offsets[k], geometry, args[1])
        close(v[k], ev)
        close(g[k], eg.reshape(-1, 3))


@pytest.mark.parametrize("be", BACKENDS_RUN)
def test_per_centre_offsets_bad_shape(be):
    coef = np.zeros((5, 6, 7))
    with pytest.raises(ConfigError, match="offsets must have shape"):
        get_kernel("sample_patches", be)(coef, np.zeros((4, 3)), np.zeros((3, 9, 3)), np.eye(4))
    with pytest.raises(ConfigError, match="offsets must have shape"):
        get_kernel("sample_patches_warped", be)(coef, np.zeros((4, 3)), np.zeros((4, 9, 2)), np.eye(4), None, None,
                                                np.eye(4))
    v = get_kernel("sample_patches", be)(coef, np.zeros((0, 3)), np.zeros((0, 9, 3)), np.eye(4))
    assert v.shape == (0, 9)
