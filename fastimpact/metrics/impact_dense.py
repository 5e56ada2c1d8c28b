"""IMPACT in dense Jacobian mode (``--mode jacobian-dense``): the network over the whole volume.

Patch Jacobian mode runs one patch per sample through the network; with thousands of samples the
patches overlap and most of the work is repeated. Dense mode instead, every iteration:

1. warps the moving image onto the fixed level grid, ``W(x) = I_m(T(x))`` (cubic B-spline, with
   the image gradient ``g(x) = grad I_m(T(x))`` in world mm);
2. runs the model's full forward graph once on ``W`` (in the fixed grid's closest RAS
   orientation, normalised and padded as static mode does) and compares its features with the
   fixed image's (computed once per level) at the N sample points: trilinear interpolation of
   each layer at ``p / stride`` (exact gathers for stride 1);
3. puts the distance's derivative into cotangent maps (the adjoint of that interpolation) and
   runs the full-volume VJP graph once: ``G = dD / dW`` at every voxel;
4. chains ``dD/dtheta = sum_x G(x) g(x) . dT(x)/dtheta`` over the voxels where G is non-zero,
   i.e. the exact chain of patch mode with every voxel's own dT/dtheta (the registration's
   exact-chain scatter does the last step).

The same value as patch mode would give with patches as large as the receptive field, at the
cost of two whole-volume network passes per iteration whatever N is: a GPU mode (on the CPU it
fits 2 mm levels). Only 3-D models; the model runs on the level grid (no ``voxel_size``). On the
cuda backend the warp runs on the GPU from resident data, but the warped volume, its gradient
and the network passes still cross to the host every iteration (not yet optimised: no GPU was
available to measure it).
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from ..interpolation import prefilter
from .impact_jacobian import PATCH_EXACT_GRADIENT_FACTOR, compare_layer
from .term import SampleBatch, Term, TermValue

__all__ = ["DenseImpact", "build_dense_impact", "trilinear_gather", "trilinear_scatter"]


# ------------------------------------------------------------------------------------------
# orientation, padding, interpolation (each with its adjoint)
# ------------------------------------------------------------------------------------------
def _canon_index(p: np.ndarray, ornt: np.ndarray, shape) -> np.ndarray:
    """Integer voxel indices (N, 3) of the original grid -> indices in the canonical (RAS) array
    that ``nibabel.orientations.apply_orientation(data, ornt)`` makes."""
    out = np.empty_like(p)
    for i in range(3):
        v = p[:, i]
        if ornt[i, 1] < 0:
            v = shape[i] - 1 - v
        out[:, int(ornt[i, 0])] = v
    return out


def _from_canon(vol: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """The inverse of ``apply_orientation(., ornt)`` on a 3-D array."""
    v = np.transpose(vol, [int(ornt[i, 0]) for i in range(3)])
    for i in range(3):
        if ornt[i, 1] < 0:
            v = np.flip(v, axis=i)
    return np.ascontiguousarray(v)


def _pad_edge(vol: np.ndarray, multiple: int) -> np.ndarray:
    pad = [(0, (-n) % multiple) for n in vol.shape]
    return np.pad(vol, pad, mode="edge") if any(p[1] for p in pad) else vol


def _pad_edge_adjoint(grad: np.ndarray, shape) -> np.ndarray:
    """Adjoint of :func:`_pad_edge`: the padded voxels' gradient goes to the last voxel they copy."""
    g = grad
    for axis, n in enumerate(shape):
        if g.shape[axis] > n:
            head = np.take(g, np.arange(n), axis=axis).copy()
            tail = np.take(g, np.arange(n, g.shape[axis]), axis=axis).sum(axis=axis)
            idx = [slice(None)] * g.ndim
            idx[axis] = n - 1
            head[tuple(idx)] += tail
            g = head
    return g


def _trilinear(pos: np.ndarray, shape):
    """Corner indices (N, 8) flat and weights (N, 8) of trilinear interpolation at continuous
    voxel positions ``pos`` (N, 3), clamped to the grid (edge values outside)."""
    shape = np.asarray(shape)
    p = np.clip(pos, 0.0, shape - 1.0)
    lo = np.minimum(np.floor(p).astype(np.int64), shape - 2).clip(0)
    fr = p - lo
    idx = np.empty((len(p), 8), dtype=np.int64)
    w = np.empty((len(p), 8))
    k = 0
    for a in (0, 1):
        for b in (0, 1):
            for c in (0, 1):
                i = np.minimum(lo + [a, b, c], shape - 1)
                idx[:, k] = (i[:, 0] * shape[1] + i[:, 1]) * shape[2] + i[:, 2]
                w[:, k] = ((fr[:, 0] if a else 1 - fr[:, 0]) * (fr[:, 1] if b else 1 - fr[:, 1])
                           * (fr[:, 2] if c else 1 - fr[:, 2]))
                k += 1
    return idx, w


