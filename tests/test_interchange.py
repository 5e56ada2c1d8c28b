"""Transform files for other tools: SimpleITK and transformix reproduce fastimpact's field.

The pair has an oblique, anisotropic fixed grid and an affine with rotation, scaling and shear, so
that a wrong LPS flip, matrix order, grid origin/direction or composition order shows up as
millimetres of error; the criterion is 0.01 mm.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from fastimpact.image import Image, make_affine
from fastimpact.transforms import AffineTransform, BSplineGrid, CompositeTransform

sitk = pytest.importorskip("SimpleITK")

F = np.array([-1.0, -1.0, 1.0])
TOL_MM = 0.01


def _rotation(ax, ay, az):
    ax, ay, az = np.deg2rad([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def make_case(seed=1, bspline=True, shape=(20, 17, 14)):
    """(fixed Image, CompositeTransform, u on the fixed grid (X, Y, Z, 3) float64 RAS)."""
    rng = np.random.default_rng(seed)
    aff = make_affine((1.5, 2.0, 2.5), (-30.0, 12.0, 7.0), _rotation(20, -15, 35))
    fixed = Image(np.zeros(shape, np.float32), aff)
    A = AffineTransform(np.eye(3) + rng.normal(0, 0.08, (3, 3)), rng.normal(0, 5, 3), rng.normal(0, 10, 3))
    if bspline:
        grid = BSplineGrid.for_image(shape, aff, 9.0)
        T = CompositeTransform(A, grid, rng.normal(0, 2.0, grid.shape + (3,)))
    else:
        T = CompositeTransform(A)
    return fixed, T, T.displacement_field(shape, aff, dtype=np.float64)


def _sitk_field(tx, fixed: Image) -> np.ndarray:
    """ITK's displacement of ``tx`` on the fixed grid, back in RAS and nibabel (X, Y, Z) order."""
    lin = fixed.affine[:3, :3]
    sp = np.linalg.norm(lin, axis=0)
    direction = (F[:, None] * lin / sp).ravel()
    df = sitk.TransformToDisplacementField(tx, sitk.sitkVectorFloat64, list(map(int, fixed.shape)),
                                           list(F * fixed.affine[:3, 3]), list(sp), list(direction))
    return np.transpose(sitk.GetArrayFromImage(df), (2, 1, 0, 3)) * F


@pytest.mark.parametrize("ending", [".h5", ".tfm"])
@pytest.mark.parametrize("bspline", [True, False])
def test_itk_transform_matches_field(tmp_path, ending, bspline):
    from fastimpact.interchange import write_itk_transform

    fixed, T, u = make_case(bspline=bspline)
    p = tmp_path / f"t{ending}"
    write_itk_transform(T, p)
    tx = sitk.ReadTransform(str(p))
    err = np.abs(_sitk_field(tx, fixed) - u).max()
    assert err < TOL_MM, err
    assert err < 1e-6  # the expression is exact: only round-off remains
    if bspline:  # a CompositeTransform of the affine and an order-3 B-spline, as Slicer loads it
        comp = sitk.CompositeTransform(tx)
        kinds = [comp.GetNthTransform(i).GetName() for i in range(comp.GetNumberOfTransforms())]
        assert kinds == ["AffineTransform", "BSplineTransform"]
        assert sitk.BSplineTransform(comp.GetNthTransform(1)).GetOrder() == 3


