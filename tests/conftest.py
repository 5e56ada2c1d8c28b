import os

# CUDA kernels are tested everywhere: on a machine without an NVIDIA driver they run in Numba's
# CUDA simulator. The switch must be set before numba is first imported (it is read once).
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import numpy as np
import pytest


def blob_volume(shape=(28, 30, 26), shift=(0.0, 0.0, 0.0), seed=0):
    """A smooth synthetic volume (sum of Gaussian blobs) shifted by ``shift`` voxels."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    out = np.zeros(shape)
    centres = rng.uniform(0.25, 0.75, size=(6, 3)) * np.array(shape)
    for c, w in zip(centres, rng.uniform(0.5, 1.5, size=6)):
        r2 = sum((g - ci - si) ** 2 for g, ci, si in zip(grids, c, shift))
        out += w * np.exp(-r2 / (2 * 3.0**2))
    return (100 * out).astype(np.float32)


@pytest.fixture
def write_nifti(tmp_path):
    import nibabel as nib

    def _write(name, data, affine=None):
        p = tmp_path / name
        nib.save(nib.Nifti1Image(np.asarray(data), np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine), str(p))
        return p

    return _write


def cost_gradient_check(cost, flat, stage, *, eps, n_picks=10, threshold=1e-3):
    """Analytic vs central-difference gradient of a registration cost at fixed samples ``flat``.

    Checks every affine parameter, or ``n_picks`` B-spline parameters whose gradient is above
    ``threshold`` of the largest. Returns (value, analytic (P,), numeric (P,), max |gradient|)."""
    theta = cost.get_parameters()
    value, grad = cost.evaluate_at(flat)
    grad = grad.copy()  # the cost reuses its gradient buffer
    rng = np.random.default_rng(0)
    if stage in ("affine", "rigid"):
        picks = np.arange(len(theta))
    else:
        picks = rng.choice(np.flatnonzero(np.abs(grad) > threshold * np.abs(grad).max()), n_picks, replace=False)
    num = []
    for k in picks:
        vals = []
        for s in (1, -1):
            th = theta.copy()
            th[k] += s * eps
            cost.set_parameters(th)
            vals.append(cost.evaluate_at(flat, gradient=False)[0])
        num.append((vals[0] - vals[1]) / (2 * eps))
    cost.set_parameters(theta)
    return value, grad[picks], np.array(num), np.abs(grad).max()


def make_cost(level, parts, sampler, transform, stage, backend="cpu", *, radius=30.0, bending_weight=0.0):
    """A cost function as the driver builds it: the weighted sum of ``parts`` ((weight, term) pairs,
    or one term) plus, with ``bending_weight``, the stage's bending penalty, on the ``stage``
    parameterisation of ``transform`` at ``level``."""
    from fastimpact.engine.cost import CostFunction
    from fastimpact.metrics.term import BendingPenalty, Term, WeightedSum
    from fastimpact.transforms.parameterisation import PARAMETERISATIONS

    parts = [(1.0, parts)] if isinstance(parts, Term) else list(parts)
    cls = PARAMETERISATIONS[stage]
    if bending_weight > 0:
        parts.append((bending_weight, BendingPenalty(cls.bending_energy(transform, level.fixed.shape))))
    term = WeightedSum(parts)
    term.start_stage()
    return CostFunction(level, term, sampler, cls(transform, level.fixed.affine, radius, backend), backend)


def batch_at(flat, x, y, transform=None, gradient=True):
    """A SampleBatch of world points for a point term (the fields a point term reads)."""
    from fastimpact.metrics.term import SampleBatch, TransformView

    view = transform if transform is not None else TransformView(np.eye(4))
    return SampleBatch(np.asarray(flat), x, y, None, None, None, view, gradient)
