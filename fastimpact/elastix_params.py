"""Import an elastix parameter file into fastimpact settings.

``read_elastix_parameters`` reads the elastix text format, one parameter per line::

    // a comment (elastix cuts every line at the first "//", inside quotes too)
    (NumberOfResolutions 3)
    (Metric "Impact" "AdvancedMattesMutualInformation")
    (ImpactLayersMask0 "01")

into ``{name: [value, ...]}``: quoted values stay strings ("01" keeps its leading zero),
unquoted ones become int, float or bool ("true"/"false", quoted or not) where they read as one.
A ``.toml`` file (which elastix also reads) is read with the same result shape.

``config_from_elastix`` maps the parameters onto :class:`fastimpact.config.RegistrationConfig`
fields and returns ``(fields, warnings)``: ``RegistrationConfig(**fields)`` is valid (checked
before returning, without model files), and ``warnings`` holds one line per parameter that
fastimpact ignores ("ignored: Key (reason)") or reads differently from elastix.

IMPACT parameters follow the elastix metric (``Components/Metrics/Impact``): per level ``<k>``
(0 = coarsest, as in fastimpact) ``ImpactModelsPath<k>`` lists the models and ``ImpactDimension<k>``,
``ImpactPatchSize<k>``, ``ImpactVoxelSize<k>`` (values per model axis, concatenated) and
``ImpactLayersMask<k>`` describe each; ``ImpactFixed*<k>`` / ``ImpactMoving*<k>`` replace them for
one side. ``ImpactSubsetFeatures<k>``, ``ImpactPCA<k>``, ``ImpactDistance<k>`` and
``ImpactLayersWeight<k>`` hold one value per compared layer. Keys without the level suffix are
read as the first released metric read them: entry ``k`` for level ``k`` (entry 0 when there is
none), each entry a string of per-model / per-layer values ("L2 L1"), sizes per axis.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from .errors import ConfigError
from .vocabulary import FEATURE_NORMS, TORCHSCRIPT_SUFFIXES

__all__ = ["read_elastix_parameters", "parse_elastix_text", "config_from_elastix", "config_from_elastix_chain",
           "METRIC_NAMES"]

#: elastix metric component -> fastimpact metric name.
METRIC_NAMES = {
    "AdvancedMeanSquares": "mse",
    "AdvancedNormalizedCorrelation": "ncc",
    "AdvancedMattesMutualInformation": "mi",
    "NormalizedMutualInformation": "mi",
    "Impact": "impact",
}
BENDING_PENALTY = "TransformBendingEnergyPenalty"
BSPLINE_TRANSFORMS = ("BSplineTransform", "RecursiveBSplineTransform", "AdvancedBSplineTransform")
AFFINE_TRANSFORMS = ("AffineTransform", "AffineDTITransform", "AffineLogTransform", "EulerTransform",
                     "SimilarityTransform", "TranslationTransform")
ELASTIX_DISTANCES = ("L1", "L2", "NCC", "Cosine", "L1Cosine", "Dice", "DotProduct")
# elastix's clamp of ImpactSubsetFeatures is [1, channels]; missing per-layer values take the
# defaults of the metric's first release.
IMPACT_LAYER_DEFAULTS = {"SubsetFeatures": 32, "PCA": 0, "Distance": "L2", "LayersWeight": 1.0}

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TOKEN_RE = re.compile(r'"([^"]*)"|([^\s"]+)')
_INT_RE = re.compile(r"^[+-]?(0|[1-9][0-9]*)$")
_FLOAT_RE = re.compile(r"^[+-]?([0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)([eE][+-]?[0-9]+)?$")
_IMPACT_LEVEL_RE = re.compile(r"^Impact([A-Za-z]+?)([0-9]+)$")
_MIND_RE = re.compile(r"^(?:mind[_-]?)?r([0-9]+)d([0-9]+)(?:[_-]?([23])d)?$", re.IGNORECASE)

# Parameters fastimpact does not read. key -> (value that matches fastimpact's fixed behaviour,
# or None when the key is never used; reason).
_OUTPUT = "output/logging setting: fastimpact's outputs are chosen on its command line"
_ASGD = "ASGD detail: fastimpact estimates its step sizes automatically"
_SAMPLER = "sampler detail: fastimpact draws fresh random samples every iteration, inside the fixed mask"
_FIXED_DESIGN = {
    "Registration": (("MultiResolutionRegistration", "MultiMetricMultiResolutionRegistration"),
                     "fastimpact runs one multi-resolution registration"),
    "Optimizer": (("AdaptiveStochasticGradientDescent",), "fastimpact always optimises with ASGD"),
    "ImageSampler": (("RandomCoordinate", "Random", "RandomSparseMask"),
                     "fastimpact draws random voxels inside the fixed mask"),
    "NewSamplesEveryIteration": ((True,), "fastimpact draws new samples every iteration"),
    "Interpolator": (("BSplineInterpolator", "BSplineInterpolatorFloat"),
                     "fastimpact interpolates the moving image with cubic B-splines during registration"),
    "BSplineInterpolationOrder": ((3,), "fastimpact interpolates the moving image with cubic B-splines "
                                        "during registration"),
    "Resampler": (("DefaultResampler",), "fastimpact has one resampler"),
    "BSplineTransformSplineOrder": ((3,), "fastimpact's B-spline transform is cubic"),
    "UseCyclicTransform": ((False,), "fastimpact has no cyclic B-spline transform"),
    "FixedImageDimension": ((3,), "fastimpact registers 3-D images only"),
    "MovingImageDimension": ((3,), "fastimpact registers 3-D images only"),
    "FixedInternalImagePixelType": (("float",), "fastimpact computes on float32 images"),
    "MovingInternalImagePixelType": (("float",), "fastimpact computes on float32 images"),
    "UseDirectionCosines": ((True,), "fastimpact always works in physical space with direction cosines"),
    "HowToCombineTransforms": (("Compose",), "fastimpact composes its affine and B-spline transforms"),
    "AutomaticParameterEstimation": ((True,), "fastimpact always estimates the ASGD parameters"),
    "UseAdaptiveStepSizes": ((True,), "fastimpact's ASGD always adapts its step sizes"),
    "MaximumStepLengthRatio": ((1, 1.0), "fastimpact's default max_step is elastix's with ratio 1; "
                                         "set max_step in mm instead"),
    "ErodeMask": ((False,), "fastimpact does not erode masks"),
    "ErodeFixedMask": ((False,), "fastimpact does not erode masks"),
    "ErodeMovingMask": ((False,), "fastimpact does not erode masks"),
    "FixedKernelBSplineOrder": ((0,), "fastimpact's Mattes MI uses a 0th-order fixed Parzen window"),
    "MovingKernelBSplineOrder": ((3,), "fastimpact's Mattes MI uses a cubic moving Parzen window"),
    "UseRelativeWeights": ((False,), "fastimpact weights metrics absolutely (MetricNWeight)"),
    "ImpactUseMixedPrecision": ((False,), "fastimpact runs the feature models in float32"),
    "ImpactFeaturesMapUpdateInterval": ((-1,), "fastimpact computes the moving feature maps once per level on "
                                               "the moving image's own grid and reads them at T(x), so they need "
                                               "no refresh"),
    "ImpactWriteFeatureMaps": ((False,), "feature maps are written with `fastimpact features`, not during "
                                         "registration"),
    "ImpactNormalizeLosses": ((True,), "fastimpact always normalises L1/L2 layers by the level's first value"),
    "ImpactLossNormalization": ((True,), "fastimpact always normalises L1/L2 layers by the level's first value"),
}
_IGNORED_REASONS = [
    (re.compile(r"^(Write|Result|Compress|ShowExactMetricValue|UseBinaryFormat|ITKTransformOutput|OutputDirectory|"
                r"DefaultPixelValue|FinalReducedDimension)"), _OUTPUT),
    (re.compile(r"^(SP_|Sigmoid|NoiseCompensation|NumberOfGradientMeasurements|NumberOfJacobianMeasurements|"
                r"NumberOfSamplesForExactGradient|MaximumDisplacementEstimationMethod|NumberOfBandStructureSamples|"
                r"StepSizeStrategy|UseConstantStep|AutomaticScalesEstimation|Scales|ASGDParameterEstimation)"), _ASGD),
    (re.compile(r"^(MaximumNumberOfSamplingAttempts|CheckNumberOfSamples|RequiredRatioOfValidSamples|"
                r"UseRandomSampleRegion|SampleRegionSize|SampleGridSpacing|FixedImageBSplineInterpolationOrder)"),
     _SAMPLER),
    (re.compile(r"^(UseMultiThreadingForMetrics|UseOpenCL|OpenCL)"),
     "performance setting: fastimpact's threads and device are the threads and device settings"),
    (re.compile(r"^(FixedLimitRangeRatio|MovingLimitRangeRatio|UseFastAndLowMemoryVersion|UseJacobianPreconditioning|"
                r"FiniteDifferenceDerivative|SubtractMean|UseNormalization)"),
     "metric detail not configurable in fastimpact"),
    (re.compile(r"^AutomaticTransformInitialization"), "only read for affine transforms"),
    (re.compile(r"^ImpactNumberOfChannels|^Impact(Fixed|Moving)NumberOfChannels"),
     "the model's .json manifest gives its input channels"),
    (re.compile(r"^(ModelsPath|Dimension|NumberOfChannels|PatchSize|VoxelSize|LayersMask|SubsetFeatures|"
                r"LayersWeight|PCA|Distance|Mode|GPU|FeaturesMapUpdateInterval|WriteFeatureMaps)$"),
     "pre-release IMPACT key without the 'Impact' prefix: rename it, e.g. ImpactModelsPath0"),
]


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------
def _convert(token: str, quoted: bool):
    low = token.lower()
    if low in ("true", "false"):
        return low == "true"
    if quoted:
        return token
    if _INT_RE.match(token):
        return int(token)
    if _FLOAT_RE.match(token) and not re.match(r"^[+-]?0[0-9]", token):
        return float(token)
    return token  # an unquoted word, or digits with a leading zero ("01": a layer mask)


def parse_elastix_text(text: str, source: str = "parameter text") -> dict:
    """Parse elastix parameter text into ``{name: [value, ...]}`` (see the module docstring).

    Raises ConfigError naming ``source`` and the 1-based line number for a malformed line.
    """
    params: dict = {}
    lines_of: dict = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.replace("\t", " ")
        cut = line.find("//")
        where = f"{source}, line {lineno}"
        if cut >= 0:
            if line[:cut].count('"') % 2:
                raise ConfigError(f"{where}: {raw.strip()!r} holds '//' inside quotes, where elastix ends the line "
                                  "as a comment: remove the '//' from the value (e.g. write the path without it)")
            line = line[:cut]
        line = line.strip()
        if not line:
            continue
        if not (line.startswith("(") and line.endswith(")")):
            raise ConfigError(f"{where}: {raw.strip()!r} is not an elastix parameter: write one parameter per line "
                              "as (Name value ...), comments after //")
        inner = line[1:-1]
        if inner.count('"') % 2:
            raise ConfigError(f"{where}: {raw.strip()!r} has an odd number of quotes: close every quoted string")
        tokens = [(m.group(1), True) if m.group(1) is not None else (m.group(2), False)
                  for m in _TOKEN_RE.finditer(inner)]
        if len(tokens) < 2:
            raise ConfigError(f"{where}: {raw.strip()!r} needs a parameter name and at least one value, "
                              "e.g. (NumberOfResolutions 3)")
        (name, name_quoted), values = tokens[0], tokens[1:]
        if name_quoted or not _NAME_RE.match(name):
            raise ConfigError(f"{where}: parameter name {name!r} is invalid: use an unquoted name of letters, digits "
                              "and underscores, e.g. (Metric \"AdvancedMattesMutualInformation\")")
        for tok, quoted in values:
            if not quoted and ("(" in tok or ")" in tok):
                raise ConfigError(f"{where}: {raw.strip()!r} holds a bracket outside quotes: write one parameter "
                                  "per line")
        if name in params:
            raise ConfigError(f"{where}: parameter {name} is given twice (first on line {lines_of[name]}): "
                              "keep one line per parameter")
        params[name] = [_convert(tok, quoted) for tok, quoted in values]
        lines_of[name] = lineno
    return params


def read_elastix_parameters(path) -> dict:
    """Read an elastix parameter file (``.txt`` text format, or ``.toml``) into ``{name: [values]}``.

    Names are case-sensitive, as in elastix. Values are str, int, float or bool (see module doc).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"elastix parameter file '{path}' does not exist: check the path")
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise ConfigError(f"elastix parameter file '{path}' cannot be read ({exc.strerror}): check its permissions") \
            from None
    if path.suffix.lower() == ".toml":
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"elastix parameter file '{path}' is not valid TOML: {str(exc).splitlines()[0]}") \
                from None
        return _normalise_dict(data, f"elastix parameter file '{path}'")
    return parse_elastix_text(text, source=f"elastix parameter file '{path}'")


