"""Counter-based random sampling: the NumPy reference, the Numba CPU kernel and the CUDA kernel
(simulated without a GPU) draw identical indices; the draws are uniform; the sampler built on them
is reproducible and respects the mask."""

import numpy as np
import pytest

from fastimpact.errors import ConfigError, RegistrationError
from fastimpact.kernels import cpu, reference as ref
from fastimpact.samplers import RandomSampler

CASES = [(123, 0, 500, 7), (2**63 + 5, 77, 2000, 10**6), (1, 2**31, 100, 2**32 - 1), (0, 0, 1, 1)]


@pytest.mark.parametrize("key, counter, n, n_total", CASES)
def test_cpu_kernel_equals_reference(key, counter, n, n_total):
    a = ref.random_indices(key, counter, n, n_total)
    b = cpu.random_indices(key, counter, n, n_total)
    assert a.dtype == b.dtype == np.int64
    np.testing.assert_array_equal(a, b)
    assert a.min() >= 0 and a.max() < n_total
    # large draws take the parallel kernel: the same numbers
    big = 40000
    np.testing.assert_array_equal(ref.random_indices(key, counter, big, n_total),
                                  cpu.random_indices(key, counter, big, n_total))


@pytest.mark.cudasim
@pytest.mark.parametrize("key, counter, n, n_total", CASES)
def test_cuda_kernel_equals_reference(key, counter, n, n_total):
    from fastimpact.kernels import cuda_sampling

    n = min(n, 200)  # the simulator runs one Python thread per CUDA thread
    np.testing.assert_array_equal(cuda_sampling.random_indices(key, counter, n, n_total),
                                  ref.random_indices(key, counter, n, n_total))
    dev = cuda_sampling.random_indices(key, counter, n, n_total, to_host=False)
    assert not isinstance(dev, np.ndarray)  # stays on the device
    np.testing.assert_array_equal(dev.copy_to_host(), ref.random_indices(key, counter, n, n_total))


def test_draws_are_uniform_and_independent_of_the_counter():
    n_total, n = 16, 160000
    a = ref.random_indices(7, 0, n, n_total)
    counts = np.bincount(a, minlength=n_total)
    chi2 = ((counts - n / n_total) ** 2 / (n / n_total)).sum()
    assert chi2 < 40.0  # 15 degrees of freedom: P(chi2 > 40) ~ 5e-4
    # successive calls (and other keys) give other, uncorrelated draws
    b = ref.random_indices(7, 1, n, n_total)
    c = ref.random_indices(8, 0, n, n_total)
    for other in (b, c):
        assert np.mean(a == other) == pytest.approx(1 / n_total, abs=0.005)
        assert abs(np.corrcoef(a, other)[0, 1]) < 0.02
    # consecutive draws within a call are uncorrelated too
    assert abs(np.corrcoef(a[:-1], a[1:])[0, 1]) < 0.02


def test_bad_arguments_are_reported():
    with pytest.raises(ConfigError, match="2\\^32"):
        ref.random_indices(0, 0, 10, 2**32)
    with pytest.raises(ConfigError, match="candidates"):
        cpu.random_indices(0, 0, 10, 0)
    with pytest.raises(ConfigError, match=">= 0"):
        ref.random_indices(0, 0, -1, 5)


def test_sampler_is_reproducible_and_respects_the_mask():
    shape = (9, 10, 11)
    mask = np.zeros(shape, bool)
    mask[2:5, 3:8, 1:4] = True
    s1 = RandomSampler(shape, mask, 300, seed=4, stream=(1, 2))
    s2 = RandomSampler(shape, mask, 300, seed=4, stream=(1, 2))
    first = s1.draw_flat()
    np.testing.assert_array_equal(first, s2.draw_flat())
    assert np.all(np.diff(first) >= 0) and mask.ravel()[first].all()
    second = s1.draw_flat()
    assert not np.array_equal(first, second)  # the counter moved on
    # the draws are the documented function of (key, counter)
    expect = np.sort(np.flatnonzero(mask.ravel())[ref.random_indices(s1.key, 1, 300, int(mask.sum()))])
    np.testing.assert_array_equal(second, expect)
    other = RandomSampler(shape, mask, 300, seed=5, stream=(1, 2)).draw_flat()
    assert not np.array_equal(first, other)
    flat, idx = RandomSampler(shape, None, 50, seed=0).draw()
    np.testing.assert_array_equal(np.ravel_multi_index(idx.astype(int).T, shape), flat)
    with pytest.raises(RegistrationError, match="no voxels"):
        RandomSampler(shape, np.zeros(shape, bool), 10, seed=0)
