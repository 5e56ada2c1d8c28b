"""IMPACT features: ONNX feature extractors, static feature maps (tiled inference), PCA, the
feature distances and the per-level settings."""