def test_composition_order_matters():
    """A(x) + u(x), not A(x) + u(A(x)): the naive composite of the affine and the raw coefficients is
    millimetres off on this pair, so the test above can tell the orders apart."""
    from fastimpact.interchange import GRID_PAD, _coefficients_itk_order, _padded_coefficients, bspline_grid_lps

    fixed, T, u = make_case()
    size, origin, spacing, direction = bspline_grid_lps(T.grid, GRID_PAD)
    b = sitk.BSplineTransform(3, 3)
    b.SetFixedParameters([float(v) for v in np.r_[np.asarray(size, float), origin, spacing, direction.ravel()]])
    b.SetParameters([float(v) for v in _coefficients_itk_order(_padded_coefficients(T.coef, GRID_PAD))])
    m = T.affine.as_matrix()
    a = sitk.AffineTransform(3)
    a.SetMatrix([float(v) for v in (F[:, None] * m[:3, :3] * F).ravel()])
    a.SetTranslation([float(v) for v in F * m[:3, 3]])
    # B alone is fastimpact's u exactly
    assert np.abs(_sitk_field(b, fixed) - (u - _sitk_field(a, fixed))).max() < 1e-6
    wrong = sitk.CompositeTransform([a, b])  # A(x + u(x))
    assert np.abs(_sitk_field(wrong, fixed) - u).max() > 0.1


def _transformix_field(folder, fixed: Image) -> np.ndarray:
    itk = pytest.importorskip("itk")
    if not hasattr(itk, "TransformixFilter"):
        pytest.skip("itk-elastix is not installed")
    moving = itk.image_from_array(np.zeros(fixed.shape[::-1], np.float32))
    tf = itk.TransformixFilter.New(Input=moving)
    tf.SetTransformParameterFileName(str(folder / "TransformParameters.0.txt"))
    tf.SetComputeDeformationField(True)
    out = folder / "transformix"  # transformix writes deformationField.* there (else into the cwd)
    out.mkdir(exist_ok=True)
    tf.SetOutputDirectory(str(out))
    tf.Update()
    d = itk.array_from_image(tf.GetOutputDeformationField()).astype(np.float64)
    return np.transpose(d, (2, 1, 0, 3)) * F


@pytest.mark.parametrize("bspline", [True, False])
def test_transformix_matches_field(tmp_path, monkeypatch, bspline):
    from fastimpact.interchange import write_elastix_parameters

    fixed, T, u = make_case(bspline=bspline)
    written = write_elastix_parameters(T, fixed, tmp_path)
    text = written[0].read_text()
    if bspline:
        assert [p.name for p in written] == ["TransformParameters.0.txt", "TransformParameters.affine.txt"]
        assert '(Transform "BSplineTransform")' in text and '(HowToCombineTransforms "Add")' in text
        assert '(InitialTransformParameterFileName "TransformParameters.affine.txt")' in text
        assert "(BSplineTransformSplineOrder 3)" in text
    else:
        assert '(Transform "AffineTransform")' in text and '"NoInitialTransform"' in text
    monkeypatch.chdir(tmp_path.parent)  # the initial file is found next to the parameter file, not in the cwd
    d = _transformix_field(tmp_path, fixed)
    assert d.shape == u.shape
    err = np.abs(d - u).max()
    assert err < TOL_MM, err


def test_register_outputs_load_in_sitk_and_transformix(tmp_path):
    """save_outputs writes transform.h5/.tfm and TransformParameters*.txt that reproduce
    Result.displacement (the field written to displacement.nii.gz)."""
    from fastimpact.config import RegistrationConfig
    from fastimpact.result import OUTPUT_NAMES, Result

    fixed, T, _ = make_case(seed=3)
    rng = np.random.default_rng(0)
    fixed = Image(rng.random(fixed.shape).astype(np.float32), fixed.affine)
    moving = Image(rng.random((12, 13, 11)).astype(np.float32), make_affine((2.2, 1.8, 2.0), (-20, 5, 0), _rotation(-10, 5, 0)))
    res = Result(T, fixed, moving, RegistrationConfig(iterations=1, affine_iterations=1), {"stages": []})
    paths = res.save(tmp_path / "out")
    out = tmp_path / "out"
    from fastimpact import interchange, result

    assert result.TRANSFORM_FILE_NAMES == interchange.TRANSFORM_FILE_NAMES
    for name in ("transform.h5", "transform.tfm", "TransformParameters.0.txt", "TransformParameters.affine.txt"):
        assert name in OUTPUT_NAMES and (out / name).is_file(), name
    assert paths["itk_transform"] == str(out / "transform.h5")
    assert paths["elastix_transform"] == str(out / "TransformParameters.0.txt")
    assert paths["transform"] == str(out / "transform.json")
    u = res.displacement
    from fastimpact.io import load_displacement_itk

    u_file, _ = load_displacement_itk(out / "displacement.nii.gz")
    for tx in (sitk.ReadTransform(str(out / "transform.h5")), sitk.ReadTransform(str(out / "transform.tfm"))):
        assert np.abs(_sitk_field(tx, fixed) - u).max() < TOL_MM
    assert np.abs(_transformix_field(out, fixed) - u_file).max() < TOL_MM
    # ITK's own displacement-field transform of the file agrees with the .h5 (the file's vectors are LPS)
    img = sitk.ReadImage(str(out / "displacement.nii.gz"), sitk.sitkVectorFloat64)
    dft = sitk.DisplacementFieldTransform(img)
    assert np.abs(_sitk_field(dft, fixed) - u).max() < 1e-4