def _normalise_dict(data, source: str) -> dict:
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a table of elastix parameters, got {type(data).__name__}")
    out = {}
    for key, value in data.items():
        if not isinstance(key, str) or not _NAME_RE.match(key):
            raise ConfigError(f"{source}: parameter name {key!r} is invalid: use letters, digits and underscores")
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if not values:
            raise ConfigError(f"{source}: parameter {key} has no value: give at least one")
        for v in values:
            if isinstance(v, (dict, list, tuple)) or v is None:
                raise ConfigError(f"{source}: parameter {key} holds {v!r}: elastix values are strings, numbers "
                                  "or booleans")
        out[key] = [(_convert(v, True) if isinstance(v, str) else v) for v in values]
    return out


# --------------------------------------------------------------------------------------------
# value helpers
# --------------------------------------------------------------------------------------------
def _fmt(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return format(v, ".10g")
    return str(v)


def _show(values) -> str:
    return " ".join(_fmt(v) for v in values)


def _as_bool(key, v) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "false"):
        return v.lower() == "true"
    raise ConfigError(f"elastix parameter {key}={v!r} is invalid: use \"true\" or \"false\"")


def _as_float(key, v) -> float:
    try:
        if isinstance(v, bool):
            raise ValueError
        f = float(v)
        if not math.isfinite(f):
            raise ValueError
        return f
    except (TypeError, ValueError):
        raise ConfigError(f"elastix parameter {key}={v!r} is invalid: use a number") from None


