"""Tests of the ASGD optimiser and its automatic parameter estimation (fastimpact.optimizers.asgd).

The synthetic problems are linear least squares in the transform parameters: probe points x_j
with Jacobians J_j (a cubic B-spline grid or a small affine-like map), targets y_j (mm), and
f(theta) = 1/(2P) sum_j ||J_j theta - y_j||^2, whose stochastic gradient uses a random subset of
points. The optimum is known in closed form.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest

from fastimpact.errors import ConfigError
from fastimpact.optimizers.asgd import (
    ASGD,
    ASGDParameters,
    ASGDSettings,
    SparseJacobian,
    default_max_step_length,
    default_n_jacobian_measurements,
    estimate_parameters,
    grid_sample_points,
    jacobian_terms,
    jacobian_terms_reference,
    manual_parameters,
    sigmoid,
)

# ----------------------------------------------------------------------------------------------
# synthetic probes
# ----------------------------------------------------------------------------------------------


def _bspline_weights(t):
    """Cubic B-spline weights of the 4 nodes around fractional position t in [0, 1)."""
    return np.stack(
        [(1 - t) ** 3 / 6, (3 * t**3 - 6 * t**2 + 4) / 6, (-3 * t**3 + 3 * t**2 + 3 * t + 1) / 6, t**3 / 6], -1
    )


def bspline_probe(img_shape, grid_shape, n_samples, *, layout="blocked", mask=None):
    """Kronecker SparseJacobian of a cubic B-spline FFD at elastix-style grid points."""
    pts = grid_sample_points(img_shape, n_samples, mask).astype(float)
    G = np.asarray(grid_shape)
    h = (np.asarray(img_shape) - 1) / (G - 3)  # control spacing (voxels), one padding node per side
    u = pts / h + 1.0
    base = np.minimum(np.floor(u).astype(int), G - 3)
    t = u - base
    wx, wy, wz = (_bspline_weights(t[:, d]) for d in range(3))
    w = (wx[:, :, None, None] * wy[:, None, :, None] * wz[:, None, None, :]).reshape(len(pts), 64)
    o = np.arange(4) - 1
    ix, iy, iz = base[:, 0:1] + o, base[:, 1:2] + o, base[:, 2:3] + o
    node = ((ix[:, :, None, None] * G[1] + iy[:, None, :, None]) * G[2] + iz[:, None, None, :]).reshape(len(pts), 64)
    ncp = int(np.prod(G))
    if layout == "blocked":  # elastix: all x coefficients, then y, then z
        return SparseJacobian.kronecker(node, w, 3 * ncp, n_dims=3, stride=ncp)
    return SparseJacobian.kronecker(3 * node, w, 3 * ncp, n_dims=3, stride=1)  # cp0x cp0y cp0z cp1x ...


def affine_probe(n_points, rng, radius=40.0):
    """General-form SparseJacobian of x -> x + M (x - c) / radius + t: 12 parameters, K = 12."""
    x = rng.uniform(-radius, radius, size=(n_points, 3))
    vals = np.zeros((n_points, 3, 12))
    for d in range(3):
        vals[:, d, 3 * d : 3 * d + 3] = x / radius
        vals[:, d, 9 + d] = 1.0
    idx = np.broadcast_to(np.arange(12), (n_points, 12))
    return SparseJacobian(idx, vals, 12)


def subset(jac: SparseJacobian, rows) -> SparseJacobian:
    return SparseJacobian(jac.indices[rows], jac.values[rows], jac.n_params, kron=jac.kron, stride=jac.stride)


class LeastSquares:
    """f(theta) = 1/(2P) sum_j ||J_j theta - y_j||^2 with noisy targets; subset gradients."""

    def __init__(self, jac, theta_true, noise_mm, n_batch, rng):
        self.jac = jac
        self.y = jac.apply(theta_true) + noise_mm * rng.standard_normal((jac.n_points, 3))
        self.n_batch = n_batch

    @functools.cached_property
    def disp_opt(self):
        """Displacements (P, 3) mm of the least-squares optimum (unique even if theta is not)."""
        jac = self.jac
        if jac.kron == 1:
            J = jac.to_dense().reshape(-1, jac.n_params)
            return jac.apply(np.linalg.lstsq(J, self.y.ravel(), rcond=None)[0])
        # J_j = w_j^T (x) I_3: three independent problems W theta_d = y_d on the node weights W
        W = SparseJacobian(jac.indices, jac.values, int(jac.indices.max()) + 1).to_dense()[:, 0, :]
        return W @ np.linalg.lstsq(W, self.y, rcond=None)[0]

    def exact_gradient(self, theta):
        return self.jac.apply_transpose(self.jac.apply(theta) - self.y) / self.jac.n_points

    def gradient(self, theta, seed):
        rows = np.random.default_rng(seed).choice(self.jac.n_points, self.n_batch, replace=False)
        sub = subset(self.jac, rows)
        return sub.apply_transpose(sub.apply(theta) - self.y[rows]) / self.n_batch

    def rms_error_mm(self, theta):
        """RMS over the probe points of the displacement difference to the optimum (mm)."""
        return float(np.sqrt(np.mean(np.sum((self.jac.apply(theta) - self.disp_opt) ** 2, axis=1))))


def run(opt: ASGD, problem: LeastSquares, theta0, iterations, seed):
    rng = np.random.default_rng(seed)
    theta = theta0.copy()
    for _ in range(iterations):
        theta = opt.step(theta, problem.gradient(theta, int(rng.integers(2**31 - 1))))
    return theta


# ----------------------------------------------------------------------------------------------
# Jacobian terms: numba kernels against the dense NumPy definition
# ----------------------------------------------------------------------------------------------


def _close(a, b, rtol=1e-9):
    for name in ("TrC", "TrCC", "maxJJ", "maxJCJ"):
        assert getattr(a, name) == pytest.approx(getattr(b, name), rel=rtol), name


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["blocked", "interleaved"])
def test_jacobian_terms_bspline_match_reference(dtype, layout):
    jac = bspline_probe((45, 63, 37), (5, 6, 5), 1000, layout=layout)
    jac = SparseJacobian(jac.indices, jac.values.astype(dtype), jac.n_params, kron=3, stride=jac.stride)
    assert jac.n_points > 700
    _close(jacobian_terms(jac), jacobian_terms_reference(jac))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_jacobian_terms_general_layout_with_repeated_indices(dtype):
    rng = np.random.default_rng(3)
    P, K, n = 57, 9, 13
    idx = rng.integers(0, n, size=(P, K))  # unsorted rows with repeats
    idx[::4] = idx[0]  # some identical rows, which are grouped
    vals = rng.standard_normal((P, 3, K)).astype(dtype)
    jac = SparseJacobian(idx, vals, n)
    ref = jacobian_terms_reference(jac)
    _close(jacobian_terms(jac), ref)
    _close(jacobian_terms(jac, max_band_entries=0), ref)  # scipy.sparse fallback


def test_jacobian_terms_affine_and_masked_bspline():
    rng = np.random.default_rng(4)
    jac = affine_probe(301, rng)
    _close(jacobian_terms(jac), jacobian_terms_reference(jac))
    shape = (31, 27, 22)
    ii = np.indices(shape)
    mask = ((ii[0] - 15) ** 2 + (ii[1] - 12) ** 2 + (ii[2] - 10) ** 2) < 100
    jac = bspline_probe(shape, (8, 7, 6), 900, mask=mask)
    _close(jacobian_terms(jac), jacobian_terms_reference(jac))


def test_sparse_jacobian_apply_is_dense_product_and_adjoint():
    rng = np.random.default_rng(5)
    for jac in (bspline_probe((21, 19, 17), (6, 6, 5), 400, layout="interleaved"), affine_probe(50, rng)):
        dense = jac.to_dense()
        v = rng.standard_normal(jac.n_params)
        d = rng.standard_normal((jac.n_points, 3))
        np.testing.assert_allclose(jac.apply(v, chunk=37), np.einsum("jdp,p->jd", dense, v), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(jac.apply_transpose(d), np.einsum("jdp,jd->p", dense, d), rtol=1e-12, atol=1e-12)


def test_sparse_jacobian_rejects_colliding_kron_layout():
    with pytest.raises(ValueError):
        SparseJacobian.kronecker(np.array([[0, 1]]), np.ones((1, 2)), 6, n_dims=3, stride=1)


# ----------------------------------------------------------------------------------------------
# the update rule
# ----------------------------------------------------------------------------------------------


def test_sigmoid_properties():
    f_max, f_min, omega = 1.0, -0.8, 0.5
    assert sigmoid(0.0, f_max, f_min, omega) == pytest.approx(0.0, abs=1e-15)
    xs = np.linspace(-20, 20, 81)
    ys = np.array([sigmoid(x, f_max, f_min, omega) for x in xs])
    assert np.all(np.diff(ys) >= 0) and np.all(np.diff(ys[30:51]) > 0)
    assert ys[-1] == pytest.approx(f_max, abs=1e-9) and ys[0] == pytest.approx(f_min, abs=1e-9)
    # no overflow for the tiny default width
    assert sigmoid(1e6, 1.0, -0.8, 1e-8) == 1.0 and sigmoid(-1e6, 1.0, -0.8, 1e-8) == -0.8


def test_first_steps_use_gain_at_initial_time_and_time_updates_from_second_step():
    p = ASGDParameters(a=2.0, A=20.0, alpha=1.0, f_max=1.0, f_min=-0.5, omega=1e-3)
    opt = ASGD(p)
    theta = np.zeros(4)
    g = np.array([1.0, 0.0, 0.0, 0.0])
    theta = opt.step(theta, g)
    np.testing.assert_allclose(theta, -2.0 / 21.0 * g)
    assert opt.time == 0.0  # the first iteration only stores the gradient
    theta = opt.step(theta, -g)  # disagreement: t += f(+1) ~ f_max
    np.testing.assert_allclose(theta, np.zeros(4), atol=1e-15)
    assert opt.time == pytest.approx(1.0, abs=1e-6)
    assert opt.learning_rate == pytest.approx(2.0 / 21.0)
    opt.step(theta, g)
    assert opt.learning_rate == pytest.approx(2.0 / 22.0, rel=1e-6)


def test_time_grows_when_gradients_disagree_and_shrinks_when_they_agree():
    rng = np.random.default_rng(7)
    p = ASGDParameters(a=1.0, A=20.0, alpha=1.0, f_max=1.0, f_min=-0.8, omega=1e-8)
    opt = ASGD(p, initial_time=10.0)
    g = rng.standard_normal(50)
    theta = np.zeros(50)
    for k in range(6):  # alternating signs: pure noise/overshoot
        theta = opt.step(theta, g if k % 2 == 0 else -g)
    assert opt.time == pytest.approx(15.0)
    lr_noisy = opt.learning_rate
    for _ in range(6):  # consistent direction
        theta = opt.step(theta, g)
    assert opt.time == pytest.approx(15.0 + 1.0 - 0.8 * 5)  # the first of these still disagreed
    assert opt.learning_rate > lr_noisy
    for _ in range(30):
        theta = opt.step(theta, g)
    assert opt.time == 0.0  # clipped at zero


def test_non_adaptive_time_advances_by_mean_sigmoid_bounds():
    p = ASGDParameters(a=1.0, A=5.0, alpha=0.602, f_max=1.0, f_min=-0.6, omega=1e-8)
    opt = ASGD(p, adaptive=False)
    theta = np.ones(3)
    for _ in range(4):
        theta = opt.step(theta, np.ones(3))
    assert opt.time == pytest.approx(4 * 0.2)


def test_step_in_place_and_shape_check():
    opt = ASGD(ASGDParameters(a=1.0, A=0.0, alpha=1.0, f_max=1.0, f_min=-0.8, omega=1e-8))
    theta = np.ones(5)
    out = opt.step(theta, np.ones(5), out=theta)
    assert out is theta and np.allclose(theta, 0.0)
    with pytest.raises(ValueError):
        opt.step(theta, np.ones(4))


# ----------------------------------------------------------------------------------------------
# automatic estimation
# ----------------------------------------------------------------------------------------------


def _model_gradient(jac, sigma):
    """Gradients distributed as N(0, sigma^2 C), C = (1/P) sum J_j^T J_j: the ASGD model."""

    def gradient(theta, seed):
        e = np.random.default_rng(seed).standard_normal((jac.n_points, 3))
        return sigma / math.sqrt(jac.n_points) * jac.apply_transpose(e)

    return gradient


def test_original_first_step_moves_probe_points_by_max_step():
    """Defining property: max_j (E + 2 sd) of ||J_j step_0||^2 equals (delta A / (A + 1))^2."""
    rng = np.random.default_rng(11)
    jac = affine_probe(60, rng)
    delta = 1.5
    grad = _model_gradient(jac, sigma=3.0)
    s = ASGDSettings(n_gradient_measurements=400)
    p = estimate_parameters(s, jac, np.zeros(12), grad, max_step_mm=delta, rng=1)
    assert p.alpha == 1.0 and p.A == 20.0 and p.f_max == 1.0
    assert p.info["noise_factor"] == pytest.approx(1.0)  # deterministic gradient: no noise factor
    assert p.f_min == pytest.approx(-0.01)
    gain0 = p.gain(0.0)
    steps = np.stack([gain0 * grad(None, 10_000 + r) for r in range(3000)])  # (R, 12)
    disp2 = np.sum(np.einsum("jdp,rp->rjd", jac.to_dense(), steps) ** 2, axis=2)  # (R, P)
    stat = np.max(disp2.mean(0) + 2 * disp2.std(0))
    assert math.sqrt(stat) == pytest.approx(delta * 20 / 21, rel=0.06)


def test_original_estimates_match_formulas_and_noise_lowers_the_gain():
    jac = bspline_probe((30, 28, 26), (7, 7, 7), 1000)
    rng = np.random.default_rng(2)
    prob = LeastSquares(jac, 2.0 * rng.standard_normal(jac.n_params), 0.5, 100, rng)
    theta0 = np.zeros(jac.n_params)
    s = ASGDSettings()
    delta = 0.8
    noisy = estimate_parameters(s, jac, theta0, prob.gradient, exact_gradient=prob.exact_gradient, max_step_mm=delta)
    def deterministic(th, seed):
        return prob.exact_gradient(th)

    clean = estimate_parameters(s, jac, theta0, deterministic, max_step_mm=delta)
    ref = jacobian_terms_reference(jac)
    n_expected = max(2, math.ceil(8 * ref.TrCC / ref.TrC**2 / 0.25))
    assert noisy.info["n_gradient_measurements"] == n_expected
    i = noisy.info
    assert i["TrC"] == pytest.approx(ref.TrC) and i["maxJCJ"] == pytest.approx(ref.maxJCJ)
    assert i["perturbation_sigma"] == pytest.approx(delta / math.sqrt(ref.maxJJ))
    assert 0.0 < i["noise_factor"] < 0.9 and i["ee"] > 0
    nf = i["gg"] / (i["gg"] + i["ee"])
    assert noisy.f_min == pytest.approx(-0.99 + 0.98 * nf, rel=1e-9)
    assert noisy.omega == pytest.approx(0.1 * i["ee"] / ref.TrC * math.sqrt(ref.TrCC), rel=1e-9)
    a_expected = 20 * delta / math.sqrt(i["gg"] / ref.TrC) / math.sqrt(ref.maxJCJ) * nf
    assert noisy.a == pytest.approx(a_expected, rel=1e-9)
    assert clean.info["ee"] == 0.0 and clean.f_min == pytest.approx(-0.01)
    assert noisy.a < 0.9 * clean.a


def test_sigmoid_to_default_and_manual_parameters():
    jac = affine_probe(40, np.random.default_rng(1))
    grad = _model_gradient(jac, 1.0)
    s = ASGDSettings(method="original_but_sigmoid_to_default", f_min=-0.5, omega=2e-3)
    p = estimate_parameters(s, jac, np.zeros(12), grad, max_step_mm=1.0)
    assert (p.f_max, p.f_min, p.omega, p.alpha) == (1.0, -0.5, 2e-3, 1.0) and p.a > 0
    m = estimate_parameters(ASGDSettings(automatic=False), jac, np.zeros(12), grad)
    assert m == manual_parameters(ASGDSettings()) and (m.a, m.A, m.alpha) == (400.0, 20.0, 0.602)


def test_zero_gradient_gives_zero_gain():
    jac = affine_probe(30, np.random.default_rng(0))
    p = estimate_parameters(ASGDSettings(), jac, np.zeros(12), lambda th, seed: np.zeros(12), max_step_mm=1.0)
    assert p.a == 0.0
    theta = ASGD(p).step(np.ones(12), np.ones(12))
    np.testing.assert_array_equal(theta, np.ones(12))


def test_displacement_distribution_first_step_and_noise_compensation():
    """Qiao et al.: the first step moves the probe points by delta in the mean + 2 std sense."""
    rng = np.random.default_rng(21)
    jac = bspline_probe((25, 23, 21), (6, 6, 6), 1200)
    g = rng.standard_normal(jac.n_params)
    delta = 1.2
    s = ASGDSettings(method="displacement_distribution", noise_compensation=False)
    p = estimate_parameters(s, jac, np.zeros(jac.n_params), lambda th, seed: g, max_step_mm=delta, rng=rng)
    assert (p.f_max, p.f_min, p.omega, p.alpha, p.A) == (1.0, -0.8, 1e-8, 1.0, 20.0)
    d = np.linalg.norm(np.einsum("jdp,p->jd", jac.to_dense(), p.gain(0.0) * g), axis=1)
    assert d.mean() + 2 * d.std() == pytest.approx(delta, rel=1e-9)
    # noise compensation multiplies a by gg / (gg + ee), measured with N = 2 by default
    prob = LeastSquares(jac, rng.standard_normal(jac.n_params), 0.5, 50, rng)
    theta0 = np.zeros(jac.n_params)
    kw = dict(exact_gradient=prob.exact_gradient, max_step_mm=delta, rng=4)
    on = estimate_parameters(ASGDSettings(method="displacement_distribution"), jac, theta0, prob.gradient, **kw)
    off = estimate_parameters(s, jac, theta0, prob.gradient, **kw)
    nf = on.info["noise_factor"]
    assert on.info["n_gradient_measurements"] == 2 and 0 < nf < 1
    assert nf == pytest.approx(on.info["gg"] / (on.info["gg"] + on.info["ee"]))
    assert on.a == pytest.approx(off.a * nf, rel=1e-9)  # same rng: same gradient for jacg


# ----------------------------------------------------------------------------------------------
# convergence and reproducibility
# ----------------------------------------------------------------------------------------------


def _smooth_coefficients(grid_shape, rng, amplitude_mm=3.0):
    """Blocked-layout B-spline coefficients of a smooth random field (sums of sinusoids)."""
    u = np.indices(grid_shape).reshape(3, -1).T / (np.asarray(grid_shape) - 1)
    theta = np.zeros((3, u.shape[0]))
    for d in range(3):
        for _ in range(3):
            theta[d] += amplitude_mm / 2 * np.sin(2 * np.pi * (u @ rng.uniform(0.3, 1.2, 3)) + rng.uniform(0, 6.3))
    return theta.ravel()


@functools.lru_cache(maxsize=None)  # problems are read-only; build each once
def _bspline_problem(seed=0):
    rng = np.random.default_rng(seed)
    grid = (7, 7, 7)
    jac = bspline_probe((33, 29, 27), grid, 1400)
    return LeastSquares(jac, _smooth_coefficients(grid, rng), noise_mm=0.1, n_batch=100, rng=rng)


@functools.lru_cache(maxsize=None)
def _affine_problem(seed=0):
    rng = np.random.default_rng(seed)
    jac = affine_probe(500, rng)
    theta_true = np.concatenate([4.0 * rng.standard_normal(9), 5.0 * rng.standard_normal(3)])
    return LeastSquares(jac, theta_true, noise_mm=1.0, n_batch=20, rng=rng)


@pytest.mark.parametrize(
    "make, iterations, tol_mm",
    [(_bspline_problem, 300, 0.15), (_affine_problem, 500, 0.15)],
    ids=["bspline", "affine"],
)
def test_asgd_converges_to_least_squares_optimum_and_beats_fixed_small_step(make, iterations, tol_mm):
    prob = make()
    theta0 = np.zeros(prob.jac.n_params)
    start = prob.rms_error_mm(theta0)
    s = ASGDSettings(iterations=iterations)
    p = estimate_parameters(s, prob.jac, theta0, prob.gradient, exact_gradient=prob.exact_gradient,
                            max_step_mm=1.0, rng=0)
    assert 0.0 < p.info["noise_factor"] < 1.0  # subset gradients are noisy
    theta = run(ASGD.from_settings(s, p), prob, theta0, s.iterations, seed=1)
    err = prob.rms_error_mm(theta)
    assert start > 1.5
    assert err < tol_mm and err < 0.08 * start
    # plain SGD with a fixed step of a tenth of ASGD's first step, same gradients
    fixed = ASGDParameters(a=p.gain(0.0) / 10, A=0.0, alpha=1e-12, f_max=1.0, f_min=-0.8, omega=1e-8)
    theta_fixed = run(ASGD(fixed, adaptive=False), prob, theta0, s.iterations, seed=1)
    assert prob.rms_error_mm(theta_fixed) > 1.5 * err


def test_identical_seeds_give_identical_results():
    prob = _bspline_problem(seed=0)
    theta0 = np.zeros(prob.jac.n_params)
    s = ASGDSettings(iterations=30)

    def once(seed):
        p = estimate_parameters(s, prob.jac, theta0, prob.gradient, exact_gradient=prob.exact_gradient,
                                max_step_mm=1.0, rng=seed)
        return p, run(ASGD.from_settings(s, p), prob, theta0, s.iterations, seed=seed)

    (p1, t1), (p2, t2), (p3, t3) = once(5), once(5), once(6)
    assert p1 == p2
    np.testing.assert_array_equal(t1, t2)
    assert p3.a != p1.a and not np.array_equal(t1, t3)


# ----------------------------------------------------------------------------------------------
# defaults and settings
# ----------------------------------------------------------------------------------------------


def test_defaults_match_elastix():
    s = ASGDSettings()
    assert (s.iterations, s.A, s.alpha, s.f_max, s.f_min, s.omega) == (500, 20.0, 0.602, 1.0, -0.8, 1e-8)
    assert (s.automatic, s.method, s.adaptive, s.initial_time) == (True, "original", True, 0.0)
    assert (s.n_gradient_measurements, s.n_samples_exact_gradient, s.sigmoid_scale_factor) == (0, 100000, 0.1)
    assert default_n_jacobian_measurements(300) == 1000
    assert default_n_jacobian_measurements(81000) == 81000
    assert default_n_jacobian_measurements(81000, ASGDSettings(n_jacobian_measurements=5000)) == 5000
    # mean of the x and y spacings of the fixed and moving images
    assert default_max_step_length((0.7, 0.7, 5.0), (1.0, 1.0, 1.0)) == pytest.approx(0.85)
    assert default_max_step_length((2.0, 3.0, 9.0), ratio=0.5) == pytest.approx(1.25)


def test_grid_sample_points_follow_elastix_grid_sampler():
    pts = grid_sample_points((45, 63, 37), 1000)
    step = round((45 * 63 * 37 / 1000) ** (1 / 3))
    assert np.all(np.diff(np.unique(pts[:, 0])) == step)
    assert 0.5 * 1000 < len(pts) < 2 * 1000
    for d, n in enumerate((45, 63, 37)):  # centred: equal margins up to one voxel
        lo, hi = pts[:, d].min(), n - 1 - pts[:, d].max()
        assert abs(lo - hi) <= 1
    mask = np.zeros((45, 63, 37), bool)
    mask[10:20, 5:40, 3:30] = True
    mp = grid_sample_points(mask.shape, 500, mask)
    assert np.all(mask[tuple(mp.T)]) and 250 < len(mp) < 1000
    assert len(grid_sample_points((4, 4, 4), 10**6)) == 64  # spacing never below one voxel


def test_estimation_requires_a_max_step():
    jac = affine_probe(20, np.random.default_rng(0))
    with pytest.raises(ConfigError, match="max_step_mm"):
        estimate_parameters(ASGDSettings(), jac, np.zeros(12), lambda th, s: np.ones(12))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"iterations": 0},
        {"iterations": -5},
        {"iterations": 2.5},
        {"alpha": -0.6},
        {"alpha": 0.0},
        {"A": -1.0},
        {"a": 0.0},
        {"a": float("nan")},
        {"f_max": 0.0},
        {"f_min": 0.2},
        {"omega": 0.0},
        {"initial_time": -1.0},
        {"max_step_mm": 0.0},
        {"max_step_mm": float("inf")},
        {"method": "bogus"},
        {"n_gradient_measurements": -1},
        {"n_jacobian_measurements": 1.5},
        {"n_samples_exact_gradient": 0},
        {"sigmoid_scale_factor": -0.1},
        {"automatic": "yes"},
        {"adaptive": 1},
    ],
)
def test_invalid_settings_raise_one_line_config_error(kwargs):
    with pytest.raises(ConfigError) as info:
        ASGDSettings(**kwargs)
    msg = str(info.value)
    assert "\n" not in msg and next(iter(kwargs)) in msg


def test_invalid_helper_arguments_raise_config_error():
    with pytest.raises(ConfigError):
        default_max_step_length((0.0, 1.0, 1.0))
    with pytest.raises(ConfigError):
        grid_sample_points((5, 5, 5), 0)
    with pytest.raises(ConfigError):
        ASGD(ASGDParameters(a=1.0, A=20.0, alpha=1.0, f_max=1.0, f_min=0.5, omega=1e-8))


def test_step_inplace_matches_step_and_scale_only_shortens_the_step():
    from fastimpact.optimizers import ASGD, ASGDParameters

    rng = np.random.default_rng(5)
    params = ASGDParameters(a=2.0, A=20.0, alpha=1.0, f_max=1.0, f_min=-0.8, omega=0.5)
    a, b = ASGD(params), ASGD(params)
    ta = rng.normal(size=300)
    tb = ta.copy()
    for k in range(30):
        g = rng.normal(size=300)
        ta = a.step(ta, g)
        scale = 0.5 if k % 7 == 3 else 1.0
        before = tb.copy()
        lr = b.step_inplace(tb, g, scale)
        np.testing.assert_allclose(tb, before - scale * lr * g, rtol=1e-12)
        if scale == 1.0:
            np.testing.assert_allclose(b.time, a.time, rtol=1e-12)
        else:  # make the reference follow the same shortened step
            ta = before - scale * lr * g
        np.testing.assert_allclose(tb, ta, rtol=1e-10, atol=1e-12)
