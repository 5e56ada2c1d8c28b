"""CUDA kernels (kernels/cuda.py) against the NumPy reference.

On a machine without an NVIDIA driver they run in Numba's CUDA simulator (conftest sets
NUMBA_ENABLE_CUDASIM=1), one Python thread per CUDA thread: shapes here are small (hundreds of
points, ~10^3 volumes, ~6^3 dense outputs). The ``gpu`` section at the end repeats the
comparisons at full size on a real GPU and is skipped elsewhere.
"""

import numpy as np
import pytest
from numba import cuda
from scipy import ndimage as ndi

from fastimpact.errors import ConfigError
from fastimpact.kernels import cuda as kc
from fastimpact.kernels import cuda_common as cc
from fastimpact.kernels import reference as ref

pytestmark = pytest.mark.cudasim

IMG_SHAPE = (11, 13, 9)
GRID_SHAPE = (5, 6, 4)
DENSE_SHAPE = (7, 5, 6)
DTYPES = (np.float32, np.float64)


# ----------------------------------------------------------------------------- helpers
def dev(a):
    return cuda.to_device(np.ascontiguousarray(a))


def host(a):
    return a.copy_to_host() if cc.is_device(a) else a


def tol(dtype):
    return 1e-5 if np.dtype(dtype) == np.float32 else 1e-11


def assert_matches(got, expected, dtype=None, rtol=None):
    """Same shape and dtype, the reference's non-finite entries exactly, finite ones within
    rtol * max|finite ref|."""
    got = host(got)
    expected = np.asarray(expected)
    assert got.shape == expected.shape
    assert got.dtype == expected.dtype, (got.dtype, expected.dtype)
    if expected.dtype.kind not in "fc":
        np.testing.assert_array_equal(got, expected)
        return
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(got[~finite], expected[~finite])  # NaN and inf where the reference has them
    scale = max(np.abs(expected[finite]).max(initial=0.0), 1.0)
    rtol = tol(dtype or expected.dtype) if rtol is None else rtol
    np.testing.assert_allclose(got[finite], expected[finite], rtol=0, atol=rtol * scale)


def f32(a):
    """float32 copy (1e300 rows become inf: still non-finite)."""
    with np.errstate(over="ignore"):
        return np.asarray(a).astype(np.float32)


def as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


@pytest.fixture(scope="module")
def image():
    r = np.random.default_rng(7)
    return ndi.gaussian_filter(r.standard_normal(IMG_SHAPE), 1.2) * 10.0


def coef_of(img, dtype):
    return ndi.spline_filter(img.astype(dtype), order=3, mode="mirror", output=dtype)


@pytest.fixture(scope="module")
def grid():
    return np.random.default_rng(99).standard_normal(GRID_SHAPE + (3,))


def image_points(rng, shape, n, margin):
    """Random points (some outside by up to ``margin``), the corners, the +-0.5 resampling
    border, and non-finite / huge rows."""
    pts = rng.uniform(-margin, np.array(shape) - 1 + margin, size=(n, 3))
    hi = np.array(shape, dtype=float) - 1
    special = [
        [0, 0, 0], hi, [-0.5, 2, 2], [hi[0] + 0.5, 2, 2], [1, -0.5, hi[2] + 0.5], [1, -0.5001, 1],
        [hi[0] + 0.5001, 1, 1], [np.nan, 1, 1], [1, np.inf, 2], [1, 1, -np.inf], [1e300, 1, 1], [1e15, 2, 2],
    ]
    pts[: len(special)] = special
    return pts


def grid_points(rng, n):
    t = rng.uniform(-2.5, np.array(GRID_SHAPE) + 1.5, size=(n, 3))
    t[:6] = [[np.nan, 1, 1], [1, np.inf, 2], [1e300, 1, 1], [-4.1, 1, 1], [0, 0, 0], [1.0, 2.0, 3.0]]
    return t


def random_affine(rng, scale=0.05, shift=(0.3, -0.2, 0.4)):
    A = np.eye(4)
    A[:3, :3] += scale * rng.standard_normal((3, 3))
    A[:3, 3] = shift
    return A


