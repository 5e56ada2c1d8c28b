"""IMPACT in static mode: compare feature maps of the fixed and moving images (Boussot et al.).

Per pyramid level, each (fixed model, moving model) pair gives feature maps of the fixed image on
its grid and of the moving image on ITS OWN grid (never of a warped image), each with its affine.
At sample points x (world mm) with moving points y = T(x)::

    f_l = F_l(x),  m_l = M_l(y),  dm_l/dy = (dM_l/dq) Minv_l          (cubic B-splines, per channel)
    value = sum_l w_l D_l(norm(f_l), norm(m_l)) / s_l
    d value / d y = sum_l w_l / s_l * sum_c dD_l/dm_lc * dm_lc/dy

with ``s_l`` the layer's first L1/L2 value of the level (the reference's loss normalisation; 1 for
the other distances), an optional random channel subset per evaluation and an optional PCA basis
fitted on the fixed features and applied to both maps. The driver chains d value / d y with
dT/dtheta exactly as for the intensity metrics.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from .term import SampleBatch, Support, Term, TermValue
from ..vocabulary import LOSS_NORMALISED_DISTANCES

__all__ = ["LayerPair", "StaticImpact", "build_static_impact", "prefilter_channels", "receptive_radius_mm"]

PCA_FIT_SAMPLES = 50_000


def prefilter_channels(data: np.ndarray, backend: str = "cpu", inplace: bool = False) -> np.ndarray:
    """Cubic B-spline coefficients of a channel-last map (X, Y, Z, C), float32, mirror boundary.

    On the ``cuda`` backend the map is uploaded once and filtered on the GPU, where the
    coefficients stay for the level (a GPU array is returned)."""
    from ..backend import to_device
    from ..kernels import get_kernel

    if backend == "cuda":
        data, inplace = to_device(np.asarray(data, dtype=np.float32), backend), True
    return get_kernel("prefilter_channels", backend)(data, inplace=inplace)


def grid_lookup(feature_map, affine: np.ndarray, shape) -> np.ndarray | None:
    """The map's values at the voxels of the grid (affine, shape), (X, Y, Z, C) C-contiguous, when
    that grid IS the map's grid up to an axis permutation / flip (stride-1 models on the level's own
    grid); None otherwise. Interpolating B-spline coefficients at a grid point gives the data value
    there exactly, so fixed features at fixed voxels are a gather, not 64 taps."""
    m = np.linalg.inv(feature_map.affine) @ np.asarray(affine, dtype=np.float64)
    lin = m[:3, :3]
    rounded = np.round(lin)
    if not np.allclose(lin, rounded, atol=1e-6) or not np.allclose(np.abs(rounded).sum(axis=0), 1):
        return None
    axes, data = [], feature_map.data
    for j in range(3):
        a = int(np.argmax(np.abs(rounded[:, j])))
        s = rounded[a, j]
        t = m[a, 3]
        n = data.shape[a]
        if n != shape[j] or abs(t - (0 if s > 0 else n - 1)) > 1e-6:
            return None
        axes.append((a, s))
    if sorted(a for a, _ in axes) != [0, 1, 2]:
        return None
    out = np.transpose(data, [a for a, _ in axes] + [3])
    for j, (_, s) in enumerate(axes):
        if s < 0:
            out = np.flip(out, axis=j)
    return np.ascontiguousarray(out)


class LayerPair:
    """One compared layer at one level: the fixed features (a gather table on the level's fixed
    grid, or prefiltered coefficients), the prefiltered moving map, and their geometry."""

    def __init__(self, fixed_map, moving_map, use, label: str, level_affine=None, level_shape=None,
                 backend: str = "cpu"):
        self.fixed_lookup = None
        if level_affine is not None:
            table = grid_lookup(fixed_map, level_affine, level_shape)
            if table is not None:
                self.fixed_lookup = table.reshape(-1, table.shape[3])
        self.fixed_coef = None if self.fixed_lookup is not None else prefilter_channels(fixed_map.data, backend, True)
        self.moving_coef = prefilter_channels(moving_map.data, backend, inplace=True)
        self.fixed_inv = np.linalg.inv(fixed_map.affine)
        self.moving_inv = np.linalg.inv(moving_map.affine)
        self.use = use
        self.label = label
        self.scale = None  # set at the first evaluation for l1 / l2

    @property
    def channels(self) -> int:
        return self.moving_coef.shape[3]


class StaticImpact(Term):
    """The IMPACT static-mode term of one level: value and d value / d y at the batch's points.

    Its support: the receptive field (``receptive_radius_mm``) of the compared features around x
    in the fixed image and around T(x) in the moving image; samples are drawn where the transform
    reaches the moving image's support."""

    name = "impact"
    needs_points = True

    def __init__(self, pairs, seed: int = 0, backend: str = "cpu", receptive_radius_mm: float = 0.0):
        from ..kernels import get_kernel

        self.support = Support(receptive_radius_mm=float(receptive_radius_mm), overlap_sampling=True)
        self.pairs = list(pairs)
        self.rng = np.random.default_rng(seed)
        self.k_channels = get_kernel("cubic_sample_channels", backend)
        self.k_values = get_kernel("cubic_sample_channels_values", backend)
        self.last_layer_values: list = []

    def start_stage(self):
        """Each stage's loss normalisation starts afresh."""
        for p in self.pairs:
            p.scale = None

    def evaluate(self, batch: SampleBatch) -> TermValue:
        """The batch's flat fixed voxels and world points x, y = T(x): value and d value / d y (K, 3)."""
        from ..backend import to_host
        from ..features.distances import layer_value_and_grad

        flat, x, y, gradient = batch.flat, batch.x, batch.y, batch.gradient

        total = 0.0
        gy = np.zeros((len(y), 3)) if gradient else None
        values = []
        for p in self.pairs:
            if p.fixed_lookup is not None:
                f = p.fixed_lookup[flat]
            else:
                qf = x @ p.fixed_inv[:3, :3].T + p.fixed_inv[:3, 3]
                f = to_host(self.k_values(p.fixed_coef, qf))
            qm = y @ p.moving_inv[:3, :3].T + p.moving_inv[:3, 3]
            if gradient:
                m, gm = (to_host(a) for a in self.k_channels(p.moving_coef, qm))
            else:
                m, gm = to_host(self.k_values(p.moving_coef, qm)), None
            use = p.use
            if 0 < use.subset < p.channels:
                sub = np.sort(self.rng.choice(p.channels, use.subset, replace=False))
                f, m = f[:, sub], m[:, sub]
                gm = gm[:, sub] if gradient else None
            v, dm = layer_value_and_grad(f, m, use.distance, use.feature_norm, with_grad=gradient)
            if p.scale is None:
                p.scale = 1.0 / v if use.distance in LOSS_NORMALISED_DISTANCES and v > 1e-12 else 1.0
            w = use.weight * p.scale
            values.append(v)
            total += w * v
            if gradient:
                gq = np.einsum("kc,kcd->kd", dm, gm)  # d D / d (moving map index)
                gy += w * (gq @ p.moving_inv[:3, :3])
        self.last_layer_values = values
        return TermValue(float(total), dvalue_dy=gy)


