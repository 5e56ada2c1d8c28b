"""IMPACT in Jacobian mode: patches at the sampled points through the network, every iteration.

For a sample x (world mm) and patch offsets o_v (V = P^3 voxels of spacing R along the fixed
image's canonical axes), the fixed patch is the fixed image at x + o_v and the moving patch the
moving image at y_v = T(x + o_v) (cubic B-splines, with the moving image's spatial gradient
g_v = dM/dy at y_v). Both (intensity-normalised) patches go through the model's patch graph, which
returns the centre voxel of each patch layer; the distance D of the centre features gives the
cotangents dD/dm, the model's VJP graph turns them into dD/d(patch voxel), and

    dD/dtheta = sum_v dD/dp_v * g_v . dT(x + o_v)/dtheta        ("exact" chain)
              ~ sum_v dD/dp_v * g_v . dT(x)/dtheta              ("centre", the reference's choice)

The centre chain scatters one gradient per sample; the exact chain scatters V per sample.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError

__all__ = ["JacobianImpact", "build_jacobian_impact", "patch_offsets"]


def patch_offsets(fixed_img, patch: int, voxel: float | None) -> np.ndarray:
    """(P^3, 3) world offsets of a patch: P voxels per axis centred on 0, along the fixed image's
    axes in the closest RAS order (as the model sees images in static mode), spaced ``voxel`` mm
    (None: the image's own voxel steps). C order: the last patch axis varies fastest."""
    from ..features.maps import canonical

    lin = canonical(fixed_img).affine[:3, :3]
    if voxel is not None:
        lin = lin / np.linalg.norm(lin, axis=0) * float(voxel)
    r = np.arange(patch, dtype=np.float64) - patch // 2
    idx = np.stack(np.meshgrid(r, r, r, indexing="ij"), axis=-1).reshape(-1, 3)
    return np.ascontiguousarray(idx @ lin.T)


class _ModelTerm:
    """One (fixed model, moving model) pair of a level: its patch geometry, sessions and layers."""

    def __init__(self, use, fspec, mspec, offsets, patch, fnorm, mnorm, threads, providers):
        from ..features.maps import FeatureExtractor

        self.use = use
        self.fspec, self.mspec = fspec, mspec
        self.offsets = offsets
        self.patch = patch
        self.fnorm, self.mnorm = fnorm, mnorm
        self.f_patch = FeatureExtractor(fspec, threads, providers, graph="patch")
        self.m_patch = FeatureExtractor(mspec, threads, providers, graph="patch")
        self.m_vjp = FeatureExtractor(mspec, threads, providers, graph="vjp")
        # position of each compared layer among the model's patch layers
        self.slots = []
        for lu in use.layers:
            if lu.index not in fspec.patch_layers or lu.index not in mspec.patch_layers:
                names = ", ".join(fspec.layers[k].name for k in fspec.patch_layers)
                raise ConfigError(f"layer {lu.index} ({fspec.layers[lu.index].name}) of model '{fspec.name}' has no "
                                  f"patch graph: in jacobian mode use the patch layers ({names}) or mode=static")
            self.slots.append(fspec.patch_layers.index(lu.index))
        self.scales = [None] * len(use.layers)

    def batch(self, values: np.ndarray, norm, spec) -> np.ndarray:
        """(K, V) sampled intensities -> the model input (K, C_in, P, P, P) float32."""
        p = self.patch
        x = norm(values).reshape(len(values), p, p, p)
        return np.ascontiguousarray(norm.channels(x, spec.input_channels), dtype=np.float32)


class JacobianImpact:
    """The IMPACT Jacobian-mode term of one level."""

    name = "impact"
    jacobian = True

    def __init__(self, terms, fixed_coef, fixed_inv, moving_coef, moving_inv, chain="centre", seed=0,
                 backend="cpu", fixed_data=None):
        from ..kernels import get_kernel

        self.terms = list(terms)
        # fixed patches whose voxels are voxels of the fixed level grid (sample centres always are)
        # are a gather from the image, not an interpolation: B-spline coefficients interpolate
        # the data exactly at grid points (mirror-folded outside, as the sampler mirrors)
        self.fixed_data = None if fixed_data is None else np.ascontiguousarray(fixed_data, dtype=np.float32)
        for t in self.terms:
            off = t.offsets @ fixed_inv[:3, :3].T
            t.grid_offsets = np.rint(off).astype(np.int64) if (
                self.fixed_data is not None and np.allclose(off, np.rint(off), atol=1e-6)) else None
        self.fixed_coef, self.fixed_inv = fixed_coef, fixed_inv
        self.moving_coef, self.moving_inv = moving_coef, moving_inv
        self.chain = chain
        self.rng = np.random.default_rng(seed)
        self.k_patches = get_kernel("sample_patches", backend)
        self.k_warped = get_kernel("sample_patches_warped", backend)
        self.k_gather = get_kernel("gather_patches", backend)
        self.last_layer_values: list = []

    def _fixed_patches(self, t, x: np.ndarray) -> np.ndarray:
        """(K, V) fixed patch intensities at x + o."""
        if t.grid_offsets is None:
            return self.k_patches(self.fixed_coef, x, t.offsets, self.fixed_inv, 0.0)
        fi = self.fixed_inv
        idx = np.rint(x @ fi[:3, :3].T + fi[:3, 3]).astype(np.int64)
        return self.k_gather(self.fixed_data, idx, t.grid_offsets)

    def max_offsets(self) -> np.ndarray:
        """All patch offsets of the level's models (for the mask erosion), (M, 3) world mm."""
        return np.concatenate([t.offsets for t in self.terms])

    def reset_normalisation(self):
        for t in self.terms:
            t.scales = [None] * len(t.scales)

    def value_and_gradient(self, x: np.ndarray, affine: np.ndarray, bs_coef, w2grid, gradient: bool = True):
        """x: (K, 3) world sample centres; the transform as affine (4x4, world -> world), B-spline
        coefficients (or None) and world -> grid matrix. Returns (value, points (M, 3) world,
        d value / d moving point at those points (M, 3)) with M = K (centre chain) or K V (exact);
        points and gradient are None without ``gradient``."""
        from ..features.distances import layer_value_and_grad

        total = 0.0
        values = []
        pts_all, g_all = [], []
        gy_centre = np.zeros((len(x), 3)) if gradient else None
        for t in self.terms:
            fv = self._fixed_patches(t, x)
            mv, mg = self.k_warped(self.moving_coef, x, t.offsets, affine, bs_coef, w2grid, self.moving_inv)
            fin = t.batch(fv, t.fnorm, t.fspec)
            min_ = t.batch(mv, t.mnorm, t.mspec)
            ffeat = t.f_patch.run(fin, None)
            mfeat = t.m_patch.run(min_, None)
            cots = [np.zeros_like(m) for m in mfeat]
            for i, (lu, slot) in enumerate(zip(t.use.layers, t.slots)):
                f, m = ffeat[slot], mfeat[slot]
                cols = None
                if 0 < lu.subset < f.shape[1]:
                    cols = np.sort(self.rng.choice(f.shape[1], lu.subset, replace=False))
                    f, m = f[:, cols], m[:, cols]
                v, dm = layer_value_and_grad(f, m, lu.distance, lu.feature_norm, with_grad=gradient)
                if t.scales[i] is None:
                    t.scales[i] = 1.0 / v if lu.distance in ("l1", "l2") and v > 1e-12 else 1.0
                w = lu.weight * t.scales[i]
                values.append(v)
                total += w * v
                if gradient:
                    if cols is None:
                        cots[slot] += w * dm
                    else:
                        cots[slot][:, cols] += w * dm
            if not gradient:
                continue
            grad = t.m_vjp.run_vjp(min_, cots)  # (K, C_in, P, P, P): dD / d(model input)
            dval = t.mnorm.input_gradient(grad, mv)  # (K, V): dD / d(moving intensity)
            if self.chain == "centre":
                gy_centre += np.einsum("kv,kvd->kd", dval, mg)
            else:
                pts_all.append((x[:, None, :] + t.offsets[None]).reshape(-1, 3))
                g_all.append((dval[..., None] * mg).reshape(-1, 3))
        self.last_layer_values = values
        if not gradient:
            return float(total), None, None
        if self.chain == "centre":
            return float(total), x, gy_centre
        return float(total), np.concatenate(pts_all), np.concatenate(g_all)


def build_jacobian_impact(settings, fixed_img, moving_img, fixed_norms, moving_norms, *, moving_coef=None,
                          chain="centre", threads=None, seed=0, backend="cpu", providers=None) -> JacobianImpact:
    """The Jacobian-mode IMPACT term of one level (images: the level's pyramid images)."""
    from ..onnx_models import load_model_spec
    from ..registration import prefilter

    providers = providers or ("CPUExecutionProvider",)
    terms = []
    for mu in settings.models:
        fspec, mspec = load_model_spec(mu.fixed_model), load_model_spec(mu.moving_model)
        for spec in (fspec, mspec):
            if spec.vjp_path is None or spec.patch_path is None:
                raise ConfigError(f"model '{spec.name}' has no patch / VJP graphs, so it cannot run in jacobian mode: "
                                  "use mode=static, or build them with `fastimpact models build`")
            if spec.dimension != 3:
                raise ConfigError(f"model '{spec.name}' is {spec.dimension}-D: jacobian mode supports 3-D models "
                                  "in this version; use mode=static")
        patch = mu.patch_size or fspec.patch_size
        for spec in (fspec, mspec):
            spec.patch_centres(patch)  # a valid size for every patch layer, else a clear error
        offsets = patch_offsets(fixed_img, patch, mu.voxel_size)
        terms.append(_ModelTerm(mu, fspec, mspec, offsets, patch, fixed_norms(fspec), moving_norms(mspec),
                                threads, providers))
    fixed_coef = prefilter(fixed_img.data)
    if moving_coef is None:
        moving_coef = prefilter(moving_img.data)
    return JacobianImpact(terms, fixed_coef, np.linalg.inv(fixed_img.affine), moving_coef,
                          np.linalg.inv(moving_img.affine), chain=chain, seed=seed, backend=backend,
                          fixed_data=fixed_img.data)
