"""``--device cuda`` end to end: the same registration on the CPU and on the CUDA backend.

Both backends draw the same samples (counter-based generator) and compute the same numbers up to
the summation order (sorted vs draw order, float64 atomics), so the fields agree to far below a
voxel. MSE and MI levels run the device-resident loop, IMPACT the hybrid one. Without a GPU
the CUDA kernels run in Numba's simulator (one Python thread per CUDA thread), hence the tiny
images, few samples and a reduced exact-gradient set for the ASGD step estimation.
"""

import numpy as np
import pytest

import fastimpact
from fastimpact.engine import estimation
from fastimpact.errors import BackendError

from conftest import blob_volume

pytestmark = pytest.mark.cudasim

AFF = np.diag([2.0, 2.0, 2.0, 1.0])
SHAPE = (14, 16, 12)
# tolerance on the displacement fields (mm): both runs make the same steps; only float64
# rounding (atomics in another order) may differ
FIELD_TOL = 1e-4


@pytest.fixture
def small_exact_gradient(monkeypatch):
    monkeypatch.setattr(estimation, "EXACT_GRADIENT_SAMPLES", 150)


def _pair():
    f = blob_volume(SHAPE, seed=0)
    m = blob_volume(SHAPE, shift=(0.6, -0.4, 0.3), seed=0)
    return (f, AFF), ((np.sqrt(m + 1.0) * 10).astype(np.float32), AFF)


@pytest.mark.parametrize("metric, extra", [
    ("mse", {}),
    ("mi", {"bins": 16}),
    ("impact", {"model": "mind"}),
])
def test_cuda_and_cpu_give_the_same_field(metric, extra, small_exact_gradient):
    fixed, moving = _pair()
    if metric == "mse":
        moving = (blob_volume(SHAPE, shift=(0.6, -0.4, 0.3), seed=0), AFF)
    opts = dict(metric=metric, levels=1, iterations=6, samples=80, grid_spacing=8.0, affine_iterations=3, seed=3,
                threads=2, **extra)
    runs = {dev: fastimpact.register(fixed, moving, device=dev, **opts) for dev in ("cpu", "cuda")}
    assert runs["cuda"].report["device"] == "cuda" and runs["cpu"].report["device"] == "cpu"
    u_cpu, u_gpu = runs["cpu"].displacement, runs["cuda"].displacement
    assert np.abs(u_cpu).max() > 0.05  # the registration moved something
    np.testing.assert_allclose(u_gpu, u_cpu, atol=FIELD_TOL)
    # classic metrics run the whole iteration on the GPU (fastimpact.engine.device_loop); IMPACT the hybrid loop
    loops = {st.get("loop", "host") for st in runs["cuda"].report["stages"]}
    assert loops == ({"host"} if metric == "impact" else {"device"})
    # the same samples were used: the same metric trace
    for a, b in zip(runs["cpu"].report["stages"], runs["cuda"].report["stages"]):
        assert a["metric_end"] == pytest.approx(b["metric_end"], rel=1e-6, abs=1e-9)


def test_cuda_needs_a_gpu_or_the_simulator(monkeypatch):
    from fastimpact.backend import cuda_available, resolve_device

    monkeypatch.delenv("NUMBA_ENABLE_CUDASIM", raising=False)
    if cuda_available()[0]:
        assert resolve_device("cuda") == ("cuda", "")
        return
    with pytest.raises(BackendError, match="--device cpu"):
        resolve_device("cuda")
    backend, note = resolve_device("auto")
    assert backend == "cpu" and "running on the CPU" in note
    monkeypatch.setenv("NUMBA_ENABLE_CUDASIM", "1")
    backend, note = resolve_device("cuda")
    assert backend == "cuda" and "simulator" in note
    # auto never picks the simulator
    assert resolve_device("auto")[0] == "cpu"


def test_level_images_are_uploaded_once(small_exact_gradient, monkeypatch):
    """The images of a level cross the bus once for both stages, not once per iteration."""
    from numba import cuda

    uploads = []
    real = cuda.to_device

    def counting(a, *args, **kwargs):
        uploads.append(np.shape(a))
        return real(a, *args, **kwargs)

    monkeypatch.setattr(cuda, "to_device", counting)
    fixed, _ = _pair()
    moving = (blob_volume(SHAPE, shift=(0.6, -0.4, 0.3), seed=0), AFF)
    fastimpact.register(fixed, moving, device="cuda", metric="mse", levels=1, iterations=5, samples=60,
                        grid_spacing=8.0, affine_iterations=5, seed=3)
    n_vox = int(np.prod(SHAPE))
    big = [s for s in uploads if int(np.prod(s)) >= n_vox]
    # fixed values + moving coefficients once; the final displacement field and warp may upload
    # the finest image again; 2 stages x (5 iterations + ASGD estimation) would be > 20
    assert 2 <= len(big) <= 4, big
