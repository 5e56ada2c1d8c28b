"""PCA of feature vectors: exact reconstruction of rank-k data, orthonormal deterministic
components, projection of whole maps (chunked, non-contiguous), sampling inside a mask, and the
errors for bad k and too few samples."""

import numpy as np
import pytest

from fastimpact.errors import ConfigError, RegistrationError
from fastimpact.features.pca import PCABasis, fit_pca, sample_for_pca


def rank_k_data(n, c, k, seed=0, offset=3.0):
    """n points on a random k-dimensional affine subspace of R^C with distinct variances."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((c, k)))
    coords = rng.standard_normal((n, k)) * np.linspace(3.0, 1.0, k)
    return coords @ basis.T + offset * rng.standard_normal(c)


def test_rank_k_data_reconstructed_exactly():
    x = rank_k_data(200, 12, 4)
    basis = fit_pca(x, 4)
    y = basis.project(x, dtype=np.float64)
    assert y.shape == (200, 4)
    np.testing.assert_allclose(basis.reconstruct(y), x, rtol=0, atol=1e-10)
    assert basis.explained_variance_ratio.sum() == pytest.approx(1.0, abs=1e-12)
    # one component fewer loses the smallest direction
    smaller = fit_pca(x, 3)
    assert np.max(np.abs(smaller.reconstruct(smaller.project(x, dtype=np.float64)) - x)) > 1e-2


def test_components_orthonormal_sorted_and_signed():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((500, 9)) @ rng.standard_normal((9, 9))
    basis = fit_pca(x, 6)
    assert basis.components.shape == (6, 9) and basis.mean.shape == (9,)
    assert basis.components.dtype == np.float64
    np.testing.assert_allclose(basis.components @ basis.components.T, np.eye(6), atol=1e-12)
    ev = basis.explained_variance
    assert np.all(np.diff(ev) <= 0) and np.all(ev > 0)
    # explained variance = variance of the projections (divisor n - 1)
    np.testing.assert_allclose(basis.project(x, dtype=np.float64).var(axis=0, ddof=1), ev, rtol=1e-10)
    # same subspace and variances as an SVD of the centred data
    _, s, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
    np.testing.assert_allclose(ev, s[:6] ** 2 / (len(x) - 1), rtol=1e-10)
    np.testing.assert_allclose(np.abs(np.sum(basis.components * vt[:6], axis=1)), 1.0, atol=1e-9)
    # sign convention: the largest-magnitude entry of each component is positive
    comps = basis.components
    assert np.all(comps[np.arange(6), np.argmax(np.abs(comps), axis=1)] > 0)
    # deterministic: same samples in another order give the same basis
    perm = rng.permutation(len(x))
    other = fit_pca(x[perm], 6)
    np.testing.assert_allclose(other.components, comps, atol=1e-10)


def test_projection_of_a_map_equals_projection_of_its_samples():
    rng = np.random.default_rng(2)
    fmap = rng.standard_normal((5, 6, 7, 8)).astype(np.float32)
    basis = fit_pca(fmap.reshape(-1, 8), 3)
    proj = basis.project(fmap)
    assert proj.shape == (5, 6, 7, 3) and proj.dtype == np.float32
    flat = basis.project(fmap.reshape(-1, 8))
    np.testing.assert_array_max_ulp(proj.reshape(-1, 3), flat, maxulp=1)
    want = (fmap.reshape(-1, 8).astype(np.float64) - basis.mean) @ basis.components.T
    np.testing.assert_allclose(flat, want, rtol=1e-6, atol=1e-6)
    assert basis.project(fmap[1, 2, 3]).shape == (3,)  # a single vector


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 10**6])
def test_chunking_gives_identical_results(chunk_rows):
    rng = np.random.default_rng(3)
    fmap = rng.standard_normal((4, 5, 6, 10)).astype(np.float32)
    basis = fit_pca(fmap.reshape(-1, 10), 4)
    whole = basis.project(fmap)
    # each row is computed alone in float64 then rounded to float32: bitwise identical with the
    # reference BLAS here; 1 ulp allowed for BLAS builds whose kernels depend on the block shape
    np.testing.assert_array_max_ulp(basis.project(fmap, chunk_rows=chunk_rows), whole, maxulp=1)
    # a non-contiguous map (e.g. a transposed view) is processed slice by slice, same values
    view = np.ascontiguousarray(fmap.transpose(2, 1, 0, 3)).transpose(2, 1, 0, 3)
    assert not view.flags.c_contiguous
    np.testing.assert_array_max_ulp(basis.project(view, chunk_rows=chunk_rows), whole, maxulp=1)


def test_projection_shape_errors():
    basis = fit_pca(rank_k_data(30, 6, 2), 2)
    with pytest.raises(ValueError, match="6 channels"):
        basis.project(np.zeros((4, 5)))
    with pytest.raises(ValueError, match="2 coordinates"):
        basis.reconstruct(np.zeros((4, 3)))


def test_fit_errors():
    x = rank_k_data(50, 6, 3)
    for k in (0, -1, 7, 2.5, True):
        with pytest.raises(ConfigError, match="pca="):
            fit_pca(x, k)
    with pytest.raises(RegistrationError, match="at least 5"):
        fit_pca(x[:4], 4)
    bad = x.copy()
    bad[3, 2] = np.nan
    with pytest.raises(RegistrationError, match="NaN"):
        fit_pca(bad, 2)
    assert isinstance(fit_pca(x[:5], 4), PCABasis)


def test_constant_samples_give_zero_variance():
    basis = fit_pca(np.ones((10, 4)) * 2.0, 2)
    assert np.all(basis.explained_variance == 0.0)
    assert np.all(basis.explained_variance_ratio == 0.0)
    np.testing.assert_allclose(basis.components @ basis.components.T, np.eye(2), atol=1e-12)


def test_sample_for_pca_in_mask():
    rng = np.random.default_rng(4)
    fmap = rng.standard_normal((6, 7, 8, 3)).astype(np.float32)
    mask = np.zeros((6, 7, 8), bool)
    mask[1:4, 2:5, 3:7] = True  # 36 voxels
    s = sample_for_pca(fmap, mask, 20, np.random.default_rng(0))
    assert s.shape == (20, 3) and s.dtype == np.float32
    inside = {tuple(v) for v in fmap[mask]}
    assert all(tuple(v) in inside for v in s)
    assert len({tuple(v) for v in s}) == 20  # without replacement
    # reproducible with the same seed, different with another
    assert np.array_equal(s, sample_for_pca(fmap, mask, 20, np.random.default_rng(0)))
    assert not np.array_equal(s, sample_for_pca(fmap, mask, 20, np.random.default_rng(1)))
    # fewer voxels than asked: all of them
    assert sample_for_pca(fmap, mask, 100, 0).shape == (36, 3)
    assert sample_for_pca(fmap, None, 10, 0).shape == (10, 3)
    assert sample_for_pca(fmap, None, 10**6, 0).shape == (6 * 7 * 8, 3)


def test_sample_for_pca_errors():
    fmap = np.zeros((4, 4, 4, 2), np.float32)
    with pytest.raises(RegistrationError, match="no voxel"):
        sample_for_pca(fmap, np.zeros((4, 4, 4), bool), 10, 0)
    with pytest.raises(ValueError, match="does not match"):
        sample_for_pca(fmap, np.ones((4, 4, 5), bool), 10, 0)
    with pytest.raises(ValueError, match="channel-last"):
        sample_for_pca(fmap[..., 0], None, 10, 0)
