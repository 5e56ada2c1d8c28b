"""The term factory: the only table from configuration names (metric, IMPACT mode) to term
classes. A stage-level's cost term is the weighted sum of the configured metrics (the intensity
metrics in the order written, then IMPACT) and, where the stage has one, the bending penalty."""

from __future__ import annotations

import time

import numpy as np

from ..features.maps import IntensityNormalization
from ..features.settings import impact_settings, with_voxel_default
from ..metrics import make_metric
from ..metrics.impact import build_static_impact
from ..metrics.impact_dense import build_dense_impact
from ..metrics.impact_jacobian import build_jacobian_impact
from ..metrics.term import BendingPenalty, WeightedSum

__all__ = ["TermFactory", "IMPACT_BUILDERS"]

#: IMPACT mode -> the builder of a level's IMPACT term
IMPACT_BUILDERS = {"static": build_static_impact, "jacobian": build_jacobian_impact,
                   "jacobian-dense": build_dense_impact}


class TermFactory:
    """Builds the cost term of every stage-level of one registration (IMPACT terms are built once
    per level and shared by the stages: static feature maps are computed once)."""

    def __init__(self, cfg, inputs, levels, backend: str, providers, timings: dict):
        self.cfg = cfg
        self.inputs = inputs
        self.levels = levels
        self.backend = backend
        self.providers = providers
        self.timings = timings
        terms = cfg.metric_terms()
        self.impact_weight = next((w for w, name in terms if name == "impact"), None)
        self.intensity = [(w, name) for w, name in terms if name != "impact"]
        self._impact: list = [None] * cfg.levels
        self._norms: dict = {}
        if self.impact_weight is not None:
            for i in range(cfg.levels):
                impact_settings(cfg, i)  # models exist, layers and channels match: fail before any work

    def stage_term(self, i: int, param_cls, transform, bending_weight: float):
        """The weighted-sum term of stage ``param_cls`` at level ``i`` (its intensity metrics are new
        and prepared on the level's images; its IMPACT term restarts its loss normalisation)."""
        lv = self.levels[i]
        parts = []
        for w, name in self.intensity:
            options = {"bins": self.cfg.bins, "implementation": "cuda" if self.backend == "cuda" else "numba"}
            metric = make_metric(name, **(options if name == "mi" else {}))
            metric.prepare(lv.fixed.data, lv.moving.data, lv.fixed_mask, lv.moving_mask)
            parts.append((w, metric))
        if self.impact_weight is not None:
            parts.append((self.impact_weight, self.impact_term(i)))
        if bending_weight > 0:
            energy = param_cls.bending_energy(transform, self.inputs.fixed.shape)
            if energy is not None:
                parts.append((bending_weight, BendingPenalty(energy)))
        term = WeightedSum(parts)
        term.start_stage()
        return term

    def _normalizer(self, role: str):
        img, mask = ((self.inputs.fixed_f32, self.inputs.fixed_mask) if role == "fixed"
                     else (self.inputs.moving_f32, self.inputs.moving_mask))

        def get(spec):
            key = (role, spec.normalization)
            if key not in self._norms:
                self._norms[key] = IntensityNormalization.from_image(img.data, mask, spec.normalization)
            return self._norms[key]

        return get

    def impact_settings(self, i: int):
        """Level i's IMPACT settings with both images' features on one voxel size in mm (by default
        the finest spacing of the fixed level; the dense mode keeps the level's own grid)."""
        settings = impact_settings(self.cfg, i)
        if self.cfg.mode == "jacobian-dense":
            return settings
        return with_voxel_default(settings, float(np.min(self.levels[i].fixed.spacing)))

    def impact_term(self, i: int):
        """The IMPACT term of level i (built on first use)."""
        if self._impact[i] is None:
            cfg, lv = self.cfg, self.levels[i]
            t0 = time.perf_counter()
            common = dict(threads=cfg.threads, seed=cfg.seed + 104729 * (i + 1), backend=self.backend,
                          providers=self.providers, precision=cfg.precision)
            if cfg.mode == "static":
                extra = dict(fixed_mask_img=self.levels.fixed_masks[i], tile_size=cfg.tile_size,
                             memory_gb=cfg.feature_memory, timings=self.timings)
            else:
                extra = dict(moving_coef=lv.moving_coef)
                if cfg.mode == "jacobian":
                    extra["chain"] = cfg.jacobian_chain
            self._impact[i] = IMPACT_BUILDERS[cfg.mode](self.impact_settings(i), lv.fixed, lv.moving,
                                                        self._normalizer("fixed"), self._normalizer("moving"),
                                                        **common, **extra)
            if cfg.mode != "static":  # the static builder times its feature maps itself
                self.timings["features"] = self.timings.get("features", 0.0) + time.perf_counter() - t0
        return self._impact[i]
