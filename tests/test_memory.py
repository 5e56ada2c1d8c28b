"""Peak-memory estimate and the check before work (fastimpact.memory)."""

import subprocess
import sys

import numpy as np
import pytest

from fastimpact.config import RegistrationConfig
from fastimpact.errors import RegistrationError
from fastimpact.image import Image, make_affine
from fastimpact.memory import GB, available_memory, check_memory, estimate_peak_memory

CT = ((512, 512, 300), (0.7, 0.7, 1.0))


def _estimate(metric="mi", shape=CT[0], spacing=CT[1], **options):
    return estimate_peak_memory(RegistrationConfig(metric=metric, **options), shape, spacing, shape, spacing)


def test_parts_scale_with_the_images_and_the_settings():
    small, big = _estimate(shape=(256, 256, 150)), _estimate()
    base = [p.bytes for p in big.parts if p.name.startswith("Python")][0]
    assert 7.5 < (big.total - base) / (small.total - base) < 8.5  # 8x the voxels (pyramid shapes round)
    out = [p for p in big.parts if p.name.startswith("the outputs")][0]
    assert out.bytes == pytest.approx(40.0 * 512 * 512 * 300)
    fine, coarse = _estimate("impact", voxel_size=0.7), _estimate("impact", voxel_size=1.4)
    f_maps = [p.bytes for p in fine.parts if p.name.startswith("IMPACT feature maps")][0]
    c_maps = [p.bytes for p in coarse.parts if p.name.startswith("IMPACT feature maps")][0]
    assert 7.0 < f_maps / c_maps < 9.0  # (1.4 / 0.7)^3 = 8
    assert fine.largest.name.startswith("IMPACT feature maps") and "--voxel-size" in fine.largest.fix
    tight = _estimate("impact", feature_memory=0.5)
    ort = [p.bytes for p in tight.parts if p.name.startswith("ONNX Runtime inference")][0]
    assert ort <= 0.5 * GB
    huge = _estimate("impact", mode="jacobian", patch_size=401)
    assert huge.largest.name.startswith("IMPACT jacobian mode") and "--patch-size" in huge.largest.fix


def test_feature_grid_count_matches_the_resampling():
    # the estimate's feature grid (floor(extent / voxel) + 1 per axis) is the grid the maps use
    from fastimpact.features.maps import resample_to_voxel_size

    img = Image(np.zeros((20, 22, 9), np.float32), make_affine((1.0, 1.0, 2.5)))
    for voxel in (0.7, 1.0, 1.7):
        got = resample_to_voxel_size(img, voxel).shape
        cfg = RegistrationConfig(metric="impact", levels=1, voxel_size=voxel)
        est = estimate_peak_memory(cfg, img.shape, img.spacing, img.shape, img.spacing)
        maps = [p.bytes for p in est.parts if p.name.startswith("IMPACT feature maps")][0]
        # mind: 12 float32 channels; fixed + moving maps + the fixed gather table
        assert maps == pytest.approx(3 * 4.0 * 12 * np.prod(got))


def test_check_refuses_with_one_line_naming_the_driver_and_the_fix():
    est = _estimate("impact")
    with pytest.raises(RegistrationError) as err:
        check_memory(est, budget_gb=4.0)
    msg = str(err.value)
    assert "\n" not in msg
    assert "--memory budget of 4 GB" in msg and "IMPACT feature maps" in msg and "--voxel-size" in msg
    check_memory(_estimate(shape=(64, 64, 32)), budget_gb=4.0)  # a small run passes
    avail, source = available_memory()
    assert avail is None or (avail > 0 and source)


def test_address_space_limit_is_seen_before_any_work():
    code = (
        "import resource; resource.setrlimit(resource.RLIMIT_AS, (3 * 1024**3, resource.RLIM_INFINITY))\n"
        "from fastimpact.config import RegistrationConfig\n"
        "from fastimpact.memory import estimate_peak_memory, check_memory\n"
        "cfg = RegistrationConfig(metric='impact')\n"
        "try:\n"
        "    check_memory(estimate_peak_memory(cfg, (512, 512, 300), (0.7, 0.7, 1), (512, 512, 300), (0.7, 0.7, 1)))\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, e)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("RegistrationError") and "address-space limit" in res.stdout, res.stdout


def test_check_run_memory_on_loaded_images_counts_what_is_already_held():
    from fastimpact.memory import check_run_memory, resident_bytes

    img = Image(np.zeros((40, 40, 30), np.int16), make_affine((1.0, 1.0, 2.0)))
    est = check_run_memory(RegistrationConfig(metric="mi"), img, img)
    inputs = [p for p in est.parts if p.name.startswith("the input images")][0]
    assert inputs.bytes == pytest.approx(2 * 40 * 40 * 30 * (2 + 4))  # int16 as stored + float32 copy
    assert resident_bytes() > 0
    with pytest.raises(RegistrationError, match="--memory budget of 0.01 GB"):
        check_run_memory(RegistrationConfig(metric="mi", memory=0.01), img, img)


def test_out_of_memory_message_names_the_driver():
    from fastimpact.memory import out_of_memory_message

    msg = out_of_memory_message(_estimate("impact", mode="jacobian", patch_size=401))
    assert "\n" not in msg and msg.startswith("out of memory: this run needs about")
    assert "patch 401^3" in msg and "--patch-size" in msg and "--samples" not in msg.split("to fit")[0]
    assert "samples" not in out_of_memory_message(None)  # samples do not drive memory