# ----------------------------------------------------------------------------- image sampling
@pytest.mark.parametrize("dtype", DTYPES)
def test_cubic_sample(image, dtype):
    rng = np.random.default_rng(1)
    coef = coef_of(image, dtype)
    pts = image_points(rng, IMG_SHAPE, 300, margin=4.0)  # outside points are mirrored
    v, g = kc.cubic_sample(coef, pts)
    rv, rg = ref.cubic_sample(coef, pts)
    assert isinstance(v, np.ndarray) and isinstance(g, np.ndarray)
    assert_matches(v, rv, dtype)
    assert_matches(g, rg, dtype)
    assert np.isnan(v[7:11]).all() and np.isnan(g[7:11]).all()  # NaN / inf / 1e300 rows
    # float32 points are read as float64
    v32, _ = kc.cubic_sample(coef, f32(pts))
    assert_matches(v32, ref.cubic_sample(coef, f32(pts))[0], dtype)


def test_cubic_sample_single_voxel_axis_and_no_points():
    rng = np.random.default_rng(2)
    coef = rng.standard_normal((1, 6, 5))  # n == 1: the mirror folds everything onto index 0
    pts = image_points(rng, coef.shape, 50, margin=3.0)
    for got, want in zip(kc.cubic_sample(coef, pts), ref.cubic_sample(coef, pts)):
        assert_matches(got, want)
    v, g = kc.cubic_sample(coef, np.empty((0, 3)))
    assert v.shape == (0,) and g.shape == (0, 3) and v.dtype == np.float64


@pytest.mark.parametrize("dtype", DTYPES)
def test_cubic_sample_values(image, dtype):
    rng = np.random.default_rng(3)
    coef = coef_of(image, dtype)
    pts = image_points(rng, IMG_SHAPE, 240, margin=1.5)
    out = kc.cubic_sample_values(coef, pts, fill=-7.0)
    assert_matches(out, ref.cubic_sample_values(coef, pts, fill=-7.0), dtype)
    assert out[0] != -7.0 and out[5] == -7.0 and out[7] == -7.0  # inside corner; outside; NaN
    # a float32 (X, Y, Z, 3) point grid returns (X, Y, Z)
    grid_pts = f32(pts[:210].reshape(7, 5, 6, 3))
    out = kc.cubic_sample_values(coef, grid_pts, fill=np.nan)
    assert out.shape == (7, 5, 6)
    assert_matches(out, ref.cubic_sample_values(coef, grid_pts, fill=np.nan), dtype)


@pytest.mark.parametrize("dtype", (np.float32, np.float64, np.int16, np.bool_))
def test_linear_sample(image, dtype):
    rng = np.random.default_rng(4)
    img = (image > 0) if dtype == np.bool_ else (image * 50).astype(dtype)
    pts = image_points(rng, IMG_SHAPE, 240, margin=1.5)
    out = kc.linear_sample(img, pts, fill=-3.0)
    assert_matches(out, ref.linear_sample(img, pts, fill=-3.0))
    grid_pts = pts[:210].reshape(7, 5, 6, 3)
    assert_matches(kc.linear_sample(img, grid_pts), ref.linear_sample(img, grid_pts))


@pytest.mark.parametrize("dtype", (np.uint8, np.float32, np.int32, np.bool_))
def test_nearest_sample(image, dtype):
    rng = np.random.default_rng(5)
    img = (image > 0) if dtype == np.bool_ else (np.abs(image) * 20).astype(dtype)
    pts = image_points(rng, IMG_SHAPE, 240, margin=1.5)
    pts[20:30] = np.round(pts[20:30]) + 0.5  # exact halves round up
    fill = True if dtype == np.bool_ else 9
    out = kc.nearest_sample(img, pts, fill=fill)
    assert_matches(out, ref.nearest_sample(img, pts, fill=fill))
    grid_pts = pts[:210].reshape(7, 5, 6, 3)
    assert_matches(kc.nearest_sample(img, grid_pts), ref.nearest_sample(img, grid_pts))


# ----------------------------------------------------------------------------- B-spline transform
def test_bspline_weights():
    rng = np.random.default_rng(6)
    t = grid_points(rng, 200)
    t[6] = [-1e15, 1e14, -0.0]
    for got, want in zip(kc.bspline_weights(t), ref.bspline_weights(t)):
        assert_matches(got, want)


