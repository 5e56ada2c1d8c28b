"""IMPACT feature distances and feature normalisation: exact gradients (central finite
differences, every distance x every normalisation, also across sample blocks), minima,
invariances, guards at degenerate inputs, the registry and its error messages."""

import numpy as np
import pytest

from fastimpact.errors import ConfigError
from fastimpact.features import distances as D
from fastimpact.features.distances import (DISTANCES, FEATURE_NORMS, PER_SAMPLE_DISTANCES, distance,
                                           layer_value_and_grad, normalize, normalize_backward)
from fastimpact.features.settings import DISTANCE_NAMES
from fastimpact.features.settings import FEATURE_NORMS as SETTINGS_NORMS

COMBOS = [(d, n) for d in DISTANCES for n in FEATURE_NORMS if not (d == "dice" and n == "standardized")]


def features(seed, k=7, c=5, offset=0.5):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((k, c)) + offset, rng.standard_normal((k, c)) + offset


def numeric_gradient(fun, m, h=1e-6):
    g = np.empty_like(m)
    for i in np.ndindex(m.shape):
        mp = m.copy()
        mp[i] += h
        mm = m.copy()
        mm[i] -= h
        g[i] = (fun(mp) - fun(mm)) / (2.0 * h)
    return g


def check_gradient(f, m, name, norm, rtol=1e-6):
    value, grad = layer_value_and_grad(f, m, name, norm)
    assert grad.shape == m.shape and grad.dtype == np.float64
    num = numeric_gradient(lambda x: layer_value_and_grad(f, x, name, norm, with_grad=False)[0], m)
    err = np.max(np.abs(grad - num)) / np.max(np.abs(num))
    assert err < rtol, f"{name}/{norm}: relative gradient error {err:.2e}"
    assert layer_value_and_grad(f, m, name, norm, with_grad=False) == (value, None)
    return value, grad


# --- exact gradients ---------------------------------------------------------------------

@pytest.mark.parametrize("name,norm", COMBOS)
def test_gradient_matches_finite_differences(name, norm):
    f, m = features(1)
    check_gradient(f, m, name, norm)


@pytest.mark.parametrize("name,norm", COMBOS)
def test_gradient_exact_across_sample_blocks(name, norm, monkeypatch):
    # blocks of 2 rows: the block-wise accumulation (NCC's merged statistics included) must
    # give the same value and an exact gradient
    f, m = features(2, k=9, c=4)
    whole = layer_value_and_grad(f, m, name, norm)
    monkeypatch.setattr(D, "BLOCK_ELEMENTS", 8)
    value, grad = check_gradient(f, m, name, norm)
    assert value == pytest.approx(whole[0], rel=1e-12, abs=1e-14)
    np.testing.assert_allclose(grad, whole[1], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name", list(DISTANCES))
def test_gradient_with_nonnegative_features(name):
    # ReLU-like features (Dice is meant for these); well away from the L1 kinks at f == m
    rng = np.random.default_rng(3)
    f = rng.random((6, 8)) * 2.0
    m = rng.random((6, 8)) * 2.0
    check_gradient(f, m, name, "none")


@pytest.mark.parametrize("name", ["cosine", "l1cosine", "dice", "ncc"])
def test_gradient_near_degenerate_inputs(name):
    # a near-zero moving vector, a near-zero Dice denominator, a near-constant channel: the
    # guarded value stays finite and its gradient is still its exact derivative
    f, m = features(4, k=6, c=4)
    m[0] = 1e-4 * np.array([1.0, -2.0, 0.5, 0.3])
    m[1] = -f[1] + 1e-4 * np.array([0.2, -0.1, 0.3, 0.1])  # U = sum(f + m) ~ 5e-5
    m[:, 2] = 0.7 + 1e-4 * np.arange(6)
    value, grad = layer_value_and_grad(f, m, name, "none")
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    num = numeric_gradient(lambda x: layer_value_and_grad(f, x, name, "none", with_grad=False)[0], m, h=1e-8)
    np.testing.assert_allclose(grad, num, rtol=1e-4, atol=1e-6 * np.max(np.abs(num)))


@pytest.mark.parametrize("u", [0.0, 3e-7, -2e-6, 1e-5])
def test_dice_gradient_where_the_guard_acts(u):
    # U = sum(f + m) of the order of DICE_EPS: the regularised 1/U is what is differentiated
    f = np.array([[0.5, -0.2, 0.3, 0.1]])
    m = np.array([[-0.4, 0.6, -0.2, 0.0]])
    m[0, 3] = u - (f.sum() + m[0, :3].sum())
    value, grad = distance("dice", f, m)
    assert np.isfinite(value) and abs(value) <= np.abs(f * m).sum() / D.DICE_EPS
    num = numeric_gradient(lambda x: distance("dice", f, x, with_grad=False)[0], m, h=1e-10)
    np.testing.assert_allclose(grad, num, rtol=1e-5)


@pytest.mark.parametrize("norm", ["l2", "standardized"])
def test_normalize_backward_is_exact_vjp(norm):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 6)) + 0.3
    dy = rng.standard_normal((4, 6))
    _, state = normalize(x, norm)
    dx = normalize_backward(dy, state)
    num = numeric_gradient(lambda z: float(np.sum(normalize(z, norm)[0] * dy)), x)
    np.testing.assert_allclose(dx, num, rtol=1e-7, atol=1e-9)


