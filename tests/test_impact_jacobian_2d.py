"""IMPACT Jacobian mode with a 2-D model on 3-D images: randomly oriented P x P planes per sample
(the same plane for the fixed and the moving patch), with a tiny Conv + Tanh model built by
onnx.helper (tests/_tiny2d.py): its VJP graph, the exact-chain gradient against finite differences
with the planes frozen, and a short registration."""

import json

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from _tiny2d import build_graphs, write_tiny2d  # noqa: E402
from conftest import batch_at, blob_volume, cost_gradient_check, make_cost  # noqa: E402
from fastimpact import register  # noqa: E402
from fastimpact.config import RegistrationConfig  # noqa: E402
from fastimpact.errors import ConfigError  # noqa: E402
from fastimpact.features.maps import IntensityNormalization  # noqa: E402
from fastimpact.features.settings import impact_settings  # noqa: E402
from fastimpact.image import Image  # noqa: E402
from fastimpact.metrics.impact_jacobian import build_jacobian_impact, random_rotations  # noqa: E402
from fastimpact.engine.levels import LevelData  # noqa: E402
from fastimpact.samplers import RandomSampler  # noqa: E402
from fastimpact.transforms import AffineTransform, BSplineGrid, CompositeTransform  # noqa: E402

AFF_F = np.array([[1.9, 0.2, 0, -20], [-0.2, 1.9, 0, 5], [0, 0, 2.1, 3], [0, 0, 0, 1]])
AFF_M = np.array([[2.0, 0, 0, -22], [0, 2.0, 0, 4], [0, 0, 2.0, 2], [0, 0, 0, 1]])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny2d")
    return {c: str(write_tiny2d(folder, c)) for c in (1, 3)}