@pytest.mark.parametrize("tdtype", DTYPES)
def test_bspline_eval_and_jacobian(grid, tdtype):
    rng = np.random.default_rng(7)
    t = grid_points(rng, 250)
    t = f32(t) if tdtype == np.float32 else t  # includes points outside the grid (zero-extended)
    u = kc.bspline_eval(grid, t)
    assert_matches(u, ref.bspline_eval(grid, t))
    assert np.all(u[:3] == 0.0)  # unusable coordinates give zero
    J = kc.bspline_eval_jacobian(grid, t)
    assert_matches(J, ref.bspline_eval_jacobian(grid, t))
    assert np.all(J[:3] == 0.0)


def test_bspline_jacobian_finite_differences(grid):
    t = np.random.default_rng(8).uniform(-1.0, np.array(GRID_SHAPE), size=(40, 3))
    J = kc.bspline_eval_jacobian(grid, t)
    h = 1e-6
    for d in range(3):
        e = np.zeros(3)
        e[d] = h
        fd = (kc.bspline_eval(grid, t + e) - kc.bspline_eval(grid, t - e)) / (2 * h)
        np.testing.assert_allclose(J[:, :, d], fd, atol=1e-7)


def test_bspline_scatter(grid):
    rng = np.random.default_rng(9)
    t = grid_points(rng, 300)
    g = rng.standard_normal((300, 3))
    g[0] = np.nan  # at a NaN point: scatters nothing
    acc = kc.bspline_scatter(t, g, GRID_SHAPE)
    assert_matches(acc, ref.bspline_scatter(t, g, GRID_SHAPE))
    # adjoint of bspline_eval: <eval(c, t), g> == <c, scatter(t, g)>
    g[0] = 1.0
    lhs = np.sum(kc.bspline_eval(grid, t) * g)
    rhs = np.sum(grid * kc.bspline_scatter(t, g, GRID_SHAPE + (3,)))
    assert lhs == pytest.approx(rhs, rel=1e-12)
    # a host buffer is overwritten and returned
    buf = np.full(GRID_SHAPE + (3,), 5.0)
    res = kc.bspline_scatter(t, g, GRID_SHAPE, out=buf)
    assert res is buf
    assert_matches(buf, ref.bspline_scatter(t, g, GRID_SHAPE))
    # a device buffer is zeroed, accumulated into and returned (stays on the device)
    dbuf = dev(np.full(GRID_SHAPE + (3,), 5.0))
    res = kc.bspline_scatter(t, g, GRID_SHAPE, out=dbuf)
    assert res is dbuf
    assert_matches(dbuf, ref.bspline_scatter(t, g, GRID_SHAPE))


@pytest.mark.parametrize("dtype", DTYPES)
def test_bspline_dense(grid, dtype):
    # grid indices from -0.9 to past the last control point: the zero-extended border too
    t0, dt = (-0.9, 0.2, -1.3), (0.95, 1.3, 1.1)
    out = kc.bspline_dense(grid, DENSE_SHAPE, t0, dt, dtype=dtype)
    assert_matches(out, ref.bspline_dense(grid, DENSE_SHAPE, t0, dt, dtype=dtype), dtype)


def test_points_affine():
    rng = np.random.default_rng(10)
    A = random_affine(rng)
    idx = rng.uniform(-5, 20, size=(200, 3))
    idx[:2] = [[np.nan, 1, 1], [1, np.inf, 2]]  # NaN / inf propagate as in the reference
    assert_matches(kc.points_affine(idx, A), ref.points_affine(idx, A))
    grid_idx = idx[:210 - 10].reshape(5, 8, 5, 3).astype(np.float32)
    out = kc.points_affine(grid_idx, A)
    assert out.shape == (5, 8, 5, 3)
    assert_matches(out, ref.points_affine(grid_idx, A))


@pytest.mark.parametrize("dtype", DTYPES)
def test_warp_sample(image, grid, dtype):
    rng = np.random.default_rng(11)
    coef = coef_of(image, dtype)
    idx = rng.uniform(-1.0, np.array(IMG_SHAPE), size=(250, 3))
    idx[0] = np.nan
    A_f2m = random_affine(rng)
    A_f2grid = np.diag([0.4, 0.42, 0.38, 1.0])
    A_f2grid[:3, 3] = [-0.3, 0.1, 0.2]
    W2M = np.diag([0.8, 0.9, 1.1]) + 0.02
    got = kc.warp_sample(coef, idx, A_f2m, 0.7 * grid, A_f2grid, W2M)
    want = ref.warp_sample(coef, idx, A_f2m, 0.7 * grid, A_f2grid, W2M)
    for k, (a, b) in enumerate(zip(got, want)):
        # values/grads in the image dtype; m and t float64 (their error is that of float64 maths)
        assert_matches(a, b, dtype if k < 2 else np.float64)