# ------------------------------------------------------------------------------------------------
# displacement fields with intent 1006 (RAS vectors) and 1007 (LPS vectors)
# ------------------------------------------------------------------------------------------------
def _grid_image(fixed: Image):
    """(spacing, LPS direction, LPS origin) of a grid, as ITK holds it."""
    lin = fixed.affine[:3, :3]
    sp = np.linalg.norm(lin, axis=0)
    return sp, (F[:, None] * lin / sp), F * fixed.affine[:3, 3]


def test_load_displacement_1007_is_lps(tmp_path):
    from fastimpact.io import load_displacement_itk

    fixed, _, u = make_case(bspline=False, shape=(6, 5, 4))
    sp, direction, origin = _grid_image(fixed)
    img = sitk.GetImageFromArray(np.transpose(u * F, (2, 1, 0, 3)), isVector=True)
    img.SetSpacing(list(sp)), img.SetOrigin(list(origin)), img.SetDirection(list(direction.ravel()))
    sitk.WriteImage(img, str(tmp_path / "f.nii.gz"))  # SimpleITK writes intent 1007, LPS components
    import nibabel as nib

    assert int(nib.load(str(tmp_path / "f.nii.gz")).header["intent_code"]) == 1007
    fld, ref = load_displacement_itk(tmp_path / "f.nii.gz")
    np.testing.assert_allclose(fld, u, atol=1e-9)
    np.testing.assert_allclose(ref.affine, fixed.affine, atol=1e-5)


def test_load_displacement_1006_is_ras(tmp_path):
    """ITK (5.3+) writes intent 1006 ('dispvect') with RAS components and converts them to LPS when
    it reads them; fastimpact reads the same file to the same field."""
    itk = pytest.importorskip("itk")
    from fastimpact.io import load_displacement_itk

    fixed, _, u = make_case(bspline=False, shape=(6, 5, 4))
    sp, direction, origin = _grid_image(fixed)
    vec = itk.Image[itk.Vector[itk.F, 3], 3]
    img = itk.image_from_array(np.ascontiguousarray(np.transpose(u * F, (2, 1, 0, 3)), dtype=np.float32), ttype=vec)
    img.SetSpacing([float(s) for s in sp]), img.SetOrigin([float(o) for o in origin])
    img.SetDirection(itk.matrix_from_array(np.ascontiguousarray(direction)))
    md = img.GetMetaDataDictionary()
    md["intent_code"] = "1006"
    img.SetMetaDataDictionary(md)
    itk.imwrite(img, str(tmp_path / "d.nii.gz"))
    import nibabel as nib

    n = nib.load(str(tmp_path / "d.nii.gz"))
    assert int(n.header["intent_code"]) == 1006
    np.testing.assert_allclose(np.asarray(n.dataobj).reshape(u.shape), u, atol=1e-4)  # RAS on disk
    fld, _ = load_displacement_itk(tmp_path / "d.nii.gz")
    np.testing.assert_allclose(fld, u, atol=1e-4)
    back = itk.array_from_image(itk.imread(str(tmp_path / "d.nii.gz"), pixel_type=itk.Vector[itk.F, 3]))
    np.testing.assert_allclose(np.transpose(back, (2, 1, 0, 3)) * F, u, atol=1e-4)  # ITK agrees


