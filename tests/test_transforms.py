"""B-spline grid, exact refinement, bending energy, affine and composite transforms."""

import numpy as np
import pytest

from fastimpact.errors import ConfigError
from fastimpact.kernels import get_kernel
from fastimpact.transforms import AffineTransform, BendingEnergy, BSplineGrid, CompositeTransform, refine_coefficients
from fastimpact.transforms.bspline import gram_matrix


def oblique_affine(spacing=(1.2, 0.9, 1.5), origin=(-30.0, 12.0, 5.0), angle=0.3):
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]]) @ np.diag([1.0, -1.0, 1.0])  # rotated, one flipped axis
    a = np.eye(4)
    a[:3, :3] = rot @ np.diag(spacing)
    a[:3, 3] = origin
    return a


def test_grid_shape_and_mapping_cover_the_image():
    shape, aff = (45, 63, 37), oblique_affine()
    grid = BSplineGrid.for_image(shape, aff, 8.0)
    ext = (np.array(shape) - 1) * np.array([1.2, 0.9, 1.5])
    assert grid.shape == tuple(int(np.floor(e / 8.0)) + 4 for e in ext)
    i2g = grid.index_to_grid()
    corners = np.array([[0, 0, 0], np.array(shape) - 1.0])
    t = corners @ i2g[:3, :3].T + i2g[:3, 3]
    np.testing.assert_allclose(t[0], 1.0)
    # support of every voxel (floor(t)-1 .. floor(t)+2) stays inside the grid
    assert np.all(np.floor(t[1]) + 2 <= np.array(grid.shape) - 1)
    np.testing.assert_allclose(i2g[:3, :3], np.diag(np.diag(i2g[:3, :3])), atol=1e-12)


@pytest.mark.parametrize("bad", [0.0, -3.0, float("nan")])
def test_grid_spacing_rejected(bad):
    with pytest.raises(ConfigError, match="grid spacing"):
        BSplineGrid.for_image((20, 20, 20), np.eye(4), bad)


def test_refinement_is_exact_on_the_image_domain():
    rng = np.random.default_rng(1)
    shape, aff = (45, 63, 37), oblique_affine()
    coarse = BSplineGrid.for_image(shape, aff, 16.0)
    fine = BSplineGrid.for_image(shape, aff, 8.0)
    c = rng.normal(size=tuple(coarse.shape) + (3,))
    f = refine_coefficients(c, fine.shape)
    idx = rng.uniform(0, np.array(shape) - 1.0, size=(500, 3))
    idx[:8] = np.array([[0, 0, 0], [44, 62, 36], [0, 62, 0], [44, 0, 36], [22, 0, 36], [0, 31, 0], [44, 62, 0], [0, 0, 36]])
    ev = get_kernel("bspline_eval", "numpy")
    tc = idx @ coarse.index_to_grid()[:3, :3].T + coarse.index_to_grid()[:3, 3]
    tf = idx @ fine.index_to_grid()[:3, :3].T + fine.index_to_grid()[:3, 3]
    np.testing.assert_allclose(ev(f, np.ascontiguousarray(tf)), ev(c, np.ascontiguousarray(tc)), atol=1e-10)


def test_gram_matrix_against_dense_quadrature():
    n, lo, hi = 9, 1.0, 6.3
    t = np.linspace(lo, hi, 200001)
    from fastimpact.transforms.bspline import _bspline3_derivative as b

    for oa in (0, 1, 2):
        g = gram_matrix(n, lo, hi, oa, oa)
        vals = b(t[None, :] - np.arange(n)[:, None], oa)
        ref = np.trapezoid(vals[:, None, :] * vals[None, :, :], t, axis=2)
        np.testing.assert_allclose(g, ref, atol=2e-6)


def _dense_bending(coef, grid, shape, step=0.25):
    """Bending energy by finite differences of the dense field on a fine voxel grid."""
    ev = get_kernel("bspline_eval", "numpy")
    sp = grid.image_spacing
    i2g = grid.index_to_grid()
    axes = [np.arange(0, n - 1 + 1e-9, step) for n in shape]
    pts = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    u = ev(coef, np.ascontiguousarray(pts @ i2g[:3, :3].T + i2g[:3, 3])).reshape(tuple(len(a) for a in axes) + (3,))
    h = step * sp
    total = 0.0
    grads = np.gradient(u, *h, axis=(0, 1, 2))
    for i in range(3):
        second = np.gradient(grads[i], *h, axis=(0, 1, 2))
        for j in range(3):
            total = total + (second[j][2:-2, 2:-2, 2:-2] ** 2).sum(-1).mean()
    return total