@pytest.mark.parametrize("with_field", (False, True))
@pytest.mark.parametrize("dtype", DTYPES)
def test_affine_grid(with_field, dtype):
    rng = np.random.default_rng(12)
    A = random_affine(rng)
    field = rng.standard_normal(DENSE_SHAPE + (3,)).astype(np.float32) if with_field else None
    L = np.diag([0.5, 0.6, 0.7]) + 0.1 if with_field else None
    out = kc.affine_grid(DENSE_SHAPE, A, field, L, dtype=dtype)
    assert_matches(out, ref.affine_grid(DENSE_SHAPE, A, field, L, dtype=dtype), dtype)


@pytest.mark.parametrize("with_field", (False, True))
@pytest.mark.parametrize("dtype", DTYPES)
def test_warp_cubic(image, with_field, dtype):
    rng = np.random.default_rng(13)
    coef = coef_of(image, dtype)
    A = random_affine(rng, shift=(-1.0, 2.0, 1.5))  # some voxels map outside: fill
    A[:3, :3] *= 1.6
    field = 2.0 * rng.standard_normal(DENSE_SHAPE + (3,)) if with_field else None
    L = np.diag([0.5, 0.6, 0.7]) if with_field else None
    out = kc.warp_cubic(coef, DENSE_SHAPE, A, field, L, fill=-5.0)
    want = ref.warp_cubic(coef, DENSE_SHAPE, A, field, L, fill=-5.0)
    assert (want == -5.0).any() and (want != -5.0).any()
    assert_matches(out, want, dtype)


# ----------------------------------------------------------------------------- sample_pairs
def pairs_case(image, n, use_bs, mask, seed=14, grid=None):
    rng = np.random.default_rng(seed)
    fixed = image.astype(np.float32)
    flat = rng.choice(fixed.size, n, replace=False)
    f2m = random_affine(rng, shift=(-0.8, 0.5, -0.3))  # part of the fixed image maps outside
    coef = coef_of(image, np.float64)
    kw = {}
    if use_bs:
        f2g = np.diag([0.4, 0.45, 0.38, 1.0])
        kw = dict(bs_coef=0.8 * grid, f2grid=f2g, w2m=np.diag([0.9, 1.1, 1.0]) + 0.03)
    if mask is not None:
        kw["moving_mask"] = mask
    return (flat, fixed, fixed.shape, f2m, coef), kw


def assert_pairs_equal(got, want):
    f, m, gy, pts, keep = (host(x) for x in got)
    wf, wm, wgy, wpts, wkeep = want
    np.testing.assert_array_equal(keep, wkeep)
    assert keep.dtype == np.bool_
    np.testing.assert_array_equal(f, wf)  # plain copies of the fixed values, in input order
    for a, b in ((m, wm), (gy, wgy), (pts, wpts)):
        assert a.dtype == np.float64
        assert_matches(a, b, rtol=1e-12)


# n = 45: one block of 45 threads (not a whole number of warps); n = 300: two blocks (the
# simulator's 256 threads per block), so the block offsets matter
@pytest.mark.parametrize(
    "n, use_bs, mask",
    [(45, False, None), (300, False, None), (45, True, "uint8"), (300, True, None), (300, True, "bool")],
)
def test_sample_pairs_matches_reference_in_order(image, grid, n, use_bs, mask):
    if mask is not None:
        m = ndi.gaussian_filter(image, 2.0) > -0.5
        mask_arr = m if mask == "bool" else m.astype(np.uint8) * 3
    else:
        mask_arr = None
    args, kw = pairs_case(image, n, use_bs, mask_arr, grid=grid)
    want = ref.sample_pairs(*args, **kw)
    assert 0 < want[4].sum() < n  # some points are dropped
    assert_pairs_equal(kc.sample_pairs(*args, **kw), want)


