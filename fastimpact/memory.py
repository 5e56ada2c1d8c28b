"""Peak memory of a registration, estimated from the image sizes and the settings, and checked
against what the machine offers before any work (issue 17: a job that cannot fit must fail in a
second with a message naming the real driver, not minutes later with a MemoryError).

The estimate adds the large arrays the run holds at its peak, each a named part with the setting
that controls it:

* the input images (as loaded, plus their float32 copies);
* the pyramid levels and their prefiltered B-spline coefficients (every level is kept);
* the outputs on the fixed grid (displacement field, warped image, the resampling coordinates and
  the write buffers) -- the peak of the intensity metrics;
* static IMPACT: the fixed and moving feature maps of every level (channels x voxels of the
  feature grid, float32; the feature grid has the model's voxel size, by default the finest
  spacing of the fixed level, so an anisotropic image gains voxels), the fixed gather table, and
  ONNX Runtime's inference memory (one whole volume when it fits ``feature_memory``, else one tile
  of that size; its arena is kept);
* Jacobian modes: the patches of one iteration through the patch graph and its VJP
  (samples x patch voxels), or the whole level through the full network and its VJP (dense).

Coefficients were measured with ``/usr/bin/time -v`` on synthetic CT-like pairs (float32,
0.7 x 0.7 x 1 mm; 128 x 128 x 75, 256 x 256 x 150 and 512 x 512 x 300 voxels, MI and IMPACT with
mind). The estimate is meant to be right within about 25 %: the check refuses only runs whose
estimate exceeds what is available, so a run near the limit is let through.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import RegistrationError

__all__ = ["MemoryEstimate", "available_memory", "check_memory", "check_run_memory", "estimate_peak_memory",
           "format_bytes", "out_of_memory_message", "resident_bytes"]

GB = 1024**3
#: Python, NumPy, SciPy and the compiled Numba kernels (measured: 0.25-0.3 GB resident).
BASE_BYTES = 0.3 * GB
#: ONNX Runtime and the model sessions on top of that.
ONNX_BASE_BYTES = 0.2 * GB
#: Bytes per fixed voxel at the output stage: displacement (3 x float32), warped image (float32),
#: resampling coordinates (3 x float32 at least), the gzip write buffers and the quality figures.
OUTPUT_BYTES_PER_VOXEL = 40.0
#: ONNX Runtime's resident peak relative to the manifest-based per-voxel estimate of
#: :func:`fastimpact.features.maps.bytes_per_voxel` (measured with mind: 0.3-0.8).
ORT_FACTOR = 0.75


@dataclass(frozen=True)
class MemoryPart:
    """One driver of the peak: what it is, its size (bytes) and the setting that shrinks it."""

    name: str
    bytes: float
    fix: str


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak resident memory of one run (bytes) and its parts, largest first."""

    total: float
    parts: tuple

    @property
    def largest(self) -> MemoryPart:
        return self.parts[0]

    def describe(self, n: int = 3) -> str:
        """The ``n`` largest parts, e.g. "IMPACT feature maps ... 9.1 GB, outputs ... 2.9 GB"."""
        return ", ".join(f"{p.name} {format_bytes(p.bytes)}" for p in self.parts[:n])


def format_bytes(n: float) -> str:
    if n >= 1000 * 1024**2:
        return f"{n / GB:.1f} GB"
    return f"{n / 1024**2:.0f} MB"


def _prod(shape) -> float:
    return float(np.prod([float(s) for s in shape]))


def _level_shapes(shape, factors_per_level) -> list:
    from .pyramid import level_geometry

    return [level_geometry(shape, np.eye(4), np.asarray(p.factors, dtype=np.float64))[0] for p in factors_per_level]


def _shape_text(shape) -> str:
    return " x ".join(str(int(s)) for s in shape)


