"""Intensity metrics (MSE, NCC, Mattes MI): derivatives vs finite differences, minima,
invariances, the Numba MI kernel vs its NumPy reference, the registry and option checks."""

import numpy as np
import pytest
from scipy import ndimage

from fastimpact.errors import ConfigError, ImageError, RegistrationError
from fastimpact.kernels import mi_cpu, mi_reference
from fastimpact.metrics import (METRICS, IntensityMetric, MattesMutualInformation, MeanSquares,
                                NormalizedCorrelation, make_metric)


def smooth_volume(seed, shape=(45, 63, 37), sigma=3.0):
    """A smooth random volume scaled to [0, 100]."""
    rng = np.random.default_rng(seed)
    v = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return 100.0 * (v - v.min()) / (v.max() - v.min())


def central_differences(metric, f, m, h, index):
    """(value(m + h e_n) - value(m - h e_n)) / 2h for each n in ``index``."""
    out = np.empty(len(index))
    for j, n in enumerate(index):
        mp = m.copy()
        mp[n] += h
        mm = m.copy()
        mm[n] -= h
        out[j] = (metric.value(f, mp) - metric.value(f, mm)) / (2.0 * h)
    return out


def prepared_mi(f, m, **options):
    """An MI metric whose ranges are set from the samples, widened by 10 % on each side so
    that finite-difference perturbations never reach the clamped ends."""
    options.setdefault("limit_range_ratio", 0.1)
    metric = MattesMutualInformation(**options)
    metric.prepare(f, m)
    return metric


@pytest.fixture(scope="module")
def related_samples():
    """Fixed samples and a noisy non-linear function of them (N = 1500)."""
    rng = np.random.default_rng(7)
    f = 100.0 * rng.random(1500)
    m = 50.0 + 30.0 * np.sin(f / 15.0) + 4.0 * rng.standard_normal(f.size)
    return f, m


# --- derivatives vs central finite differences ------------------------------------------

def _relative_error(analytic, numeric):
    return np.max(np.abs(analytic - numeric)) / np.max(np.abs(analytic))


@pytest.mark.parametrize("metric", [MeanSquares(), NormalizedCorrelation()], ids=["mse", "ncc"])
def test_mse_ncc_derivative_matches_finite_differences(metric, related_samples):
    f, m = related_samples
    _, grad = metric.value_and_derivative(f, m)
    index = np.arange(0, f.size, 7)
    numeric = central_differences(metric, f, m, 1e-4, index)
    assert _relative_error(grad[index], numeric) < 1e-5


@pytest.mark.parametrize("fixed_kernel_order", [0, 1, 3])
@pytest.mark.parametrize("implementation", ["numba", "numpy"])
def test_mi_derivative_matches_finite_differences(related_samples, fixed_kernel_order,
                                                  implementation):
    f, m = related_samples
    metric = prepared_mi(f, m, bins=24, fixed_kernel_order=fixed_kernel_order,
                         implementation=implementation)
    _, grad = metric.value_and_derivative(f, m)
    # step: 1e-4 of a moving bin; the cubic window is C2, so crossing a knot inside
    # [-h, h] costs O(h^2) only, and no sample is near the clamped range ends
    bin_width = 1.0 / metric.kernel_arguments()["m_scale"]
    index = np.arange(0, f.size, 1 if implementation == "numba" else 25)
    numeric = central_differences(metric, f, m, 1e-4 * bin_width, index)
    assert np.all(grad != 0.0)
    assert _relative_error(grad[index], numeric) < 1e-5


def test_mi_derivative_is_zero_for_clamped_samples(related_samples):
    f, m = related_samples
    metric = MattesMutualInformation(limit_range_ratio=0.0)
    metric.prepare(f, m[10:])  # samples 0..9 may lie outside the moving range
    m = m.copy()
    m[:3] = [m.max() + 50.0, m.min() - 50.0, np.inf]
    value, grad = metric.value_and_derivative(f, m)
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    assert np.all(grad[:3] == 0.0)
    assert np.all(grad[3:] != 0.0)