def receptive_radius_mm(settings, default_voxel_mm: float = 1.0) -> float:
    """The largest receptive-field radius (mm) of the compared layers of a level's IMPACT settings
    (``(rf - 1) / 2`` input voxels of the model's grid, ``voxel_size`` mm each; a model without a
    voxel size runs on a grid of ``default_voxel_mm``)."""
    from ..onnx_models import load_model_spec

    radius = 0.0
    for mu in settings.models:
        for name in dict.fromkeys((mu.fixed_model, mu.moving_model)):
            spec = load_model_spec(name)
            for lu in mu.layers:
                rf = spec.layers[lu.index].receptive_field or spec.receptive_field
                voxel = mu.voxel_size if mu.voxel_size is not None else default_voxel_mm
                radius = max(radius, 0.5 * (float(rf) - 1.0) * float(voxel))
    return radius


def _mask_on_grid(mask_img, affine, shape) -> np.ndarray | None:
    """A mask image sampled (nearest) at the voxel centres of a grid (affine, shape)."""
    if mask_img is None:
        return None
    from scipy import ndimage

    m = np.linalg.inv(mask_img.affine) @ affine
    return ndimage.affine_transform((np.asarray(mask_img.data) > 0).astype(np.uint8), m[:3, :3], m[:3, 3],
                                    output_shape=tuple(shape), order=0, mode="constant", cval=0) > 0


def build_static_impact(settings, fixed_img, moving_img, fixed_norms, moving_norms, *, fixed_mask_img=None,
                        threads=None, tile_size=0, memory_gb=4.0, seed=0, backend="cpu", providers=None, precision="fp32",
                        timings: dict | None = None) -> StaticImpact:
    """The static IMPACT term of one level.

    settings: :class:`~fastimpact.features.settings.ImpactLevel`. fixed_img / moving_img: the
    level's images (used as the model grid when a model has no voxel size). fixed_norms /
    moving_norms: callables ``spec -> IntensityNormalization`` (statistics of the full-resolution
    images). fixed_mask_img: the level's fixed mask image (restricts the PCA fit).
    """
    import time

    from ..features.maps import FeatureExtractor, compute_feature_maps
    from ..onnx_models import load_model_spec

    providers = providers or ("CPUExecutionProvider",)
    pairs = []
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for mu in settings.models:
        fspec, mspec = load_model_spec(mu.fixed_model), load_model_spec(mu.moving_model)
        outputs = [lu.index for lu in mu.layers]
        voxel = mu.voxel_size
        kw = dict(voxel_size=voxel, tile_size=tile_size, memory_gb=memory_gb)
        fmaps = compute_feature_maps(fixed_img, FeatureExtractor(fspec, threads, providers, precision=precision), outputs,
                                     fixed_norms(fspec), **kw)
        mmaps = compute_feature_maps(moving_img, FeatureExtractor(mspec, threads, providers, precision=precision), outputs,
                                     moving_norms(mspec), **kw)
        for lu, fm, mm in zip(mu.layers, fmaps, mmaps):
            if lu.pca:
                from ..features.pca import fit_pca, sample_for_pca

                mask = _mask_on_grid(fixed_mask_img, fm.affine, fm.shape)
                basis = fit_pca(sample_for_pca(fm.data, mask, PCA_FIT_SAMPLES, rng), lu.pca)
                fm = type(fm)(basis.project(fm.data), fm.affine, fm.name)
                mm = type(mm)(basis.project(mm.data), mm.affine, mm.name)
            pairs.append(LayerPair(fm, mm, lu, f"{fspec.name}:{fspec.layers[lu.index].name}", fixed_img.affine,
                                   fixed_img.shape, backend))
    if timings is not None:
        timings["features"] = timings.get("features", 0.0) + time.perf_counter() - t0
    if not pairs:
        raise ConfigError("IMPACT has no layer to compare at this level: set layers (e.g. --layers 1)")
    return StaticImpact(pairs, seed=seed, backend=backend, receptive_radius_mm=receptive_radius_mm(settings, float(np.min(fixed_img.spacing))))
