"""CUDA Mattes MI kernel (kernels/mi_cuda.py) against the NumPy reference and the CPU kernel.

On a CPU-only machine this runs in Numba's CUDA simulator (tests/conftest.py); sample counts stay
in the hundreds. The `gpu` tests at the end repeat the comparison with 100k samples on a real GPU.
"""

import numpy as np
import pytest
from numba import cuda

from fastimpact.kernels import cuda_common, mi_cpu, mi_cuda, mi_reference
from fastimpact.metrics import MattesMutualInformation

pytestmark = pytest.mark.cudasim


def samples(n, dtype, seed=15):
    """Related fixed/moving samples; the moving ones partly beyond the histogram range."""
    rng = np.random.default_rng(seed)
    f = 200.0 * rng.random(n) - 50.0
    m = np.cos(f / 20.0) + 0.2 * rng.standard_normal(n)
    return f.astype(dtype), m.astype(dtype)


def kernel_args(f, m, order, bins=(12, 17)):
    metric = MattesMutualInformation(fixed_bins=bins[0], moving_bins=bins[1], fixed_kernel_order=order)
    # ranges from most of the samples, so some moving samples are clamped (zero derivative)
    metric.set_ranges((float(f.min()), float(f.max())), tuple(np.quantile(m, [0.03, 0.96])))
    return metric.kernel_arguments()


@pytest.fixture(params=["shared", "global"])
def histogram_variant(request, monkeypatch):
    """Run with the per-block shared-memory histogram or with global atomics only."""
    if request.param == "global":
        monkeypatch.setattr(mi_cuda, "SHARED_HIST_BYTES", 0)
    return request.param


@pytest.mark.parametrize("order", [0, 1, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mi_cuda_matches_reference(order, dtype, histogram_variant):
    f, m = samples(263, dtype)  # not a multiple of the block size
    kw = kernel_args(f, m, order)
    mi_ref, d_ref = mi_reference.mattes_mi_reference(f, m, **kw)
    mi, d = mi_cuda.mattes_mi(f, m, **kw)
    assert isinstance(mi, float) and mi_ref > 0.1
    assert mi == pytest.approx(mi_ref, rel=1e-10)
    assert isinstance(d, np.ndarray) and d.dtype == np.float64 and d.shape == f.shape
    np.testing.assert_allclose(d, d_ref, rtol=1e-9, atol=1e-12 * np.abs(d_ref).max())
    clamped = d_ref == 0.0
    assert 10 < clamped.sum() < 40 and np.all(d[clamped] == 0.0)
    mi_val, none = mi_cuda.mattes_mi(f, m, derivative=False, **kw)
    assert none is None and mi_val == pytest.approx(mi_ref, rel=1e-10)


def test_mi_cuda_derivative_matches_finite_differences():
    f, m = samples(150, np.float64, seed=3)
    kw = kernel_args(f, m, 3, bins=(10, 10))
    _, d = mi_cuda.mattes_mi(f, m, **kw)
    picks = np.argsort(-np.abs(d))[:4]  # the largest derivatives (inside the clamp interval)
    h = 1e-6
    for n in picks:
        mp, mm = m.copy(), m.copy()
        mp[n] += h
        mm[n] -= h
        fd = (mi_cuda.mattes_mi(f, mp, derivative=False, **kw)[0]
              - mi_cuda.mattes_mi(f, mm, derivative=False, **kw)[0]) / (2 * h)
        assert d[n] == pytest.approx(fd, rel=1e-5)


def test_mi_cuda_matches_cpu_with_non_finite_and_out_of_range_samples():
    """NaN moving samples count as clamped at the low end (as in mi_cpu; the dense reference
    would propagate NaN)."""
    f, m = samples(150, np.float64, seed=4)
    m[[3, 77]] = np.nan
    m[5] = 1e30
    kw = kernel_args(f, m[np.isfinite(m) & (np.abs(m) < 10)], 1, bins=(9, 14))
    mi_c, d_c = mi_cpu.mattes_mi(f, m, **kw)
    mi, d = mi_cuda.mattes_mi(f, m, **kw)
    assert np.isfinite(mi) and mi == pytest.approx(mi_c, rel=1e-10)
    np.testing.assert_allclose(d, d_c, rtol=1e-9, atol=1e-12 * np.abs(d_c).max())
    assert np.all(d[[3, 5, 77]] == 0.0)


def test_mi_cuda_device_arrays_stay_on_the_device():
    f, m = samples(120, np.float32, seed=5)
    kw = kernel_args(f, m, 3)
    mi_h, d_h = mi_cuda.mattes_mi(f, m, **kw)
    mi_d, d_d = mi_cuda.mattes_mi(cuda.to_device(f), cuda.to_device(m), **kw)
    assert isinstance(mi_d, float) and mi_d == pytest.approx(mi_h, rel=1e-12)
    assert cuda_common.is_device(d_d) and not isinstance(d_d, np.ndarray)
    np.testing.assert_allclose(d_d.copy_to_host(), d_h, rtol=1e-12, atol=1e-15)


def test_mi_cuda_rejects_bad_arguments():
    f, m = samples(50, np.float64)
    kw = kernel_args(f, m, 3)
    with pytest.raises(ValueError, match="non-empty 1-D arrays of equal length"):
        mi_cuda.mattes_mi(f, m[:-1], **kw)
    with pytest.raises(ValueError, match="non-empty 1-D arrays of equal length"):
        mi_cuda.mattes_mi(cuda.to_device(f.reshape(5, 10)), cuda.to_device(m.reshape(5, 10)), **kw)
    with pytest.raises(ValueError, match="non-empty 1-D arrays of equal length"):
        mi_cuda.mattes_mi(f[:0], m[:0], **kw)
    with pytest.raises(ValueError, match="clamp intervals leave the histogram"):
        mi_cuda.mattes_mi(f, m, **{**kw, "m_hi": kw["nbins_m"] - 1.5})
    with pytest.raises(ValueError, match="clamp intervals leave the histogram"):
        mi_cuda.mattes_mi(f, m, **{**kw, "f_lo": 0.5})  # the cubic fixed window needs f_lo >= 1


# ----------------------------------------------------------------------------- real GPU, full size
_NO_GPU = cuda_common.simulated() or not cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(_NO_GPU, reason="needs a real CUDA GPU: running under the Numba CUDA simulator "
                                    "(NUMBA_ENABLE_CUDASIM=1) or no CUDA driver")
@pytest.mark.parametrize("bins", [(32, 32), (64, 64), (100, 100)], ids=["32", "64-shared", "100-global"])
@pytest.mark.parametrize("order", [0, 3])
def test_gpu_mi_full_size(bins, order):
    f, m = samples(100_000, np.float32, seed=6)
    kw = kernel_args(f, m, order, bins=bins)
    mi_ref, d_ref = mi_reference.mattes_mi_reference(f, m, **kw)
    mi_c, _ = mi_cpu.mattes_mi(f, m, **kw)
    mi, d = mi_cuda.mattes_mi(cuda.to_device(f), cuda.to_device(m), **kw)
    assert mi == pytest.approx(mi_ref, rel=1e-10) and mi == pytest.approx(mi_c, rel=1e-10)
    np.testing.assert_allclose(d.copy_to_host(), d_ref, rtol=1e-9, atol=1e-12 * np.abs(d_ref).max())