# --- minimum at alignment -----------------------------------------------------------------

@pytest.mark.parametrize("name", ["mse", "ncc", "mi"])
def test_identical_images_give_the_lowest_value_among_shifts(name):
    fixed = smooth_volume(1)
    rng = np.random.default_rng(2)
    idx = tuple(rng.integers(0, s, 2000) for s in fixed.shape)
    metric = make_metric(name)
    metric.prepare(fixed, fixed)
    values = {}
    for shift in [(0, 0, 0), (1, 0, 0), (0, -1, 0), (0, 0, 2), (2, 1, -1), (-3, 0, 1)]:
        moving = np.roll(fixed, shift, axis=(0, 1, 2))
        values[shift] = metric.value(fixed[idx], moving[idx])
    best = min(values, key=values.get)
    assert best == (0, 0, 0), values
    others = [v for k, v in values.items() if k != (0, 0, 0)]
    assert values[(0, 0, 0)] < min(others)


def test_mse_and_ncc_at_identity():
    f = smooth_volume(3).ravel()[::50]
    value, grad = MeanSquares().value_and_derivative(f, f)
    assert value == 0.0 and np.all(grad == 0.0)
    value, grad = NormalizedCorrelation().value_and_derivative(f, f)
    assert value == pytest.approx(-1.0, abs=1e-12)
    assert np.max(np.abs(grad)) < 1e-12


# --- NCC --------------------------------------------------------------------------------

@pytest.mark.parametrize("a, b", [(1.0, 0.0), (2.5, -40.0), (0.01, 1e3)])
def test_ncc_is_minus_one_for_affine_intensity_maps(a, b):
    f = smooth_volume(4).ravel()[::37]
    value = NormalizedCorrelation().value(f, a * f + b)
    assert value == pytest.approx(-1.0, abs=1e-12)
    assert NormalizedCorrelation().value(f, -a * f + b) == pytest.approx(1.0, abs=1e-12)


def test_ncc_is_invariant_to_affine_maps_of_unrelated_images():
    f = smooth_volume(5).ravel()[::41]
    m = smooth_volume(6).ravel()[::41] + 0.3 * f
    ncc = NormalizedCorrelation()
    base = ncc.value(f, m)
    assert -1.0 < base < 0.0
    assert ncc.value(f, 3.0 * m + 7.0) == pytest.approx(base, abs=1e-12)
    assert ncc.value(0.5 * f - 2.0, m) == pytest.approx(base, abs=1e-12)


@pytest.mark.parametrize("constant", ["fixed", "moving", "both"])
def test_ncc_zero_variance_gives_zero_value_and_gradient(constant):
    rng = np.random.default_rng(8)
    f = rng.random(300)
    m = rng.random(300)
    if constant in ("fixed", "both"):
        f = np.full(300, 0.1)
    if constant in ("moving", "both"):
        m = np.full(300, 123.456)
    value, grad = NormalizedCorrelation().value_and_derivative(f, m)
    assert value == 0.0
    assert np.all(grad == 0.0)


# --- MI behaviour -------------------------------------------------------------------------

def test_mi_prefers_a_non_monotonic_remap_to_an_unrelated_image():
    fixed = smooth_volume(9)
    remapped = (fixed - np.median(fixed)) ** 2  # non-monotonic: NCC hardly sees it
    unrelated = smooth_volume(10)
    idx = np.random.default_rng(11).integers(0, fixed.size, 3000)
    f = fixed.ravel()[idx]
    metric = MattesMutualInformation()
    metric.prepare(fixed, remapped)
    v_remap = metric.value(f, remapped.ravel()[idx])
    metric.prepare(fixed, unrelated)
    v_unrelated = metric.value(f, unrelated.ravel()[idx])
    assert v_remap < v_unrelated - 0.5  # nats
    assert abs(NormalizedCorrelation().value(f, remapped.ravel()[idx])) < 0.2


