"""Static feature maps: an image -> normalised intensities -> the model's grid -> ONNX Runtime
(whole volume or tiles) -> one channel-last feature map per layer, placed in physical space.

Geometry. The model sees the image on a grid ``G``: the image's voxels reordered to the closest
canonical (RAS+) axis order, so that the same anatomy stored flipped or with permuted axes gives
the same features at the same physical point, then (optionally) resampled to the requested
voxel size with the same direction cosines. A layer of stride ``s`` has voxel
``j`` at input voxel ``s j`` (convolutions padded by k // 2, the contract of every model here),
so its affine is ``G @ diag(s, s, s, 1)`` (2-D models: the stride applies to the first two axes;
slices along the third axis are run as a batch). Feature maps therefore follow the physical
frame whatever the image orientation, and the moving map is read at T(x) on its own grid.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, RegistrationError
from ..image import Image

__all__ = ["FeatureMap", "FeatureExtractor", "IntensityNormalization", "canonical", "resample_to_voxel_size",
           "compute_feature_maps", "plan_tiles"]

# ImageNet statistics (RGB), for 3-channel 2-D models.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CT_RANGE = (-1024.0, 3071.0)


@dataclass(frozen=True)
class FeatureMap:
    """One layer's features: ``data`` (X, Y, Z, C) float32 channel-last, ``affine`` voxel -> world
    RAS mm (4 x 4)."""

    data: np.ndarray
    affine: np.ndarray
    name: str = ""

    @property
    def shape(self):
        return self.data.shape[:3]

    @property
    def channels(self) -> int:
        return self.data.shape[3]


# ------------------------------------------------------------------------------------------
# intensity normalisation (the image's own statistics inside its mask)
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IntensityNormalization:
    """``y = (clip(x, lo, hi) - shift) / scale``, with statistics taken once from the full-resolution
    image inside its mask, so every level, tile and patch gets the same mapping.

    none: identity. zscore: mean / std. minmax: to [0, 1]. ct: clip to the 0.5-99.5 percentiles
    (inside [-1024, 3071] HU) then z-score (nnU-Net's CT scheme with the image's own statistics).
    imagenet: min-max to [0, 1]; the per-channel ImageNet mean/std are applied after replication
    to 3 channels.
    """

    mode: str
    shift: float = 0.0
    scale: float = 1.0
    lo: float = -math.inf
    hi: float = math.inf

    @classmethod
    def from_image(cls, data: np.ndarray, mask: np.ndarray | None, mode: str) -> "IntensityNormalization":
        if mode == "none":
            return cls("none")
        vals = np.asarray(data)[mask > 0] if mask is not None else np.asarray(data).ravel()
        vals = vals.astype(np.float64, copy=False)
        if mode == "zscore":
            std = float(vals.std())
            return cls(mode, float(vals.mean()), std if std > 0 else 1.0)
        if mode in ("minmax", "imagenet"):
            lo, hi = float(vals.min()), float(vals.max())
            return cls(mode, lo, (hi - lo) if hi > lo else 1.0)
        if mode == "ct":
            lo, hi = np.percentile(np.clip(vals, *CT_RANGE), [0.5, 99.5])
            clipped = np.clip(vals, lo, hi)
            std = float(clipped.std())
            return cls(mode, float(clipped.mean()), std if std > 0 else 1.0, float(lo), float(hi))
        raise ConfigError(f"normalization={mode!r} is invalid: choose none, zscore, minmax, ct or imagenet")

    def __call__(self, data: np.ndarray) -> np.ndarray:
        x = np.asarray(data, dtype=np.float32)
        if self.mode == "none":
            return x
        if math.isfinite(self.lo) or math.isfinite(self.hi):
            x = np.clip(x, self.lo, self.hi)
        return ((x - np.float32(self.shift)) / np.float32(self.scale)).astype(np.float32, copy=False)

    def input_gradient(self, grad: np.ndarray, raw: np.ndarray) -> np.ndarray:
        """Chain a gradient w.r.t. the model input, ``grad`` (K, C_in, *patch), back to the raw
        intensities ``raw`` (K, V) the input was made of (through the channel replication, the
        ImageNet scaling and this normalisation; zero where ``ct`` clipping is active)."""
        k = grad.shape[0]
        g = np.asarray(grad, dtype=np.float64).reshape(k, grad.shape[1], -1)
        if self.mode == "imagenet" and g.shape[1] == 3:
            g = g / np.asarray(IMAGENET_STD)[None, :, None]
        g = g.sum(axis=1)
        if self.mode == "none":
            return g
        g = g / self.scale
        if math.isfinite(self.lo) or math.isfinite(self.hi):
            g = np.where((raw > self.lo) & (raw < self.hi), g, 0.0)
        return g

    def channels(self, x: np.ndarray, n_channels: int) -> np.ndarray:
        """Stack a normalised grey batch (B, *spatial) into (B, n_channels, *spatial)."""
        if n_channels == 1:
            return x[:, None]
        out = np.repeat(x[:, None], n_channels, axis=1)
        if self.mode == "imagenet" and n_channels == 3:
            for c in range(3):
                out[:, c] = (out[:, c] - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        return out


# ------------------------------------------------------------------------------------------
# the model's grid
# ------------------------------------------------------------------------------------------
def canonical(image: Image) -> Image:
    """The image with its voxel axes flipped / permuted to the closest RAS+ order (data and affine
    change together: every voxel keeps its physical position)."""
    from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation

    ornt = io_orientation(image.affine)
    if np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]):
        return image
    data = np.ascontiguousarray(apply_orientation(np.asarray(image.data), ornt))
    affine = image.affine @ inv_ornt_aff(ornt, image.shape)
    return Image(data, affine, image.name)


def resample_to_voxel_size(image: Image, voxel: float | None) -> Image:
    """The image on a grid with the same origin and direction cosines and isotropic spacing
    ``voxel`` mm covering the same extent (linear interpolation after a Gaussian anti-aliasing
    filter of sigma 0.5 * sqrt(r^2 - 1) voxels for a shrink ratio r > 1). ``None`` or a spacing
    equal to the image's returns the image unchanged."""
    from scipy import ndimage

    if voxel is None:
        return image
    spacing = image.spacing
    ratio = float(voxel) / spacing
    if np.allclose(ratio, 1.0, atol=1e-6):
        return image
    data = np.asarray(image.data, dtype=np.float32)
    sigma = 0.5 * np.sqrt(np.maximum(ratio**2 - 1.0, 0.0))
    if np.any(sigma > 0):
        data = ndimage.gaussian_filter(data, sigma, mode="nearest", truncate=3.0)
    shape = tuple(int(math.floor((n - 1) / r + 1e-6)) + 1 for n, r in zip(image.shape, ratio))
    out = ndimage.affine_transform(data, ratio, output_shape=shape, order=1, mode="nearest", output=np.float32)
    affine = np.array(image.affine, dtype=np.float64)
    affine[:3, :3] = affine[:3, :3] * ratio[None, :]
    return Image(out, affine, image.name)