def _session(model):
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("channels", [1, 3])
def test_tiny_model_vjp_equals_finite_differences_of_the_patch_graph(channels):
    full, patch, vjp = (_session(m) for m in build_graphs(channels))
    rng = np.random.default_rng(channels)
    for P in (5, 7):
        x = rng.normal(size=(6, channels, P, P)).astype(np.float32)
        cot = rng.normal(size=(6, 4)).astype(np.float32)
        centre = patch.run(None, {"patches": x})[0]
        # the patch graph is the full graph's centre voxel (the contract)
        np.testing.assert_allclose(centre, full.run(None, {"input": x})[0][:, :, P // 2, P // 2], atol=1e-6)
        grad = vjp.run(None, {"patches": x, "cotangent_0": cot})[0].astype(np.float64)
        assert grad.shape == x.shape
        assert np.abs(grad).max() > 1e-2
        # only the 3 x 3 neighbourhood of the centre matters (receptive field 3)
        ring = np.ones((P, P), bool)
        ring[P // 2 - 1:P // 2 + 2, P // 2 - 1:P // 2 + 2] = False
        assert np.all(grad[:, :, ring] == 0)
        h = 1e-2
        for _ in range(4):
            d = rng.normal(size=x.shape).astype(np.float32)
            fp = patch.run(None, {"patches": x + h * d})[0].astype(np.float64)
            fm = patch.run(None, {"patches": x - h * d})[0].astype(np.float64)
            num = ((fp - fm) / (2 * h) * cot).sum(axis=1)  # per batch item
            ana = (grad * d).reshape(len(x), -1).sum(axis=1)
            np.testing.assert_allclose(ana, num, rtol=2e-3, atol=2e-4)


def _norms(img):
    return lambda spec: IntensityNormalization.from_image(img.data, None, spec.normalization)


def _cost(stage, model, chain="exact", n=300, same=False, **options):
    rng = np.random.default_rng(5)
    fixed = Image(blob_volume(seed=1), AFF_F)
    mov = blob_volume(seed=1, shift=(0.7, -0.4, 0.3))
    moving = fixed if same else Image((np.sqrt(mov + 1.0) * 10).astype(np.float32), AFF_M)
    lv = LevelData(fixed, moving, None, None)
    from scipy import ndimage

    lv.moving_coef = ndimage.spline_filter(moving.data.astype(np.float64), order=3, mode="mirror")
    cfg = RegistrationConfig(metric="impact", mode="jacobian", levels=1, jacobian_chain=chain, model=model, **options)
    term = build_jacobian_impact(impact_settings(cfg, 0), fixed, moving, _norms(fixed), _norms(moving),
                                 moving_coef=lv.moving_coef, chain=chain, seed=1)
    grid = BSplineGrid.for_image(fixed.shape, fixed.affine, 14.0)
    if same:
        tr = CompositeTransform(AffineTransform(np.eye(3), np.zeros(3), fixed.center()), grid,
                                np.zeros(tuple(grid.shape) + (3,)))
    else:
        tr = CompositeTransform(AffineTransform(np.eye(3) + 0.01 * rng.normal(size=(3, 3)), rng.normal(size=3),
                                                fixed.center()), grid, 0.8 * rng.normal(size=tuple(grid.shape) + (3,)))
    sampler = RandomSampler(fixed.shape, None, n, seed=3)
    cost = make_cost(lv, term, sampler, tr, stage, "cpu", radius=30.0)
    flat, idx = sampler.draw()
    q = moving.world_to_index(tr.map_world(fixed.index_to_world(idx)))
    inner = np.all((q > 1.0) & (q < np.array(moving.shape) - 2.0), axis=1)
    return cost, flat[inner]


@pytest.mark.parametrize("stage, channels, options", [
    ("affine", 1, {"distance": "l2"}),
    ("bspline", 1, {"distance": "l2"}),
    ("affine", 3, {"distance": "cosine"}),
    ("bspline", 3, {"distance": "ncc", "patch_size": 7}),
])
def test_exact_chain_gradient_matches_finite_differences_with_frozen_planes(models, stage, channels, options):
    cost, flat = _cost(stage, models[channels], **options)
    term = cost.term.terms[0][1]
    term.freeze_rotations = True  # the same planes for every evaluation of the check
    _, g, num, scale = cost_gradient_check(cost, flat, stage, eps=1e-3 if stage == "affine" else 1e-2, n_picks=8,
                                           threshold=1e-2)
    np.testing.assert_allclose(g, num, rtol=3e-2, atol=3e-3 * scale)
    t = term.terms[0]
    P = options.get("patch_size", 5)
    assert t.last_offsets.shape == (len(flat), P * P, 3)


def test_centre_chain_with_planes(models):
    """The centre chain (the reference's approximation) on 2-D planes: the same value as the exact
    chain; the same translation gradient (dT/dt is the identity at every patch voxel); a B-spline
    gradient close to, but not equal to, the exact one."""
    for stage in ("affine", "bspline"):
        exact, flat = _cost(stage, models[1], chain="exact", distance="l2")
        centre, _ = _cost(stage, models[1], chain="centre", distance="l2")
        ve, ge = exact.evaluate_at(flat)
        ge = ge.copy()
        vc, gc = centre.evaluate_at(flat)
        # both costs draw the same planes (same seeds): only the chain differs
        np.testing.assert_array_equal(exact.term.terms[0][1].terms[0].last_offsets, centre.term.terms[0][1].terms[0].last_offsets)
        assert ve == pytest.approx(vc, rel=1e-6)
        if stage == "affine":
            np.testing.assert_allclose(gc[9:], ge[9:], rtol=1e-6, atol=1e-9 * np.abs(ge).max())
            assert not np.allclose(gc[:9], ge[:9], rtol=1e-3)  # the linear part sees the patch extent
        else:
            cos = ge @ gc / (np.linalg.norm(ge) * np.linalg.norm(gc))
            assert 0.8 < cos < 0.99999


def test_planes_are_random_rotations_shared_by_fixed_and_moving(models):
    cost, flat = _cost("bspline", models[1], distance="l2", same=True)
    term = cost.term.terms[0][1]
    t = term.terms[0]
    # fixed == moving and T = identity: the fixed and moving patches coincide only if they use
    # the same plane, so the l2 distance vanishes
    v, _ = cost.evaluate_at(flat)
    first = t.last_offsets.copy()
    assert v < 1e-8
    cost.evaluate_at(flat, gradient=False)
    second = t.last_offsets
    assert np.abs(first - second).max() > 1.0  # new orientations every evaluation
    # each plane is the unrotated one under a rotation: distances to the centre are kept
    spacing = float(np.mean(cost.level.fixed.spacing))
    radii = np.broadcast_to(np.linalg.norm(t.offsets, axis=1), first.shape[:2])
    np.testing.assert_allclose(np.linalg.norm(first, axis=2), radii, atol=1e-9)
    np.testing.assert_allclose(np.abs(t.offsets).max(), 2 * spacing)
    # the normals point everywhere (not all along one axis)
    normals = np.cross(first[:, 1] - first[:, 0], first[:, 5] - first[:, 0])
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    assert np.abs(normals.mean(axis=0)).max() < 0.3
    # max_offsets bounds any orientation
    reach = np.abs(term.max_offsets()).max(axis=0)
    assert np.all(np.abs(first).max(axis=(0, 1)) <= reach + 1e-9)
    np.testing.assert_allclose(reach, 2 * spacing * np.sqrt(2))
    # frozen: reused while the sample count stays
    term.freeze_rotations = True
    cost.evaluate_at(flat, gradient=False)
    np.testing.assert_array_equal(t.last_offsets, second)


def test_random_rotations_are_uniform_rotations():
    R = random_rotations(np.random.default_rng(0), 20000)
    np.testing.assert_allclose(R @ R.transpose(0, 2, 1), np.broadcast_to(np.eye(3), R.shape), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(R), 1.0)
    # Haar measure: every column (e.g. the plane normal R e_z) is uniform on the sphere, so each
    # coordinate is uniform on [-1, 1] (Archimedes): mean 0, E[c^2] = 1/3, flat histogram.
    # Uniform Euler angles would give E[n_z^2] = 1/4 and a histogram peaked at 0.
    for col in range(3):
        c = R[:, :, col]
        np.testing.assert_allclose(c.mean(axis=0), 0.0, atol=0.02)
        np.testing.assert_allclose((c**2).mean(axis=0), 1 / 3, atol=0.01)
        hist = np.histogram(c[:, 2], bins=10, range=(-1, 1))[0] / len(c)
        np.testing.assert_allclose(hist, 0.1, atol=0.01)


def test_manifest_dimension_must_match_the_patch_graph_rank(models, tmp_path):
    from pathlib import Path

    src = Path(models[1])
    for f in src.parent.glob("tiny2d_c1*"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    mf = tmp_path / "tiny2d_c1.json"
    data = json.loads(mf.read_text())
    data["dimension"] = 3
    mf.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="rank 4"):
        _cost("affine", str(tmp_path / "tiny2d_c1.onnx"), distance="l2")


@pytest.mark.parametrize("channels", [1, 3])
def test_short_registration_with_a_2d_model(models, channels):
    data = blob_volume(shape=(30, 32, 28), seed=2)
    shifted = blob_volume(shape=(30, 32, 28), seed=2, shift=(1.0, 0.0, -0.5))
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    mask = np.zeros(data.shape, np.uint8)
    mask[3:-3, 3:-3, 3:-3] = 1
    res = register((data, aff), (shifted, aff), metric="impact", mode="jacobian", model=models[channels],
                   fixed_mask=(mask, aff), levels=1, iterations=0, affine_iterations=60, samples=400, threads=2)
    u = res.displacement[8:-8, 8:-8, 8:-8].reshape(-1, 3).mean(axis=0)
    assert np.all(np.isfinite(res.displacement))
    # the shift (2, 0, -1) mm is found roughly (measured: 0.57 mm off for 1 channel, 0.60 for 3;
    # a 4-channel random-weight network and noisy random planes, no better is expected)
    assert np.linalg.norm(u - [2.0, 0.0, -1.0]) < 0.4 * np.linalg.norm([2.0, 0.0, -1.0])


def test_static_mode_runs_a_2d_model_slice_by_slice(models):
    """Static mode feeds a 2-D model the image's slices along its third axis (as a batch): the
    feature map equals Conv 3x3 (zero padding) + Tanh of every normalised slice."""
    from scipy import ndimage

    from _tiny2d import weights
    from fastimpact.features.maps import FeatureExtractor, compute_feature_maps
    from fastimpact.onnx_models import load_model_spec

    spec = load_model_spec(models[1])
    img = Image(blob_volume((12, 10, 7), seed=4), np.diag([1.5, 1.5, 2.0, 1.0]))
    norm = IntensityNormalization.from_image(img.data, None, spec.normalization)
    (fmap,) = compute_feature_maps(img, FeatureExtractor(spec, 1), [0], norm)
    assert fmap.data.shape == (12, 10, 7, 4)
    np.testing.assert_allclose(fmap.affine, img.affine)
    w, b = weights(1)
    x = norm(img.data).astype(np.float64)
    want = np.stack([np.tanh(np.stack([ndimage.correlate(x[:, :, z], w[c, 0], mode="constant") for z in range(7)],
                                      axis=-1) + b[c]) for c in range(4)], axis=-1)
    np.testing.assert_allclose(fmap.data, want, atol=2e-5)
