"""Principal component analysis of feature vectors (IMPACT static mode, ``pca`` option).

A basis is fitted on feature vectors sampled from the FIXED feature map (inside the fixed mask)
and applied to both the fixed and the moving map, so both are compared in the same k-dimensional
space (as the reference does). Feature maps are channel-last arrays (X, Y, Z, C).

Conventions: ``mean`` (C,), ``components`` (k, C) with orthonormal rows sorted by decreasing
variance, ``explained_variance`` (k,) the variance along each component (divisor n - 1).
Projection ``y = (x - mean) @ components.T``; reconstruction ``x ~ y @ components + mean``.
Each component's sign is fixed so that its entry of largest magnitude is positive (the first
such entry on ties), which makes the basis a deterministic function of the samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, RegistrationError

__all__ = ["PCABasis", "fit_pca", "sample_for_pca", "PROJECT_CHUNK_BYTES"]

#: Float64 working memory per projection chunk (rows = this // (8 C)).
PROJECT_CHUNK_BYTES = 8 << 20


@dataclass(frozen=True, eq=False)
class PCABasis:
    """A fitted PCA basis (all float64); see the module docstring for the conventions.

    ``total_variance`` is the summed variance of all C channels of the fitted samples, so
    ``explained_variance.sum() / total_variance`` is the fraction the k components keep.
    """

    mean: np.ndarray
    components: np.ndarray
    explained_variance: np.ndarray
    total_variance: float

    @property
    def n_components(self) -> int:
        return self.components.shape[0]

    @property
    def n_channels(self) -> int:
        return self.components.shape[1]

    @property
    def explained_variance_ratio(self) -> np.ndarray:
        """(k,) fraction of the total variance along each component (0 for constant data)."""
        if self.total_variance <= 0:
            return np.zeros_like(self.explained_variance)
        return self.explained_variance / self.total_variance

    def project(self, x, *, dtype=np.float32, chunk_rows: int | None = None) -> np.ndarray:
        """Coordinates of feature vectors ``x`` (..., C) in the basis: (..., k) of ``dtype``.

        Works on whole feature maps (X, Y, Z, C). The rows are processed in chunks of
        ``chunk_rows`` vectors (default: :data:`PROJECT_CHUNK_BYTES` of float64 per chunk), each
        computed in float64 and then cast, so the result does not depend on the chunking and
        the extra memory is bounded. A non-contiguous ``x`` is processed one index of its first
        axis at a time (never copied whole).
        """
        x = np.asarray(x)
        c = self.n_channels
        if x.ndim == 0 or x.shape[-1] != c:
            raise ValueError(f"PCA projection needs feature vectors with {c} channels on the last axis, got "
                             f"shape {x.shape}")
        if chunk_rows is None:
            chunk_rows = max(1, PROJECT_CHUNK_BYTES // (8 * c))
        elif int(chunk_rows) < 1:
            raise ValueError(f"chunk_rows={chunk_rows} must be >= 1")
        out = np.empty(x.shape[:-1] + (self.n_components,), dtype=dtype)
        self._project_into(x, out, int(chunk_rows))
        return out

    def _project_into(self, x: np.ndarray, out: np.ndarray, chunk_rows: int) -> None:
        c = self.n_channels
        if x.ndim == 1:
            out[...] = (x.astype(np.float64) - self.mean) @ self.components.T
            return
        if x.ndim == 2:
            rows = x
        elif x.flags.c_contiguous:
            rows = x.reshape(-1, c)
        else:
            # reshape(-1, C) would copy the whole map; one slice of the first axis is bounded
            for i in range(x.shape[0]):
                self._project_into(x[i], out[i], chunk_rows)
            return
        flat = out.reshape(-1, self.n_components)  # a view: out is a fresh C-contiguous array
        wt = self.components.T
        for a in range(0, rows.shape[0], chunk_rows):
            block = rows[a:a + chunk_rows].astype(np.float64)
            block -= self.mean
            flat[a:a + chunk_rows] = block @ wt

    def reconstruct(self, y) -> np.ndarray:
        """Feature vectors (..., C) float64 back from coordinates ``y`` (..., k)."""
        y = np.asarray(y, dtype=np.float64)
        if y.ndim == 0 or y.shape[-1] != self.n_components:
            raise ValueError(f"PCA reconstruction needs {self.n_components} coordinates on the last axis, got "
                             f"shape {y.shape}")
        return y @ self.components + self.mean


def fit_pca(samples, k: int) -> PCABasis:
    """Fit a k-component PCA basis to feature vectors ``samples`` (n, C).

    Eigendecomposition of the sample covariance (C x C, accumulated in float64 from the
    centred samples); needs ``1 <= k <= C`` and at least ``k + 1`` finite samples.
    Raises :class:`ConfigError` for a bad ``k`` and :class:`RegistrationError` for too few
    or non-finite samples.
    """
    x = np.asarray(samples)
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError(f"PCA samples must be a 2-D array (n, C), got shape {x.shape}")
    n, c = x.shape
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= c:
        raise ConfigError(f"pca={k!r} is invalid for a layer with {c} channels: use an integer from 1 to {c} "
                          "(0 = off)")
    k = int(k)
    if n < k + 1:
        raise RegistrationError(f"pca={k} needs at least {k + 1} feature samples to fit, got {n}: enlarge the "
                                "fixed mask or lower pca")
    x = np.asarray(x, dtype=np.float64)
    if not np.isfinite(x).all():
        raise RegistrationError("the feature samples for the PCA fit contain NaN or infinite values: check the "
                                "model and the image intensities")
    mean = x.mean(axis=0)
    cov = np.zeros((c, c))
    step = max(1, PROJECT_CHUNK_BYTES // (8 * c))
    for a in range(0, n, step):
        xc = x[a:a + step] - mean
        cov += xc.T @ xc
    cov /= n - 1
    cov = 0.5 * (cov + cov.T)  # exactly symmetric for eigh
    evals, evecs = np.linalg.eigh(cov)  # ascending
    order = np.argsort(evals)[::-1][:k]
    comps = evecs[:, order].T.copy()
    big = np.argmax(np.abs(comps), axis=1)
    comps *= np.where(comps[np.arange(k), big] < 0, -1.0, 1.0)[:, None]
    explained = np.clip(evals[order], 0.0, None)
    return PCABasis(mean=mean, components=comps, explained_variance=explained,
                    total_variance=float(np.clip(np.trace(cov), 0.0, None)))


def sample_for_pca(feature_map, mask, n: int, rng) -> np.ndarray:
    """Up to ``n`` feature vectors (m, C) of ``feature_map`` (X, Y, Z, C) to fit a PCA on.

    Voxels are drawn uniformly without replacement among those where ``mask`` (X, Y, Z) is
    nonzero (all voxels when ``mask`` is None); all of them when there are at most ``n``.
    ``rng`` is a ``numpy.random.Generator`` (or a seed). Rows come in voxel (C) order, with
    the dtype of the map. Raises :class:`RegistrationError` when the mask selects no voxel.
    """
    fm = np.asarray(feature_map)
    if fm.ndim != 4:
        raise ValueError(f"feature_map must be channel-last (X, Y, Z, C), got shape {fm.shape}")
    n = int(n)
    if n < 1:
        raise ValueError(f"n={n} must be >= 1")
    spatial = fm.shape[:3]
    if mask is None:
        total = int(np.prod(spatial))
        flat = None
    else:
        mask = np.asarray(mask)
        if mask.shape != spatial:
            raise ValueError(f"mask shape {mask.shape} does not match the feature map's grid {spatial}")
        flat = np.flatnonzero(mask)
        total = flat.size
    if total == 0:
        raise RegistrationError("the fixed mask contains no voxel of the feature map grid, so no PCA can be "
                                "fitted: check the mask or set pca 0")
    rng = np.random.default_rng(rng)
    if total <= n:
        idx = np.arange(total)
    else:
        idx = np.sort(rng.choice(total, size=n, replace=False))
    if flat is not None:
        idx = flat[idx]
    ix, iy, iz = np.unravel_index(idx, spatial)
    return fm[ix, iy, iz]