def _as_int(key, v) -> int:
    f = _as_float(key, v)
    if f != int(f):
        raise ConfigError(f"elastix parameter {key}={v!r} is invalid: use a whole number")
    return int(f)


def _same(values) -> bool:
    return all(v == values[0] for v in values)


def _collapse(values: list):
    """One value when every level has the same, else the per-level list."""
    return values[0] if _same(values) else list(values)


def _split_tokens(values, stars: bool = False) -> list:
    """Values with strings holding several space- (or '*'-) separated items expanded."""
    out = []
    for v in values:
        parts = (v.replace("*", " ") if stars else v).split() if isinstance(v, str) else []
        if len(parts) > 1:
            out.extend(parts)
        else:
            out.append(v)
    return out


class _Params:
    """The parameter map plus the set of keys read, so the unread ones can be reported."""

    def __init__(self, data: dict):
        self.data = data
        self.used: set = set()

    def __contains__(self, key) -> bool:
        return key in self.data

    def get(self, key, default=None):
        if key in self.data:
            self.used.add(key)
            return self.data[key]
        return default

    def first(self, key, default=None):
        values = self.get(key)
        return default if values is None else values[0]


def _per_level(p: _Params, key: str, levels: int, warnings: list, convert) -> list | None:
    """elastix's per-level reading: entry l at level l, entry 0 where a level has none."""
    values = p.get(key)
    if values is None:
        return None
    if len(values) not in (1, levels):
        warnings.append(f"{key} has {len(values)} values for {levels} levels: read as elastix does (entry l at "
                        f"level l, entry 0 where there is none{', the rest dropped' if len(values) > levels else ''})")
    return [convert(key, values[l] if l < len(values) else values[0]) for l in range(levels)]


def _one_value(p: _Params, key: str, levels: int, warnings: list, convert, what: str):
    """A per-level elastix parameter that fastimpact holds once: entry 0, with a warning if levels differ."""
    vals = _per_level(p, key, levels, warnings, convert)
    if vals is None:
        return None
    if not _same(vals):
        warnings.append(f"{key} {_show(vals)}: fastimpact uses one {what} for every level; took the first, "
                        f"{_fmt(vals[0])}")
    return vals[0]


# --------------------------------------------------------------------------------------------
# mapping
# --------------------------------------------------------------------------------------------
def config_from_elastix(path_or_dict) -> tuple:
    """Map an elastix parameter file (path) or parameter map (dict) onto RegistrationConfig fields.

    Returns ``(fields, warnings)``: ``fields`` is a dict of RegistrationConfig field names (only
    the ones the file sets; the others keep fastimpact's defaults) and ``warnings`` a list of
    one-line messages about parameters ignored or read differently. Raises ConfigError for a
    malformed file, a setting fastimpact cannot honour (a metric or transform it lacks, a
    TorchScript model it cannot map to a built-in) or fields that do not validate.
    """
    from .config import RegistrationConfig

    if isinstance(path_or_dict, dict):
        source = "elastix parameter map"
        data = _normalise_dict(path_or_dict, source)
    else:
        source = f"elastix parameter file '{path_or_dict}'"
        data = read_elastix_parameters(path_or_dict)
    p = _Params(data)
    fields: dict = {}
    warnings: list = []

    levels = p.first("NumberOfResolutions")
    if levels is not None:
        levels = _as_int("NumberOfResolutions", levels)
        fields["levels"] = levels
    else:
        levels = 3  # elastix's default, and fastimpact's
    if not 1 <= levels <= 8:
        raise ConfigError(f"elastix parameter NumberOfResolutions={levels} is invalid for fastimpact: use 1 to 8")

    kind = _map_transform(p, levels, fields, warnings)
    _map_schedule_keys(p, levels, kind, fields, warnings)
    impact_weight = _map_metrics(p, levels, fields, warnings)
    if impact_weight:
        _map_impact(p, levels, fields, warnings)
    _map_misc(p, levels, fields, warnings)
    _map_pyramid(p, levels, fields, warnings)
    _report_unused(p, levels, impact_weight, warnings)

    try:
        RegistrationConfig(**fields)
    except ConfigError as exc:
        raise ConfigError(f"{source} gives settings fastimpact rejects: {exc}") from None
    return fields, list(dict.fromkeys(warnings))


#: RegistrationConfig fields that belong to the affine stage (taken from an affine file of a chain).
_AFFINE_STAGE_FIELDS = ("affine", "affine_iterations", "rigid", "rigid_iterations", "init")


def _transform_kind(path_or_dict) -> str:
    """'affine' or 'bspline': the stage an elastix parameter file (or map) configures."""
    data = (_normalise_dict(path_or_dict, "elastix parameter map") if isinstance(path_or_dict, dict)
            else read_elastix_parameters(path_or_dict))
    name = _Params(data).get("Transform")
    return "affine" if name and len(name) == 1 and str(name[0]) in AFFINE_TRANSFORMS else "bspline"