def test_bending_energy_value_and_gradient():
    rng = np.random.default_rng(2)
    shape = (21, 25, 19)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    grid = BSplineGrid.for_image(shape, aff, 12.0)
    coef = rng.normal(size=tuple(grid.shape) + (3,))
    be = BendingEnergy(grid, shape)
    val, grad = be.value_and_gradient(coef)
    approx = _dense_bending(coef, grid, shape)
    assert val > 0
    np.testing.assert_allclose(val, approx, rtol=0.08)  # finite differences on a fine grid
    # gradient vs central differences of the exact quadratic form
    for k in rng.choice(coef.size, 6, replace=False):
        e = np.zeros(coef.size)
        e[k] = 1e-4
        vp = be.value_and_gradient(coef + e.reshape(coef.shape))[0]
        vm = be.value_and_gradient(coef - e.reshape(coef.shape))[0]
        np.testing.assert_allclose(grad.ravel()[k], (vp - vm) / 2e-4, rtol=1e-6, atol=1e-10)
    # an affine deformation has zero bending energy
    gw = grid.grid_to_world()
    nodes = np.stack(np.meshgrid(*[np.arange(n) for n in grid.shape], indexing="ij"), -1).reshape(-1, 3).astype(float)
    xw = nodes @ gw[:3, :3].T + gw[:3, 3]
    lin = (xw @ rng.normal(size=(3, 3)).T * 0.01).reshape(coef.shape)
    assert be.value_and_gradient(lin)[0] < 1e-18 * max(1.0, val)


def test_affine_gradient_matches_finite_differences():
    rng = np.random.default_rng(3)
    aff = AffineTransform(np.eye(3) + 0.05 * rng.normal(size=(3, 3)), rng.normal(size=3), rng.normal(size=3) * 10)
    pts = rng.normal(size=(50, 3)) * 40
    g = rng.normal(size=(50, 3))
    radius = 37.0
    theta = aff.get_parameters(radius)
    analytic = aff.gradient_from_points(pts, g, radius)

    def f(th):
        a = AffineTransform(center=aff.center)
        a.set_parameters(th, radius)
        return float((a(pts) * g).sum())

    num = np.array([(f(theta + e) - f(theta - e)) / 2e-6 for e in np.eye(12) * 1e-6])
    np.testing.assert_allclose(analytic, num, rtol=1e-6, atol=1e-6)
    v = rng.normal(size=12)
    np.testing.assert_allclose(aff.jacobian_apply(pts, v, radius).ravel() @ g.ravel(), analytic @ v, rtol=1e-10)


def test_composite_dense_field_matches_pointwise_and_roundtrips():
    rng = np.random.default_rng(4)
    shape, aff = (17, 19, 13), oblique_affine((2.0, 2.5, 3.0))
    grid = BSplineGrid.for_image(shape, aff, 10.0)
    tr = CompositeTransform(AffineTransform(np.eye(3) + 0.02 * rng.normal(size=(3, 3)), rng.normal(size=3), np.zeros(3)),
                            grid, rng.normal(size=tuple(grid.shape) + (3,)))
    field = tr.displacement_field(shape, aff, dtype=np.float64)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3).astype(float)
    x = idx @ aff[:3, :3].T + aff[:3, 3]
    np.testing.assert_allclose(field.reshape(-1, 3), tr.map_world(x) - x, atol=1e-9)
    back = CompositeTransform.from_dict(tr.to_dict())
    np.testing.assert_allclose(back.map_world(x), tr.map_world(x), atol=1e-6)
    # a reference grid not aligned with the control grid goes through the pointwise path
    other = oblique_affine((2.0, 2.0, 2.0), angle=0.7)
    f2 = tr.displacement_field((9, 8, 7), other, dtype=np.float64)
    idx2 = np.stack(np.meshgrid(*[np.arange(n) for n in (9, 8, 7)], indexing="ij"), -1).reshape(-1, 3).astype(float)
    x2 = idx2 @ other[:3, :3].T + other[:3, 3]
    np.testing.assert_allclose(f2.reshape(-1, 3), tr.map_world(x2) - x2, atol=1e-9)
