"""Registration configuration: one frozen dataclass, validated on construction.

A per-level field takes a scalar (applies to every level) or a list with one value per level
(a one-element list also applies to every level; any other length is an error). Files are TOML
or JSON with the same field names; unknown keys are rejected with the list of valid ones.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .pyramid import PYRAMID_KINDS, plan_pyramid
from .vocabulary import DEVICES, IMPACT_MODES, INTERPOLATIONS, JACOBIAN_CHAINS, METRIC_NAMES, PRECISIONS

INIT_NAMES = ("moments", "geometry", "none")
ASGD_ESTIMATIONS = ("original", "displacement_distribution")
PER_LEVEL = ("iterations", "samples", "affine_iterations", "rigid_iterations", "bending_weight")
# IMPACT settings: per level (scalar or one entry per level); an entry holds one value per model
# (model, moving_model, layers, voxel_size, patch_size) or per kept layer (distance, layer_weights, subset,
# pca, feature_norm), written as a space-separated string ("l2 l1") or a list; one value applies
# to every model / layer.
IMPACT_PER_LEVEL = ("model", "moving_model", "layers", "voxel_size", "patch_size", "distance", "layer_weights", "subset", "pca",
                    "feature_norm")
FOV_MASK_MODES = ("auto", "off")
#: settings that only the IMPACT metric reads
IMPACT_ONLY = ("mode",) + IMPACT_PER_LEVEL + ("jacobian_chain", "tile_size", "feature_memory", "precision")


@dataclass(frozen=True)
class RegistrationConfig:
    """All settings of one registration (units: mm, voxels, counts).

    metric: similarity to minimise: mse | ncc | mi | impact, or a weighted sum such as
        "impact + 0.1*mi" (each term ``[weight*]name``).
    levels: pyramid levels; level l has the target spacing 2**(levels-1-l) times the smallest voxel
        spacing of the two images, the same in mm for fixed and moving (see fastimpact.pyramid).
    pyramid: shrink (smoothing + per-axis downsampling; an axis is never made coarser than the
        level's target spacing) or smooth (elastix's smoothing pyramid: no downsampling).
    pyramid_schedule: explicit shrink factors per level (coarse to fine), one number or three per
        level (per image axis, voxels), as elastix's FixedImagePyramidSchedule; None = automatic.
    pyramid_sigma: explicit Gaussian sigmas in mm per level (one number or three); None = 0.5 x the
        level's spacing on shrunk axes (shrink) or on every axis (smooth).
    fov_mask: auto (an image given without a mask whose real data fill a cylinder inside a constant
        background, as cone-beam CT, gets that field of view as its mask; see fastimpact.fov) or off.
    iterations / samples: ASGD iterations and random samples per iteration of the B-spline stage
        (0 iterations skip a level; 0 at every level gives an affine-only registration).
    grid_spacing: B-spline control-point spacing at the finest level, mm; doubled per coarser level.
    affine: run an optimised affine stage before the B-spline stage.
    affine_iterations: ASGD iterations per level of the affine stage.
    rigid: run a rigid stage (rotation about the centre + translation, 6 parameters) before the
        affine stage (or instead of it, with affine false).
    rigid_iterations: ASGD iterations per level of the rigid stage.
    init: initial affine: moments (centres of mass), geometry (image centres) or none.
    initial_transform: a file with the initial affine (fastimpact transform.json, ITK .tfm/.h5/.mat, elastix
        TransformParameters file; fixed -> moving), used instead of ``init`` (default none).
    bins: histogram bins of Mattes mutual information.
    bending_weight: weight of the bending-energy penalty added to the metric (0 = off).
    max_step: ASGD maximum step length in mm (elastix's default: mean x/y spacing of the inputs).
    asgd_estimation: ASGD automatic step estimation, elastix's "original" (Klein et al. 2009,
        the default) or "displacement_distribution" (Qiao et al. 2016; calibrates the gain on one
        gradient at the start, so it overshoots when a level starts near its optimum).
    interpolation: interpolation of the warped output image.
    seed: random seed; identical seeds give identical results on one machine.
    threads: CPU threads for the kernels (default: all cores).
    device: cpu | cuda | auto.

    IMPACT (metric "impact"; see fastimpact.features.settings for how per-model / per-layer
    entries are read):
    mode: static (feature maps once per level, read at T(x)), jacobian (a patch per sample through
        the network and its VJP graph every iteration) or jacobian-dense (the warped moving image
        through the full network and its full-volume VJP graph every iteration; for the GPU).
    model: feature extractor(s): a built-in name (``fastimpact models list``) or an .onnx file with
        a .json manifest; several models space-separated.
    moving_model: model(s) for the moving image (default: the same as ``model``).
    layers: per model, a bit string over its output layers ("01" = second layer only; default all).
    voxel_size: per model, mm spacing of the grid the model sees (default: the level's spacing).
    patch_size: jacobian mode: per model, patch edge in voxels (default: the model's manifest).
    jacobian_chain: jacobian mode: "centre" (the reference's approximation: dT/dtheta of every
        patch voxel taken at the patch centre) or "exact" (each patch voxel's own dT/dtheta).
    distance: per kept layer: l1 | l2 | ncc | cosine | l1cosine | dice | dotproduct.
    layer_weights: per kept layer, weight of its distance.
    subset: per kept layer, channels drawn at random each iteration (0 = all).
    pca: per kept layer, principal components kept (static mode; 0 = off).
    feature_norm: per kept layer: none | l2 | standardized (per sample feature vector).
    tile_size: static mode: tile edge in voxels for tiled inference (0 = whole volume when it fits
        feature_memory, else tiles chosen automatically).
    feature_memory: static mode: memory budget of one inference, GB.
    precision: arithmetic of the feature networks: fp32 (exact float32), tf32 (float32 storage,
        TensorFloat-32 matrix products on the GPU; the same as fp32 on the CPU) or fp16 (graphs
        converted to float16 with float32 inputs and outputs; GPU only: refused on the CPU).
    memory: memory budget of the whole run, GB (None: what the machine offers); a run whose
        estimated peak (fastimpact.memory) exceeds it, or the available memory, is refused before
        any work.
    """

    metric: str = "mse"
    levels: int = 3
    pyramid: str = "shrink"
    pyramid_schedule: Any = None
    pyramid_sigma: Any = None
    fov_mask: str = "auto"
    iterations: Any = 500
    samples: Any = 2000
    grid_spacing: float = 8.0
    affine: bool = True
    affine_iterations: Any = 250
    rigid: bool = False
    rigid_iterations: Any = 250
    init: str = "moments"
    initial_transform: str | None = None
    bins: int = 32
    bending_weight: Any = 0.0
    max_step: float | None = None
    asgd_estimation: str = "original"
    interpolation: str = "cubic"
    seed: int = 0
    threads: int | None = None
    device: str = "cpu"
    mode: str = "static"
    model: Any = "mind"
    moving_model: Any = None
    layers: Any = None
    voxel_size: Any = None
    patch_size: Any = None
    jacobian_chain: str = "centre"
    distance: Any = "l2"
    layer_weights: Any = 1.0
    subset: Any = 0
    pca: Any = 0
    feature_norm: Any = "none"
    tile_size: int = 0
    feature_memory: float = 4.0
    precision: str = "fp32"
    memory: float | None = None

    def __post_init__(self):
        for name in PER_LEVEL + IMPACT_PER_LEVEL + ("pyramid_schedule", "pyramid_sigma"):  # lists and tuples
            # compare equal after a file round trip
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        self.metric_terms()  # validates the metric expression
        _choice("mode", self.mode, IMPACT_MODES)
        _choice("jacobian_chain", self.jacobian_chain, JACOBIAN_CHAINS)
        _choice("precision", self.precision, PRECISIONS)
        _choice("init", self.init, INIT_NAMES)
        _choice("pyramid", self.pyramid, PYRAMID_KINDS)
        _choice("fov_mask", self.fov_mask, FOV_MASK_MODES)
        if self.pyramid_schedule is not None or self.pyramid_sigma is not None:
            plan_pyramid((1.0, 1.0, 1.0), (1.0, 1.0, 1.0), self.levels, self.pyramid, self.pyramid_schedule,
                         self.pyramid_sigma)  # validates both schedules
        _choice("interpolation", self.interpolation, INTERPOLATIONS)
        _choice("device", self.device, DEVICES)
        _choice("asgd_estimation", self.asgd_estimation, ASGD_ESTIMATIONS)
        _int("levels", self.levels, 1, 8)
        _int("bins", self.bins, 4, 1024)
        _int("seed", self.seed, 0, 2**63 - 1)
        if self.threads is not None:
            _int("threads", self.threads, 1, 4096)
        _number("grid_spacing", self.grid_spacing, positive=True)
        if self.max_step is not None:
            _number("max_step", self.max_step, positive=True)
        _int("tile_size", self.tile_size, 0, 100_000)
        _number("feature_memory", self.feature_memory, positive=True)
        if self.memory is not None:
            _number("memory", self.memory, positive=True)
        if not self.uses_impact():
            defaults = {f.name: f.default for f in fields(self)}
            changed = [name for name in IMPACT_ONLY if getattr(self, name) != defaults[name]]
            if changed:
                raise ConfigError(
                    f"{changed[0]}={getattr(self, changed[0])!r} (--{changed[0].replace('_', '-')}) applies to the IMPACT "
                    f"metric, but the metric is {self.metric!r}: add impact to the metric (e.g. 'impact' or "
                    f"'impact+0.1*mi') or drop {changed[0]}")
        if self.uses_impact():
            from .features.settings import impact_settings

            for level in range(self.levels):
                impact_settings(self, level, check_files=False)
            if self.device == "cpu":  # device auto: checked by the driver once the device is known
                from .features.precision import check_precision

                check_precision(self.precision, "cpu")
        if not isinstance(self.affine, bool):
            raise ConfigError(f"affine={self.affine!r} is invalid: use true or false")
        if not isinstance(self.rigid, bool):
            raise ConfigError(f"rigid={self.rigid!r} is invalid: use true or false")
        for name in PER_LEVEL:
            values = self.per_level(name)
            for v in values:
                if name == "bending_weight":
                    _number(name, v, positive=False)
                    if v < 0:
                        raise ConfigError(f"bending_weight={v!r} is invalid: use a weight >= 0")
                elif name == "samples":
                    _int(name, v, 16, 10_000_000)
                else:
                    _int(name, v, 0, 1_000_000)  # 0 skips the level (0 everywhere: affine only)
        if (sum(self.per_level("iterations")) == 0 and (not self.affine or sum(self.per_level("affine_iterations")) == 0)
                and (not self.rigid or sum(self.per_level("rigid_iterations")) == 0)):
            raise ConfigError(
                "iterations and affine_iterations are 0 at every level: nothing would be optimised; "
                "give the B-spline stage iterations (e.g. --iterations 500) or keep --affine with iterations"
            )

    def metric_terms(self) -> tuple:
        """((weight, name), ...) of the metric expression, e.g. "impact + 0.1*mi"."""
        return parse_metric(self.metric)

    def uses_impact(self) -> bool:
        return any(name == "impact" for _, name in self.metric_terms())

    def per_level(self, name: str) -> tuple:
        """The value of field ``name`` for each level, coarse to fine."""
        value = getattr(self, name)
        if isinstance(value, (list, tuple)):
            if len(value) == 1:
                return tuple(value) * self.levels
            if len(value) != self.levels:
                raise ConfigError(
                    f"{name} has {len(value)} values for {self.levels} levels: give one value "
                    f"(applies to every level) or exactly {self.levels}"
                )
            return tuple(value)
        return (value,) * self.levels

    def grid_spacings(self) -> tuple:
        return tuple(self.grid_spacing * 2 ** (self.levels - 1 - i) for i in range(self.levels))

    def with_options(self, **options) -> "RegistrationConfig":
        names = {f.name for f in fields(self)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise ConfigError(
                f"unknown option(s) {', '.join(unknown)}: valid options are {', '.join(sorted(names))}"
            )
        return replace(self, **{k: v for k, v in options.items()})

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict, source: str = "configuration") -> "RegistrationConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"{source} must be a table of settings, got {type(data).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(
                f"{source}: unknown setting(s) {', '.join(unknown)}; valid settings are "
                f"{', '.join(sorted(names))}"
            )
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items()})

    # --- files -------------------------------------------------------------------------------
    @classmethod
    def load(cls, path) -> "RegistrationConfig":
        return cls.from_dict(read_config_file(path), source=f"config file '{path}'")

    def save(self, path) -> None:
        path = Path(path)
        data = {k: v for k, v in self.to_dict().items() if v is not None}
        if path.suffix.lower() == ".json":
            path.write_text(json.dumps(data, indent=2) + "\n")
        else:
            path.write_text(_to_toml(data))


def parse_metric(expr) -> tuple:
    """Parse a metric expression: ``name`` or a sum of ``[weight*]name`` terms."""
    if not isinstance(expr, str) or not expr.strip():
        raise ConfigError(f"metric={expr!r} is invalid: choose one of {', '.join(METRIC_NAMES)} or a sum such as 'impact+0.1*mi'")
    terms = []
    for raw in expr.replace(" ", "").lower().split("+"):
        weight, _, name = raw.rpartition("*")
        if name not in METRIC_NAMES:
            raise ConfigError(f"metric={expr!r}: unknown metric {name!r}; choose one of {', '.join(METRIC_NAMES)} "
                              "(a sum: 'impact+0.1*mi')")
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            raise ConfigError(f"metric={expr!r}: weight {weight!r} of {name} is not a number (write e.g. 0.1*mi)") from None
        if not math.isfinite(w) or w <= 0:
            raise ConfigError(f"metric={expr!r}: the weight of {name} must be a positive number")
        if any(n == name for _, n in terms):
            raise ConfigError(f"metric={expr!r} names {name} twice: give each metric once")
        terms.append((w, name))
    return tuple(terms)


def read_config_file(path) -> dict:
    """Read a TOML or JSON settings file into a dict (clear errors for bad files)."""
    import tomllib

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist: check the path given to --config")
    text = path.read_text(errors="replace")
    try:
        if path.suffix.lower() == ".json":
            return json.loads(text)
        return tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        msg = str(exc).splitlines()[0]
        raise ConfigError(f"config file '{path}' is not valid {path.suffix.lstrip('.').upper() or 'TOML'}: {msg}") from None


def _to_toml(data: dict) -> str:
    def fmt(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return repr(v)

    return "".join(f"{k} = {fmt(v)}\n" for k, v in data.items())


def _choice(name, value, allowed):
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is invalid: choose one of {', '.join(allowed)}")


def _int(name, value, lo, hi):
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"{name}={value!r} is invalid: use an integer from {lo} to {hi}")


def _number(name, value, positive):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (positive and value <= 0):
        what = "a positive number" if positive else "a finite number"
        raise ConfigError(f"{name}={value!r} is invalid: use {what}")