def estimate_peak_memory(cfg, fixed_shape, fixed_spacing, moving_shape, moving_spacing, *,
                         fixed_itemsize: int = 4, moving_itemsize: int = 4, backend: str = "cpu") -> MemoryEstimate:
    """Estimated peak resident memory of registering with ``cfg`` (a RegistrationConfig).

    ``*_shape``: voxels (X, Y, Z); ``*_spacing``: mm per axis; ``*_itemsize``: bytes per voxel of
    the images as stored (a float32 copy is added for other types). Reads the model manifests
    (channels, strides) for IMPACT; nothing is allocated. ``backend`` "cuda" leaves out the parts
    that live in GPU memory (the ONNX Runtime inference), not the host copies.
    """
    from .pyramid import plan_pyramid

    fixed_shape = tuple(int(s) for s in fixed_shape)
    moving_shape = tuple(int(s) for s in moving_shape)
    fixed_spacing = np.asarray(fixed_spacing, dtype=np.float64)
    moving_spacing = np.asarray(moving_spacing, dtype=np.float64)
    n_f, n_m = _prod(fixed_shape), _prod(moving_shape)
    plan = plan_pyramid(fixed_spacing, moving_spacing, cfg.levels, cfg.pyramid, cfg.pyramid_schedule,
                        cfg.pyramid_sigma)
    f_levels = _level_shapes(fixed_shape, plan.fixed)
    m_levels = _level_shapes(moving_shape, plan.moving)
    image_fix = "crop the images to the region of interest or resample them coarser, or use a machine with more memory"
    parts = [
        MemoryPart("Python and the compiled kernels", BASE_BYTES, "nothing to change"),
        MemoryPart(f"the input images ({_shape_text(fixed_shape)} and {_shape_text(moving_shape)} voxels)",
                   n_f * (fixed_itemsize + (4 if fixed_itemsize != 4 else 0))
                   + n_m * (moving_itemsize + (4 if moving_itemsize != 4 else 0)), image_fix),
        # every level: fixed and moving data (float32) + the moving B-spline coefficients (float32)
        MemoryPart(f"the {cfg.levels}-level pyramid", sum(4.0 * _prod(s) for s in f_levels[:-1])
                   + sum(8.0 * _prod(s) for s in m_levels[:-1]) + 4.0 * _prod(m_levels[-1]),
                   "use fewer --levels or smaller images"),
        MemoryPart(f"the outputs on the fixed grid ({_shape_text(fixed_shape)} voxels: displacement field, "
                   "warped image)", OUTPUT_BYTES_PER_VOXEL * n_f, image_fix),
    ]
    if cfg.uses_impact():
        parts.append(MemoryPart("ONNX Runtime", ONNX_BASE_BYTES, "nothing to change"))
        parts.extend(_impact_parts(cfg, f_levels, m_levels, fixed_spacing, moving_spacing, plan, backend))
    parts = sorted(parts, key=lambda p: -p.bytes)
    return MemoryEstimate(float(sum(p.bytes for p in parts)), tuple(parts))


