"""The closed name sets of fastimpact, defined once (configuration, CLI, elastix import, models).

Every module that accepts one of these names validates it against the tuple here, so a new name
is added in one place.
"""

from __future__ import annotations

#: similarity terms of a metric expression ("impact + 0.1*mi")
METRIC_NAMES = ("mse", "ncc", "mi", "impact")
#: the intensity metrics (compare sampled intensities f, m)
INTENSITY_METRICS = ("mse", "ncc", "mi")
#: how the IMPACT term gets its moving features
IMPACT_MODES = ("static", "jacobian", "jacobian-dense")
#: the Jacobian mode's chain from patch gradients to the transform
JACOBIAN_CHAINS = ("centre", "exact")
#: feature distances (fastimpact.features.distances)
DISTANCE_NAMES = ("l1", "l2", "ncc", "cosine", "l1cosine", "dice", "dotproduct")
#: distances whose value is divided by the level's first value (the reference's loss normalisation)
LOSS_NORMALISED_DISTANCES = ("l1", "l2")
#: feature normalisations before the distance
FEATURE_NORMS = ("none", "l2", "standardized")
#: resampling of the output image
INTERPOLATIONS = ("cubic", "linear", "nearest")
#: where the registration runs
DEVICES = ("cpu", "cuda", "auto")
#: network arithmetic
PRECISIONS = ("fp32", "tf32", "fp16")
#: optimised transform stages, in the order they run
STAGES = ("rigid", "affine", "bspline")
#: file suffixes of TorchScript models (elastix IMPACT's ModelsPath)
TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".jit", ".torchscript")

__all__ = ["METRIC_NAMES", "INTENSITY_METRICS", "IMPACT_MODES", "JACOBIAN_CHAINS", "DISTANCE_NAMES",
           "LOSS_NORMALISED_DISTANCES", "FEATURE_NORMS", "INTERPOLATIONS", "DEVICES", "PRECISIONS", "STAGES",
           "TORCHSCRIPT_SUFFIXES"]