# --- values, minima and invariances --------------------------------------------------------

def test_values_match_the_definitions():
    f, m = features(6, k=6, c=5)
    c = f.shape[1]
    cos = np.sum(f * m, 1) / (np.linalg.norm(f, axis=1) * np.linalg.norm(m, axis=1))
    expected = {
        "l1": np.mean(np.abs(f - m)),
        "l2": np.mean((f - m) ** 2),
        "dotproduct": -np.mean(np.sum(f * m, 1)),
        "cosine": -np.mean(cos),
        "l1cosine": -np.mean(cos * np.mean(np.exp(-0.1 * np.abs(f - m)), 1)),
        "dice": -np.mean(2 * np.sum(f * m, 1) / np.sum(f + m, 1)),
        "ncc": -np.mean([np.corrcoef(f[:, j], m[:, j])[0, 1] for j in range(c)]),
    }
    for name, want in expected.items():
        assert distance(name, f, m, with_grad=False)[0] == pytest.approx(want, rel=1e-9), name
        # float32 inputs are accepted and computed in float64
        v32, g32 = distance(name, f.astype(np.float32), m.astype(np.float32))
        assert g32.dtype == np.float64
        assert v32 == pytest.approx(want, rel=1e-5), name


@pytest.mark.parametrize("norm", FEATURE_NORMS)
@pytest.mark.parametrize("name", ["l1", "l2"])
def test_l1_l2_zero_and_minimal_at_identity(name, norm):
    f, m = features(7)
    value, grad = layer_value_and_grad(f, f.copy(), name, norm)
    assert value == 0.0
    assert np.all(grad == 0.0)  # sign(0) = 0 for L1
    assert layer_value_and_grad(f, m, name, norm)[0] > 0.0
    rng = np.random.default_rng(0)
    for _ in range(5):
        assert layer_value_and_grad(f, f + 1e-3 * rng.standard_normal(f.shape), name, norm)[0] > 0.0


def test_ncc_is_minus_one_for_positive_affine_channels():
    f, _ = features(8, k=40, c=6)
    rng = np.random.default_rng(1)
    a = rng.uniform(0.2, 5.0, size=6)
    b = rng.uniform(-3.0, 3.0, size=6)
    value, grad = distance("ncc", f, a * f + b)
    assert value == pytest.approx(-1.0, abs=1e-10)
    np.testing.assert_allclose(grad, 0.0, atol=1e-10)  # a minimum
    a[2] = -a[2]  # one anti-correlated channel: its correlation is -1
    assert distance("ncc", f, a * f + b, with_grad=False)[0] == pytest.approx(-1.0 + 2.0 / 6, abs=1e-10)


def test_ncc_blocks_merge_exactly():
    rng = np.random.default_rng(9)
    # large means: Sff - Sf^2 / K from raw sums would lose ~10 digits here
    f = 1e5 + rng.standard_normal((3000, 40))
    m = 0.5 * f + rng.standard_normal((3000, 40))
    want = -np.mean([np.corrcoef(f[:, j], m[:, j])[0, 1] for j in range(40)])
    # the variance floor K * 1e-10 shifts the value by ~1e-10 relative
    assert distance("ncc", f, m, with_grad=False)[0] == pytest.approx(want, rel=1e-9)


def test_cosine_minus_one_and_scale_invariant():
    f, m = features(10)
    value, grad = distance("cosine", f, 2.0 * f)
    assert value == pytest.approx(-1.0, abs=1e-12)
    np.testing.assert_allclose(grad, 0.0, atol=1e-12)
    scales = np.random.default_rng(2).uniform(0.1, 10.0, size=(f.shape[0], 1))
    v1, g1 = distance("cosine", f, m)
    v2, g2 = distance("cosine", f, scales * m)
    assert v2 == pytest.approx(v1, rel=1e-12)
    np.testing.assert_allclose(g2 * scales, g1, rtol=1e-9)  # degree -1 homogeneous gradient


def test_l1cosine_minimal_at_identity():
    f, m = features(11)
    best = distance("l1cosine", f, f)[0]
    assert best == pytest.approx(-1.0, abs=1e-12)
    assert distance("l1cosine", f, m)[0] > best
    assert distance("l1cosine", f, 2.0 * f)[0] > best  # unlike cosine, magnitude counts


