"""Kernels of the device-resident ASGD loop against NumPy (simulator without a GPU)."""

import numpy as np
import pytest

pytestmark = pytest.mark.cudasim

from numba import cuda  # noqa: E402

from fastimpact.kernels import cuda_loop as kl  # noqa: E402
from fastimpact.optimizers import ASGD  # noqa: E402
from fastimpact.optimizers.asgd import ASGDParameters  # noqa: E402


@pytest.fixture(params=[37, 300])  # one partial block; two blocks (the second partial)
def pairs(request):
    rng = np.random.default_rng(request.param)
    n = request.param
    f = rng.normal(5.0, 2.0, n)
    m = 0.5 * f + rng.normal(1.0, 0.3, n)
    return f, m


def test_moments(pairs):
    f, m = pairs
    got = kl.moments(cuda.to_device(f), cuda.to_device(m)).copy_to_host()
    fc, mc = f - f.mean(), m - m.mean()
    want = [f.sum(), m.sum(), fc @ fc, mc @ mc, fc @ mc, ((m - f) ** 2).sum(), np.abs(f).max(), np.abs(m).max()]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # the output vector is reused and zeroed
    out = kl.moments(cuda.to_device(f), cuda.to_device(m))
    again = kl.moments(cuda.to_device(f), cuda.to_device(m), out).copy_to_host()
    np.testing.assert_allclose(again, want, rtol=1e-12)


def test_scale_gradient(pairs):
    f, m = pairs
    rng = np.random.default_rng(1)
    gy = rng.normal(size=(len(f), 3))
    dmi = rng.normal(size=len(f))
    d = cuda.to_device(gy)
    kl.scale_gradient(d, cuda.to_device(f), cuda.to_device(m), 0.3, -0.7, 0.11, cuda.to_device(dmi), 2.5)
    np.testing.assert_allclose(d.copy_to_host(), gy * (0.3 * m - 0.7 * f + 0.11 + 2.5 * dmi)[:, None], rtol=1e-13)
    d = cuda.to_device(gy)
    kl.scale_gradient(d, cuda.to_device(f), cuda.to_device(m), 1.0, 0.0, 0.0)
    np.testing.assert_allclose(d.copy_to_host(), gy * m[:, None], rtol=1e-13)


def test_affine_sums(pairs):
    f, _ = pairs
    rng = np.random.default_rng(2)
    gy, idx = rng.normal(size=(len(f), 3)), rng.uniform(0, 30, size=(len(f), 3))
    got = kl.affine_sums(cuda.to_device(gy), cuda.to_device(idx))
    np.testing.assert_allclose(got, np.r_[(gy.T @ idx).ravel(), gy.sum(axis=0)], rtol=1e-12)


def test_absmax3_and_take():
    rng = np.random.default_rng(3)
    v = rng.normal(size=3 * 301)
    got = kl.absmax3(cuda.to_device(v))
    np.testing.assert_allclose(got, np.abs(v.reshape(-1, 3)).max(axis=0))
    src = np.arange(100, 160, dtype=np.int64)
    picks = rng.integers(0, 60, 25)
    np.testing.assert_array_equal(kl.take(cuda.to_device(src), cuda.to_device(picks)).copy_to_host(), src[picks])


def test_asgd_update_matches_the_host_optimiser():
    """Three steps of the fused device update + ASGD.advance equal ASGD.step_inplace."""
    rng = np.random.default_rng(4)
    params = ASGDParameters(a=2.0, A=20.0, alpha=1.0, f_max=1.0, f_min=-0.8, omega=0.1)
    host, dev = ASGD(params), ASGD(params)
    theta = rng.normal(size=300)
    t_dev = cuda.to_device(theta.copy())
    prev = cuda.device_array(300)
    for k in range(3):
        g = rng.normal(size=300) + (0.5 if k == 1 else -0.2)
        host.step_inplace(theta, g.copy(), 0.7)
        lr = dev.rate()
        inner = kl.asgd_update(t_dev, cuda.to_device(g), prev, lr * 0.7, k > 0)
        dev.advance(None if k == 0 else inner)
        assert dev.time == pytest.approx(host.time, rel=1e-12)
    np.testing.assert_allclose(t_dev.copy_to_host(), theta, rtol=1e-13)
    assert host.time > 0.0  # the adaptive time moved
