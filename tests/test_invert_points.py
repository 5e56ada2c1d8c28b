"""`fastimpact invert` and `fastimpact points`: the inverse composes with the forward transform to
within its stated residual; landmarks map as the displacement field (and transformix) do."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from fastimpact.image import Image, make_affine
from fastimpact.transforms import AffineTransform, BSplineGrid, CompositeTransform

F = np.array([-1.0, -1.0, 1.0])


def _rotation_z(deg):
    a = np.deg2rad(deg)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1.0]])


def _rotation_x(deg):
    a = np.deg2rad(deg)
    return np.array([[1.0, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])


def make_case(seed=2, amplitude=1.5):
    """Oblique anisotropic fixed grid, a moving grid of its own, a rotated/scaled affine plus a
    smooth B-spline (folding-free at this amplitude)."""
    rng = np.random.default_rng(seed)
    fixed_aff = make_affine((1.6, 2.0, 2.4), (-25.0, -20.0, -15.0), _rotation_z(25) @ _rotation_x(-10))
    shape = (22, 19, 16)
    grid = BSplineGrid.for_image(shape, fixed_aff, 12.0)
    A = AffineTransform(_rotation_z(12) * 1.05, np.array([3.0, -2.0, 1.5]), np.array([0.0, 5.0, 0.0]))
    T = CompositeTransform(A, grid, rng.normal(0, amplitude, grid.shape + (3,)))
    moving = Image(np.zeros((20, 21, 18), np.float32), make_affine((2.2, 1.9, 2.1), (-24.0, -22.0, -18.0), _rotation_x(8)))
    return Image(np.zeros(shape, np.float32), fixed_aff), moving, T


def _write_outdir(folder, fixed, T):
    from fastimpact.io import save_displacement_itk

    folder.mkdir()
    doc = {"format": "fastimpact-transform", "transform": T.to_dict(),
           "fixed": {"shape": list(fixed.shape), "affine": fixed.affine.tolist()}}
    (folder / "transform.json").write_text(json.dumps(doc))
    u = T.displacement_field(fixed.shape, fixed.affine)
    save_displacement_itk(u, fixed, folder / "displacement.nii.gz")
    return u


def _grid_points(img):
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in img.shape], indexing="ij"), -1).reshape(-1, 3)
    return idx @ img.affine[:3, :3].T + img.affine[:3, 3]


# ------------------------------------------------------------------------------------------------
# invert
# ------------------------------------------------------------------------------------------------
def test_invert_transform_composes_within_residual():
    from fastimpact.inverse import invert

    fixed, moving, T = make_case()
    res = invert(T, moving.shape, moving.affine, tolerance_mm=1e-4)
    assert res.converged and res.residual_max_mm < 1e-4
    y = _grid_points(moving)
    back = T.map_world(y + res.field.reshape(-1, 3).astype(np.float64))  # T(T^-1(y))
    err = np.linalg.norm(back - y, axis=1)
    assert err.max() <= res.residual_max_mm + 1e-9
    assert abs(err.mean() - res.residual_mean_mm) < 1e-9
    assert np.abs(res.field).max() > 3.0  # a real deformation, not the identity


def test_invert_reports_failure_where_the_transform_folds():
    from fastimpact.inverse import invert
    from fastimpact.synthetic import jacobian_determinant

    fixed, moving, T = make_case(amplitude=12.0)
    assert jacobian_determinant(T.displacement_field(fixed.shape, fixed.affine), fixed.affine).min() < 0
    res = invert(T, moving.shape, moving.affine, iterations=30)
    assert not res.converged and res.residual_max_mm > 0.1
    ok = invert(*make_case(amplitude=6.0)[2:], moving.shape, moving.affine)  # strong but fold-free
    assert ok.converged and ok.residual_max_mm <= 1e-3


def test_plain_fixed_point_iteration_without_affine():
    """With no affine part the preconditioner is the identity: v <- -u(y + v)."""
    from fastimpact.inverse import invert

    fixed, _, T = make_case(amplitude=1.0)
    T = CompositeTransform(AffineTransform(), T.grid, T.coef)
    res = invert(T, fixed.shape, fixed.affine, iterations=100, tolerance_mm=1e-5)
    y = _grid_points(fixed)
    v = res.field.reshape(-1, 3).astype(np.float64)
    u_at = T.map_world(y + v) - (y + v)
    np.testing.assert_allclose(v, -u_at, atol=res.residual_max_mm + 1e-9)


def test_invert_field_file_with_scipy_check(tmp_path):
    """A displacement field file is interpolated trilinearly; an independent scipy evaluation of
    y + v + u(y + v) agrees with the stated residual."""
    from scipy import ndimage

    from fastimpact.inverse import FieldMap, invert
    from fastimpact.io import load_displacement_itk

    fixed, moving, T = make_case()
    _write_outdir(tmp_path / "out", fixed, T)
    u, ref = load_displacement_itk(tmp_path / "out" / "displacement.nii.gz")
    res = invert(FieldMap(u, ref.affine), fixed.shape, fixed.affine, tolerance_mm=1e-4)
    y = _grid_points(fixed)
    z = y + res.field.reshape(-1, 3).astype(np.float64)
    inv = np.linalg.inv(ref.affine)
    q = (z @ inv[:3, :3].T + inv[:3, 3]).T
    uz = np.stack([ndimage.map_coordinates(u[..., c], q, order=1, mode="nearest") for c in range(3)], -1)
    err = np.linalg.norm(z + uz - y, axis=1)
    assert err.max() <= res.residual_max_mm + 1e-9
    assert res.residual_max_mm < 1e-3 or not res.converged


def test_cli_invert(tmp_path):
    from fastimpact.cli.main import main
    from fastimpact.io import load_displacement_itk, save_image

    fixed, moving, T = make_case()
    _write_outdir(tmp_path / "out", fixed, T)
    save_image(Image(np.zeros(moving.shape, np.float32), moving.affine), tmp_path / "moving.nii.gz")
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["invert", str(tmp_path / "out"), "-o", str(tmp_path / "inv.nii.gz"),
                   "--reference", str(tmp_path / "moving.nii.gz"), "--json"])
    assert rc == 0
    doc = json.loads(buf.getvalue())
    assert doc["status"] == "ok" and doc["direction"] == "moving -> fixed" and doc["converged"]
    v, grid = load_displacement_itk(tmp_path / "inv.nii.gz")
    np.testing.assert_allclose(grid.affine, moving.affine, atol=1e-5)
    y = _grid_points(moving)
    err = np.linalg.norm(T.map_world(y + v.reshape(-1, 3)) - y, axis=1)
    assert err.max() <= doc["residual_max_mm"] + 1e-5  # the file's grid is stored in float32
    assert main(["invert", str(tmp_path / "out"), "-o", str(tmp_path / "inv.nii.gz")]) == 2  # exists, no --force
    # without --reference: the moving image named in transform.json gives the grid
    doc_t = json.loads((tmp_path / "out" / "transform.json").read_text())
    doc_t["moving"] = {"path": str(tmp_path / "moving.nii.gz")}
    (tmp_path / "out" / "transform.json").write_text(json.dumps(doc_t))
    assert main(["invert", str(tmp_path / "out"), "-o", str(tmp_path / "inv2.nii.gz")]) == 0
    np.testing.assert_allclose(load_displacement_itk(tmp_path / "inv2.nii.gz")[1].affine, moving.affine, atol=1e-5)
    assert main(["invert", str(tmp_path / "nope"), "-o", str(tmp_path / "x.nii.gz")]) == 2
    assert not (tmp_path / "x.nii.gz").exists()


# ------------------------------------------------------------------------------------------------
# points
# ------------------------------------------------------------------------------------------------
def _read_pts(path):
    lines = path.read_text().split("\n")
    assert lines[0] == "point"
    n = int(lines[1])
    return np.array([[float(v) for v in ln.split()] for ln in lines[2:2 + n]])


def test_points_match_field_at_voxels(tmp_path):
    """Voxel-centre landmarks map to x + u(x) with u the saved field; LPS and RAS conventions,
    'point' and 'index' files, CSV with extra columns."""
    from fastimpact.cli.main import main

    fixed, _, T = make_case()
    u = _write_outdir(tmp_path / "out", fixed, T)
    rng = np.random.default_rng(5)
    idx = rng.integers(0, fixed.shape, (15, 3))
    x = idx @ fixed.affine[:3, :3].T + fixed.affine[:3, 3]
    y = x + u[idx[:, 0], idx[:, 1], idx[:, 2]]
    body = "".join(" ".join(repr(float(v)) for v in p) + "\n" for p in F * x)
    (tmp_path / "in.pts").write_text(f"point\n{len(x)}\n{body}")
    assert main(["points", str(tmp_path / "out"), str(tmp_path / "in.pts"), "-o", str(tmp_path / "o.pts")]) == 0
    np.testing.assert_allclose(_read_pts(tmp_path / "o.pts"), F * y, atol=1e-4)
    # RAS, CSV with a label column kept
    rows = "".join(f"L{i},{float(p[0])!r},{float(p[1])!r},{float(p[2])!r}\n" for i, p in enumerate(x))
    (tmp_path / "in.csv").write_text("label,x,y,z\n" + rows)
    assert main(["points", str(tmp_path / "out" / "transform.json"), str(tmp_path / "in.csv"), "-o",
                 str(tmp_path / "o.csv"), "--convention", "ras"]) == 0
    lines = (tmp_path / "o.csv").read_text().splitlines()
    assert lines[0] == "label,x,y,z" and lines[1].startswith("L0,")
    got = np.array([[float(v) for v in ln.split(",")[1:]] for ln in lines[1:]])
    np.testing.assert_allclose(got, y, atol=1e-4)
    # index file: voxel indices of the fixed image
    body = "".join(" ".join(str(int(v)) for v in p) + "\n" for p in idx)
    (tmp_path / "idx.txt").write_text(f"index\n{len(idx)}\n{body}")
    assert main(["points", str(tmp_path / "out"), str(tmp_path / "idx.txt"), "-o", str(tmp_path / "o2.pts")]) == 0
    np.testing.assert_allclose(_read_pts(tmp_path / "o2.pts"), F * y, atol=1e-4)
    # the displacement field file (trilinear) gives the same at voxel centres
    assert main(["points", str(tmp_path / "out" / "displacement.nii.gz"), str(tmp_path / "in.pts"), "-o",
                 str(tmp_path / "o3.pts")]) == 0
    np.testing.assert_allclose(_read_pts(tmp_path / "o3.pts"), F * y, atol=1e-4)


def test_points_between_voxels_match_trilinear_field(tmp_path):
    from scipy import ndimage

    from fastimpact.points import PointSet, load_forward, map_points

    fixed, _, T = make_case()
    u = _write_outdir(tmp_path / "out", fixed, T)
    rng = np.random.default_rng(6)
    q = rng.uniform(0, np.asarray(fixed.shape) - 1, (25, 3))
    x = q @ fixed.affine[:3, :3].T + fixed.affine[:3, 3]
    want = x + np.stack([ndimage.map_coordinates(u[..., c].astype(np.float64), q.T, order=1) for c in range(3)], -1)
    got, info = map_points(load_forward(tmp_path / "out" / "displacement.nii.gz"), PointSet(x), "ras")
    np.testing.assert_allclose(got, want, atol=1e-4)
    exact, info = map_points(load_forward(tmp_path / "out"), PointSet(x), "ras")
    np.testing.assert_allclose(exact, T.map_world(x), atol=1e-9)
    assert info["direction"] == "fixed -> moving" and info["outside_fixed_grid"] == 0
    assert np.abs(exact - got).max() < 0.5  # the field's interpolation error is small, not zero


def test_points_match_transformix(tmp_path):
    """transformix -def on our TransformParameters.0.txt maps the same landmarks to the same points."""
    itk = pytest.importorskip("itk")
    if not hasattr(itk, "TransformixFilter"):
        pytest.skip("itk-elastix is not installed")
    from fastimpact.cli.main import main
    from fastimpact.interchange import write_elastix_parameters

    fixed, _, T = make_case()
    _write_outdir(tmp_path / "out", fixed, T)
    write_elastix_parameters(T, fixed, tmp_path / "out")
    rng = np.random.default_rng(7)
    q = rng.uniform(0, np.asarray(fixed.shape) - 1, (12, 3))
    x = q @ fixed.affine[:3, :3].T + fixed.affine[:3, 3]
    body = "".join(" ".join(repr(float(v)) for v in p) + "\n" for p in F * x)
    (tmp_path / "in.pts").write_text(f"point\n{len(x)}\n{body}")
    assert main(["points", str(tmp_path / "out"), str(tmp_path / "in.pts"), "-o", str(tmp_path / "o.pts")]) == 0
    ours = _read_pts(tmp_path / "o.pts")
    (tmp_path / "tfx").mkdir()
    tf = itk.TransformixFilter.New(Input=itk.image_from_array(np.zeros(fixed.shape[::-1], np.float32)))
    tf.SetTransformParameterFileName(str(tmp_path / "out" / "TransformParameters.0.txt"))
    tf.SetFixedPointSetFileName(str(tmp_path / "in.pts"))
    tf.SetOutputDirectory(str(tmp_path / "tfx"))
    tf.Update()
    text = (tmp_path / "tfx" / "outputpoints.txt").read_text()
    theirs = np.array([[float(v) for v in m.split()] for m in re.findall(r"OutputPoint = \[([^\]]*)\]", text)])
    assert theirs.shape == ours.shape
    assert np.abs(theirs - ours).max() < 0.01
    # `points` given the elastix file itself runs transformix and agrees too
    assert main(["points", str(tmp_path / "out" / "TransformParameters.0.txt"), str(tmp_path / "in.pts"), "-o",
                 str(tmp_path / "o_elx.pts")]) == 0
    assert np.abs(_read_pts(tmp_path / "o_elx.pts") - ours).max() < 0.01


def test_points_through_linear_elastix_and_itk_files(tmp_path):
    """An affine-only result: its TransformParameters.0.txt and transform.tfm map points as
    transform.json does (no transformix needed for a linear elastix file)."""
    from fastimpact.interchange import itk_transform_text, write_elastix_parameters
    from fastimpact.points import PointSet, load_forward, map_points

    fixed, _, T = make_case()
    T = CompositeTransform(T.affine)
    _write_outdir(tmp_path / "out", fixed, T)
    write_elastix_parameters(T, fixed, tmp_path / "out")
    (tmp_path / "out" / "transform.tfm").write_text(itk_transform_text(T))
    x = np.random.default_rng(8).uniform(-30, 30, (10, 3))
    want = T.map_world(x)
    for name in ("TransformParameters.0.txt", "transform.tfm"):
        if name.endswith(".tfm"):
            pytest.importorskip("SimpleITK")
        got, info = map_points(load_forward(tmp_path / "out" / name), PointSet(F * x), "lps")
        np.testing.assert_allclose(F * got, want, atol=1e-9)


def test_points_bad_input(tmp_path):
    from fastimpact.cli.main import main

    fixed, _, T = make_case()
    _write_outdir(tmp_path / "out", fixed, T)
    (tmp_path / "bad.pts").write_text("point\n3\n1 2 3\n")
    assert main(["points", str(tmp_path / "out"), str(tmp_path / "bad.pts"), "-o", str(tmp_path / "o.pts")]) == 2
    (tmp_path / "bad.csv").write_text("a,b,c\n1,2,3\n")
    assert main(["points", str(tmp_path / "out"), str(tmp_path / "bad.csv"), "-o", str(tmp_path / "o.pts")]) == 2
    assert not (tmp_path / "o.pts").exists()
    (tmp_path / "ok.pts").write_text("point\n1\n1 2 3\n")
    assert main(["points", str(tmp_path / "out"), str(tmp_path / "ok.pts"), "-o", str(tmp_path / "o.nii")]) == 2
    assert main(["points", str(tmp_path / "out"), str(tmp_path / "ok.pts"), "-o", str(tmp_path / "o.pts")]) == 0
    assert main(["points", str(tmp_path / "out"), str(tmp_path / "ok.pts"), "-o", str(tmp_path / "o.pts")]) == 2  # exists