def config_from_elastix_chain(paths) -> tuple:
    """Several elastix parameter files, chained as ``elastix -p a.txt -p b.txt`` chains them.

    elastix runs the files in order, each starting from the transform the earlier ones found; in
    fastimpact that is one registration whose affine stage is configured by the affine files
    (an Euler file: the rigid stage; similarity, affine: the affine stage; the first one's
    initialisation) and whose B-spline stage, which starts from the affine result, by the one
    B-spline file, which must come last. Settings both kinds of file give (levels, metric,
    samples, ...) are shared by fastimpact's stages: the last file's value is used, with a note.

    Returns ``(fields, warnings)`` like :func:`config_from_elastix` (one file: exactly its result).
    Raises ConfigError for a chain fastimpact cannot run as elastix would: more than one B-spline
    file, or a B-spline file before an affine one.
    """
    paths = list(paths)
    if len(paths) == 1:
        return config_from_elastix(paths[0])
    if not paths:
        raise ConfigError("no elastix parameter file given")
    names = [str(getattr(q, "name", None) or q) for q in paths]
    kinds = [_transform_kind(q) for q in paths]
    if "bspline" in kinds[:-1]:
        order = ", ".join(f"{n} ({k})" for n, k in zip(names, kinds))
        raise ConfigError(
            f"elastix parameter files {order} cannot be chained in this order: fastimpact runs the affine "
            "files' stage first and then one B-spline stage; give the affine (Euler, similarity, affine) files "
            "first and at most one B-spline file, last")
    fields: dict = {}
    warnings: list = []
    results = [config_from_elastix(q) for q in paths]
    affine_files = [i for i, k in enumerate(kinds) if k == "affine"]
    for stage in ("rigid", "affine"):
        same = [i for i in affine_files if results[i][0].get(stage)]
        if len(same) > 1:
            warnings.append(f"{', '.join(names[i] for i in same[:-1])}: folded into the {stage} stage of "
                            f"{names[same[-1]]} (fastimpact runs one {stage} stage)")
    for i, ((f, w), kind) in enumerate(zip(results, kinds)):
        for note in w:
            if kind == "bspline" and affine_files and "this file has no affine stage" in note:
                continue  # the affine files give it one
            warnings.append(f"{names[i]}: {note}")
        for key, value in f.items():
            if key in ("affine", "rigid"):  # a rigid file and an affine file each add their stage
                fields[key] = bool(fields.get(key, False) or value)
                continue
            if kind == "affine" and key == "iterations":
                continue  # an affine file's "no B-spline stage"; the B-spline file decides
            if kind == "affine" and key == "init" and "init" in fields:
                continue  # later elastix stages start from the earlier result: the first file initialises
            if key in fields and fields[key] != value and key not in _AFFINE_STAGE_FIELDS:
                warnings.append(f"{key} differs between the files ({fields[key]!r}, then {value!r} in {names[i]}): "
                                f"fastimpact's stages share one {key}: used {value!r}")
            if kind == "bspline" and key in _AFFINE_STAGE_FIELDS and affine_files:
                continue  # the affine stage's settings come from the affine files
            fields[key] = value
    if kinds[-1] == "affine":
        fields["iterations"] = 0  # affine files only: no B-spline stage, as elastix would run
    from .config import RegistrationConfig

    try:
        RegistrationConfig(**fields)
    except ConfigError as exc:
        raise ConfigError(f"elastix parameter files {', '.join(names)} give settings fastimpact rejects: {exc}") from None
    return fields, list(dict.fromkeys(warnings))


def _map_transform(p, levels, fields, warnings) -> str:
    iterations = _per_level(p, "MaximumNumberOfIterations", levels, warnings, _as_int)
    name = p.get("Transform")
    if name is None:
        warnings.append("Transform not given: fastimpact runs its default affine + B-spline registration")
        if iterations is not None:
            fields["iterations"] = _collapse(iterations)
        return "bspline"
    if len(name) != 1:
        raise ConfigError(f"elastix parameter Transform={_show(name)!r} names {len(name)} transforms: give one per "
                          "parameter file")
    name = str(name[0])
    if name in BSPLINE_TRANSFORMS:
        if iterations is not None:
            fields["iterations"] = _collapse(iterations)
        warnings.append(f"Transform {name}: this file has no affine stage; fastimpact keeps its initial alignment "
                        "(init=moments) and affine stage (affine=true): set affine=false and init=none to start "
                        "from the identity as elastix does")
        return "bspline"
    if name in AFFINE_TRANSFORMS:
        fields["iterations"] = 0
        if name == "EulerTransform":  # rotation + translation: fastimpact's rigid stage
            fields["rigid"], fields["affine"] = True, False
            if iterations is not None:
                fields["rigid_iterations"] = _collapse(iterations)
        else:
            fields["affine"] = True
            if iterations is not None:
                fields["affine_iterations"] = _collapse(iterations)
        if name not in ("AffineTransform", "EulerTransform"):
            warnings.append(f"Transform {name}: fastimpact's affine stage optimises a full affine transform "
                            "(12 parameters)")
        auto = p.first("AutomaticTransformInitialization", False)
        method = str(p.first("AutomaticTransformInitializationMethod", "GeometricalCenter"))
        if not _as_bool("AutomaticTransformInitialization", auto):
            fields["init"] = "none"
        elif method == "CenterOfGravity":
            fields["init"] = "moments"
        elif method == "GeometricalCenter":
            fields["init"] = "geometry"
        else:
            fields["init"] = "none"
            warnings.append(f"AutomaticTransformInitializationMethod {method}: fastimpact initialises with moments, "
                            "geometry or none; used none")
        return "affine"
    raise ConfigError(f"elastix parameter Transform={name!r} has no fastimpact equivalent: fastimpact runs an affine "
                      f"stage ({', '.join(AFFINE_TRANSFORMS[:1])}) and a cubic B-spline stage "
                      f"({', '.join(BSPLINE_TRANSFORMS)})")


def _map_schedule_keys(p, levels, kind, fields, warnings):
    samples = _per_level(p, "NumberOfSpatialSamples", levels, warnings, _as_int)
    if samples is not None:
        fields["samples"] = _collapse(samples)
    if kind == "affine":
        for key in ("FinalGridSpacingInPhysicalUnits", "GridSpacingSchedule", "FinalGridSpacingInVoxels"):
            if p.get(key) is not None:
                warnings.append(f"ignored: {key} (affine-only file: no B-spline grid)")
        return
    final = p.get("FinalGridSpacingInPhysicalUnits")
    if final is None:
        if p.get("FinalGridSpacingInVoxels") is not None:
            warnings.append("ignored: FinalGridSpacingInVoxels (fastimpact needs the spacing in mm: set grid_spacing)")
        if p.get("GridSpacingSchedule") is not None:
            warnings.append("ignored: GridSpacingSchedule (no FinalGridSpacingInPhysicalUnits to scale)")
        return
    p.get("FinalGridSpacingInVoxels")  # elastix uses the physical spacing when both are given
    final = [_as_float("FinalGridSpacingInPhysicalUnits", v) for v in final]
    spacing = sum(final) / len(final)
    if not _same(final):
        warnings.append(f"FinalGridSpacingInPhysicalUnits {_show(final)}: fastimpact's control-point grid is "
                        f"isotropic; used the mean, {_fmt(spacing)} mm")
    schedule = p.get("GridSpacingSchedule")
    if schedule is not None:
        sched = [_as_float("GridSpacingSchedule", v) for v in schedule]
        if len(sched) % levels:
            raise ConfigError(f"elastix parameter GridSpacingSchedule has {len(sched)} values for {levels} levels: "
                              "give one per level (or one per level and axis)")
        per = len(sched) // levels
        factors = [sum(sched[l * per:(l + 1) * per]) / per for l in range(levels)]
        doubling = all(abs(factors[l] - 2.0 * factors[l + 1]) <= 1e-9 * factors[l] for l in range(levels - 1))
        uniform = all(_same(sched[l * per:(l + 1) * per]) for l in range(levels))
        if not (doubling and uniform):
            used = [spacing * factors[-1] * 2 ** (levels - 1 - l) for l in range(levels)]
            warnings.append(f"GridSpacingSchedule {_show(sched)}: fastimpact doubles the control-point spacing per "
                            f"coarser level; spacings used {'/'.join(_fmt(s) for s in used)} mm instead of "
                            f"{'/'.join(_fmt(spacing * f) for f in factors)} mm")
        spacing *= factors[-1]
    fields["grid_spacing"] = spacing


