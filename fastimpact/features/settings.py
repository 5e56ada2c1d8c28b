"""IMPACT settings of one pyramid level, resolved from a RegistrationConfig.

Each IMPACT field of the config holds one entry per level (or one entry for every level). An
entry holds one value per model (``model``, ``moving_model``, ``layers``, ``voxel_size``,
``patch_size``) or per
kept layer over all models in order (``distance``, ``layer_weights``, ``subset``, ``pca``,
``feature_norm``), as a space-separated string ("l2 l1") or a list; a single value applies to
every model / layer.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..vocabulary import DISTANCE_NAMES, FEATURE_NORMS



@dataclass(frozen=True)
class LayerUse:
    """One compared layer: output ``index`` of the fixed and of the moving model."""

    index: int
    distance: str
    weight: float
    subset: int
    pca: int
    feature_norm: str


@dataclass(frozen=True)
class ModelUse:
    """A (fixed model, moving model) pair and the layers compared at one level."""

    fixed_model: str
    moving_model: str
    voxel_size: float | None
    layers: tuple  # of LayerUse
    patch_size: int | None = None  # jacobian mode (None: the model's default)


@dataclass(frozen=True)
class ImpactLevel:
    mode: str
    models: tuple  # of ModelUse

    @property
    def n_layers(self) -> int:
        return sum(len(m.layers) for m in self.models)


def split_entry(value) -> list:
    """One level's entry as a list of per-model / per-layer values."""
    if value is None:
        return [None]
    if isinstance(value, str):
        parts = value.replace(",", " ").split()
        return parts or [value]
    if isinstance(value, (list, tuple)):
        out = []
        for v in value:
            out.extend(split_entry(v) if isinstance(v, str) else [v])
        return out
    return [value]


def _spread(name: str, values: list, n: int, what: str, level: int) -> list:
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise ConfigError(f"{name} has {len(values)} values at level {level + 1} for {n} {what}: give one value "
                          f"(applies to all) or exactly {n}")
    return values


def _is_default(v) -> bool:
    """``None`` / "none" / "auto": the built-in default of a per-model value."""
    return v is None or (isinstance(v, str) and v.strip().lower() in ("none", "auto"))


def _as_int(name, v, lo, what=None):
    try:
        if isinstance(v, bool):
            raise ValueError
        iv = int(v)
        if iv != float(v) or iv < lo:
            raise ValueError
        return iv
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={v!r} is invalid: use {what or f'an integer >= {lo}'}") from None


def _as_float(name, v, positive=True, what=None):
    try:
        if isinstance(v, bool):
            raise ValueError
        fv = float(v)
        if not (fv == fv) or fv in (float("inf"), float("-inf")) or (positive and fv <= 0) or fv < 0:
            raise ValueError
        return fv
    except (TypeError, ValueError):
        what = what or f"a {'positive' if positive else 'non-negative'} number"
        raise ConfigError(f"{name}={v!r} is invalid: use {what}") from None


_CHECKED_MODELS: dict = {}