# ------------------------------------------------------------------------------------------------
# initial transforms
# ------------------------------------------------------------------------------------------------
def _ras_points(n=20, seed=0):
    return np.random.default_rng(seed).uniform(-80, 80, (n, 3))


def _apply_sitk(tx, pts):
    return np.array([tx.TransformPoint(tuple(float(v) for v in F * p)) for p in pts]) * F


def _apply_h(h, pts):
    return pts @ h[:3, :3].T + h[:3, 3]


@pytest.mark.parametrize("ending", [".tfm", ".h5", ".mat", ".txt"])
def test_initial_from_itk_affine(tmp_path, ending):
    from fastimpact.interchange import initial_affine_matrix

    tx = sitk.AffineTransform(3)
    rng = np.random.default_rng(4)
    tx.SetMatrix(list((np.eye(3) + rng.normal(0, 0.1, (3, 3))).ravel()))
    tx.SetTranslation(list(rng.normal(0, 5, 3)))
    tx.SetCenter(list(rng.normal(0, 20, 3)))
    p = tmp_path / f"a{ending}"
    sitk.WriteTransform(tx, str(p))
    pts = _ras_points()
    np.testing.assert_allclose(_apply_h(initial_affine_matrix(p), pts), _apply_sitk(tx, pts), atol=1e-9)


def test_initial_from_itk_rigid_and_composite(tmp_path):
    from fastimpact.interchange import initial_affine_matrix

    e = sitk.Euler3DTransform((5.0, -3.0, 10.0), 0.1, -0.2, 0.3, (4.0, 5.0, -6.0))
    sitk.WriteTransform(e, str(tmp_path / "e.tfm"))
    pts = _ras_points()
    np.testing.assert_allclose(_apply_h(initial_affine_matrix(tmp_path / "e.tfm"), pts), _apply_sitk(e, pts), atol=1e-9)
    t = sitk.TranslationTransform(3, (1.0, 2.0, 3.0))
    a = sitk.AffineTransform(3)
    a.SetMatrix([1.1, 0.1, 0, 0, 0.9, 0.05, 0, 0, 1.0])
    comp = sitk.CompositeTransform([a, t])
    sitk.WriteTransform(comp, str(tmp_path / "c.tfm"))
    np.testing.assert_allclose(_apply_h(initial_affine_matrix(tmp_path / "c.tfm"), pts), _apply_sitk(comp, pts), atol=1e-9)


def _elastix_file(path, kind, params, center=(0, 0, 0), init="NoInitialTransform", how="Compose", extra=""):
    path.write_text(
        f'(Transform "{kind}")\n(NumberOfParameters {len(params)})\n'
        f'(TransformParameters {" ".join(repr(float(v)) for v in params)})\n'
        f'(InitialTransformParameterFileName "{init}")\n(HowToCombineTransforms "{how}")\n'
        f'(CenterOfRotationPoint {" ".join(repr(float(v)) for v in center)})\n{extra}'
        '(FixedImageDimension 3)\n(MovingImageDimension 3)\n'
    )