def _map_metrics(p, levels, fields, warnings) -> float:
    """Metric terms -> ``metric`` (and ``bending_weight``); returns the IMPACT weight (0 = none)."""
    names = p.get("Metric")
    if names is None:
        warnings.append("Metric not given: fastimpact's default metric (mse) is used")
        return 0.0
    names = [str(n) for n in names]
    relative = _as_bool("UseRelativeWeights", p.first("UseRelativeWeights", False))
    if relative:
        for i in range(len(names)):
            p.get(f"Metric{i}RelativeWeight")
    terms = []
    bending = None
    for i, name in enumerate(names):
        default_w = 1.0 / len(names)  # elastix's default weight of each metric
        weights = _per_level(p, f"Metric{i}Weight", levels, warnings, _as_float) or [default_w] * levels
        use = _per_level(p, f"Metric{i}Use", levels, warnings, _as_bool) or [True] * levels
        weights = [w if u else 0.0 for w, u in zip(weights, use)]
        if name == BENDING_PENALTY:
            if any(w < 0 for w in weights):
                raise ConfigError(f"elastix parameter Metric{i}Weight of {name} is negative: use a weight >= 0")
            bending = weights
            continue
        if name not in METRIC_NAMES:
            if name.endswith("Penalty") or name == "CorrespondingPointsEuclideanDistanceMetric":
                warnings.append(f"ignored: Metric {name} (fastimpact has no such penalty; only "
                                f"{BENDING_PENALTY} is supported)")
                continue
            raise ConfigError(f"elastix Metric {name!r} has no fastimpact equivalent: use one of "
                              f"{', '.join(METRIC_NAMES)} (optionally with {BENDING_PENALTY})")
        fast = METRIC_NAMES[name]
        if name == "NormalizedMutualInformation":
            warnings.append("Metric NormalizedMutualInformation: fastimpact uses Mattes mutual information (mi)")
        if any(t[0] == fast for t in terms):
            raise ConfigError(f"elastix Metric lists two metrics that both map to {fast} ({_show(names)}): keep one")
        if not _same(weights):
            warnings.append(f"Metric{i}Weight {_show(weights)} ({name}): fastimpact weighs each metric the same at "
                            f"every level; used the first, {_fmt(weights[0])}")
        w = weights[0]
        if w <= 0:
            warnings.append(f"ignored: Metric {name} (weight 0 or switched off by Metric{i}Use)")
            continue
        terms.append((fast, w))
    if relative:
        warnings.append("UseRelativeWeights true: fastimpact weighs metrics absolutely; used MetricNWeight "
                        "(elastix default 1/N) instead of MetricNRelativeWeight")
    if not terms:
        raise ConfigError(f"elastix Metric {_show(names)} leaves no image similarity metric for fastimpact: add one "
                          f"of {', '.join(METRIC_NAMES)}")
    fields["metric"] = " + ".join(name if w == 1.0 else f"{_fmt(w)}*{name}" for name, w in terms)
    if bending is not None:
        fields["bending_weight"] = _collapse(bending)
    bin_keys = ("NumberOfHistogramBins", "NumberOfFixedHistogramBins", "NumberOfMovingHistogramBins")
    if any(n == "mi" for n, _ in terms):
        bins = _one_value(p, "NumberOfHistogramBins", levels, warnings, _as_int, "number of histogram bins")
        fixed_bins = p.get("NumberOfFixedHistogramBins")
        moving_bins = p.get("NumberOfMovingHistogramBins")
        if fixed_bins is not None or moving_bins is not None:
            if bins is None and fixed_bins == moving_bins:
                bins = _as_int("NumberOfFixedHistogramBins", fixed_bins[0])
            else:
                warnings.append("ignored: NumberOfFixedHistogramBins/NumberOfMovingHistogramBins (fastimpact uses "
                                "one number of bins for both images: NumberOfHistogramBins)")
        if bins is not None:
            fields["bins"] = bins
    else:
        for key in bin_keys:
            if p.get(key) is not None:
                warnings.append(f"ignored: {key} (no mutual information term in Metric)")
    return dict((n, w) for n, w in terms).get("impact", 0.0)


def _map_misc(p, levels, fields, warnings):
    seed = p.first("RandomSeed")
    if seed is not None:
        fields["seed"] = _as_int("RandomSeed", seed)
    threads = p.first("MaximumNumberOfThreads")
    if threads is not None:
        fields["threads"] = _as_int("MaximumNumberOfThreads", threads)
    step = _one_value(p, "MaximumStepLength", levels, warnings, _as_float, "maximum step length")
    if step is not None:
        fields["max_step"] = step
    method = _one_value(p, "ASGDParameterEstimationMethod", levels, warnings, lambda k, v: str(v),
                        "ASGD estimation method")
    if method is not None:
        table = {"Original": "original", "DisplacementDistribution": "displacement_distribution"}
        if method not in table:
            raise ConfigError(f"elastix parameter ASGDParameterEstimationMethod={method!r} is invalid: use Original "
                              "or DisplacementDistribution")
        fields["asgd_estimation"] = table[method]
    # output interpolation: the resample interpolator, with the order of a B-spline one
    resample = p.first("ResampleInterpolator")
    order = p.first("FinalBSplineInterpolationOrder")
    if resample is not None and resample not in ("FinalBSplineInterpolator", "FinalBSplineInterpolatorFloat"):
        table = {"FinalLinearInterpolator": "linear", "FinalNearestNeighborInterpolator": "nearest"}
        if resample in table:
            fields["interpolation"] = table[resample]
        else:
            warnings.append(f"ResampleInterpolator {resample}: fastimpact resamples with cubic, linear or nearest "
                            "interpolation; kept its default (cubic)")
    elif order is not None:
        table = {3: "cubic", 1: "linear", 0: "nearest"}
        order = _as_int("FinalBSplineInterpolationOrder", order)
        if order in table:
            fields["interpolation"] = table[order]
        else:
            warnings.append(f"FinalBSplineInterpolationOrder {order}: fastimpact resamples with order 3, 1 or 0; "
                            "kept its default (cubic)")
    interpolator = p.data.get("Interpolator")  # left unread: checked with the fixed-design keys
    if interpolator is not None and "BSplineInterpolationOrder" not in p:
        if str(interpolator[0]).startswith("BSplineInterpolator"):
            warnings.append("BSplineInterpolationOrder not given (elastix default 1): fastimpact interpolates the "
                            "moving image with cubic B-splines during registration")


_PYRAMIDS = {"RecursiveImagePyramid": "shrink", "ShrinkingImagePyramid": "shrink", "GenericImagePyramid": "shrink",
             "SmoothingImagePyramid": "smooth"}