def check_user_model(spec) -> None:
    """Check a user model's ONNX graphs against its manifest before any work (ConfigError, one line).

    Built-in models are skipped (their graphs are tested). Checked: what
    :func:`fastimpact.onnx_models.validate_with_runtime` checks (input rank, output count, the
    patch and VJP graphs' names and channels) and, on the full graph, the input channels and
    each output's rank and channels where the graph fixes them. Without this a wrong manifest
    surfaced in the middle of the run as ONNX Runtime's own text, with exit status 1 or 2 by
    where it happened. Results are cached per file version (the driver asks once per level).
    """
    from pathlib import Path

    from .. import onnx_models

    manifest = getattr(spec, "manifest_path", None)
    if manifest is None or Path(manifest).resolve().parent == Path(onnx_models.__file__).resolve().parent:
        return
    files = [Path(manifest), Path(spec.path)] + [Path(p) for p in (getattr(spec, "patch_path", None),
                                                                   getattr(spec, "vjp_path", None),
                                                                   getattr(spec, "vjp_full_path", None)) if p]
    key = tuple((str(f), f.stat().st_mtime_ns if f.is_file() else None) for f in files)
    if key in _CHECKED_MODELS:
        return
    sess = onnx_models._open_session(spec.path)
    rank = spec.dimension + 2
    dims = sess.get_inputs()[0].shape
    if len(dims) != rank:
        raise ConfigError(f"model '{spec.name}': the ONNX graph takes an input of rank {len(dims)} {dims}, but the "
                          f"manifest's dimension {spec.dimension} means rank {rank}; fix 'dimension' in the manifest")
    onnx_models.validate_with_runtime(spec)
    if isinstance(dims[1], int) and dims[1] != spec.input_channels:
        raise ConfigError(f"model '{spec.name}': the ONNX graph takes {dims[1]} input channel(s) {dims}, its manifest "
                          f"says input_channels={spec.input_channels}; fix the manifest")
    for out, layer in zip(sess.get_outputs(), spec.layers):
        if len(out.shape) != rank or (isinstance(out.shape[1], int) and out.shape[1] != layer.channels):
            raise ConfigError(f"model '{spec.name}': output '{out.name}' of the ONNX graph has shape {out.shape}, its "
                              f"manifest says layer '{layer.name}' has {layer.channels} channels (rank {rank}); fix "
                              "the manifest")
    _CHECKED_MODELS[key] = True