def test_initial_from_elastix_linear_transforms(tmp_path):
    """elastix's linear transforms are ITK's: Euler3D (both angle orders), Similarity3D (versor,
    translation, scale), Affine (matrix row by row, translation), Translation; an initial chain
    composes."""
    from fastimpact.interchange import initial_affine_matrix

    c = (3.0, -4.0, 12.0)
    pts = _ras_points()
    for zyx in (False, True):
        _elastix_file(tmp_path / "e.txt", "EulerTransform", [0.1, -0.2, 0.3, 4, 5, -6], c,
                      extra=f'(ComputeZYX "{str(zyx).lower()}")\n')
        e = sitk.Euler3DTransform(c, 0.1, -0.2, 0.3, (4.0, 5.0, -6.0))
        e.SetComputeZYX(zyx)
        np.testing.assert_allclose(_apply_h(initial_affine_matrix(tmp_path / "e.txt"), pts), _apply_sitk(e, pts), atol=1e-9)
    _elastix_file(tmp_path / "s.txt", "SimilarityTransform", [0.05, 0.1, -0.02, 1, 2, 3, 1.2], c)
    w = float(np.sqrt(1 - 0.05**2 - 0.1**2 - 0.02**2))
    s = sitk.Similarity3DTransform(1.2, (0.05, 0.1, -0.02, w), (1.0, 2.0, 3.0), c)
    np.testing.assert_allclose(_apply_h(initial_affine_matrix(tmp_path / "s.txt"), pts), _apply_sitk(s, pts), atol=1e-9)
    m = [1.1, 0.1, 0.0, -0.05, 0.95, 0.02, 0.0, 0.03, 1.0]
    _elastix_file(tmp_path / "t0.txt", "TranslationTransform", [7, -8, 9])
    _elastix_file(tmp_path / "a.txt", "AffineTransform", m + [1, 2, 3], c, init="t0.txt")
    a = sitk.AffineTransform(m, (1.0, 2.0, 3.0), c)
    comp = sitk.CompositeTransform([a, sitk.TranslationTransform(3, (7.0, -8.0, 9.0))])  # a(t0(x))
    np.testing.assert_allclose(_apply_h(initial_affine_matrix(tmp_path / "a.txt"), pts), _apply_sitk(comp, pts), atol=1e-9)


def test_initial_from_json_and_bad_files(tmp_path):
    from fastimpact.errors import ConfigError, FastImpactError
    from fastimpact.interchange import initial_affine_matrix

    _, T, _ = make_case(bspline=False)
    (tmp_path / "t.json").write_text(json.dumps({"transform": T.to_dict()}))
    np.testing.assert_allclose(initial_affine_matrix(tmp_path / "t.json"), T.affine.as_matrix(), atol=1e-12)
    _, Tb, _ = make_case()
    (tmp_path / "b.json").write_text(json.dumps({"transform": Tb.to_dict()}))
    with pytest.raises(ConfigError, match="B-spline part"):
        initial_affine_matrix(tmp_path / "b.json")
    (tmp_path / "x.txt").write_text("hello\n")
    with pytest.raises(ConfigError, match="neither"):
        initial_affine_matrix(tmp_path / "x.txt")
    _elastix_file(tmp_path / "bs.txt", "BSplineTransform", [0.0] * 3)
    with pytest.raises(ConfigError, match="must be linear"):
        initial_affine_matrix(tmp_path / "bs.txt")
    _elastix_file(tmp_path / "chain.txt", "TranslationTransform", [0, 0, 0], init="missing.txt")
    with pytest.raises(FastImpactError, match="does not exist"):
        initial_affine_matrix(tmp_path / "chain.txt")
    with pytest.raises(FastImpactError, match="does not exist"):
        initial_affine_matrix(tmp_path / "nope.tfm")