# ------------------------------------------------------------------------------------------
# ONNX Runtime
# ------------------------------------------------------------------------------------------
_SESSIONS: dict = {}
_SESSIONS_LOCK = threading.Lock()


def _ort():
    try:
        import onnxruntime as ort
    except ImportError:
        raise ConfigError(
            "the IMPACT metric needs ONNX Runtime: pip install 'fastimpact[cpu]' (or onnxruntime-gpu for CUDA)"
        ) from None
    return ort


class OutputBuffers:
    """Grow-only float32 output buffers for :meth:`FeatureExtractor.run_bound`, one per output.

    ``get(k, shape)`` returns a C-contiguous view of the first ``prod(shape)`` elements of buffer
    ``k``, reallocating only when a larger batch comes (a registration's batches are all about
    the sample count), on the host or, for GPU feeds, on the GPU (CuPy).
    """

    def __init__(self):
        self._store: dict = {}

    def get(self, k: int, shape, like=None):
        n = int(np.prod(shape))
        gpu = like is not None and hasattr(like, "__cuda_array_interface__")
        buf = self._store.get((k, gpu))
        if buf is None or buf.size < n:
            if gpu:
                import cupy

                buf = cupy.empty(max(n, 1), dtype=np.float32)
            else:
                buf = np.empty(max(n, 1), dtype=np.float32)
            self._store[(k, gpu)] = buf
        return buf[:n].reshape(shape)