def impact_settings(cfg, level: int, *, check_files: bool = True) -> ImpactLevel:
    """Resolve the IMPACT settings of pyramid ``level`` (0 = coarsest).

    With ``check_files`` the models are loaded (manifests read) and the layer masks checked
    against their layer counts, and fixed/moving layers must have equal channel counts.
    """
    from ..onnx_models import load_model_spec

    pick = {name: cfg.per_level(name)[level] for name in
            ("model", "moving_model", "layers", "voxel_size", "patch_size", "distance", "layer_weights", "subset", "pca",
             "feature_norm")}
    models = [str(m) for m in split_entry(pick["model"]) if m is not None]
    if not models:
        raise ConfigError("model is empty: give a model name (e.g. mind) or an .onnx file")
    n_models = len(models)
    moving = split_entry(pick["moving_model"])
    moving = models if moving == [None] else [str(m) for m in _spread("moving_model", moving, n_models, "models", level)]
    layers = _spread("layers", split_entry(pick["layers"]), n_models, "models", level)
    voxel = _spread("voxel_size", split_entry(pick["voxel_size"]), n_models, "models", level)
    # 0 is refused, not read as "default": a zero voxel or patch has no meaning, and taking it as
    # the default would run something other than what was asked for
    voxel = [None if _is_default(v) else _as_float("voxel_size", v, what="a size in mm > 0, or auto (the level's "
                                                   "spacing)") for v in voxel]
    patch = _spread("patch_size", split_entry(pick["patch_size"]), n_models, "models", level)
    patch = [None if _is_default(v) else _as_int("patch_size", v, 1, what="an odd number of voxels >= 1, or auto "
                                                 "(the model's)") for v in patch]
    for v in patch:
        if v is not None and v % 2 == 0:
            raise ConfigError(f"patch_size={v} is invalid: use an odd number of voxels (the patch has a centre voxel)")

    masks = []
    for i, mask in enumerate(layers):
        if mask is None:
            masks.append(None)
            continue
        mask = str(mask)
        if not mask or any(c not in "01" for c in mask) or "1" not in mask:
            raise ConfigError(f"layers={mask!r} is invalid: use a bit string with one bit per model output layer and "
                              "at least one 1 (e.g. 01 = second layer only)")
        masks.append(mask)
    specs = None
    if check_files:
        specs = []
        for fm, mm in zip(models, moving):
            fs, ms = load_model_spec(fm), load_model_spec(mm)
            for spec in (fs, ms):
                check_user_model(spec)
            specs.append((fs, ms))
    kept = []
    for i in range(n_models):
        if specs is not None:
            fs, ms = specs[i]
            n_out = len(fs.layers)
            if masks[i] is not None and len(masks[i]) > n_out:
                raise ConfigError(f"layers={masks[i]!r} has {len(masks[i])} bits but model '{fs.name}' has {n_out} "
                                  f"output layers ({', '.join(l.name for l in fs.layers)}); give at most {n_out} bits")
            idx = list(range(n_out)) if masks[i] is None else [k for k, c in enumerate(masks[i]) if c == "1"]
            for k in idx:
                if k >= len(ms.layers) or ms.layers[k].channels != fs.layers[k].channels:
                    raise ConfigError(
                        f"fixed model '{fs.name}' and moving model '{ms.name}' differ at layer {k}: the compared layers "
                        "must have the same number of channels; choose matching models or layers")
        else:
            idx = [0] if masks[i] is None else [k for k, c in enumerate(masks[i]) if c == "1"]
        kept.append(idx)
    n_layers = sum(len(k) for k in kept)
    dist = _spread("distance", split_entry(pick["distance"]), n_layers, "layers", level)
    weights = _spread("layer_weights", split_entry(pick["layer_weights"]), n_layers, "layers", level)
    subset = _spread("subset", split_entry(pick["subset"]), n_layers, "layers", level)
    pca = _spread("pca", split_entry(pick["pca"]), n_layers, "layers", level)
    norm = _spread("feature_norm", split_entry(pick["feature_norm"]), n_layers, "layers", level)
    out, j = [], 0
    for i in range(n_models):
        uses = []
        for k in kept[i]:
            d = str(dist[j]).lower()
            if d not in DISTANCE_NAMES:
                raise ConfigError(f"distance={dist[j]!r} is invalid: choose one of {', '.join(DISTANCE_NAMES)}")
            fnorm = str(norm[j]).lower()
            if fnorm not in FEATURE_NORMS:
                raise ConfigError(f"feature_norm={norm[j]!r} is invalid: choose one of {', '.join(FEATURE_NORMS)}")
            if d == "dice" and fnorm == "standardized":
                raise ConfigError("distance=dice with feature_norm=standardized is invalid: standardised feature "
                                  "vectors sum to 0, so Dice's denominator vanishes; use feature_norm none or l2")
            sub = _as_int("subset", subset[j], 0)
            npca = _as_int("pca", pca[j], 0)
            if specs is not None:
                channels = specs[i][0].layers[k].channels
                if npca > channels:
                    raise ConfigError(f"pca={npca} exceeds the {channels} channels of layer {k} of model "
                                      f"'{specs[i][0].name}': use at most {channels} (0 = off)")
                # the subset is drawn from the compared channels: the principal components when
                # PCA is on (static mode), else the layer's channels
                pool, what = (npca, f"{npca} principal components kept (pca={npca})") \
                    if npca and cfg.mode == "static" else (channels, f"{channels} channels")
                if sub > pool:
                    raise ConfigError(f"subset={sub} exceeds the {what} of layer {k} of model '{specs[i][0].name}': "
                                      f"use at most {pool} (0 = all)")
            uses.append(LayerUse(k, d, _as_float("layer_weights", weights[j], positive=True), sub, npca, fnorm))
            j += 1
        out.append(ModelUse(models[i], moving[i], voxel[i], tuple(uses), patch[i]))
    return ImpactLevel(cfg.mode, tuple(out))


def with_voxel_default(level: ImpactLevel, voxel_mm: float) -> ImpactLevel:
    """``level`` with every model that has no ``voxel_size`` set to ``voxel_mm``: the fixed and the
    moving features of a level are always computed on one voxel size in mm (the driver passes the
    finest spacing of the fixed level grid, the same for both images whatever their own grids)."""
    from dataclasses import replace

    return replace(level, models=tuple(m if m.voxel_size is not None else replace(m, voxel_size=float(voxel_mm))
                                       for m in level.models))