def _map_pyramid(p, levels, fields, warnings):
    """FixedImagePyramid / MovingImagePyramid and their schedules (levels x 3 numbers, per level per
    axis): recursive -> shrink, smoothing -> smooth, shrinking -> shrink without smoothing, generic ->
    its rescale and smoothing schedules (sigmas in mm)."""
    kinds = {}
    for role in ("Fixed", "Moving"):
        name = p.first(f"{role}ImagePyramid")
        if name is not None:
            base = str(name)[len(role):] if str(name).startswith(role) else str(name)
            if base not in _PYRAMIDS:
                raise ConfigError(f"elastix parameter {role}ImagePyramid={name!r} is not supported: use "
                                  f"{', '.join(role + k for k in _PYRAMIDS)}")
            kinds[role] = base
    if kinds and len(set(kinds.values())) > 1:
        warnings.append(f"FixedImagePyramid {kinds.get('Fixed')} and MovingImagePyramid {kinds.get('Moving')} differ: "
                        "fastimpact builds both pyramids alike; used the fixed one")
    kind = kinds.get("Fixed", kinds.get("Moving"))
    if kind is not None:
        fields["pyramid"] = _PYRAMIDS[kind]

    def schedule(suffix):
        found = {}
        for key in (f"FixedImagePyramid{suffix}", f"MovingImagePyramid{suffix}", f"ImagePyramid{suffix}"):
            values = p.get(key)
            if values is not None:
                found[key] = values
        if not found:
            return None
        key, values = next(iter(found.items()))
        if len({tuple(map(str, v)) for v in found.values()}) > 1:
            warnings.append(f"{', '.join(found)} differ: fastimpact uses one pyramid schedule for both images; "
                            f"used {key}")
        nums = [_as_float(key, v) for v in values]
        if len(nums) == levels:
            return tuple(nums)
        if len(nums) != 3 * levels:
            raise ConfigError(f"elastix parameter {key} has {len(nums)} values: give {3 * levels} (NumberOfResolutions "
                              f"x 3 axes) or {levels}")
        return tuple(" ".join(repr(v) for v in nums[3 * l: 3 * l + 3]) for l in range(levels))

    rescale = schedule("Schedule") if kind != "GenericImagePyramid" else schedule("RescaleSchedule")
    if rescale is not None:
        fields["pyramid_schedule"] = rescale
    if kind == "GenericImagePyramid":
        smoothing = schedule("SmoothingSchedule")
        if smoothing is not None:
            fields["pyramid_sigma"] = smoothing
    elif kind == "ShrinkingImagePyramid":
        fields["pyramid_sigma"] = (0.0,) * levels


def _report_unused(p, levels, impact_weight, warnings):
    unused = [k for k in p.data if k not in p.used]
    collapsed: dict = {}
    for key in unused:
        values = p.data[key]
        if key in _FIXED_DESIGN:
            ok, reason = _FIXED_DESIGN[key]
            if all(_matches(v, ok) for v in values):
                continue
            warnings.append(f"{key} {_show(values)}: {reason}")
            continue
        m = _IMPACT_LEVEL_RE.match(key)
        if m and key.startswith("Impact"):
            base, k = m.group(1), int(m.group(2))
            if not impact_weight:
                reason = "Metric has no Impact term"
            elif k >= levels:
                reason = f"level {k} does not exist with NumberOfResolutions {levels}"
            else:
                reason = _reason(f"Impact{base}")
            collapsed.setdefault((f"Impact{base}<k>", reason), None)
            continue
        if key.startswith("Impact") and not impact_weight:
            collapsed.setdefault((key, "Metric has no Impact term"), None)
            continue
        m = re.match(r"^Metric([0-9]+)", key)
        if m:
            n_metrics = len(p.data.get("Metric", []))
            reason = (f"Metric lists no metric {m.group(1)}" if int(m.group(1)) >= n_metrics
                      else "not read with these settings")
            collapsed.setdefault((key, reason), None)
            continue
        collapsed.setdefault((key, _reason(key)), None)
    for key, reason in collapsed:
        warnings.append(f"ignored: {key} ({reason})")


def _matches(value, ok) -> bool:
    for o in ok:
        if isinstance(o, bool):
            if isinstance(value, bool) and value == o or (isinstance(value, str) and value.lower() == _fmt(o)):
                return True
        elif isinstance(o, (int, float)) and not isinstance(value, (bool, str)):
            if value == o:
                return True
        elif isinstance(o, (int, float)) and isinstance(value, str):
            try:
                if float(value) == o:
                    return True
            except ValueError:
                pass
        elif value == o:
            return True
    return False


def _reason(key: str) -> str:
    for pattern, reason in _IGNORED_REASONS:
        if pattern.search(key):
            return reason
    return "not used by fastimpact"


# --------------------------------------------------------------------------------------------
# IMPACT
# --------------------------------------------------------------------------------------------
def _jacobian_available() -> bool:
    from .config import RegistrationConfig

    try:
        RegistrationConfig(metric="impact", mode="jacobian", levels=1)
    except ConfigError:
        return False
    return True


class _ImpactReader:
    """Reads ``Impact<base><k>`` (or the unsuffixed ``Impact<base>`` entry k) for one level."""

    def __init__(self, p: _Params, levels: int, warnings: list):
        self.p, self.levels, self.warnings = p, levels, warnings

    def has(self, base: str, level: int) -> bool:
        return f"Impact{base}{level}" in self.p or f"Impact{base}" in self.p

    def entry(self, base: str, level: int, split: bool = True) -> list | None:
        key = f"Impact{base}{level}"
        if key in self.p:
            values = self.p.get(key)
            return _split_tokens(values) if split else list(values)
        key = f"Impact{base}"
        values = self.p.get(key)
        if values is None:
            return None
        if len(values) > 1:
            self.warnings.append(f"{key} has no level suffix: read as the first IMPACT release did, entry k at level "
                                 f"k (entry 0 where there is none), each entry holding the per-model/per-layer "
                                 f"values; write {key}<k> to be explicit")
        value = values[level] if level < len(values) else values[0]
        return _split_tokens([value])

    def sizes(self, base: str, level: int, dims: list) -> list | None:
        """Per-model groups of per-axis values (``dims[i]`` values for model i) of a size key."""
        key = f"Impact{base}{level}"
        if key in self.p:
            flat = _split_tokens(self.p.get(key), stars=True)
        elif f"Impact{base}" in self.p:
            flat = self._legacy_sizes(f"Impact{base}", level, dims[0])
        else:
            return None
        flat = [_as_float(key, v) for v in flat]
        if len(flat) == len(dims):  # one value per model (isotropic)
            return [[v] for v in flat]
        if len(flat) == 1:
            return [flat] * len(dims)
        if len(flat) != sum(dims):
            raise ConfigError(f"elastix parameter {key} has {len(flat)} values at level {level} for "
                              f"{len(dims)} model(s) of {'+'.join(map(str, dims))} axes: give one value per model axis")
        out, i = [], 0
        for d in dims:
            out.append(flat[i:i + d])
            i += d
        return out

    def _legacy_sizes(self, key: str, level: int, dim: int) -> list:
        # the first release read sizes axis by axis across levels ("6 6 6 3 3 3"), or one quoted
        # string per level ("1.5 1.5 1.5 1.5 1.5" for two models), entry 0 standing in for missing ones
        values = self.p.get(key)
        idx = 0
        for lv in range(level + 1):
            first = values[idx] if idx < len(values) else values[0]
            if isinstance(first, str) and len(first.replace("*", " ").split()) > 1:
                group, idx = [first], idx + 1
            else:
                group = [values[i] if i < len(values) else values[0] for i in range(idx, idx + dim)]
                idx += dim
        return _split_tokens(group, stars=True)