def test_sample_pairs_all_or_none_kept(image):
    rng = np.random.default_rng(15)
    coef = coef_of(image, np.float64)
    flat = rng.choice(image.size, 70, replace=False)
    for shift, n_kept in ((0.0, 70), (100.0, 0)):
        A = np.eye(4)
        A[:3, 3] = shift
        got = kc.sample_pairs(flat, image, image.shape, A, coef)
        assert_pairs_equal(got, ref.sample_pairs(flat, image, image.shape, A, coef))
        assert got[4].sum() == n_kept and got[0].shape == (n_kept,) and got[3].shape == (n_kept, 3)
    got = kc.sample_pairs(np.empty(0, dtype=np.int64), image, image.shape, np.eye(4), coef)
    assert all(x.shape[0] == 0 for x in got)


def test_block_count_scan_over_several_chunks():
    # pass 2 of sample_pairs: one block scanning more counts than it has threads (carry between
    # chunks, a last partial chunk)
    counts = np.random.default_rng(16).integers(0, 257, size=230).astype(np.int64)
    offsets = cc.device_out(230, np.int64)
    total = cc.device_out(1, np.int64)
    kc._k_scan_counts[1, 48](dev(counts), offsets, total)  # 5 chunks of 48 threads (1.5 warps)
    np.testing.assert_array_equal(offsets.copy_to_host(), np.concatenate([[0], np.cumsum(counts)[:-1]]))
    assert total.copy_to_host()[0] == counts.sum()


def test_sample_pairs_rejects_bad_inputs(image):
    coef = coef_of(image, np.float64)
    with pytest.raises(ConfigError, match="flat indices"):
        kc.sample_pairs(np.array([0, image.size]), image, image.shape, np.eye(4), coef)
    with pytest.raises(ConfigError, match="moving_mask"):
        kc.sample_pairs(np.array([0, 1]), image, image.shape, np.eye(4), coef, moving_mask=np.ones((3, 3, 3)))
    with pytest.raises(ConfigError, match="fixed_values"):
        kc.sample_pairs(np.array([0, 1]), image[:5], image.shape, np.eye(4), coef)
    with pytest.raises(ConfigError, match="f2m"):
        kc.sample_pairs(np.array([0, 1]), image, image.shape, np.eye(3), coef)


# ----------------------------------------------------------------------------- device arrays in and out
def op_cases(image, grid):
    """name -> (function, host args, device args, reference result)."""
    rng = np.random.default_rng(17)
    coef32 = coef_of(image, np.float32)
    pts = image_points(rng, IMG_SHAPE, 120, margin=2.0)
    t = grid_points(rng, 120)
    g = rng.standard_normal((120, 3))
    A = random_affine(rng)
    field = rng.standard_normal(DENSE_SHAPE + (3,))
    L = np.diag([0.5, 0.6, 0.7])
    labels = (np.abs(image) * 20).astype(np.uint8)
    W2M = np.diag([0.8, 0.9, 1.1])
    f2g = np.diag([0.4, 0.42, 0.38, 1.0])
    pargs, pkw = pairs_case(image, 150, True, ndi.gaussian_filter(image, 2.0) > -0.5, grid=grid)
    pflat, pfixed, pshape, pf2m, pcoef = pargs
    D = dev
    cases = {
        "cubic_sample": (kc.cubic_sample, (coef32, pts), (D(coef32), D(pts))),
        "cubic_sample_values": (kc.cubic_sample_values, (coef32, f32(pts), 2.0), (D(coef32), D(f32(pts)), 2.0)),
        "linear_sample": (kc.linear_sample, (image, pts), (D(image), D(pts))),
        "nearest_sample": (kc.nearest_sample, (labels, pts, 7), (D(labels), D(pts), 7)),
        "bspline_weights": (kc.bspline_weights, (t,), (D(t),)),
        "bspline_eval": (kc.bspline_eval, (grid, t), (D(grid), D(t))),
        "bspline_eval_jacobian": (kc.bspline_eval_jacobian, (grid, t), (D(grid), D(t))),
        "bspline_scatter": (kc.bspline_scatter, (t, g, GRID_SHAPE), (D(t), D(g), GRID_SHAPE)),
        "bspline_dense": (kc.bspline_dense, (grid, DENSE_SHAPE, (0.1, -0.5, 0.3), (0.7, 1.2, 0.9)),
                          (D(grid), DENSE_SHAPE, (0.1, -0.5, 0.3), (0.7, 1.2, 0.9))),
        "points_affine": (kc.points_affine, (pts[12:], A), (D(pts[12:]), A)),
        "warp_sample": (kc.warp_sample, (coef32, pts, A, grid, f2g, W2M), (D(coef32), D(pts), A, D(grid), f2g, W2M)),
        "affine_grid": (kc.affine_grid, (DENSE_SHAPE, A, field, L), (DENSE_SHAPE, A, D(field), L)),
        "sample_pairs": (kc.sample_pairs, (pflat, pfixed, pshape, pf2m, pcoef),
                         (D(pflat), D(pfixed), pshape, pf2m, D(pcoef)), pkw,
                         dict(pkw, bs_coef=D(pkw["bs_coef"]), moving_mask=D(pkw["moving_mask"].view(np.uint8)))),
        "warp_cubic": (kc.warp_cubic, (coef32, DENSE_SHAPE, A, field, L, -1.0),
                       (D(coef32), DENSE_SHAPE, A, D(field), L, -1.0)),
    }
    return cases