@pytest.mark.parametrize("a, b", [(3.0, 10.0), (0.02, -5.0), (-1.5, 0.0)])
def test_mi_is_invariant_to_affine_maps_of_the_moving_image(related_samples, a, b):
    # the range follows the image, so eta (mirrored when a < 0) and, with the symmetric
    # cubic window, the histogram up to a mirror are unchanged; d/dm scales by 1/a
    f, m = related_samples
    metric = MattesMutualInformation(fixed_kernel_order=3)
    metric.prepare(f, m)
    value, grad = metric.value_and_derivative(f, m)
    metric.prepare(f, a * m + b)
    value_ab, grad_ab = metric.value_and_derivative(f, a * m + b)
    assert value < -0.3
    assert value_ab == pytest.approx(value, rel=1e-9)
    np.testing.assert_allclose(grad_ab * a, grad, rtol=1e-6, atol=1e-9 * np.abs(grad).max())


def test_mi_is_nonpositive_and_lowest_for_identical_samples():
    f = smooth_volume(12).ravel()[::29]
    metric = prepared_mi(f, f)
    rng = np.random.default_rng(13)
    shuffled = [metric.value(f, rng.permutation(f)) for _ in range(3)]
    identical = metric.value(f, f)
    assert all(-0.1 < v <= 0.0 for v in shuffled)  # independent: MI ~ 0 (small bias)
    assert identical < -1.0


@pytest.mark.parametrize("name", ["mse", "ncc", "mi"])
def test_value_and_derivative_do_not_depend_on_sample_order(name, related_samples):
    f, m = related_samples
    metric = make_metric(name)
    metric.prepare(f, m)
    value, grad = metric.value_and_derivative(f, m)
    perm = np.random.default_rng(14).permutation(f.size)
    value_p, grad_p = metric.value_and_derivative(f[perm], m[perm])
    assert value_p == pytest.approx(value, rel=1e-12, abs=1e-14)
    np.testing.assert_allclose(grad_p, grad[perm], rtol=1e-10, atol=1e-14 * np.abs(grad).max())
    assert metric.value(f, m) == pytest.approx(value, rel=1e-12, abs=1e-14)


@pytest.mark.parametrize("name", ["mse", "ncc", "mi"])
def test_float32_inputs_give_float64_results(name, related_samples):
    f, m = related_samples
    f32, m32 = f.astype(np.float32), m.astype(np.float32)
    metric = make_metric(name)
    metric.prepare(f32, m32)
    value, grad = metric.value_and_derivative(f32, m32)
    assert isinstance(value, float) and grad.dtype == np.float64
    value64, grad64 = metric.value_and_derivative(f32.astype(np.float64), m32.astype(np.float64))
    assert value == pytest.approx(value64, rel=1e-12)
    np.testing.assert_allclose(grad, grad64, rtol=1e-10, atol=1e-14 * np.abs(grad64).max())


# --- MI kernel: Numba vs NumPy reference ----------------------------------------------------

@pytest.mark.parametrize("fixed_kernel_order", [0, 1, 3])
@pytest.mark.parametrize("dtype, parallel", [(np.float32, False), (np.float64, False),
                                             (np.float64, True)])  # parallel: 1 compile