def _map_model(ref, dim: int, key: str, warnings: list) -> str:
    """An elastix model reference -> a fastimpact model (built-in name or .onnx/.json path)."""
    from .onnx_models import ALIASES, builtin_models

    ref = str(ref).strip()
    builtins = builtin_models()
    if ref in builtins or ref in ALIASES:
        return ref
    if any(c.isspace() for c in ref) or "," in ref:
        raise ConfigError(f"elastix parameter {key}: model path '{ref}' holds a space or comma, which fastimpact uses "
                          "to separate models: move or rename the file")
    path = Path(ref)
    suffix = path.suffix.lower()
    if suffix in (".onnx", ".json"):
        return ref
    m = _MIND_RE.match(path.stem)
    if m and suffix in TORCHSCRIPT_SUFFIXES:
        radius, dilation = int(m.group(1)), int(m.group(2))
        model_dim = int(m.group(3)) if m.group(3) else dim
        name = f"mind-r{radius}d{dilation}"
        if model_dim == 3 and name in builtins:
            warnings.append(f"{key.rstrip('0123456789')}<k>: '{ref}' imported as the built-in {name} (the same "
                            f"MIND-SSC descriptor, radius {radius}, dilation {dilation}, as an ONNX graph)")
            return name
        what = "a 2-D MIND" if model_dim == 2 else f"MIND radius {radius}, dilation {dilation}"
        raise ConfigError(f"elastix parameter {key}: TorchScript model '{ref}' ({what}) has no built-in equivalent "
                          f"(built-in MIND models: 3-D {', '.join(n for n in builtins if n.startswith('mind'))}) and "
                          "fastimpact runs ONNX models only: use a built-in, or export it to ONNX with a .json "
                          "manifest (see `fastimpact models show mind`) and give the .onnx file")
    if suffix in TORCHSCRIPT_SUFFIXES:
        raise ConfigError(f"elastix parameter {key}: TorchScript model '{ref}' has no built-in equivalent and "
                          "fastimpact runs ONNX models only: export it to ONNX (torch.onnx.export), write a .json "
                          "manifest beside it (see `fastimpact models show mind`) and give the .onnx file")
    raise ConfigError(f"elastix parameter {key}: model '{ref}' is not a built-in model ({', '.join(builtins)}) nor an "
                      ".onnx file with a .json manifest: give one of those")


def _map_impact(p, levels, fields, warnings):
    reader = _ImpactReader(p, levels, warnings)
    image_dim = _as_int("FixedImageDimension", p.data.get("FixedImageDimension", [3])[0])

    modes = _per_level(p, "ImpactMode", levels, warnings, lambda k, v: str(v).capitalize())
    if modes is None:
        modes = ["Jacobian"] * levels  # elastix's default mode
        warnings.append("ImpactMode not given: elastix's default is Jacobian")
    for m in modes:
        if m not in ("Static", "Jacobian"):
            raise ConfigError(f"elastix parameter ImpactMode={m!r} is invalid: use Static or Jacobian")
    if not _same(modes):
        warnings.append(f"ImpactMode {_show(modes)}: fastimpact uses one mode for every level; took {modes[0]}")
    mode = modes[0].lower()
    elastix_mode = modes[0]
    if mode == "jacobian" and not _jacobian_available():
        warnings.append("ImpactMode Jacobian: this fastimpact version has static mode only; imported as static "
                        "(the same features, computed as maps once per level)")
        mode = "static"
    fields["mode"] = mode

    gpu = _one_value(p, "ImpactGPU", levels, warnings, _as_int, "device")
    if gpu is not None:
        fields["device"] = "cpu" if gpu < 0 else "cuda"
        if gpu > 0:
            warnings.append(f"ImpactGPU {gpu}: fastimpact uses the first visible GPU; select this one with "
                            f"CUDA_VISIBLE_DEVICES={gpu}")

    per: dict = {k: [] for k in ("model", "moving_model", "layers", "voxel_size", "patch_size", "distance",
                                 "layer_weights", "subset", "pca", "feature_norm")}
    tiles = []
    for lv in range(levels):
        sides = {}
        for side in ("Fixed", "Moving"):
            prefix = side if reader.has(f"{side}ModelsPath", lv) else ""
            if not prefix and not reader.has("ModelsPath", lv):
                raise ConfigError(f"elastix parameter ImpactModelsPath{lv} (or Impact{side}ModelsPath{lv}) is missing: "
                                  f"the Impact metric needs the models of every level, here level {lv}")
            sides[side] = _read_models(reader, prefix, lv, image_dim, elastix_mode, warnings)
        fx, mv = sides["Fixed"], sides["Moving"]
        if len(fx["models"]) != len(mv["models"]):
            raise ConfigError(f"elastix level {lv} has {len(fx['models'])} fixed and {len(mv['models'])} moving "
                              "model(s): fastimpact compares fixed and moving models in pairs; give as many of each")
        if fx["masks"] != mv["masks"]:
            raise ConfigError(f"elastix level {lv}: fixed layers mask(s) {_show(fx['masks'])} differ from moving "
                              f"{_show(mv['masks'])}: fastimpact compares layer k of the fixed model with layer k of "
                              "the moving model; give equal ImpactFixedLayersMask/ImpactMovingLayersMask")
        if fx["voxels"] != mv["voxels"]:
            warnings.append(f"level {lv}: the moving models' ImpactVoxelSize differs from the fixed ones'; fastimpact "
                            "runs both models of a pair on the fixed model's grid spacing")
        per["model"].append(" ".join(fx["models"]))
        per["moving_model"].append(" ".join(mv["models"]))
        per["layers"].append(" ".join(fx["masks"]))
        per["voxel_size"].append(" ".join("auto" if v is None else _fmt(v) for v in fx["voxels"]))
        tiles.extend(fx["patches"] + mv["patches"])
        per["patch_size"].append(" ".join(str(e) for e in fx["edges"]) if mode == "jacobian" and fx["edges"] else "auto")

        counts = [m.count("1") for m in fx["masks"]]
        n_layers = sum(counts)
        for base, field in (("SubsetFeatures", "subset"), ("PCA", "pca"), ("Distance", "distance"),
                            ("LayersWeight", "layer_weights")):
            values = reader.entry(base, lv)
            if values is None:
                default = IMPACT_LAYER_DEFAULTS[base]
                warnings.append(f"Impact{base}{lv} not given: used the elastix default {_fmt(default)}")
                values = [default]
            if len(values) not in (1, n_layers):
                raise ConfigError(f"elastix parameter Impact{base}{lv} has {len(values)} values for the {n_layers} "
                                  f"compared layer(s) of level {lv}: give one value per layer (or one for all)")
            per[field].append(" ".join(_layer_value(base, lv, v, warnings) for v in values))
        norms = reader.entry("FeatureNormalization", lv)
        if norms is None:
            per["feature_norm"].append("none")
        else:
            norms = [str(v).lower() for v in norms]
            for v in norms:
                if v not in FEATURE_NORMS:
                    raise ConfigError(f"elastix parameter ImpactFeatureNormalization{lv}={v!r} is invalid: use none, "
                                      "l2 or standardized")
            if len(norms) == len(counts) and len(norms) != n_layers:  # one per model -> one per kept layer
                norms = [v for v, c in zip(norms, counts) for _ in range(c)]
            elif len(norms) not in (1, n_layers):
                raise ConfigError(f"elastix parameter ImpactFeatureNormalization{lv} has {len(norms)} values for "
                                  f"{len(counts)} model(s) and {n_layers} layer(s): give one per model or per layer")
            per["feature_norm"].append(" ".join(norms))

    if per["moving_model"] == per["model"]:
        del per["moving_model"]
    if all(v == "auto" for entry in per["voxel_size"] for v in entry.split()):
        del per["voxel_size"]
    if all(v == "auto" for entry in per["patch_size"] for v in entry.split()):
        del per["patch_size"]
    if all(v == "none" for entry in per["feature_norm"] for v in entry.split()):
        del per["feature_norm"]
    for field, values in per.items():
        fields[field] = _collapse(values)
    _map_tiles(tiles, mode, elastix_mode, fields, warnings)


