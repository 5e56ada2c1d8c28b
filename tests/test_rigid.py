"""The rigid stage: Euler-angle parameterisation (gradients against finite differences), the cost
gradient through the whole pipeline, recovery of a known rotation, elastix EulerTransform import."""

import numpy as np
import pytest

from conftest import blob_volume, cost_gradient_check
from fastimpact.image import Image, make_affine
from fastimpact.transforms import AffineTransform
from fastimpact.transforms.linear import AffineParameters, RigidParameters


def _rigid(seed=0):
    rng = np.random.default_rng(seed)
    base = np.eye(3) + 0.05 * rng.normal(size=(3, 3))  # an initial affine that is not a rotation
    aff = AffineTransform(base, rng.normal(size=3), rng.normal(size=3) * 10)
    par = RigidParameters(aff, radius=40.0)
    par.set(np.r_[rng.normal(size=3) * 4.0, rng.normal(size=3)])  # ~6 degrees
    return par, rng


def test_rigid_matrix_is_a_rotation_times_the_start_and_get_set_round_trip():
    par, rng = _rigid()
    rot = par.affine.matrix @ np.linalg.inv(par.base)
    np.testing.assert_allclose(rot @ rot.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(rot) == pytest.approx(1.0)
    theta = par.get()
    par.set(theta)
    np.testing.assert_allclose(par.get(), theta)
    # one angle alone is the rotation about that world axis
    p = RigidParameters(AffineTransform(), radius=1.0)
    p.set(np.r_[0.0, 0.0, np.pi / 2, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(p.affine.matrix @ [1.0, 0, 0], [0, 1.0, 0], atol=1e-12)


@pytest.mark.parametrize("cls", [RigidParameters, AffineParameters])
def test_parameter_derivatives_match_finite_differences(cls):
    par, rng = _rigid()
    if cls is AffineParameters:
        par = AffineParameters(par.affine, 40.0)
    pts = rng.normal(size=(50, 3)) * 30
    g = rng.normal(size=(50, 3))
    theta = par.get()
    eps = 1e-5
    num = np.zeros((50, 3, par.n_params))
    for k in range(par.n_params):
        out = []
        for s in (1, -1):
            t = theta.copy()
            t[k] += s * eps
            par.set(t)
            out.append(par.affine(pts))
        num[:, :, k] = (out[0] - out[1]) / (2 * eps)
    par.set(theta)
    np.testing.assert_allclose(par.jacobian_at(pts), num, atol=1e-6)
    np.testing.assert_allclose(par.gradient_from_points(pts, g), np.einsum("nd,ndk->k", g, num), rtol=1e-6, atol=1e-6)
    v = rng.normal(size=par.n_params)
    np.testing.assert_allclose(par.jacobian_apply(pts, v), num @ v, atol=1e-6)


@pytest.mark.parametrize("metric", ["mse", "mi"])
def test_rigid_cost_gradient_matches_finite_differences(metric):
    from test_cost_gradient import _setup

    cost, flat = _setup(metric, "rigid", "cpu")
    assert cost.n_params == 6
    _, grad, num, scale = cost_gradient_check(cost, flat, "rigid", eps=1e-4)
    np.testing.assert_allclose(grad, num, rtol=2e-3, atol=2e-4 * scale)


def test_rigid_registration_recovers_a_known_rotation_and_translation():
    from fastimpact.engine import register

    shape = (40, 44, 36)
    fixed_aff = make_affine((2.0, 2.0, 2.0), (-40.0, -44.0, -36.0))
    vol = blob_volume(shape=shape, seed=2)
    a = np.deg2rad(5.0)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1.0]])
    t = np.array([3.0, -2.0, 1.5])
    # moving = fixed anatomy seen through T: moving(T(x)) = fixed(x), T(x) = rot x + t
    moving_aff = np.eye(4)
    moving_aff[:3, :3] = rot @ fixed_aff[:3, :3]
    moving_aff[:3, 3] = rot @ fixed_aff[:3, 3] + t
    r = register(Image(vol, fixed_aff), Image(vol, moving_aff), metric="mse", rigid=True, affine=False,
                 iterations=0, rigid_iterations=150, levels=2, samples=1500, init="none", threads=1)
    m = r.transform.affine.as_matrix()
    np.testing.assert_allclose(m[:3, :3] @ m[:3, :3].T, np.eye(3), atol=1e-9)  # rigid stays rigid
    idx = np.argwhere(vol > 0.2 * vol.max())[::20].astype(float)
    x = idx @ fixed_aff[:3, :3].T + fixed_aff[:3, 3]
    err = np.linalg.norm(r.transform.map_world(x) - (x @ rot.T + t), axis=1)
    assert err.mean() < 0.2, err.mean()  # from 4.4 mm
    assert [s["stage"] for s in r.report["stages"]] == ["rigid", "rigid"]


def test_elastix_euler_file_maps_to_the_rigid_stage(tmp_path):
    from fastimpact.elastix_params import config_from_elastix, config_from_elastix_chain

    euler = tmp_path / "rigid.txt"
    euler.write_text('(Transform "EulerTransform")\n(MaximumNumberOfIterations 300)\n(NumberOfResolutions 2)\n')
    bspline = tmp_path / "bspline.txt"
    bspline.write_text('(Transform "BSplineTransform")\n(MaximumNumberOfIterations 400)\n(NumberOfResolutions 2)\n'
                       '(FinalGridSpacingInPhysicalUnits 10)\n')
    fields, warnings = config_from_elastix(euler)
    assert fields["rigid"] is True and fields["affine"] is False and fields["rigid_iterations"] == 300
    assert not any("12 parameters" in w for w in warnings)
    fields, _ = config_from_elastix_chain([euler, bspline])
    assert fields["rigid"] and not fields["affine"] and fields["iterations"] == 400