def _impact_parts(cfg, f_levels, m_levels, fixed_spacing, moving_spacing, plan, backend) -> list:
    from .features.maps import bytes_per_voxel
    from .features.settings import impact_settings
    from .onnx_models import load_model_spec

    parts = []
    maps_bytes, lookup_bytes, ort_bytes, patch_bytes = 0.0, 0.0, 0.0, 0.0
    maps_desc, ort_desc, patch_desc = "", "", ""
    samples = cfg.per_level("samples")
    budget = float(cfg.feature_memory) * GB
    for li in range(cfg.levels):
        level = impact_settings(cfg, li, check_files=False)
        f_sp = fixed_spacing * np.asarray(plan.fixed[li].factors, dtype=np.float64)
        m_sp = moving_spacing * np.asarray(plan.moving[li].factors, dtype=np.float64)
        # mm between the first and last voxel centres: the feature grid has floor(extent / voxel) + 1
        # voxels per axis (fastimpact.features.maps.resample_to_voxel_size)
        f_ext = (np.asarray(f_levels[li], dtype=np.float64) - 1.0) * f_sp
        m_ext = (np.asarray(m_levels[li], dtype=np.float64) - 1.0) * m_sp
        for use in level.models:
            spec = load_model_spec(use.fixed_model)
            d = spec.dimension
            outputs = [lu.index for lu in use.layers if lu.index < len(spec.layers)] or [0]
            bpv = bytes_per_voxel(spec, outputs)
            if cfg.mode == "static":
                voxel = use.voxel_size or float(np.min(f_sp))
                nf = _prod(np.floor(f_ext / voxel + 1e-6) + 1)
                nm = _prod(np.floor(m_ext / voxel + 1e-6) + 1)
                channels = sum(spec.layers[i].channels / spec.layers[i].stride ** d for i in outputs)
                pca = [lu.pca for lu in use.layers if lu.pca]
                level_maps = 4.0 * channels * (nf + nm)
                maps_bytes += level_maps
                if li == cfg.levels - 1:
                    lookup_bytes += 4.0 * channels * nf
                    maps_desc = (f"{spec.name}, {channels:g} channels on a {voxel:.3g} mm grid of "
                                 f"{nf / 1e6:.0f}M voxels per image")
                    if pca:
                        maps_desc += " before PCA"
                if backend != "cuda":
                    per_run = ORT_FACTOR * min(budget, max(nf, nm) * bpv)
                    if per_run > ort_bytes:
                        ort_bytes, ort_desc = per_run, f"{spec.name}, feature_memory {cfg.feature_memory:g} GB"
            else:
                # the level's patches through the network (jacobian) or the whole level (dense)
                if cfg.mode == "jacobian":
                    p = use.patch_size or getattr(spec, "patch_size", None) or 1
                    n_in = float(samples[li]) * float(p) ** d
                    desc = f"{spec.name}, patch {p}^{d} voxels x {samples[li]} samples"
                else:
                    n_in = _prod(m_levels[li])
                    desc = f"{spec.name} on the whole level of {n_in / 1e6:.0f}M voxels"
                # patches (fixed + moving, input channels) + the forward graph and its VJP
                need = n_in * (8.0 * spec.input_channels + 2.0 * bpv)
                if need > patch_bytes:
                    patch_bytes, patch_desc = need, desc
    if maps_bytes:
        parts.append(MemoryPart(f"IMPACT feature maps ({maps_desc})", maps_bytes + lookup_bytes,
                                "use a coarser --voxel-size, fewer --layers or a model with fewer channels"))
    if ort_bytes:
        parts.append(MemoryPart(f"ONNX Runtime inference ({ort_desc})", ort_bytes, "lower --feature-memory"))
    if patch_bytes:
        fix = ("use a smaller --patch-size or fewer --samples" if cfg.mode == "jacobian"
               else "use --mode jacobian or static, or smaller images")
        parts.append(MemoryPart(f"IMPACT {cfg.mode} mode ({patch_desc})", patch_bytes, fix))
    return parts


def _read_meminfo() -> dict:
    out = {}
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                out[key.strip()] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