def _read_models(reader: _ImpactReader, prefix: str, lv: int, image_dim: int, elastix_mode: str,
                 warnings: list) -> dict:
    """One side's models at level ``lv``: mapped names, layer masks, voxel sizes (mm) and patch sizes."""
    key = f"Impact{prefix}ModelsPath{lv}"
    paths = reader.entry(f"{prefix}ModelsPath", lv, split=False)
    n = len(paths)
    dims = reader.entry(f"{prefix}Dimension", lv)
    dims = [3] * n if dims is None else [_as_int(f"Impact{prefix}Dimension{lv}", d) for d in dims]
    dims = (dims + [dims[0]] * n)[:n]
    for d in dims:
        if d not in (2, 3):
            raise ConfigError(f"elastix parameter Impact{prefix}Dimension{lv}={d} is invalid: use 2 or 3")
    models = [_map_model(ref, d, key, warnings) for ref, d in zip(paths, dims)]

    masks = reader.entry(f"{prefix}LayersMask", lv)
    if masks is None:
        masks = ["1"] * n  # elastix: the first layer of each model
        warnings.append(f"Impact{prefix}LayersMask{lv} not given: elastix compares the first layer of each model; "
                        "used layers 1")
    masks = [_fmt(m) for m in masks]
    if len(masks) == 1:
        masks = masks * n
    if len(masks) != n:
        raise ConfigError(f"elastix parameter Impact{prefix}LayersMask{lv} has {len(masks)} masks for {n} model(s): "
                          "give one bit string per model")
    for m in masks:
        if not m or any(c not in "01" for c in m) or "1" not in m:
            raise ConfigError(f"elastix parameter Impact{prefix}LayersMask{lv}={m!r} is invalid: use a bit string per "
                              "model with at least one 1 (\"01\" = second layer only)")

    voxel_dims = [image_dim] * n if elastix_mode == "Static" else dims
    groups = reader.sizes(f"{prefix}VoxelSize", lv, voxel_dims)
    voxels = []
    if groups is None:
        warnings.append(f"Impact{prefix}VoxelSize{lv} not given: fastimpact runs the models at the level's spacing")
        voxels = [None] * n
    for g in groups or []:
        v = sum(g) / len(g)
        if not _same(g):
            warnings.append(f"Impact{prefix}VoxelSize{lv} {_show(g)}: fastimpact resamples to an isotropic voxel "
                            f"size; used the mean, {_fmt(v)} mm")
        voxels.append(None if v == 0 else v)
    # a static-mode patch is a tile; a Jacobian one the patch edge of each model
    groups = reader.sizes(f"{prefix}PatchSize", lv, dims) or []
    edges = []
    if elastix_mode == "Jacobian":
        for g in groups:
            edge = max(int(x) for x in g)
            if not _same(g):
                warnings.append(f"Impact{prefix}PatchSize{lv} {_show(g)}: fastimpact patches are cubes; used {edge}")
            edges.append(edge)
    return {"models": models, "masks": masks, "voxels": voxels, "edges": edges,
            "patches": [int(x) for g in groups for x in g] if elastix_mode == "Static" else []}


def _layer_value(base: str, lv: int, v, warnings: list) -> str:
    key = f"Impact{base}{lv}"
    if base == "Distance":
        names = {d.lower(): d for d in ELASTIX_DISTANCES}
        if str(v).lower() not in names:
            raise ConfigError(f"elastix parameter {key}={v!r} is invalid: use one of {', '.join(ELASTIX_DISTANCES)}")
        return str(v).lower()
    if base == "LayersWeight":
        w = _as_float(key, v)
        if w <= 0:
            raise ConfigError(f"elastix parameter {key}={v!r} is invalid: use a positive layer weight")
        return _fmt(w)
    n = _as_int(key, v)
    if n < 0:
        raise ConfigError(f"elastix parameter {key}={v!r} is invalid: use an integer >= 0")
    if base == "SubsetFeatures" and n == 0:
        # elastix clamps the subset to [1, channels]; fastimpact's 0 would mean every channel
        warnings.append(f"{key} 0: elastix clamps it to 1 channel per iteration; imported as 1 (0 means all "
                        "channels in fastimpact)")
        n = 1
    return str(n)


def _map_tiles(tiles: list, mode: str, elastix_mode: str, fields: dict, warnings: list):
    if elastix_mode != "Static" or mode != "static":
        return  # a Jacobian patch is reported with the unused keys
    nonzero = sorted({t for t in tiles if t > 0})
    if not nonzero:
        return  # 0 = the whole image, fastimpact's default
    fields["tile_size"] = nonzero[-1]
    if len(nonzero) > 1 or len(nonzero) != len(set(tiles)):
        warnings.append(f"ImpactPatchSize (static tiles) {' '.join(map(str, sorted(set(tiles))))}: fastimpact uses "
                        f"one tile edge for every model and level; used {nonzero[-1]} voxels")