@pytest.fixture(scope="module")
def cases(image, grid):
    return op_cases(image, grid)


def test_every_core_operation_has_a_device_case(cases):
    assert set(cases) == set(kc.CORE_OPERATIONS)


@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul")  # the reference, at inf points
@pytest.mark.parametrize("name", kc.CORE_OPERATIONS)
def test_device_inputs_give_device_outputs_without_copies(cases, name, monkeypatch):
    """With its arrays on the GPU an op returns device arrays equal to the host call's results and
    makes no host <-> device copy (sample_pairs: one, its 8-byte kept count)."""
    case = cases[name]
    fn, host_args, dev_args = case[:3]
    host_kw, dev_kw = (case[3], case[4]) if len(case) > 3 else ({}, {})
    want = as_tuple(fn(*host_args, **host_kw))
    assert all(isinstance(w, np.ndarray) for w in want)  # all-host inputs: NumPy results
    # every output of the host call equals the NumPy reference
    for got_h, ref_h in zip(want, as_tuple(getattr(ref, name)(*host_args, **host_kw))):
        assert_matches(got_h, ref_h, got_h.dtype if got_h.dtype.kind == "f" else None)

    uploads, downloads = [], []
    real_to_device = cuda.to_device
    array_type = type(cuda.device_array(1))  # Numba's device array class (simulated or real)
    real_copy = array_type.copy_to_host

    def counting_to_device(a, *args, **kw):
        uploads.append(np.shape(a))
        return real_to_device(a, *args, **kw)

    def counting_copy(self, *args, **kw):
        downloads.append(self.shape)
        return real_copy(self, *args, **kw)

    monkeypatch.setattr(cuda, "to_device", counting_to_device)
    monkeypatch.setattr(array_type, "copy_to_host", counting_copy)
    got = as_tuple(fn(*dev_args, **dev_kw))
    monkeypatch.undo()
    assert uploads == []
    assert downloads == ([(1,)] if name == "sample_pairs" else [])
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert cc.is_device(a), f"{name} returned {type(a)} for device inputs"
        a = a.copy_to_host()
        assert a.dtype == b.dtype and a.shape == b.shape
        if b.dtype.kind == "f":
            np.testing.assert_allclose(a, b, rtol=1e-6 if b.dtype == np.float32 else 1e-12, atol=1e-12)
        else:
            np.testing.assert_array_equal(a, b)


def test_mixed_host_and_device_inputs_return_device_arrays(image):
    coef = coef_of(image, np.float64)
    pts = np.random.default_rng(18).uniform(0, 8, size=(30, 3))
    v, g = kc.cubic_sample(dev(coef), pts)
    assert cc.is_device(v) and cc.is_device(g)
    np.testing.assert_allclose(v.copy_to_host(), ref.cubic_sample(coef, pts)[0], rtol=1e-12)


def test_wrongly_typed_device_inputs_raise_type_error(image, grid):
    pts = np.zeros((4, 3))
    with pytest.raises(TypeError, match="bs_coef on the GPU has dtype float32"):
        kc.warp_sample(coef_of(image, np.float64), pts, np.eye(4), dev(grid.astype(np.float32)), np.eye(4), np.eye(3))
    with pytest.raises(TypeError, match="coef on the GPU has dtype int32.*float64"):
        kc.cubic_sample(dev(image.astype(np.int32)), pts)
    with pytest.raises(TypeError, match="points on the GPU has dtype int64"):
        kc.cubic_sample(coef_of(image, np.float64), dev(pts.astype(np.int64)))
    with pytest.raises(TypeError, match="flat on the GPU has dtype float64"):
        kc.sample_pairs(dev(np.zeros(3)), image, image.shape, np.eye(4), coef_of(image, np.float64))