def trilinear_gather(data: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Channel-last ``data`` (X, Y, Z, C) at continuous voxel positions (N, 3): (N, C) float64."""
    idx, w = _trilinear(pos, data.shape[:3])
    flat = data.reshape(-1, data.shape[3])
    return np.einsum("nk,nkc->nc", w, flat[idx].astype(np.float64))


def trilinear_scatter(values: np.ndarray, pos: np.ndarray, shape) -> np.ndarray:
    """Adjoint of :func:`trilinear_gather`: (N, C) values -> (X, Y, Z, C) float64 map."""
    idx, w = _trilinear(pos, shape)
    out = np.zeros((int(np.prod(shape)), values.shape[1]))
    for k in range(8):
        np.add.at(out, idx[:, k], w[:, k, None] * values)
    return out.reshape(tuple(shape) + (values.shape[1],))


# ------------------------------------------------------------------------------------------
# the term
# ------------------------------------------------------------------------------------------
class _DenseModel:
    """One (fixed model, moving model) pair of a level in dense mode."""

    def __init__(self, use, fspec, mspec, fnorm, mnorm, threads, providers, precision):
        from ..features.maps import FeatureExtractor, OutputBuffers

        for spec in (fspec, mspec):
            if spec.dimension != 3:
                raise ConfigError(f"model '{spec.name}' is {spec.dimension}-D: jacobian-dense mode needs a 3-D model; "
                                  "use mode=jacobian (planes) or static")
        if use.voxel_size is not None:
            raise ConfigError("jacobian-dense mode runs the model on the level grid: drop voxel_size "
                              f"({use.voxel_size} mm) or use mode=jacobian")
        self.use, self.fspec, self.mspec = use, fspec, mspec
        self.fnorm, self.mnorm = fnorm, mnorm
        self.f_full = FeatureExtractor(fspec, threads, providers, precision=precision)
        self.m_full = FeatureExtractor(mspec, threads, providers, precision=precision)
        self.m_vjp = FeatureExtractor(mspec, threads, providers, graph="vjp_full", precision=precision)
        # cotangent index of each compared layer (raises when the model has no full VJP graph)
        self.slots = list(mspec.vjp_full_slots([lu.index for lu in use.layers]))
        self.outputs = list(mspec.vjp_full_layers)  # the forward outputs the VJP graph takes cotangents for
        self.g_out = OutputBuffers()
        self.scales = [None] * len(use.layers)
        self.fixed = None  # per layer: channel-last fixed features on the canonical grid

    def batch(self, vol_canon: np.ndarray, norm, spec) -> np.ndarray:
        x = _pad_edge(norm(vol_canon), spec.size_multiple)
        return np.ascontiguousarray(norm.channels(x[None], spec.input_channels), dtype=np.float32)


class DenseImpact(Term):
    """The IMPACT dense-Jacobian term of one level (see the module docstring): the whole warped
    image through the networks, compared at the batch's points; no support beyond the points."""

    name = "impact"
    needs_points = True

    def __init__(self, terms, fixed_img, moving_coef, moving_inv, seed: int = 0, backend: str = "cpu"):
        from nibabel.orientations import io_orientation

        from ..kernels import get_kernel

        self.terms = list(terms)
        self.fixed = fixed_img
        self.shape = tuple(fixed_img.shape)
        self.ornt = io_orientation(fixed_img.affine)
        self.canon_shape = tuple(self.shape[int(np.flatnonzero(self.ornt[:, 0] == a)[0])] for a in range(3))
        from ..backend import to_device

        self.moving_coef, self.moving_inv = to_device(moving_coef, backend), moving_inv
        self.fixed_inv = np.linalg.inv(fixed_img.affine)
        self.rng = np.random.default_rng(seed)
        self.backend = backend
        self.k_grid = get_kernel("affine_grid", backend)
        self.k_dense = get_kernel("bspline_dense", backend)
        self.k_eval = get_kernel("bspline_eval", backend)
        self.k_cubic = get_kernel("cubic_sample", backend)
        self.last_layer_values: list = []
        canon = self._canon(np.asarray(fixed_img.data, dtype=np.float32))
        for t in self.terms:
            out = t.f_full.run(t.batch(canon, t.fnorm, t.fspec), t.outputs)
            t.fixed = [np.moveaxis(o[0], 0, -1) for o in out]  # (X/s, Y/s, Z/s, C) channel-last, padded

    def _canon(self, vol: np.ndarray) -> np.ndarray:
        from nibabel.orientations import apply_orientation

        return np.ascontiguousarray(apply_orientation(vol, self.ornt))

    def exact_gradient_samples(self, n_iteration, default):
        return min(default, PATCH_EXACT_GRADIENT_FACTOR * n_iteration)

    def start_stage(self):
        """Each stage's loss normalisation starts afresh."""
        for t in self.terms:
            t.scales = [None] * len(t.scales)

    def warp(self, affine: np.ndarray, bs_coef, w2grid):
        """W (X, Y, Z) float32 = I_m(T(x)) on the fixed level grid and d I_m / d y (X, Y, Z, 3)
        world, for the transform (affine world -> world, B-spline coefficients, world -> grid)."""
        from ..backend import to_device, to_host

        fa = self.fixed.affine
        minv = self.moving_inv
        field = None
        if bs_coef is not None:
            bs_coef = to_device(bs_coef, self.backend)  # cuda: the field and the warp are computed on the GPU
            i2g = w2grid @ fa
            lin = i2g[:3, :3]
            if np.allclose(lin, np.diag(np.diag(lin)), atol=1e-9 * np.abs(lin).max()):
                field = self.k_dense(bs_coef, self.shape, i2g[:3, 3].copy(), np.diag(lin).copy(), np.float64)
            else:
                idx = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in self.shape], indexing="ij"),
                               -1).reshape(-1, 3)
                field = self.k_eval(bs_coef, np.ascontiguousarray(idx @ lin.T + i2g[:3, 3])).reshape(self.shape + (3,))
        q = self.k_grid(self.shape, minv @ affine @ fa, field, None if field is None else minv[:3, :3].copy())
        values, gq = (to_host(a) for a in self.k_cubic(self.moving_coef, q.reshape(-1, 3)))
        return (np.asarray(values, dtype=np.float32).reshape(self.shape),
                (np.asarray(gq, dtype=np.float64) @ minv[:3, :3]).reshape(self.shape + (3,)))

    def evaluate(self, batch: SampleBatch) -> TermValue:
        """The batch's world points x (fixed voxel centres): the value and d value / d moving point at
        the voxels the cotangents reach (``points`` (M, 3) world)."""
        x, gradient, view = batch.x, batch.gradient, batch.transform
        affine, bs_coef, w2grid = view.affine, view.coef, view.world_to_grid
        vox = np.rint(x @ self.fixed_inv[:3, :3].T + self.fixed_inv[:3, 3]).astype(np.int64)
        pc = _canon_index(vox, self.ornt, self.shape).astype(np.float64)
        w_img, g_img = self.warp(affine, bs_coef, w2grid)
        w_canon = self._canon(w_img)
        total = 0.0
        values = []
        G = np.zeros(self.canon_shape) if gradient else None
        for t in self.terms:
            batch = t.batch(w_canon, t.mnorm, t.mspec)
            mfeat = t.m_full.run(batch, t.outputs)
            cots = [np.zeros(o.shape, dtype=np.float32) for o in mfeat]
            for i, (lu, slot) in enumerate(zip(t.use.layers, t.slots)):
                stride = t.mspec.layers[lu.index].stride
                pos = pc / stride
                mmap = np.moveaxis(mfeat[slot][0], 0, -1)
                f = trilinear_gather(t.fixed[slot], pos)
                m = trilinear_gather(mmap, pos)
                v, wv, dfull = compare_layer(lu, f, m, self.rng, t.scales, i, gradient)
                values.append(v)
                total += wv
                if gradient:
                    cot = trilinear_scatter(dfull, pos, mmap.shape[:3])  # channel-last
                    cots[slot][0] += np.moveaxis(cot, -1, 0).astype(np.float32)
            if not gradient:
                continue
            grad = t.m_vjp.run_bound([batch, *cots], t.g_out)[0]  # (1, C_in, padded spatial)
            g_in = t.mnorm.input_gradient(grad, np.asarray(_pad_edge(w_canon, t.mspec.size_multiple)).reshape(1, -1))
            g_in = g_in.reshape(batch.shape[2:])
            G += _pad_edge_adjoint(g_in, self.canon_shape)
        self.last_layer_values = values
        if not gradient:
            return TermValue(float(total))
        G = _from_canon(G, self.ornt)
        nz = np.flatnonzero(G)
        idx = np.stack(np.unravel_index(nz, self.shape), axis=1).astype(np.float64)
        fa = self.fixed.affine
        pts = idx @ fa[:3, :3].T + fa[:3, 3]
        gy = G.ravel()[nz, None] * g_img.reshape(-1, 3)[nz]
        return TermValue(float(total), points=pts, point_gradient=gy)


def build_dense_impact(settings, fixed_img, moving_img, fixed_norms, moving_norms, *, moving_coef=None, threads=None,
                       seed=0, backend="cpu", providers=None, precision="fp32") -> DenseImpact:
    """The dense-Jacobian IMPACT term of one level (images: the level's pyramid images)."""
    from ..onnx_models import load_model_spec

    providers = providers or ("CPUExecutionProvider",)
    terms = []
    for mu in settings.models:
        fspec, mspec = load_model_spec(mu.fixed_model), load_model_spec(mu.moving_model)
        terms.append(_DenseModel(mu, fspec, mspec, fixed_norms(fspec), moving_norms(mspec), threads, providers,
                                 precision))
    if moving_coef is None:
        moving_coef = prefilter(moving_img.data)
    return DenseImpact(terms, fixed_img, moving_coef, np.linalg.inv(moving_img.affine), seed=seed, backend=backend)
