"""Kernel tests: NumPy reference vs Numba CPU, both against scipy / definitions / finite differences."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from scipy import ndimage as ndi

from fastimpact.errors import ConfigError
from fastimpact.kernels import BACKENDS, OPERATIONS, _bspline1d, get_kernel
from fastimpact.kernels import reference as ref

IMG_SHAPE = (45, 63, 37)
GRID_SHAPE = (9, 11, 8)
BACKENDS_RUN = ("numpy", "cpu")
DTYPES = (np.float32, np.float64)


def tol(dtype):
    return 1e-5 if dtype == np.float32 else 1e-11


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(scope="module")
def image():
    r = np.random.default_rng(7)
    img = ndi.gaussian_filter(r.standard_normal(IMG_SHAPE), 1.5) * 10.0
    return img


def coef_of(img, dtype):
    return ndi.spline_filter(img.astype(dtype), order=3, mode="mirror", output=dtype)


def random_points(rng, shape, n, margin):
    lo = -margin
    hi = np.array(shape) - 1 + margin
    return rng.uniform(lo, hi, size=(n, 3))


@pytest.fixture(scope="module")
def grid():
    r = np.random.default_rng(99)
    return r.standard_normal(GRID_SHAPE + (3,))


# ----------------------------------------------------------------------------- registry
def test_registry_resolves_every_operation():
    for be in BACKENDS_RUN:
        for op in OPERATIONS:
            assert callable(get_kernel(op, be))
    assert get_kernel("cubic_sample", "numpy") is ref.cubic_sample


def test_registry_rejects_unknown_names():
    with pytest.raises(ConfigError, match="cubic_sample"):
        get_kernel("cubic", "cpu")
    with pytest.raises(ConfigError, match="numpy"):
        get_kernel("cubic_sample", "gpu")
    assert "cuda" in BACKENDS


@pytest.mark.cudasim
def test_cuda_backend_implements_every_operation():
    # the simulator stands in for a GPU on machines without one (tests/conftest.py)
    for op in OPERATIONS:
        f = get_kernel(op, "cuda")
        assert callable(f) and f.__module__.startswith("fastimpact.kernels.")
    assert get_kernel("random_indices", "cuda")(5, 0, 8, 100).tolist() == ref.random_indices(5, 0, 8, 100).tolist()


def test_import_is_cheap():
    code = "import sys, fastimpact.kernels; print('numba' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_cpu_kernels_load_from_cache_in_a_new_process():
    code = textwrap.dedent(
        """
        import numpy as np
        from fastimpact.kernels import cpu
        coef = np.zeros((5, 6, 7))
        cpu.cubic_sample(coef, np.ones((3, 3)))
        stats = cpu._pick(cpu._k_cubic_sample, 3).stats
        print(sum(stats.cache_hits.values()), sum(stats.cache_misses.values()))
        """
    )
    subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    hits, misses = (int(v) for v in out.stdout.split())
    assert hits >= 1 and misses == 0, out.stdout


# ----------------------------------------------------------------------------- scalar B-spline
def test_scalar_bspline_functions_match_definition():
    xs = np.linspace(-2.5, 2.5, 1001)
    b = np.array([_bspline1d.bspline3(x) for x in xs])
    d1 = np.array([_bspline1d.bspline3_d1(x) for x in xs])
    d2 = np.array([_bspline1d.bspline3_d2(x) for x in xs])
    np.testing.assert_allclose(b, ref._beta3(xs), atol=1e-15)
    h = 1e-5
    fd1 = (ref._beta3(xs + h) - ref._beta3(xs - h)) / (2 * h)
    fd2 = (ref._beta3_d1(xs + h) - ref._beta3_d1(xs - h)) / (2 * h)
    np.testing.assert_allclose(d1, fd1, atol=1e-8)
    np.testing.assert_allclose(d2, fd2, atol=2e-5)  # O(h) only at the kinks
    for f in np.linspace(0.0, 0.999, 37):
        x = 5.0 + f
        dist = x - (np.floor(x) - 1 + np.arange(4))
        np.testing.assert_allclose(_bspline1d.bspline3_weights(f), ref._beta3(dist), atol=1e-15)
        np.testing.assert_allclose(_bspline1d.bspline3_weights_d1(f), ref._beta3_d1(dist), atol=1e-15)
        np.testing.assert_allclose(
            _bspline1d.bspline3_weights_d2(f), [_bspline1d.bspline3_d2(v) for v in dist], atol=1e-14
        )
        w = np.zeros(4)
        dw = np.zeros(4)
        assert _bspline1d.fill_bspline3_weights(x, w, dw) == 4
        np.testing.assert_allclose(w, ref._beta3(dist), atol=1e-15)
        np.testing.assert_allclose(dw, ref._beta3_d1(dist), atol=1e-15)


def test_scalar_index_helpers():
    for n in (1, 2, 5):
        ii = np.arange(-12, 13)
        mine = [_bspline1d.mirror_index(int(i), n) for i in ii]
        np.testing.assert_array_equal(mine, ref._mirror_index(ii, n))
        for base in range(-6, 7):
            np.testing.assert_array_equal(_bspline1d.mirror_taps(base, n), ref._mirror_index(base + np.arange(4), n))
        for x in np.linspace(-9.3, 9.7, 41):
            y, s = _bspline1d.mirror_coord(x, n)
            ry, rs = ref._mirror_coord(np.array([x]), n)
            assert y == pytest.approx(ry[0], abs=1e-12) and s == rs[0]
    assert _bspline1d.mirror_index(-1, 5) == 1 and _bspline1d.mirror_index(5, 5) == 3
    idx, w = _bspline1d.clamp_taps(-2, 5, (1.0, 2.0, 3.0, 4.0))
    assert idx == (0, 0, 0, 1) and w == (0.0, 0.0, 3.0, 4.0)
    idx, w = _bspline1d.clamp_taps(3, 5, (1.0, 2.0, 3.0, 4.0))
    assert idx == (3, 4, 4, 4) and w == (1.0, 2.0, 0.0, 0.0)


# ----------------------------------------------------------------------------- cubic sampling
@pytest.mark.parametrize("dtype", DTYPES)
def test_cubic_sample_matches_scipy(rng, image, dtype):
    coef = coef_of(image, dtype)
    pts = random_points(rng, IMG_SHAPE, 400, margin=4.0)  # includes points outside (mirrored)
    pts[:6] = [[0, 0, 0], [44, 62, 36], [-0.5, 3, 3], [44.5, 3, 3], [1, 62.5, 36.5], [10.25, 20.5, 30.75]]
    expected = ndi.map_coordinates(coef, pts.T, order=3, mode="mirror", prefilter=False)
    results = {}
    for be in BACKENDS_RUN:
        v, g = get_kernel("cubic_sample", be)(coef, pts)
        assert v.dtype == dtype and g.dtype == dtype and v.shape == (400,) and g.shape == (400, 3)
        scale = np.abs(expected).max()
        np.testing.assert_allclose(v, expected, atol=tol(dtype) * scale)
        results[be] = g
    np.testing.assert_allclose(results["cpu"], results["numpy"], atol=tol(dtype) * np.abs(results["numpy"]).max())


@pytest.mark.parametrize("be", BACKENDS_RUN)
def test_cubic_sample_gradient_finite_differences(rng, image, be):
    coef = coef_of(image, np.float64)
    pts = random_points(rng, IMG_SHAPE, 200, margin=3.0)
    _, g = get_kernel("cubic_sample", be)(coef, pts)
    h = 1e-5
    for d in range(3):
        e = np.zeros(3)
        e[d] = h
        fp = ndi.map_coordinates(coef, (pts + e).T, order=3, mode="mirror", prefilter=False)
        fm = ndi.map_coordinates(coef, (pts - e).T, order=3, mode="mirror", prefilter=False)
        np.testing.assert_allclose(g[:, d], (fp - fm) / (2 * h), atol=1e-6 * np.abs(g).max())


@pytest.mark.parametrize("be", BACKENDS_RUN)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cubic_sample_analytic_quadratic(rng, be, dtype):
    # coef = i^2 + 2 j^2 - k^2 + i j  =>  s(x) = x^2 + 2y^2 - z^2 + xy + 2/3 (beta3 has variance 1/3)
    i, j, k = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in (12, 15, 11)), indexing="ij")
    coef = (i**2 + 2 * j**2 - k**2 + i * j).astype(dtype)
    pts = rng.uniform([1, 1, 1], [9.99, 12.99, 8.99], size=(300, 3))  # all four taps inside
    x, y, z = pts.T
    v, g = get_kernel("cubic_sample", be)(coef, pts)
    rtol = 1e-6 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(v, x**2 + 2 * y**2 - z**2 + x * y + 2.0 / 3.0, rtol=rtol, atol=rtol * 300)
    expected_g = np.stack([2 * x + y, 4 * y + x, -2 * z], axis=1)
    np.testing.assert_allclose(g, expected_g, rtol=rtol, atol=rtol * 60)


def test_cubic_sample_nonfinite_points_give_nan():
    coef = np.ones((6, 7, 8))
    pts = np.array([[np.nan, 1.0, 1.0], [1.0, np.inf, 2.0], [1e300, 1.0, 1.0], [2.0, 2.0, 2.0]])
    for be in BACKENDS_RUN:
        v, g = get_kernel("cubic_sample", be)(coef, pts)
        assert np.isnan(v[:3]).all() and np.isnan(g[:3]).all()
        assert v[3] == pytest.approx(1.0) and np.allclose(g[3], 0.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cubic_sample_values_inside_outside(rng, image, dtype):
    coef = coef_of(image, dtype)
    pts = random_points(rng, IMG_SHAPE, 600, margin=1.5).astype(np.float32).reshape(10, 6, 10, 3)
    flat = pts.reshape(-1, 3).astype(np.float64)
    inside = np.all((flat >= -0.5) & (flat <= np.array(IMG_SHAPE) - 0.5), axis=1)
    assert 50 < inside.sum() < 600
    expected = ndi.map_coordinates(coef, flat.T, order=3, mode="mirror", prefilter=False)
    expected = np.where(inside, expected, -7.0).reshape(10, 6, 10)
    for be in BACKENDS_RUN:
        v = get_kernel("cubic_sample_values", be)(coef, pts, -7.0)
        assert v.shape == (10, 6, 10) and v.dtype == dtype
        np.testing.assert_allclose(v, expected, atol=tol(dtype) * np.abs(expected).max())
    # same values as cubic_sample inside
    v_in = get_kernel("cubic_sample_values", "cpu")(coef, flat[inside])
    np.testing.assert_allclose(v_in, get_kernel("cubic_sample", "cpu")(coef, flat[inside])[0], rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_sample(rng, image, dtype):
    img = image.astype(dtype)
    pts = random_points(rng, IMG_SHAPE, 800, margin=1.5)
    pts[:4] = [[-0.5, 0, 0], [44.5, 62.5, 36.5], [-0.51, 3, 3], [3, 3, 36.51]]
    inside = np.all((pts >= -0.5) & (pts <= np.array(IMG_SHAPE) - 0.5), axis=1)
    # scipy's 'nearest' mode clamps neighbour indices: the same half-voxel border rule.
    expected = ndi.map_coordinates(img.astype(np.float64), pts.T, order=1, mode="nearest")
    expected = np.where(inside, expected, 3.5)
    for be in BACKENDS_RUN:
        v = get_kernel("linear_sample", be)(img, pts, 3.5)
        assert v.dtype == dtype
        np.testing.assert_allclose(v, expected, atol=tol(dtype) * np.abs(expected).max())
        assert v[2] == 3.5 and v[3] == 3.5 and v[0] == pytest.approx(img[0, 0, 0])


def test_linear_sample_integer_image_and_grid_points(rng):
    img = rng.integers(0, 1000, size=IMG_SHAPE).astype(np.int16)
    pts = rng.integers(0, IMG_SHAPE, size=(100, 3)).astype(np.float32).reshape(10, 10, 3)
    for be in BACKENDS_RUN:
        v = get_kernel("linear_sample", be)(img, pts)
        assert v.dtype == np.float64 and v.shape == (10, 10)
        p = pts.reshape(-1, 3).astype(int)
        np.testing.assert_array_equal(v.reshape(-1), img[p[:, 0], p[:, 1], p[:, 2]])


@pytest.mark.parametrize("dtype", (np.uint8, np.float32))
def test_nearest_sample(rng, dtype):
    img = rng.integers(1, 100, size=IMG_SHAPE).astype(dtype)
    pts = random_points(rng, IMG_SHAPE, 700, margin=1.5)
    pts[:5] = [[0.5, 0.5, 0.5], [-0.5, 2.49, 1.5], [44.5, 62.5, 36.5], [-0.500001, 1, 1], [2, 2, 36.50001]]
    inside = np.all((pts >= -0.5) & (pts <= np.array(IMG_SHAPE) - 0.5), axis=1)
    idx = np.clip(np.floor(pts + 0.5).astype(int), 0, np.array(IMG_SHAPE) - 1)
    expected = np.where(inside, img[idx[:, 0], idx[:, 1], idx[:, 2]], 0)
    for be in BACKENDS_RUN:
        v = get_kernel("nearest_sample", be)(img, pts, 0)
        assert v.dtype == dtype
        np.testing.assert_array_equal(v, expected)
        assert v[0] == img[1, 1, 1]  # half rounds up
        assert v[1] == img[0, 2, 2] and v[2] == img[44, 62, 36] and v[3] == 0 and v[4] == 0


def test_resampling_nonfinite_points_get_fill():
    img = np.ones((5, 6, 7), dtype=np.float32)
    pts = np.array([[np.nan, 1, 1], [1, -np.inf, 1], [1, 1, 1]])
    for be in BACKENDS_RUN:
        for op in ("cubic_sample_values", "linear_sample", "nearest_sample"):
            v = get_kernel(op, be)(img, pts, 9)
            np.testing.assert_allclose(v, [9, 9, 1], err_msg=f"{op} {be}")


# ----------------------------------------------------------------------------- B-spline transform
def brute_force_eval(coef, t):
    """sum over every control point of beta3 products (the definition, zero outside the grid)."""
    a, b, c = (np.arange(n) for n in coef.shape[:3])
    wx = ref._beta3(t[:, 0, None] - a)
    wy = ref._beta3(t[:, 1, None] - b)
    wz = ref._beta3(t[:, 2, None] - c)
    return np.einsum("na,nb,nc,abcd->nd", wx, wy, wz, coef)


def grid_points(rng, n, margin):
    return random_points(rng, GRID_SHAPE, n, margin)


def test_bspline_weights(rng):
    t = grid_points(rng, 300, 3.0)
    t[0] = [2.0, 0.0, -1.0]
    out = {be: get_kernel("bspline_weights", be)(t) for be in BACKENDS_RUN}
    bad = np.array([[np.nan, np.inf, 1e300]])
    for i in range(3):  # unusable coordinates give the taps of 0 in both backends
        np.testing.assert_array_equal(
            get_kernel("bspline_weights", "cpu")(bad)[i], get_kernel("bspline_weights", "numpy")(bad)[i]
        )
    base, w, dw = out["cpu"]
    assert base.dtype == np.int64 and w.shape == (300, 3, 4) and dw.shape == (300, 3, 4)
    np.testing.assert_array_equal(base, np.floor(t).astype(np.int64) - 1)
    np.testing.assert_array_equal(base[0], [1, -1, -2])
    for i in range(3):
        np.testing.assert_allclose(out["cpu"][i], out["numpy"][i], atol=1e-14)
    np.testing.assert_allclose(w.sum(axis=2), 1.0, atol=1e-14)
    np.testing.assert_allclose(dw.sum(axis=2), 0.0, atol=1e-14)
    np.testing.assert_allclose(w, ref._beta3(t[:, :, None] - (base[:, :, None] + np.arange(4))), atol=1e-15)


@pytest.mark.parametrize("be", BACKENDS_RUN)
def test_bspline_eval_definition_and_edges(rng, grid, be):
    t = grid_points(rng, 400, 3.5)  # many supports leave the grid
    t[:3] = [[-2.5, 1, 1], [8.99, 10.5, 7.0], [-1.0, -1.0, -1.0]]
    u = get_kernel("bspline_eval", be)(grid, t)
    assert u.shape == (400, 3) and u.dtype == np.float64
    np.testing.assert_allclose(u, brute_force_eval(grid, t), atol=1e-12)
    t_bad = np.array([[np.nan, 1, 1], [1e300, 2, 2], [-4.1, 1, 1]])
    np.testing.assert_array_equal(get_kernel("bspline_eval", be)(grid, t_bad), 0.0)


@pytest.mark.parametrize("be", BACKENDS_RUN)
def test_bspline_jacobian_finite_differences(rng, grid, be):
    t = grid_points(rng, 300, 2.0)
    J = get_kernel("bspline_eval_jacobian", be)(grid, t)
    assert J.shape == (300, 3, 3)
    h = 1e-6
    for d in range(3):
        e = np.zeros(3)
        e[d] = h
        fd = (brute_force_eval(grid, t + e) - brute_force_eval(grid, t - e)) / (2 * h)
        np.testing.assert_allclose(J[:, :, d], fd, atol=1e-7)


def test_bspline_eval_and_jacobian_backends_agree(rng, grid):
    t = grid_points(rng, 500, 3.0)
    for op in ("bspline_eval", "bspline_eval_jacobian"):
        np.testing.assert_allclose(
            get_kernel(op, "cpu")(grid, t), get_kernel(op, "numpy")(grid, t), atol=1e-12, err_msg=op
        )


@pytest.mark.parametrize("n", (50, 3000))  # one private grid / several
def test_bspline_scatter_is_adjoint_of_eval(rng, grid, n):
    t = grid_points(rng, n, 3.0)
    t[0] = np.nan
    g = rng.standard_normal((n, 3))
    out = {}
    for be in BACKENDS_RUN:
        s = get_kernel("bspline_scatter", be)(t, g, GRID_SHAPE)
        assert s.shape == GRID_SHAPE + (3,) and s.dtype == np.float64
        lhs = np.sum(get_kernel("bspline_eval", be)(grid, t) * g)
        assert np.sum(grid * s) == pytest.approx(lhs, rel=1e-11)
        out[be] = s
    np.testing.assert_allclose(out["cpu"], out["numpy"], atol=1e-11)


def test_bspline_scatter_chunking_is_exact(rng):
    from fastimpact.kernels import cpu

    t = grid_points(rng, 1000, 2.0)
    g = rng.standard_normal((1000, 3))
    one = cpu._scatter(t, g, GRID_SHAPE, 1)
    for chunks in (2, 3, 7):
        np.testing.assert_allclose(cpu._scatter(t, g, GRID_SHAPE, chunks), one, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bspline_dense_matches_pointwise(grid, dtype):
    shape = IMG_SHAPE
    t0 = (-1.3, 0.2, -0.7)  # starts outside the grid on two axes: zero-extension is exercised
    dt = (10.8 / 44, 11.0 / 62, 8.4 / 36)
    ii, jj, kk = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    t = np.stack([t0[d] + (ii, jj, kk)[d] * dt[d] for d in range(3)], axis=-1).reshape(-1, 3)
    expected = get_kernel("bspline_eval", "cpu")(grid, t).reshape(shape + (3,))
    sub = np.random.default_rng(0).choice(len(t), 300, replace=False)
    np.testing.assert_allclose(expected.reshape(-1, 3)[sub], brute_force_eval(grid, t[sub]), atol=1e-12)
    for be in BACKENDS_RUN:
        u = get_kernel("bspline_dense", be)(grid, shape, t0, dt, dtype=dtype)
        assert u.shape == shape + (3,) and u.dtype == dtype
        np.testing.assert_allclose(u, expected, atol=tol(dtype) * np.abs(expected).max())


def test_points_affine(rng):
    A = np.eye(4)
    A[:3, :3] = rng.standard_normal((3, 3))
    A[:3, 3] = [1.5, -2.0, 3.0]
    p = rng.standard_normal((257, 3))
    expected = np.array([A[:3, :3] @ q + A[:3, 3] for q in p])
    for be in BACKENDS_RUN:
        np.testing.assert_allclose(get_kernel("points_affine", be)(p, A), expected, atol=1e-13)
        q = get_kernel("points_affine", be)(p.astype(np.float32).reshape(257, 1, 1, 3), A)
        assert q.shape == (257, 1, 1, 3) and q.dtype == np.float64


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("be", BACKENDS_RUN)
def test_bad_shapes_raise_config_error(be, grid):
    with pytest.raises(ConfigError, match="3-D"):
        get_kernel("cubic_sample", be)(np.zeros((4, 4)), np.zeros((2, 3)))
    with pytest.raises(ConfigError, match=r"\(N, 3\)"):
        get_kernel("cubic_sample", be)(np.zeros((4, 4, 4)), np.zeros((2, 2)))
    with pytest.raises(ConfigError, match="gx, gy, gz, 3"):
        get_kernel("bspline_eval", be)(np.zeros((4, 4, 4)), np.zeros((2, 3)))
    with pytest.raises(ConfigError, match="one 3-vector per point"):
        get_kernel("bspline_scatter", be)(np.zeros((4, 3)), np.zeros((3, 3)), GRID_SHAPE)
    with pytest.raises(ConfigError, match="4x4"):
        get_kernel("points_affine", be)(np.zeros((4, 3)), np.eye(3))
    with pytest.raises(ConfigError, match="float32 or float64"):
        get_kernel("bspline_dense", be)(grid, (4, 5, 6), (0, 0, 0), (1, 1, 1), dtype=np.int32)
    with pytest.raises(ConfigError, match="3 values"):
        get_kernel("bspline_dense", be)(grid, (4, 5, 6), (0, 0), (1, 1, 1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_warp_sample_equals_composition(rng, image, grid, dtype):
    coef = coef_of(image, dtype)
    idx = random_points(rng, IMG_SHAPE, 300, margin=0.0)
    A_f2m = np.eye(4)
    A_f2m[:3, :3] += 0.03 * rng.standard_normal((3, 3))
    A_f2m[:3, 3] = [0.7, -1.2, 0.4]
    A_f2grid = np.diag([8.0 / 44, 10.0 / 62, 7.0 / 36, 1.0])
    A_f2grid[:3, 3] = 0.5
    W2M = np.diag([1 / 1.2, 1 / 0.9, 1 / 1.1]) + 0.01
    t = get_kernel("points_affine", "cpu")(idx, A_f2grid)
    m = get_kernel("points_affine", "cpu")(idx, A_f2m) + get_kernel("bspline_eval", "cpu")(grid, t) @ W2M.T
    v, g = get_kernel("cubic_sample", "cpu")(coef, m)
    for be in BACKENDS_RUN:
        wv, wg, wm, wt = get_kernel("warp_sample", be)(coef, idx, A_f2m, grid, A_f2grid, W2M)
        assert wv.dtype == dtype and wg.dtype == dtype and wm.dtype == np.float64
        np.testing.assert_allclose(wt, t, atol=1e-12)
        np.testing.assert_allclose(wm, m, atol=1e-12)
        np.testing.assert_allclose(wv, v, atol=tol(dtype) * np.abs(v).max())
        np.testing.assert_allclose(wg, g, atol=tol(dtype) * np.abs(g).max())
    with pytest.raises(ConfigError, match="W2M must be a 3x3"):
        get_kernel("warp_sample", "cpu")(coef, idx, A_f2m, grid, A_f2grid, np.eye(4))


@pytest.mark.parametrize("shape", [(1, 2, 3), (2, 3, 4), (4, 1, 5)])
def test_tiny_images_match_scipy(rng, shape):
    img = rng.standard_normal(shape)
    coef = coef_of(img, np.float64)
    pts = random_points(rng, shape, 200, margin=2.0)
    expected = ndi.map_coordinates(coef, pts.T, order=3, mode="mirror", prefilter=False)
    inside = np.all((pts >= -0.5) & (pts <= np.array(shape) - 0.5), axis=1)
    for be in BACKENDS_RUN:
        v, g = get_kernel("cubic_sample", be)(coef, pts)
        np.testing.assert_allclose(v, expected, atol=1e-12)
        assert np.isfinite(g).all()
        vv = get_kernel("cubic_sample_values", be)(coef, pts, np.nan)
        np.testing.assert_allclose(vv[inside], expected[inside], atol=1e-12)
        assert np.isnan(vv[~inside]).all()
        lin = get_kernel("linear_sample", be)(img, pts, np.nan)
        np.testing.assert_allclose(lin[inside], ndi.map_coordinates(img, pts[inside].T, order=1, mode="nearest"))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_affine_grid_matches_reference(dtype):
    r = np.random.default_rng(7)
    shape = (45, 63, 37)
    A = np.eye(4)
    A[:3] = r.normal(size=(3, 4))
    field = r.normal(size=shape + (3,)).astype(dtype)
    L = r.normal(size=(3, 3))
    for args in ((shape, A), (shape, A, field, L)):
        got = get_kernel("affine_grid", "cpu")(*args, dtype=dtype)
        want = get_kernel("affine_grid", "numpy")(*args, dtype=dtype)
        assert got.dtype == dtype and got.shape == shape + (3,)
        np.testing.assert_allclose(got, want, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-4 if dtype == np.float32 else 1e-10)
    i, j, k = 4, 7, 9
    expect = A[:3, :3] @ np.array([i, j, k]) + A[:3, 3] + L @ field[i, j, k].astype(np.float64)
    np.testing.assert_allclose(get_kernel("affine_grid", "numpy")(shape, A, field, L)[i, j, k], expect, rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("with_grid", [False, True])
@pytest.mark.parametrize("with_mask, n", [(False, 3000), (True, 3000), (True, 20000)])
def test_sample_pairs_matches_reference(dtype, with_grid, with_mask, n):
    r = np.random.default_rng(11)
    fshape, mshape = (45, 63, 37), (41, 59, 39)
    fvals = r.normal(size=fshape).astype(dtype)
    mcoef = r.normal(size=mshape).astype(dtype)
    f2m = np.eye(4)
    f2m[:3, :3] += 0.05 * r.normal(size=(3, 3))
    f2m[:3, 3] = [-2.0, 1.5, -3.0]  # some points map outside
    kwargs = {}
    if with_grid:
        kwargs = dict(bs_coef=r.normal(size=(9, 11, 8, 3)), f2grid=np.diag([0.15, 0.14, 0.16, 1.0]) + np.eye(4) * 0,
                      w2m=np.eye(3) + 0.1 * r.normal(size=(3, 3)))
        kwargs["f2grid"][:3, 3] = 1.0
    mask = (r.random(mshape) > 0.3).astype(np.uint8) if with_mask else None
    flat = r.integers(0, np.prod(fshape), size=n)  # 20000: the parallel path
    got = get_kernel("sample_pairs", "cpu")(flat, fvals, fshape, f2m, mcoef, mask, **kwargs)
    want = get_kernel("sample_pairs", "numpy")(flat, fvals, fshape, f2m, mcoef, mask, **kwargs)
    assert 0 < got[4].sum() < len(flat)
    np.testing.assert_array_equal(got[4], want[4])
    tol = 2e-5 if dtype == np.float32 else 1e-10
    for a, b in zip(got[:4], want[:4]):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * 10)


def test_bspline_scatter_into_a_reused_buffer():
    r = np.random.default_rng(12)
    t = r.uniform(0.5, 7.0, size=(500, 3))
    g = r.normal(size=(500, 3))
    out = np.full(GRID_SHAPE + (3,), 7.0)  # stale content must be overwritten
    for be in BACKENDS_RUN:
        res = get_kernel("bspline_scatter", be)(t, g, GRID_SHAPE, out=out)
        assert res is out
        np.testing.assert_allclose(out, get_kernel("bspline_scatter", "numpy")(t, g, GRID_SHAPE), atol=1e-12)
    with pytest.raises(ConfigError, match="out must be"):
        get_kernel("bspline_scatter", "cpu")(t, g, GRID_SHAPE, out=np.zeros((2, 2, 2, 3)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_warp_cubic_matches_reference(dtype):
    r = np.random.default_rng(13)
    coef = r.normal(size=(45, 63, 37)).astype(dtype)
    shape = (21, 30, 17)
    A = np.eye(4)
    A[:3, :3] = np.diag([2.0, 2.0, 2.0]) + 0.1 * r.normal(size=(3, 3))
    A[:3, 3] = [-1.0, 0.5, 2.0]  # a few voxels fall outside
    field = r.normal(size=shape + (3,)).astype(np.float32)
    L = np.eye(3) * 0.5
    for args in ((coef, shape, A), (coef, shape, A, field, L)):
        got = get_kernel("warp_cubic", "cpu")(*args, fill=-7.0)
        want = get_kernel("warp_cubic", "numpy")(*args, fill=-7.0)
        assert got.dtype == dtype and (want == -7.0).any()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 if dtype == np.float32 else 1e-10)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [700, 20000])  # 20000: the parallel path
def test_cubic_sample_channels_matches_per_channel_sampling(dtype, n):
    r = np.random.default_rng(14)
    coef = r.normal(size=(45, 63, 37, 5)).astype(dtype)
    pts = r.uniform(-3.0, 66.0, size=(n, 3))  # some outside: mirrored
    pts[0] = np.nan
    vals, grads = get_kernel("cubic_sample_channels", "cpu")(coef, pts)
    rv, rg = get_kernel("cubic_sample_channels", "numpy")(coef, pts)
    assert vals.shape == (n, 5) and grads.shape == (n, 5, 3)
    assert np.isnan(vals[0]).all() and np.isnan(grads[0]).all()
    np.testing.assert_allclose(vals[1:], rv[1:], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(grads[1:], rg[1:], rtol=1e-9, atol=1e-9)
    only = get_kernel("cubic_sample_channels_values", "cpu")(coef, pts)
    assert only.shape == (n, 5) and np.isnan(only[0]).all()
    np.testing.assert_allclose(only[1:], rv[1:], rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(get_kernel("cubic_sample_channels_values", "numpy")(coef, pts)[1:], rv[1:])
    for c in (0, 4):  # and each channel is the scalar sampler of that channel
        v, g = get_kernel("cubic_sample", "numpy")(np.ascontiguousarray(coef[..., c]), pts[1:50])
        np.testing.assert_allclose(vals[1:50, c], v, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(grads[1:50, c], g, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("shape", [(45, 63, 37, 5), (3, 4, 2, 2), (1, 7, 30, 3), (2, 2, 2, 1), (40, 1, 33, 12)])
def test_prefilter_channels_matches_scipy(shape):
    r = np.random.default_rng(15)
    data = r.normal(size=shape).astype(np.float32)
    got = get_kernel("prefilter_channels", "cpu")(data)
    want = get_kernel("prefilter_channels", "numpy")(data.astype(np.float64))
    assert got.dtype == np.float32 and got.shape == shape and got.flags.c_contiguous
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # the coefficients interpolate: sampling them at the voxel centres gives the data back
    if min(shape[:3]) > 1:
        idx = np.argwhere(np.ones(shape[:3], bool))[::11].astype(np.float64)
        vals = get_kernel("cubic_sample_channels_values", "cpu")(got, idx)
        np.testing.assert_allclose(vals, data[tuple(idx.astype(int).T)], atol=1e-4)


def test_serial_twins_have_their_own_cache_entries():
    """The single-threaded twin of a parallel kernel must not share the parallel kernel's on-disk
    cache entry (Numba names entries by function name and line and keys them by signature, not by
    the parallel flag: a shared entry made the parallel kernel load the serial code)."""
    from fastimpact.kernels import cpu

    for kernel in (cpu._k_cubic_sample, cpu._k_sample_patches_warped, cpu._k_random_indices):
        twin = cpu._pick(kernel, 1)
        assert twin is not kernel and cpu._pick(kernel, cpu.SERIAL_BELOW) is kernel
        assert twin._cache._cache_file._index_name != kernel._cache._cache_file._index_name
        assert twin.py_func.__code__ is kernel.py_func.__code__  # the same source