def test_bad_shapes_raise_the_reference_config_errors(image, grid):
    coef = coef_of(image, np.float64)
    for pts in (np.zeros((5, 2)), dev(np.zeros((5, 2)))):
        with pytest.raises(ConfigError) as mine:
            kc.cubic_sample(coef, pts)
        with pytest.raises(ConfigError) as theirs:
            ref.cubic_sample(coef, np.zeros((5, 2)))
        assert str(mine.value) == str(theirs.value)
    for c in (np.zeros((4, 4)), dev(np.zeros((4, 4)))):
        with pytest.raises(ConfigError, match="coef must be a 3-D array"):
            kc.cubic_sample(c, np.zeros((2, 3)))
    for bad_grid in (np.zeros((4, 4, 4, 2)), dev(np.zeros((4, 4, 4, 2)))):
        with pytest.raises(ConfigError, match=r"B-spline coefficients must have shape \(gx, gy, gz, 3\)"):
            kc.bspline_eval(bad_grid, np.zeros((2, 3)))
    with pytest.raises(ConfigError, match="A must be a 4x4 matrix"):
        kc.points_affine(np.zeros((2, 3)), np.eye(3))
    with pytest.raises(ConfigError, match="g must have one 3-vector per point"):
        kc.bspline_scatter(np.zeros((4, 3)), np.zeros((5, 3)), GRID_SHAPE)
    with pytest.raises(ConfigError, match="g must have one 3-vector per point"):
        kc.bspline_scatter(dev(np.zeros((4, 3))), dev(np.zeros((5, 3))), GRID_SHAPE)
    with pytest.raises(ConfigError, match="out must be a C-contiguous float64"):
        kc.bspline_scatter(np.zeros((4, 3)), np.zeros((4, 3)), GRID_SHAPE, out=np.zeros((2, 2, 2, 3)))
    with pytest.raises(ConfigError, match="out must be a C-contiguous float64"):
        kc.bspline_scatter(np.zeros((4, 3)), np.zeros((4, 3)), GRID_SHAPE, out=dev(np.zeros(GRID_SHAPE + (2,))))
    with pytest.raises(ConfigError, match="grid_shape"):
        kc.bspline_scatter(np.zeros((4, 3)), np.zeros((4, 3)), (3, 3))
    with pytest.raises(ConfigError, match="field must have shape"):
        kc.warp_cubic(coef, DENSE_SHAPE, np.eye(4), np.zeros((2, 2, 2, 3)), np.eye(3))
    with pytest.raises(ConfigError, match="L must be a 3x3 matrix"):
        kc.affine_grid(DENSE_SHAPE, np.eye(4), np.zeros(DENSE_SHAPE + (3,)), np.eye(4))
    with pytest.raises(ConfigError, match="dtype must be float32 or float64"):
        kc.bspline_dense(grid, DENSE_SHAPE, (0, 0, 0), (1, 1, 1), dtype=np.int32)
    with pytest.raises(ConfigError, match="dtype must be float32 or float64"):
        kc.affine_grid(DENSE_SHAPE, np.eye(4), dtype=np.int32)


# ----------------------------------------------------------------------------- full size, real GPU only
def _no_gpu_reason():
    if cc.simulated():
        return "numba.cuda is the CUDA simulator (NUMBA_ENABLE_CUDASIM=1): full-size runs need a real GPU"
    if not cuda.is_available():
        return "no CUDA GPU available"
    return None


gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(_no_gpu_reason() is not None, reason=str(_no_gpu_reason()))

FULL_IMG = (96, 96, 96)
FULL_GRID = (12, 13, 11)
FULL_N = 200_000