def _bind(io, kind: str, name: str, arr) -> None:
    """Bind one float32 C-contiguous array (host or GPU) to an input or output of ``io``."""
    if hasattr(arr, "__cuda_array_interface__"):
        cai = arr.__cuda_array_interface__
        device, ptr = "cuda", cai["data"][0]
        dev_id = int(getattr(getattr(arr, "device", None), "id", 0))
    else:
        if not arr.flags.c_contiguous or arr.dtype != np.float32:
            raise TypeError(f"{kind} '{name}' must be float32 C-contiguous for I/O binding")
        device, ptr, dev_id = "cpu", arr.ctypes.data, 0
    if kind == "input":
        io.bind_input(name, device, dev_id, np.float32, list(arr.shape), ptr)
    else:
        io.bind_output(name, device, dev_id, np.float32, list(arr.shape), ptr)


class FeatureExtractor:
    """An ONNX model of the registry, run by ONNX Runtime with a given thread count.

    Sessions are cached per (file, threads, providers, precision): a registration builds each
    once, and a second registration in the same process reuses them. ``precision``: see
    :mod:`fastimpact.features.precision`.
    """

    def __init__(self, spec, threads: int | None = None, providers=("CPUExecutionProvider",), graph: str = "full",
                 precision: str = "fp32"):
        self.spec = spec
        self.graph = graph
        self.path = {"full": spec.path, "patch": getattr(spec, "patch_path", None),
                     "vjp": getattr(spec, "vjp_path", None), "vjp_full": getattr(spec, "vjp_full_path", None)}[graph]
        self.threads = int(threads or os.cpu_count() or 1)
        self.providers = tuple(providers)
        self.precision = precision
        self._output_names = None

    def _session_providers(self) -> list:
        from .precision import cuda_provider_options

        return [(p, cuda_provider_options(self.precision)) if p == "CUDAExecutionProvider" else p
                for p in self.providers]

    def _model_source(self):
        """The graph for ONNX Runtime: its file, or the bytes of its float16 conversion."""
        if self.precision != "fp16":
            return str(self.path)
        import onnx

        from .precision import to_float16

        return to_float16(onnx.load(str(self.path))).SerializeToString()

    @property
    def session(self):
        key = (str(self.path), self.threads, self.providers, self.precision)
        with _SESSIONS_LOCK:
            sess = _SESSIONS.get(key)
            if sess is None:
                ort = _ort()
                opts = ort.SessionOptions()
                opts.intra_op_num_threads = self.threads
                opts.inter_op_num_threads = 1
                opts.log_severity_level = 3
                try:
                    sess = ort.InferenceSession(self._model_source(), sess_options=opts,
                                                providers=self._session_providers())
                except ConfigError:
                    raise
                except Exception as exc:  # ORT has its own exception types
                    raise ConfigError(f"model file '{self.path}' cannot be loaded by ONNX Runtime "
                                      f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); rebuild or "
                                      "re-export the model") from None
                n_out = len(sess.get_outputs())
                expected = {"full": len(self.spec.layers), "patch": len(getattr(self.spec, "patch_layers", ()) or ()),
                            "vjp": 1, "vjp_full": 1}[self.graph]
                if n_out != expected:
                    raise ConfigError(f"model '{self.spec.name}': the {self.graph} ONNX graph has {n_out} outputs but "
                                      f"its manifest implies {expected}; fix the manifest")
                _SESSIONS[key] = sess
        return sess

    def run_bound(self, feeds, buffers: "OutputBuffers") -> list:
        """Run with ONNX Runtime I/O binding: inputs bound where they lie, outputs written into
        ``buffers`` (grow-only, owned by the caller, so no output is allocated per call).

        ``feeds``: the graph's inputs in order, float32 C-contiguous, host NumPy arrays or GPU
        arrays (``__cuda_array_interface__``, bound as 'cuda' memory without a copy). The output
        shapes follow from the batch: (B, C_k) per layer for the patch graph, the patches' shape
        for the VJP graph. Returns views of ``buffers`` (valid until the next call with them).
        """
        sess = self.session
        b = int(feeds[0].shape[0])
        io = sess.io_binding()
        for inp, arr in zip(sess.get_inputs(), feeds):
            _bind(io, "input", inp.name, arr)
        outs = []
        for k, out in enumerate(sess.get_outputs()):
            shape = ((b, self._output_channels(k)) if self.graph == "patch" else tuple(feeds[0].shape))
            buf = buffers.get(k, shape, like=feeds[0])
            _bind(io, "output", out.name, buf)
            outs.append(buf)
        try:
            sess.run_with_iobinding(io)
        except Exception as exc:
            raise RegistrationError(f"the {self.graph} graph of model '{self.spec.name}' failed on a batch of shape "
                                    f"{list(feeds[0].shape)} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
        return outs

    def _output_channels(self, k: int) -> int:
        return self.spec.layers[self.spec.patch_layers[k]].channels

    def run(self, batch: np.ndarray, outputs) -> list:
        """Run on ``batch`` (B, C_in, *spatial) float32; return the requested outputs (None: all),
        as ONNX gives them (B, C_l, *spatial / stride; the patch graph: (B, C_l) centres)."""
        sess = self.session
        names = [o.name for o in sess.get_outputs()]
        if outputs is None:
            outputs = range(len(names))
        try:
            res = sess.run([names[i] for i in outputs], {sess.get_inputs()[0].name: np.ascontiguousarray(batch, dtype=np.float32)})
        except Exception as exc:
            raise RegistrationError(f"model '{self.spec.name}' failed on an input of shape {list(batch.shape)} "
                                    f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); check the model's "
                                    "manifest (dimension, input_channels, size_multiple)") from None
        if self.graph != "full":
            return res
        for i, r in zip(outputs, res):
            c = self.spec.layers[i].channels
            if r.ndim != batch.ndim or r.shape[0] != batch.shape[0] or r.shape[1] != c:
                raise ConfigError(f"model '{self.spec.name}' output {i} has shape {list(r.shape)}, its manifest "
                                        f"says {c} channels for a batch of {batch.shape[0]}; fix the manifest")
        return res