def test_mi_numba_matches_reference(dtype, fixed_kernel_order, parallel):
    rng = np.random.default_rng(15)
    n = 45 * 63 + 37  # odd size: uneven chunks in the parallel kernel
    f = (200.0 * rng.random(n) - 50.0).astype(dtype)
    m = (np.cos(f / 20.0) + 0.2 * rng.standard_normal(n)).astype(dtype)
    metric = MattesMutualInformation(fixed_bins=27, moving_bins=33,
                                     fixed_kernel_order=fixed_kernel_order)
    metric.prepare(f, m[: n // 2])  # some moving samples fall beyond the range: clamped
    kwargs = metric.kernel_arguments()
    mi_ref, d_ref = mi_reference.mattes_mi_reference(f, m, **kwargs)
    mi_nb, d_nb = mi_cpu.mattes_mi(f, m, parallel=parallel, **kwargs)
    assert mi_ref > 0.1
    assert mi_nb == pytest.approx(mi_ref, rel=1e-12)
    assert d_nb.dtype == np.float64 and d_nb.shape == (n,)
    np.testing.assert_allclose(d_nb, d_ref, rtol=1e-9, atol=1e-12 * np.abs(d_ref).max())
    mi_val, none = mi_cpu.mattes_mi(f, m, derivative=False, parallel=parallel, **kwargs)
    assert none is None and mi_val == pytest.approx(mi_ref, rel=1e-12)


def test_mi_reference_histogram_is_a_partition_of_unity(related_samples):
    f, m = related_samples
    metric = prepared_mi(f, m, fixed_kernel_order=3)
    h = mi_reference.joint_histogram_reference(f, m, **metric.kernel_arguments())
    assert h.shape == (32, 32)
    assert h.sum() == pytest.approx(f.size, rel=1e-12)
    assert np.all(h >= 0.0)
    # fixed marginal counts with the cubic window = sum of the fixed weights only
    kw = metric.kernel_arguments()
    xi = np.clip(f * kw["f_scale"] + kw["f_offset"], kw["f_lo"], kw["f_hi"])
    wf = mi_reference.parzen_weight_matrix(xi, 32, 3)
    np.testing.assert_allclose(h.sum(axis=1), wf.sum(axis=0), rtol=1e-12, atol=1e-12)


def test_mi_prepare_uses_the_fixed_mask():
    fixed = smooth_volume(16, shape=(20, 21, 22))
    mask = np.zeros(fixed.shape, dtype=bool)
    mask[5:15, 5:15, 5:15] = True
    fixed_out = fixed.copy()
    fixed_out[~mask] = 1e6  # outside the mask: must not stretch the fixed range
    a, b = MattesMutualInformation(), MattesMutualInformation()
    a.prepare(fixed, fixed, fixed_mask=mask)
    b.prepare(fixed_out, fixed, fixed_mask=mask)
    assert a.kernel_arguments() == b.kernel_arguments()


# --- registry and options -------------------------------------------------------------------

def test_registry_contents():
    assert set(METRICS) == {"mse", "ncc", "mi"}
    for name, cls in METRICS.items():
        metric = make_metric(name)
        assert isinstance(metric, cls) and metric.name == name
        assert isinstance(metric, IntensityMetric)
    assert make_metric("mi", bins=16).moving_bins == 16


def test_unknown_metric_name_lists_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        make_metric("mutual_info")
    message = str(err.value)
    assert "'mutual_info'" in message
    for name in ("mse", "ncc", "mi"):
        assert name in message


@pytest.mark.parametrize("name, options, fragment", [
    ("mi", {"bins": 3}, "bins = 3"),
    ("mi", {"bins": 0}, "bins = 0"),
    ("mi", {"bins": 5000}, "bins = 5000"),
    ("mi", {"bins": 32.0}, "integer"),
    ("mi", {"bins": True}, "integer"),
    ("mi", {"bins": "32"}, "integer"),
    ("mi", {"fixed_bins": 2}, "fixed_bins = 2"),
    ("mi", {"moving_bins": -1}, "moving_bins = -1"),
    ("mi", {"fixed_kernel_order": 2}, "fixed_kernel_order"),
    ("mi", {"fixed_kernel_order": True}, "fixed_kernel_order"),
    ("mi", {"limit_range_ratio": -0.1}, "limit_range_ratio"),
    ("mi", {"limit_range_ratio": float("nan")}, "limit_range_ratio"),
    ("mi", {"implementation": "opencl"}, "implementation"),
    ("mi", {"nbins": 32}, "'nbins'"),
    ("mse", {"bins": 32}, "takes no options"),
    ("ncc", {"subtract_mean": True}, "'subtract_mean'"),
])
def test_invalid_options_are_rejected(name, options, fragment):
    with pytest.raises(ConfigError) as err:
        make_metric(name, **options)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_mi_prepare_rejects_unusable_images():
    metric = MattesMutualInformation()
    good = smooth_volume(17, shape=(8, 9, 10))
    with pytest.raises(ImageError, match="constant"):
        metric.prepare(np.full((8, 9, 10), 3.0), good)
    with pytest.raises(ImageError, match="constant"):
        metric.prepare(good, np.zeros((8, 9, 10)))
    with pytest.raises(ImageError, match="mask is empty"):
        metric.prepare(good, good, fixed_mask=np.zeros(good.shape, bool))
    bad = good.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ImageError, match="NaN"):
        metric.prepare(bad, good)


def test_mi_must_be_prepared_and_samples_validated():
    metric = MattesMutualInformation()
    with pytest.raises(RuntimeError, match="prepare"):
        metric.value(np.ones(10), np.ones(10))
    with pytest.raises(RegistrationError, match="0 samples"):
        MeanSquares().value_and_derivative(np.ones(0), np.ones(0))
    with pytest.raises(ValueError, match="equal length"):
        NormalizedCorrelation().value(np.ones(10), np.ones(11))


# --- MI kernel: the result does not depend on the thread count -------------------------------

def test_mi_chunk_layout_depends_only_on_samples_and_bins():
    assert mi_cpu.chunk_layout(10, 32, 32) == (mi_cpu.CHUNK_SAMPLES, 1)
    chunk, nchunks = mi_cpu.chunk_layout(3 * mi_cpu.CHUNK_SAMPLES + 1, 32, 32)
    assert (chunk, nchunks) == (mi_cpu.CHUNK_SAMPLES, 4)
    chunk, nchunks = mi_cpu.chunk_layout(10**7, 32, 32)  # chunk grows, count stays bounded
    assert nchunks <= mi_cpu.MAX_CHUNKS and chunk * nchunks >= 10**7
    chunk, nchunks = mi_cpu.chunk_layout(10**6, 256, 256)  # per-chunk histograms <= 8 MiB
    assert nchunks * 256 * 256 * 8 <= mi_cpu.MAX_CHUNK_BYTES


def test_mi_is_bit_identical_for_any_thread_count_and_variant():
    import numba

    rng = np.random.default_rng(21)
    n = 3 * mi_cpu.CHUNK_SAMPLES + 123  # 4 chunks, the last one short
    f = 200.0 * rng.random(n) - 50.0
    m = np.cos(f / 20.0) + 0.2 * rng.standard_normal(n)
    metric = MattesMutualInformation(fixed_bins=27, moving_bins=33)
    metric.prepare(f, m)
    kwargs = metric.kernel_arguments()
    before = numba.get_num_threads()
    results = []
    try:
        for threads in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
            numba.set_num_threads(threads)
            for parallel in (False, True):
                results.append(mi_cpu.mattes_mi(f, m, parallel=parallel, **kwargs))
    finally:
        numba.set_num_threads(before)
    mi0, d0 = results[0]
    for mi, d in results[1:]:
        assert mi == mi0  # bit-identical, not merely close
        assert np.array_equal(d, d0)
    mi_ref, d_ref = mi_reference.mattes_mi_reference(f, m, **kwargs)
    assert mi_ref > 0.1 and mi0 == pytest.approx(mi_ref, rel=1e-12)
    np.testing.assert_allclose(d0, d_ref, rtol=1e-9, atol=1e-12 * np.abs(d_ref).max())