def test_register_starts_from_initial_transform(tmp_path):
    from fastimpact import register
    from fastimpact.config import RegistrationConfig
    from fastimpact.interchange import initial_affine_matrix

    tx = sitk.AffineTransform((1.05, 0.02, 0.0, -0.03, 0.97, 0.01, 0.0, 0.0, 1.0), (3.0, -2.0, 1.0), (10.0, 0.0, 5.0))
    sitk.WriteTransform(tx, str(tmp_path / "init.tfm"))
    rng = np.random.default_rng(0)
    fixed = Image(rng.random((12, 11, 10)).astype(np.float32), make_affine((2, 2, 2), (-10, -10, -10), _rotation(0, 0, 20)))
    moving = Image(rng.random((24, 24, 20)).astype(np.float32), make_affine((2, 2, 2.5), (-20, -20, -20)))
    # no affine stage: the affine stays the file's (a B-spline iteration is needed to run at all)
    cfg = RegistrationConfig(levels=1, iterations=1, samples=200, affine=False, initial_transform=str(tmp_path / "init.tfm"))
    res = register(fixed, moving, config=cfg)
    pts = _ras_points()
    np.testing.assert_allclose(res.transform.affine(pts), _apply_sitk(tx, pts), atol=1e-9)
    np.testing.assert_allclose(res.report["initial_affine"]["homogeneous"], initial_affine_matrix(tmp_path / "init.tfm"), atol=1e-9)


def test_cli_rejects_bad_initial_transform_before_registering(tmp_path):
    from fastimpact.cli.main import main
    from fastimpact.io import save_image

    img = Image(np.random.default_rng(0).random((8, 8, 8)).astype(np.float32), np.eye(4))
    save_image(img, tmp_path / "f.nii.gz")
    (tmp_path / "bad.txt").write_text("not a transform\n")
    rc = main(["register", str(tmp_path / "f.nii.gz"), str(tmp_path / "f.nii.gz"), "-o", str(tmp_path / "out"),
               "--initial-transform", str(tmp_path / "bad.txt")])
    assert rc == 2
    assert not (tmp_path / "out").exists()


def test_load_displacement_1006_agrees_with_simpleitk(tmp_path):
    """A 1006 file (written here with nibabel): SimpleITK converts its vectors RAS -> LPS on
    reading, so ITK's displacement-field transform and fastimpact's field map points alike."""
    import nibabel as nib

    from fastimpact.io import load_displacement_itk

    fixed, _, u = make_case(bspline=False, shape=(6, 5, 4))
    n = nib.Nifti1Image(u.reshape(u.shape[:3] + (1, 3)).astype(np.float32), fixed.affine)
    n.header.set_intent(1006)
    n.set_sform(fixed.affine, 1), n.set_qform(fixed.affine, 1)
    nib.save(n, str(tmp_path / "d.nii.gz"))
    fld, _ = load_displacement_itk(tmp_path / "d.nii.gz")
    np.testing.assert_allclose(fld, u, atol=1e-4)
    img = sitk.ReadImage(str(tmp_path / "d.nii.gz"), sitk.sitkVectorFloat64)
    np.testing.assert_allclose(np.transpose(sitk.GetArrayFromImage(img), (2, 1, 0, 3)) * F, u, atol=1e-4)
    np.testing.assert_allclose(_sitk_field(sitk.DisplacementFieldTransform(img), fixed), u, atol=1e-4)


def test_initial_from_our_own_files_round_trip(tmp_path):
    """What register writes reads back as its affine: TransformParameters.affine.txt (the B-spline
    file itself is refused) and transform.tfm of an affine-only result (parsed without SimpleITK)."""
    from fastimpact.errors import ConfigError
    from fastimpact.interchange import initial_affine_matrix, itk_transform_text, write_elastix_parameters

    fixed, T, _ = make_case()
    write_elastix_parameters(T, fixed, tmp_path)
    np.testing.assert_allclose(initial_affine_matrix(tmp_path / "TransformParameters.affine.txt"),
                               T.affine.as_matrix(), atol=1e-12)
    with pytest.raises(ConfigError, match="TransformParameters.affine.txt"):
        initial_affine_matrix(tmp_path / "TransformParameters.0.txt")
    (tmp_path / "a.tfm").write_text(itk_transform_text(CompositeTransform(T.affine)))
    np.testing.assert_allclose(initial_affine_matrix(tmp_path / "a.tfm"), T.affine.as_matrix(), atol=1e-12)
