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

2-D models (paper Sec. III-A-5, as for SAM): each sample's patch is a P x P plane (V = P^2) of
spacing ``voxel_size`` (default: the fixed level image's mean spacing) with a random orientation
R_n (uniform on SO(3), drawn per sample from the term's generator at every evaluation);
the fixed and the moving patch of a sample use the same plane, o_nv = R_n (a_v, b_v, 0).
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from ..interpolation import prefilter
from .term import SampleBatch, Support, Term, TermValue
from ..vocabulary import LOSS_NORMALISED_DISTANCES

__all__ = ["JacobianImpact", "build_jacobian_impact", "compare_layer", "patch_offsets", "plane_offsets",
           "random_rotations"]


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


def plane_offsets(patch: int, spacing: float) -> np.ndarray:
    """(P^2, 3) offsets (mm) of an unrotated P x P plane patch in the world x-y plane, centred on
    voxel P // 2, ``spacing`` mm apart. C order: row i * P + j is (i - P // 2, j - P // 2, 0) *
    spacing, so patch axis 0 runs along x and axis 1 along y before the rotation."""
    r = (np.arange(patch, dtype=np.float64) - patch // 2) * float(spacing)
    return np.ascontiguousarray(np.stack(np.meshgrid(r, r, [0.0], indexing="ij"), axis=-1).reshape(-1, 3))


def random_rotations(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 3, 3) rotation matrices drawn uniformly on SO(3) (Haar measure).

    A unit quaternion from four independent normal deviates is uniform on the 3-sphere, and the
    rotation it defines is uniform on SO(3), so each plane normal ``R e_z`` is uniform on the
    sphere (independent Euler angles are not: they crowd the normals towards the poles).
    """
    q = rng.standard_normal((n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
    ], axis=1)


def compare_layer(lu, f: np.ndarray, m: np.ndarray, rng, scales: list, i: int, gradient: bool):
    """One compared layer of Jacobian-type modes: features ``f``, ``m`` (N, C) at the samples.

    Draws the layer's random channel subset, evaluates its distance, sets the L1 / L2 loss
    normalisation ``scales[i]`` at the first call (the reference divides by the first value) and
    returns (distance value, weighted value, weighted d value / d m (N, C) with zeros in the
    unused channels, or None without ``gradient``)."""
    from ..features.distances import layer_value_and_grad

    n_channels = f.shape[1]
    cols = None
    if 0 < lu.subset < n_channels:
        cols = np.sort(rng.choice(n_channels, lu.subset, replace=False))
        f, m = f[:, cols], m[:, cols]
    v, dm = layer_value_and_grad(f, m, lu.distance, lu.feature_norm, with_grad=gradient)
    if scales[i] is None:
        scales[i] = 1.0 / v if lu.distance in LOSS_NORMALISED_DISTANCES and v > 1e-12 else 1.0
    w = lu.weight * scales[i]
    if not gradient:
        return v, w * v, None
    if cols is None:
        return v, w * v, w * dm
    full = np.zeros((len(dm), n_channels))
    full[:, cols] = w * dm
    return v, w * v, full


class _ModelTerm:
    """One (fixed model, moving model) pair of a level: its patch geometry, sessions and layers."""

    def __init__(self, use, fspec, mspec, offsets, patch, fnorm, mnorm, threads, providers, precision="fp32"):
        from ..features.maps import FeatureExtractor, OutputBuffers

        self.use = use
        self.fspec, self.mspec = fspec, mspec
        self.dimension = fspec.dimension
        # 3-D: (P^3, 3) offsets shared by every sample; 2-D: the unrotated (P^2, 3) plane
        self.offsets = offsets
        self.patch = patch
        self.fnorm, self.mnorm = fnorm, mnorm
        self.f_patch = FeatureExtractor(fspec, threads, providers, graph="patch", precision=precision)
        self.m_patch = FeatureExtractor(mspec, threads, providers, graph="patch", precision=precision)
        self.m_vjp = FeatureExtractor(mspec, threads, providers, graph="vjp", precision=precision)
        # preallocated outputs of the three graphs (I/O binding; they grow to the largest batch)
        self.f_out, self.m_out, self.g_out = OutputBuffers(), OutputBuffers(), OutputBuffers()
        # position of each compared layer among the model's patch layers
        self.slots = []
        for lu in use.layers:
            if lu.index not in fspec.patch_layers or lu.index not in mspec.patch_layers:
                names = ", ".join(fspec.layers[k].name for k in fspec.patch_layers)
                raise ConfigError(f"layer {lu.index} ({fspec.layers[lu.index].name}) of model '{fspec.name}' has no "
                                  f"patch graph: in jacobian mode use the patch layers ({names}) or mode=static")
            self.slots.append(fspec.patch_layers.index(lu.index))
        self.scales = [None] * len(use.layers)
        for spec, ext in ((fspec, self.f_patch), (mspec, self.m_patch), (mspec, self.m_vjp)):
            rank = len(ext.session.get_inputs()[0].shape)
            if rank != spec.dimension + 2:
                raise ConfigError(f"model '{spec.name}' is {spec.dimension}-D in its manifest but its {ext.graph} "
                                  f"graph '{ext.path.name}' takes inputs of rank {rank} (expected "
                                  f"{spec.dimension + 2}); fix 'dimension' in the manifest or re-export the graph")
        self.last_offsets = None  # 2-D: the (K, P^2, 3) planes of the last evaluation

    def batch(self, values: np.ndarray, norm, spec) -> np.ndarray:
        """(K, V) sampled intensities -> the model input (K, C_in, P, ..., P) float32 (D patch axes)."""
        x = norm(values).reshape((len(values),) + (self.patch,) * self.dimension)
        return np.ascontiguousarray(norm.channels(x, spec.input_channels), dtype=np.float32)

    def reach(self) -> np.ndarray:
        """Offsets (M, 3) whose box contains the patch of any sample: 3-D, the patch itself; 2-D, the
        8 corners of the cube circumscribing the sphere swept by the plane's half-diagonal."""
        if self.dimension == 3:
            return self.offsets
        r = float(np.linalg.norm(self.offsets, axis=1).max())
        return r * np.stack(np.meshgrid([-1.0, 1.0], [-1.0, 1.0], [-1.0, 1.0], indexing="ij"), -1).reshape(-1, 3)


#: IMPACT Jacobian and dense modes: ASGD's exact-gradient estimate uses this many times the samples
#: of one iteration (every sample is a network evaluation: 100k of them would cost more than a
#: whole level; the estimate only needs to be much less noisy than one iteration's gradient)
PATCH_EXACT_GRADIENT_FACTOR = 5


class JacobianImpact(Term):
    """The IMPACT Jacobian-mode term of one level: patches around the batch's points through the
    networks; its support is the patches' extent (``max_offsets``)."""

    name = "impact"
    needs_points = True

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
            # 2-D planes are rotated per sample: always interpolated
            on_grid = self.fixed_data is not None and np.allclose(off, np.rint(off), atol=1e-6)
            t.grid_offsets = np.rint(off).astype(np.int64) if (t.dimension == 3 and on_grid) else None
        from ..backend import to_device

        # on the cuda backend the level's images live on the GPU for the whole level
        self.fixed_coef, self.fixed_inv = to_device(fixed_coef, backend), fixed_inv
        self.moving_coef, self.moving_inv = to_device(moving_coef, backend), moving_inv
        self.fixed_data = to_device(self.fixed_data, backend)
        self.chain = chain
        self.rng = np.random.default_rng(seed)
        # True: 2-D models reuse the last planes while the sample count is unchanged (for gradient
        # checks by finite differences); False (the registration): new planes every evaluation
        self.freeze_rotations = False
        self.k_patches = get_kernel("sample_patches", backend)
        self.k_warped = get_kernel("sample_patches_warped", backend)
        self.k_gather = get_kernel("gather_patches", backend)
        self.last_layer_values: list = []
        self.support = Support(patch_offsets=self.max_offsets())

    def _offsets(self, t, k: int) -> np.ndarray:
        """The patch offsets of this evaluation: (V, 3) shared (3-D), or (K, P^2, 3) planes with
        random orientations (2-D)."""
        if t.dimension == 3:
            return t.offsets
        if not (self.freeze_rotations and t.last_offsets is not None and len(t.last_offsets) == k):
            rot = random_rotations(self.rng, k)
            t.last_offsets = np.ascontiguousarray(np.einsum("kij,vj->kvi", rot, t.offsets))
        return t.last_offsets

    def _fixed_patches(self, t, x: np.ndarray, offsets=None) -> np.ndarray:
        """(K, V) fixed patch intensities at x + o (``offsets``: (V, 3) or (K, V, 3); default the
        term's shared offsets)."""
        offsets = t.offsets if offsets is None else offsets
        from ..backend import to_host

        if t.grid_offsets is None or offsets.ndim == 3:
            return to_host(self.k_patches(self.fixed_coef, x, offsets, self.fixed_inv, 0.0))
        fi = self.fixed_inv
        idx = np.rint(x @ fi[:3, :3].T + fi[:3, 3]).astype(np.int64)
        return to_host(self.k_gather(self.fixed_data, idx, t.grid_offsets))

    def max_offsets(self) -> np.ndarray:
        """Offsets (M, 3) world mm bounding every patch of the level's models (for the mask erosion
        and the moving-mask corner check): the 3-D patches themselves, and for 2-D models the
        corners of the cube around any orientation of the plane."""
        return np.concatenate([t.reach() for t in self.terms])

    def exact_gradient_samples(self, n_iteration, default):
        return min(default, PATCH_EXACT_GRADIENT_FACTOR * n_iteration)

    def start_stage(self):
        """Each stage's loss normalisation starts afresh."""
        for t in self.terms:
            t.scales = [None] * len(t.scales)

    def evaluate(self, batch: SampleBatch) -> TermValue:
        """Patches around the batch's world points x, warped by the batch's transform: the value and
        d value / d moving point at x (centre chain) or at every patch voxel (exact chain:
        ``points`` (K V, 3))."""
        from ..backend import to_host

        x, gradient, view = batch.x, batch.gradient, batch.transform
        affine, bs_coef, w2grid = view.affine, view.coef, view.world_to_grid

        total = 0.0
        values = []
        pts_all, g_all = [], []
        gy_centre = np.zeros((len(x), 3)) if gradient else None
        for t in self.terms:
            off = self._offsets(t, len(x))
            fv = self._fixed_patches(t, x, off)
            mv, mg = (to_host(a) for a in self.k_warped(self.moving_coef, x, off, affine, bs_coef, w2grid,
                                                         self.moving_inv))
            fin = t.batch(fv, t.fnorm, t.fspec)
            min_ = t.batch(mv, t.mnorm, t.mspec)
            ffeat = t.f_patch.run_bound([fin], t.f_out)
            mfeat = t.m_patch.run_bound([min_], t.m_out)
            cots = [np.zeros_like(m) for m in mfeat]
            for i, (lu, slot) in enumerate(zip(t.use.layers, t.slots)):
                v, wv, dfull = compare_layer(lu, ffeat[slot], mfeat[slot], self.rng, t.scales, i, gradient)
                values.append(v)
                total += wv
                if gradient:
                    cots[slot] += dfull
            if not gradient:
                continue
            grad = t.m_vjp.run_bound([min_, *cots], t.g_out)[0]  # (K, C_in, P, ..., P): dD / d(model input)
            dval = t.mnorm.input_gradient(grad, mv)  # (K, V): dD / d(moving intensity)
            if self.chain == "centre":
                gy_centre += np.einsum("kv,kvd->kd", dval, mg)
            else:
                pts_all.append((x[:, None, :] + (off if off.ndim == 3 else off[None])).reshape(-1, 3))
                g_all.append((dval[..., None] * mg).reshape(-1, 3))
        self.last_layer_values = values
        if not gradient:
            return TermValue(float(total))
        if self.chain == "centre":
            return TermValue(float(total), dvalue_dy=gy_centre)
        return TermValue(float(total), points=np.concatenate(pts_all), point_gradient=np.concatenate(g_all))


def build_jacobian_impact(settings, fixed_img, moving_img, fixed_norms, moving_norms, *, moving_coef=None,
                          chain="centre", threads=None, seed=0, backend="cpu", providers=None,
                          precision="fp32") -> JacobianImpact:
    """The Jacobian-mode IMPACT term of one level (images: the level's pyramid images)."""
    from ..onnx_models import load_model_spec

    providers = providers or ("CPUExecutionProvider",)
    terms = []
    for mu in settings.models:
        fspec, mspec = load_model_spec(mu.fixed_model), load_model_spec(mu.moving_model)
        for spec in (fspec, mspec):
            if spec.vjp_path is None or spec.patch_path is None:
                raise ConfigError(f"model '{spec.name}' has no patch / VJP graphs, so it cannot run in jacobian mode: "
                                  "use mode=static, or build them with `fastimpact models build`")
        if fspec.dimension != mspec.dimension:
            raise ConfigError(f"fixed model '{fspec.name}' is {fspec.dimension}-D and moving model '{mspec.name}' "
                              f"{mspec.dimension}-D: in jacobian mode both patches have the same shape; choose models "
                              "of one dimension")
        patch = mu.patch_size or fspec.patch_size
        for spec in (fspec, mspec):
            spec.patch_centres(patch)  # a valid size for every patch layer, else a clear error
        if fspec.dimension == 3:
            offsets = patch_offsets(fixed_img, patch, mu.voxel_size)
        else:
            spacing = mu.voxel_size if mu.voxel_size is not None else float(np.mean(fixed_img.spacing))
            offsets = plane_offsets(patch, spacing)
        terms.append(_ModelTerm(mu, fspec, mspec, offsets, patch, fixed_norms(fspec), moving_norms(mspec),
                                threads, providers, precision))
    fixed_coef = prefilter(fixed_img.data)
    if moving_coef is None:
        moving_coef = prefilter(moving_img.data)
    return JacobianImpact(terms, fixed_coef, np.linalg.inv(fixed_img.affine), moving_coef,
                          np.linalg.inv(moving_img.affine), chain=chain, seed=seed, backend=backend,
                          fixed_data=fixed_img.data)