# ------------------------------------------------------------------------------------------
# tiling
# ------------------------------------------------------------------------------------------
def bytes_per_voxel(spec, outputs) -> float:
    """Rough peak memory of one inference per input voxel (float32 activations; a factor 3 for the
    intermediates of a layer and its neighbours, calibrated on mind and deepbet)."""
    d = spec.dimension
    act = sum(spec.layers[i].channels / spec.layers[i].stride ** d for i in outputs)
    widest = max(l.channels / l.stride ** d for l in spec.layers[: max(outputs) + 1])
    return 4.0 * 3.0 * (spec.input_channels + act + widest)


def plan_tiles(shape, align: int, halo: int, tile: int):
    """Tiles of a spatial ``shape``: (core_start, core_stop, in_start, in_stop) per axis, with core
    starts and input starts multiples of ``align`` (the largest stride) so tile outputs sit on the
    whole-volume output grid. ``tile`` is the core edge (voxels), ``halo`` the context on each side."""
    tile = max(align, (tile // align) * align)
    halo = int(math.ceil(halo / align)) * align
    axes = []
    for n in shape:
        spans = []
        for a in range(0, n, tile):
            b = min(a + tile, n)
            spans.append((a, b, max(0, a - halo), min(n, b + halo)))
        axes.append(spans)
    return axes


def compute_feature_maps(image: Image, extractor: FeatureExtractor, outputs, normalization: IntensityNormalization,
                         *, voxel_size: float | None = None, tile_size: int = 0, memory_gb: float = 4.0,
                         halo: int | None = None) -> list:
    """Feature maps (one :class:`FeatureMap` per index in ``outputs``) of ``image``.

    The image is normalised, put on the model's grid (``voxel_size``, see
    :func:`resample_to_voxel_size`) and run whole when its estimated peak memory fits
    ``memory_gb``, else in tiles: cores of ``tile_size`` voxels (0: the largest cube that fits),
    each run with ``halo`` voxels of context on every side (default: the largest receptive field
    of the requested layers, twice that for models that normalise by input statistics) and
    cropped to its core. For models
    without global normalisation the result equals whole-volume inference exactly.
    """
    spec = extractor.spec
    outputs = list(outputs)
    grid = resample_to_voxel_size(canonical(image), voxel_size)
    vol = normalization(grid.data)
    d = spec.dimension
    strides = [spec.layers[i].stride for i in outputs]
    align = math.lcm(*[spec.layers[i].stride for i in range(max(outputs) + 1)], spec.size_multiple)
    spatial = vol.shape[:d]
    if min(spatial) < 1:
        raise ConfigError(f"image of shape {vol.shape} is empty on the model grid")
    if halo is None:
        rf = max(spec.layers[i].receptive_field or spec.receptive_field for i in outputs)
        halo = rf * (2 if spec.global_normalization else 1)
    bpv = bytes_per_voxel(spec, outputs)
    budget = float(memory_gb) * 1024**3
    nvox = float(np.prod(vol.shape))
    if tile_size <= 0 and nvox * bpv <= budget:
        tile = max(spatial) + align  # one tile: the whole volume
    elif tile_size > 0:
        tile = int(tile_size)
    else:
        # largest core whose tile (core + 2 halos) fits the budget (2-D: slices batched)
        depth = 1 if d == 3 else vol.shape[2]
        edge = (budget / (bpv * depth)) ** (1.0 / d) - 2 * halo
        tile = max(align, int(edge))
        if edge < 2 * align:
            raise ConfigError(f"feature_memory={memory_gb} GB is too small for model '{spec.name}' (a tile with its "
                              f"{halo}-voxel halo does not fit); raise --feature-memory")
    out_shapes = []
    for s in strides:
        sp = [math.ceil(n / s) for n in spatial] + ([vol.shape[2]] if d == 2 else [])
        out_shapes.append(sp)
    results = [np.empty(tuple(sp) + (spec.layers[i].channels,), dtype=np.float32) for sp, i in zip(out_shapes, outputs)]
    axes = plan_tiles(spatial, align, halo, tile)
    import itertools

    for spans in itertools.product(*axes):
        sl = tuple(slice(s[2], s[3]) for s in spans)
        block = _pad_to_multiple(vol[sl], spec.size_multiple, d)
        if d == 3:
            batch = normalization.channels(block[None], spec.input_channels)
        else:  # slices along the third axis as a batch
            batch = normalization.channels(np.moveaxis(block, 2, 0), spec.input_channels)
        outs = extractor.run(batch, outputs)
        for r, res, s_l, i in zip(outs, results, strides, outputs):
            feat = np.moveaxis(r[0], 0, -1) if d == 3 else np.moveaxis(r, (0, 1), (2, 3))  # channel-last
            src, dst = [], []
            for k, (a, b, ia, ib) in enumerate(spans):
                if feat.shape[k] != math.ceil(block.shape[k] / s_l):
                    raise ConfigError(  # a wrong manifest is bad input (exit 2), like every manifest error
                        f"model '{spec.name}' layer {spec.layers[i].name} gives {feat.shape[k]} voxels for "
                        f"{block.shape[k]} input voxels, but its manifest stride {s_l} means "
                        f"{math.ceil(block.shape[k] / s_l)}: fix the stride in the manifest")
                o0, o1 = a // s_l, math.ceil(b / s_l)
                off = ia // s_l
                src.append(slice(o0 - off, o1 - off))
                dst.append(slice(o0, o1))
            res[tuple(dst)] = feat[tuple(src)]
    maps = []
    for res, s_l, i in zip(results, strides, outputs):
        scale = np.diag([s_l, s_l, s_l if d == 3 else 1, 1.0])
        maps.append(FeatureMap(res, grid.affine @ scale, spec.layers[i].name))
    return maps


def _pad_to_multiple(block: np.ndarray, multiple: int, d: int) -> np.ndarray:
    if multiple <= 1:
        return block
    pad = [(0, (-n) % multiple) for n in block.shape[:d]] + [(0, 0)] * (block.ndim - d)
    if not any(p[1] for p in pad):
        return block
    return np.pad(block, pad, mode="edge")