@pytest.fixture(scope="module")
def full():
    rng = np.random.default_rng(20)
    img = ndi.gaussian_filter(rng.standard_normal(FULL_IMG), 2.0) * 10.0
    return dict(
        img=img,
        coef={dt: coef_of(img, dt) for dt in DTYPES},
        grid=rng.standard_normal(FULL_GRID + (3,)),
        pts=image_points(rng, FULL_IMG, FULL_N, margin=3.0),
        t=grid_points(rng, FULL_N) * (np.array(FULL_GRID) / np.array(GRID_SHAPE)),
        g=rng.standard_normal((FULL_N, 3)),
        A=random_affine(rng, shift=(1.0, -2.0, 0.5)),
        rng=rng,
    )


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_full_size_sampling(full, dtype):
    coef, pts = full["coef"][dtype], full["pts"]
    for got, want in zip(kc.cubic_sample(coef, pts), ref.cubic_sample(coef, pts)):
        assert_matches(got, want, dtype)
    assert_matches(kc.cubic_sample_values(coef, pts, -1.0), ref.cubic_sample_values(coef, pts, -1.0), dtype)
    img = full["img"].astype(dtype)
    assert_matches(kc.linear_sample(img, pts), ref.linear_sample(img, pts), dtype)
    labels = (np.abs(full["img"]) * 10).astype(np.uint8)
    assert_matches(kc.nearest_sample(labels, pts, 3), ref.nearest_sample(labels, pts, 3))


@gpu
@needs_gpu
def test_gpu_full_size_transform(full):
    grid, t, g = full["grid"], full["t"], full["g"]
    for got, want in zip(kc.bspline_weights(t), ref.bspline_weights(t)):
        assert_matches(got, want)
    assert_matches(kc.bspline_eval(grid, t), ref.bspline_eval(grid, t))
    assert_matches(kc.bspline_eval_jacobian(grid, t), ref.bspline_eval_jacobian(grid, t))
    # 200k points on ~1700 control points: heavy atomic contention, float64 order-of-addition noise only
    assert_matches(kc.bspline_scatter(t, g, FULL_GRID), ref.bspline_scatter(t, g, FULL_GRID), rtol=1e-10)
    t0, dt = (-0.5, -0.4, -0.6), (0.125, 0.135, 0.12)
    for dtype in DTYPES:
        want = ref.bspline_dense(grid, FULL_IMG, t0, dt, dtype)
        assert_matches(kc.bspline_dense(grid, FULL_IMG, t0, dt, dtype), want, dtype)
    assert_matches(kc.points_affine(full["pts"], full["A"]), ref.points_affine(full["pts"], full["A"]))


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_full_size_fused(full, dtype):
    coef, grid, A, rng = full["coef"][dtype], full["grid"], full["A"], full["rng"]
    idx = rng.uniform(0, 95, size=(FULL_N, 3))
    f2g = np.diag([0.12, 0.13, 0.11, 1.0])
    W2M = np.diag([0.9, 1.0, 1.1])
    for k, (a, b) in enumerate(zip(kc.warp_sample(coef, idx, A, grid, f2g, W2M),
                                   ref.warp_sample(coef, idx, A, grid, f2g, W2M))):
        assert_matches(a, b, dtype if k < 2 else np.float64)
    field = rng.standard_normal(FULL_IMG + (3,)).astype(np.float32)
    L = np.diag([0.5, 0.6, 0.7])
    assert_matches(kc.affine_grid(FULL_IMG, A, field, L), ref.affine_grid(FULL_IMG, A, field, L))
    assert_matches(kc.warp_cubic(coef, FULL_IMG, A, field, L, -2.0), ref.warp_cubic(coef, FULL_IMG, A, field, L, -2.0),
                   dtype)
    fixed = full["img"].astype(np.float32)
    flat = rng.choice(fixed.size, FULL_N, replace=False)  # ~800 blocks: several chunks in the count scan
    kw = dict(moving_mask=np.abs(full["img"]) < 1.0, bs_coef=grid, f2grid=f2g, w2m=W2M)
    want = ref.sample_pairs(flat, fixed, FULL_IMG, A, full["coef"][np.float64], **kw)
    assert_pairs_equal(kc.sample_pairs(flat, fixed, FULL_IMG, A, full["coef"][np.float64], **kw), want)
    dkw = dict(kw, moving_mask=dev(kw["moving_mask"].view(np.uint8)), bs_coef=dev(grid))
    got = kc.sample_pairs(dev(flat), dev(fixed), FULL_IMG, A, dev(full["coef"][np.float64]), **dkw)
    assert all(cc.is_device(x) for x in got)
    assert_pairs_equal(got, want)
