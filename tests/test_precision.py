"""--precision: float16 copies of the feature graphs (accuracy stated), CUDA provider options,
and the setting reaching the networks of a registration."""

import numpy as np
import pytest

pytest.importorskip("onnxconverter_common")
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

from fastimpact.config import RegistrationConfig  # noqa: E402
from fastimpact.errors import ConfigError  # noqa: E402
from fastimpact.features.maps import FeatureExtractor, OutputBuffers  # noqa: E402
from fastimpact.features.precision import cuda_provider_options, to_float16  # noqa: E402
from fastimpact.onnx_models import load_model_spec  # noqa: E402

# float16 has an 11-bit significand (relative rounding 4.9e-4); a few layers of rounding give
# ~1e-3 of the largest feature; the tolerance is 5x that
FP16_REL_TOL = 5e-3


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(a).max())


@pytest.mark.parametrize("name", ["mind", "mind-r2d1", "deepbet"])
def test_float16_patch_graphs_stay_close_to_float32(name):
    spec = load_model_spec(name)
    P = spec.patch_size
    x = np.random.default_rng(0).standard_normal((32, spec.input_channels) + (P,) * spec.dimension).astype(np.float32)
    ref = FeatureExtractor(spec, 2, graph="patch").run_bound([x], OutputBuffers())
    half = FeatureExtractor(spec, 2, graph="patch", precision="fp16")
    got = half.run_bound([x], OutputBuffers())
    assert half.session is not FeatureExtractor(spec, 2, graph="patch").session  # cached per precision
    for r, g in zip(ref, got):
        assert g.dtype == np.float32
        err = _rel(r, g)
        assert 1e-6 < err < FP16_REL_TOL  # really float16 arithmetic, and close


def test_float16_full_graph_with_a_layer_that_feeds_the_next():
    # deepbet's s1 is a graph output and the input of the next stage
    spec = load_model_spec("deepbet")
    model = onnx.load(str(spec.path))
    half = ort.InferenceSession(to_float16(model).SerializeToString(), providers=["CPUExecutionProvider"])
    full = ort.InferenceSession(str(spec.path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((1, 1, 32, 32, 32)).astype(np.float32)
    for r, g in list(zip(full.run(None, {"image": x}), half.run(None, {"image": x})))[:4]:
        assert g.dtype == np.float32 and _rel(r, g) < FP16_REL_TOL
    assert [o.name for o in half.get_outputs()] == [o.name for o in full.get_outputs()]


def test_cuda_provider_options_follow_the_precision():
    assert cuda_provider_options("fp32") == {"use_tf32": "0"}
    assert cuda_provider_options("tf32") == {"use_tf32": "1"}
    ext = FeatureExtractor(load_model_spec("mind"), 1, providers=("CUDAExecutionProvider", "CPUExecutionProvider"),
                           precision="tf32")
    assert ext._session_providers() == [("CUDAExecutionProvider", {"use_tf32": "1"}), "CPUExecutionProvider"]


def test_precision_setting_is_checked_and_reaches_the_networks():
    with pytest.raises(ConfigError, match="precision"):
        RegistrationConfig(precision="fp8")
    from fastimpact.features.settings import impact_settings
    from fastimpact.metrics.impact_jacobian import build_jacobian_impact
    from fastimpact.features.maps import IntensityNormalization
    from fastimpact.image import Image

    img = Image(np.random.default_rng(0).random((20, 20, 20)).astype(np.float32), np.eye(4))
    cfg = RegistrationConfig(metric="impact", mode="jacobian", precision="fp16", device="cuda")  # fp16: GPU only
    norm = lambda spec: IntensityNormalization.from_image(img.data, None, spec.normalization)  # noqa: E731
    term = build_jacobian_impact(impact_settings(cfg, 0), img, img, norm, norm, precision=cfg.precision)
    t = term.terms[0]
    assert {t.f_patch.precision, t.m_patch.precision, t.m_vjp.precision} == {"fp16"}


def test_fp16_on_the_cpu_is_refused_before_any_work():
    from fastimpact.features.precision import check_precision

    with pytest.raises(ConfigError) as err:
        RegistrationConfig(metric="impact", mode="jacobian", precision="fp16")  # device cpu (the default)
    msg = str(err.value)
    assert "\n" not in msg and "precision=fp16" in msg and "--precision fp32" in msg and "--device cuda" in msg
    with pytest.raises(ConfigError, match="precision=fp16"):
        check_precision("fp16", "cpu")  # what the driver calls once device auto has resolved
    check_precision("fp16", "cuda")
    check_precision("tf32", "cpu")
    RegistrationConfig(metric="impact", precision="fp16", device="auto")  # decided once the device is known
    with pytest.raises(ConfigError, match="applies to the IMPACT metric"):
        RegistrationConfig(metric="mse", precision="fp16")  # no feature network would run: refused, not ignored


def test_float16_conversion_prints_no_truncation_warnings():
    import warnings

    spec = load_model_spec("deepbet")  # has float32 constants below float16's smallest subnormal
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        to_float16(onnx.load(str(spec.path)))
    assert not [w for w in caught if "truncated" in str(w.message)]