def test_dice_soft_overlap():
    rng = np.random.default_rng(12)
    f = rng.random((5, 6))
    assert distance("dice", f, f)[0] == pytest.approx(-2.0 * np.mean(np.sum(f * f, 1) / np.sum(2 * f, 1)))
    binary = (rng.random((5, 6)) > 0.5).astype(float)
    binary[:, 0] = 1.0
    assert distance("dice", binary, binary)[0] == pytest.approx(-1.0, abs=1e-12)
    # empty against empty: finite, zero gradient (no 0/0)
    value, grad = distance("dice", np.zeros((3, 4)), np.zeros((3, 4)))
    assert value == 0.0 and np.all(grad == 0.0)


@pytest.mark.parametrize("norm", ["l2", "standardized"])
def test_normalisation_invariances(norm):
    f, m = features(13)
    rng = np.random.default_rng(3)
    a = rng.uniform(0.2, 5.0, size=(f.shape[0], 1))
    b = rng.uniform(-2.0, 2.0, size=(f.shape[0], 1)) if norm == "standardized" else 0.0
    y1, _ = normalize(m, norm)
    y2, _ = normalize(a * m + b, norm)
    np.testing.assert_allclose(y2, y1, rtol=1e-9, atol=1e-10)
    for name in ("l2", "cosine", "ncc"):
        v1, g1 = layer_value_and_grad(f, m, name, norm)
        v2, g2 = layer_value_and_grad(f, a * m + b, name, norm)
        assert v2 == pytest.approx(v1, rel=1e-9, abs=1e-12)
        np.testing.assert_allclose(g2 * a, g1, rtol=1e-7, atol=1e-10)


def test_normalized_outputs():
    rng = np.random.default_rng(14)
    x = rng.standard_normal((5, 7)) * 3.0 + 1.0
    y, _ = normalize(x, "l2")
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, rtol=1e-10)
    y, _ = normalize(x, "standardized")
    np.testing.assert_allclose(y.mean(axis=1), 0.0, atol=1e-12)
    np.testing.assert_allclose(y.std(axis=1), 1.0, rtol=1e-10)
    y, state = normalize(x, "none")
    assert np.array_equal(y, x) and normalize_backward(x, state) is not None
    # zero vectors: finite (zero) output instead of 0/0
    for norm in ("l2", "standardized"):
        y, state = normalize(np.zeros((2, 4)), norm)
        assert np.all(y == 0.0) and np.all(np.isfinite(normalize_backward(np.ones((2, 4)), state)))


def test_per_sample_distances_are_means_over_samples():
    f, m = features(15, k=10)
    for name in PER_SAMPLE_DISTANCES:
        whole, g = distance(name, f, m)
        parts = [distance(name, f[s], m[s]) for s in (slice(0, 3), slice(3, 10))]
        assert whole == pytest.approx(0.3 * parts[0][0] + 0.7 * parts[1][0], rel=1e-12), name
        np.testing.assert_allclose(g[:3], 0.3 * parts[0][1], rtol=1e-12, atol=1e-15)
    assert "ncc" not in PER_SAMPLE_DISTANCES


def test_inputs_not_modified():
    f, m = features(16)
    f0, m0 = f.copy(), m.copy()
    for name, norm in COMBOS:
        layer_value_and_grad(f, m, name, norm)
    assert np.array_equal(f, f0) and np.array_equal(m, m0)


# --- registry and errors -------------------------------------------------------------------

def test_registry_matches_settings():
    assert set(DISTANCES) == set(DISTANCE_NAMES)
    assert set(FEATURE_NORMS) == set(SETTINGS_NORMS)


def test_names_are_case_insensitive():
    f, m = features(17)
    assert distance("L1Cosine", f, m)[0] == distance("l1cosine", f, m)[0]
    assert layer_value_and_grad(f, m, "NCC", "Standardized")[0] == layer_value_and_grad(f, m, "ncc",
                                                                                       "standardized")[0]


def test_unknown_names_raise_config_error_listing_valid_ones():
    f, m = features(18)
    with pytest.raises(ConfigError, match="distance='mse'.*l1, l2, ncc, cosine, l1cosine, dice, dotproduct"):
        distance("mse", f, m)
    with pytest.raises(ConfigError, match="distance='hamming'"):
        layer_value_and_grad(f, m, "hamming", "none")
    with pytest.raises(ConfigError, match="feature_norm='minmax'.*none, l2, standardized"):
        layer_value_and_grad(f, m, "l2", "minmax")
    with pytest.raises(ConfigError, match="feature_norm='zscore'"):
        normalize(f, "zscore")
    assert isinstance(ConfigError("x"), ValueError)


def test_dice_with_standardized_is_rejected():
    f, m = features(19)
    with pytest.raises(ConfigError, match="dice.*standardized"):
        layer_value_and_grad(f, m, "dice", "standardized")


def test_shape_errors():
    f, m = features(20)
    with pytest.raises(ValueError, match="equal"):
        distance("l2", f, m[:, :3])
    with pytest.raises(ValueError, match="2-D"):
        distance("l2", f[0], m[0])
    with pytest.raises(ValueError):
        distance("l2", np.zeros((0, 5)), np.zeros((0, 5)))