def _cgroup_room() -> float | None:
    """Bytes left under the cgroup (v2 or v1) memory limit of this process, or None without one."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_file) as fh:
                raw = fh.read().strip()
            if raw == "max":
                return None
            limit = float(raw)
            if limit >= 2**60:  # v1's "no limit"
                return None
            with open(usage_file) as fh:
                usage = float(fh.read().strip())
            return max(0.0, limit - usage)
        except (OSError, ValueError):
            continue
    return None


def _address_space_room() -> float | None:
    """Bytes left under RLIMIT_AS (``ulimit -v``, ``prlimit --as``), or None without a limit."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    except (ImportError, OSError, ValueError):
        return None
    if soft in (resource.RLIM_INFINITY, -1) or soft <= 0:
        return None
    used = 0.0
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmSize:"):
                    used = float(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    return max(0.0, float(soft) - used)


def available_memory() -> tuple[float | None, str]:
    """(bytes this process can still use, where the bound comes from), or (None, "") when unknown.

    The smallest of: the memory the kernel reports available (MemAvailable), the room under a
    cgroup limit (containers, SLURM), and the room under an address-space limit (``ulimit -v``).
    """
    bounds = []
    info = _read_meminfo()
    if "MemAvailable" in info:
        bounds.append((float(info["MemAvailable"]), "available memory"))
    room = _cgroup_room()
    if room is not None:
        bounds.append((room, "the container's memory limit"))
    room = _address_space_room()
    if room is not None:
        bounds.append((room, "the address-space limit (ulimit -v)"))
    if not bounds:
        return None, ""
    return min(bounds, key=lambda b: b[0])


def resident_bytes() -> float:
    """This process's resident memory now (VmRSS), 0 where unknown."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return float(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


def check_memory(estimate: MemoryEstimate, budget_gb: float | None = None, *, in_use: float | None = None) -> None:
    """Raise RegistrationError (one line) when ``estimate`` exceeds ``budget_gb`` (GB) or what the
    machine still offers; name the largest parts and how to shrink the largest.

    ``in_use``: bytes the process already holds that the estimate counts (default: its resident
    memory now, e.g. the images already loaded); the machine's limits bound only the rest.
    """
    in_use = resident_bytes() if in_use is None else float(in_use)
    limits = []  # (limit on the whole run's peak, what it is)
    if budget_gb is not None:
        limits.append((float(budget_gb) * GB, f"the --memory budget of {float(budget_gb):g} GB"))
    avail, source = available_memory()
    if avail is not None:
        limits.append((avail + min(in_use, estimate.total), f"{source}"))
    if not limits:
        return
    limit, what = min(limits, key=lambda b: b[0])
    if estimate.total <= limit:
        return
    top = estimate.largest
    if top.fix == "nothing to change":  # the fixed costs alone exceed the limit
        fix = (f"raise --memory to at least {format_bytes(estimate.total)}" if budget_gb is not None
               and limit == float(budget_gb) * GB else "use a machine with more memory")
        top = MemoryPart(top.name, top.bytes, fix)
    raise RegistrationError(
        f"this run needs about {format_bytes(estimate.total)} of memory but {what} allows "
        f"{format_bytes(limit)}; the largest parts: {estimate.describe()}; to fit, {top.fix}")


def out_of_memory_message(estimate: MemoryEstimate | None) -> str:
    """One line for a MemoryError that still happens: what the run needed and what to change."""
    if estimate is None:
        return ("out of memory: crop or resample the images coarser, use a coarser --voxel-size (IMPACT) or a "
                "lower --feature-memory, or a machine with more memory")
    return (f"out of memory: this run needs about {format_bytes(estimate.total)} (largest parts: "
            f"{estimate.describe()}); to fit, {estimate.largest.fix}")


def check_run_memory(cfg, fixed, moving, backend: str = "cpu") -> MemoryEstimate:
    """The driver's check before any work: estimate the peak of registering the Images ``fixed``
    and ``moving`` (already loaded) with ``cfg`` and refuse it (RegistrationError) when it does not
    fit ``cfg.memory`` or the machine. Returns the estimate (for the report)."""
    est = estimate_peak_memory(cfg, fixed.shape, fixed.spacing, moving.shape, moving.spacing,
                               fixed_itemsize=np.dtype(fixed.data.dtype).itemsize,
                               moving_itemsize=np.dtype(moving.data.dtype).itemsize, backend=backend)
    check_memory(est, getattr(cfg, "memory", None))
    return est


def image_header(path) -> tuple[tuple, tuple, int]:
    """(shape, spacing mm, bytes per voxel) of an image file from its header, without reading the
    data (NIfTI through nibabel); raises the loaders' errors for unreadable files."""
    import nibabel as nib

    img = nib.load(str(path))
    shape = tuple(int(s) for s in img.shape[:3])
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    itemsize = int(np.dtype(img.get_data_dtype()).itemsize)
    if getattr(img.header, "get_slope_inter", None) is not None:
        slope, inter = img.header.get_slope_inter()
        if slope not in (None, 1.0) or inter not in (None, 0.0):
            itemsize = max(itemsize, 4)  # scaled data comes back as floats
    return shape, zooms, itemsize
