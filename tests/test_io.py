"""Tests of fastimpact.image, fastimpact.io and the shipped demo data."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fastimpact.errors import FastImpactError, ImageError, ImageIOError
from fastimpact.image import Image, check_finite, check_not_constant, make_affine
from fastimpact.io import (
    atomic_write_path,
    load_displacement_itk,
    load_image,
    lps_to_ras,
    output_dir,
    ras_matrix_to_lps,
    ras_to_lps,
    save_displacement_itk,
    save_image,
)

NIB_DATA = Path(nib.__file__).parent / "tests" / "data"
# NIfTI-1 stores the sform as float32: affines come back to ~1e-7 relative.
AFFINE_ATOL = 1e-4


def _rotation(seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def _affines() -> dict[str, np.ndarray]:
    oblique = make_affine((1.5, 2.0, 2.5), (10.0, -20.0, 30.0), _rotation(1))
    flipped = make_affine((0.9, 1.1, 3.0), (90.0, 100.0, -50.0), np.diag([-1.0, -1.0, 1.0]))
    permuted = make_affine((2.0, 1.0, 1.5), (-5.0, 7.0, 3.0), [[0, 0, 1], [-1, 0, 0], [0, 1, 0]])
    oblique_flipped = make_affine((1.2, 0.8, 2.2), (3.0, 4.0, 5.0), _rotation(2) @ np.diag([1, -1, 1]))
    return {
        "identity": np.eye(4),
        "oblique": oblique,
        "flipped": flipped,
        "permuted": permuted,
        "oblique_flipped": oblique_flipped,
    }


AFFINES = _affines()


def _assert_one_line(err: BaseException, *names: str) -> None:
    msg = str(err)
    assert "\n" not in msg and "\r" not in msg, msg
    assert msg.strip() == msg and msg, msg
    for n in names:
        assert n in msg, f"{n!r} not in {msg!r}"


# -- Image ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", list(AFFINES))
def test_image_geometry(key):
    a = AFFINES[key]
    img = Image(np.zeros((5, 6, 7), np.float32), a, "x.nii")
    assert img.shape == (5, 6, 7)
    np.testing.assert_allclose(img.spacing, np.linalg.norm(a[:3, :3], axis=0))
    np.testing.assert_allclose(img.direction @ np.diag(img.spacing), a[:3, :3], atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(img.direction, axis=0), 1.0)
    np.testing.assert_allclose(img.origin, a[:3, 3])
    idx = np.random.default_rng(0).uniform(-2, 8, size=(4, 2, 3))
    world = img.index_to_world(idx)
    homog = np.concatenate([idx, np.ones(idx.shape[:-1] + (1,))], axis=-1)
    np.testing.assert_allclose(world, (homog @ a.T)[..., :3], atol=1e-9)
    np.testing.assert_allclose(img.world_to_index(world), idx, atol=1e-9)
    grid = img.world_grid()
    assert grid.shape == (5, 6, 7, 3)
    for v in [(0, 0, 0), (4, 5, 6), (2, 3, 1)]:
        np.testing.assert_allclose(grid[v], img.index_to_world(v), atol=1e-9)
    np.testing.assert_allclose(img.center(), img.index_to_world([2.0, 2.5, 3.0]))
    assert img.voxel_volume == pytest.approx(abs(np.linalg.det(a[:3, :3])))


def test_image_with_data_and_validation():
    img = Image(np.zeros((4, 5, 6), np.float32), AFFINES["oblique"], "a.nii.gz")
    lab = img.with_data(np.ones((4, 5, 6), np.uint8))
    assert lab.is_integer and not img.is_integer
    assert lab.same_grid(img) and lab.affine is not img.affine
    with pytest.raises(ImageError) as e:
        img.with_data(np.ones((4, 5, 7)))
    _assert_one_line(e.value, "(4, 5, 7)", "(4, 5, 6)")
    with pytest.raises(ImageError) as e:
        Image(np.zeros((4, 5)), np.eye(4), "flat.nii")
    _assert_one_line(e.value, "2-D", "flat.nii")
    bad = np.eye(4)
    bad[1, 1] = 0.0
    with pytest.raises(ImageError) as e:
        Image(np.zeros((2, 2, 2)), bad, "s.nii")
    _assert_one_line(e.value, "singular", "s.nii")
    bad = np.eye(4)
    bad[0, 3] = np.nan
    with pytest.raises(ImageError):
        Image(np.zeros((2, 2, 2)), bad)
    with pytest.raises(ImageError):
        make_affine((1.0, 0.0, 1.0))
    with pytest.raises(ImageError):
        make_affine((1.0, -1.0, 1.0))
    assert "shape=(4, 5, 6)" in repr(img)


def test_check_finite_and_constant():
    d = np.random.default_rng(0).normal(size=(6, 7, 8)).astype(np.float32)
    img = Image(d, np.eye(4), "a.nii.gz")
    check_finite(img, "fixed image")
    check_not_constant(img, "fixed image")
    d2 = d.copy()
    d2[0, 0, :3] = np.nan
    d2[1, 1, 1] = np.inf
    with pytest.raises(ImageError) as e:
        check_finite(img.with_data(d2), "fixed image")
    _assert_one_line(e.value, "fixed image 'a.nii.gz'", "4 NaN/Inf")
    with pytest.raises(ImageError) as e:
        check_not_constant(img.with_data(np.full((6, 7, 8), 3.0)), "moving image")
    _assert_one_line(e.value, "moving image 'a.nii.gz'", "constant")
    mask = np.zeros((6, 7, 8), bool)
    mask[2, 2, 2] = True
    with pytest.raises(ImageError) as e:
        check_not_constant(img, "fixed image", mask=mask)
    _assert_one_line(e.value, "inside its mask")
    with pytest.raises(ImageError) as e:
        check_not_constant(img, "fixed image", mask=np.zeros((6, 7, 8), bool))
    _assert_one_line(e.value, "empty")
    check_finite(img.with_data(np.zeros((6, 7, 8), np.int16)))  # integers are always finite


# -- round trips -----------------------------------------------------------------------------------

def _data(dtype, shape=(9, 10, 11)):
    rng = np.random.default_rng(3)
    if np.dtype(dtype).kind == "f":
        return rng.normal(100.0, 30.0, size=shape).astype(dtype)
    if dtype == np.int16:
        return rng.integers(-1200, 3000, size=shape).astype(dtype)
    return rng.integers(0, 6, size=shape).astype(dtype)  # uint8 labels


@pytest.mark.parametrize("ext", [".nii", ".nii.gz"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16, np.uint8])
@pytest.mark.parametrize("key", ["oblique", "flipped", "permuted", "oblique_flipped"])
def test_round_trip(tmp_path, ext, dtype, key):
    img = Image(_data(dtype), AFFINES[key], "in")
    path = tmp_path / f"img{ext}"
    save_image(img, path)
    back = load_image(path)
    assert back.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(back.data, img.data)
    np.testing.assert_allclose(back.affine, img.affine, atol=AFFINE_ATOL)
    assert back.name == str(path)
    hdr = nib.load(str(path)).header
    assert int(hdr["sform_code"]) == 1 and int(hdr["qform_code"]) == 1
    # The qform holds the same (rigid + zoom) affine as the sform.
    np.testing.assert_allclose(hdr.get_qform(), img.affine, atol=AFFINE_ATOL)


def test_bool_and_explicit_dtypes(tmp_path):
    mask = np.zeros((5, 6, 7), bool)
    mask[1:3, 2:4, 3:6] = True
    save_image(Image(mask, AFFINES["flipped"]), tmp_path / "m.nii.gz")
    m = load_image(tmp_path / "m.nii.gz")
    assert m.dtype == np.uint8
    np.testing.assert_array_equal(m.data, mask.astype(np.uint8))
    # Float labels saved as uint8 are rounded by us, so no scale factor is stored.
    labels = np.random.default_rng(1).integers(0, 5, size=(5, 6, 7)).astype(np.float64)
    save_image(Image(labels, np.eye(4)), tmp_path / "l.nii.gz", dtype=np.uint8)
    hdr = nib.load(str(tmp_path / "l.nii.gz")).header
    assert hdr.get_data_dtype() == np.uint8 and hdr.get_slope_inter() == (None, None)
    np.testing.assert_array_equal(load_image(tmp_path / "l.nii.gz").data, labels)
    with pytest.raises(ImageError) as e:
        save_image(Image(labels * 100, np.eye(4)), tmp_path / "o.nii.gz", dtype=np.uint8)
    _assert_one_line(e.value, "o.nii.gz", "uint8")
    assert not (tmp_path / "o.nii.gz").exists()
    # An int image read as float.
    f = load_image(tmp_path / "l.nii.gz", dtype=np.float32)
    assert f.dtype == np.float32
    np.testing.assert_array_equal(f.data, labels)


def test_scaled_data(tmp_path):
    raw = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    n = nib.Nifti1Image(raw, np.eye(4))
    n.header.set_slope_inter(0.5, -3.0)
    n.to_filename(str(tmp_path / "s.nii.gz"))
    img = load_image(tmp_path / "s.nii.gz")
    assert img.dtype == np.float32
    np.testing.assert_allclose(img.data, raw * 0.5 - 3.0)
    assert load_image(tmp_path / "s.nii.gz", dtype=np.float64).dtype == np.float64


def test_simpleitk_reads_saved_geometry(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    img = Image(_data(np.float32), AFFINES["oblique_flipped"])
    save_image(img, tmp_path / "g.nii.gz")
    s = sitk.ReadImage(str(tmp_path / "g.nii.gz"))
    np.testing.assert_allclose(s.GetSpacing(), img.spacing, atol=1e-5)
    np.testing.assert_allclose(s.GetOrigin(), ras_to_lps(img.origin), atol=1e-4)
    np.testing.assert_allclose(
        np.array(s.GetDirection()).reshape(3, 3), ras_to_lps(img.direction.T).T, atol=1e-5
    )
    # Same voxel: SimpleITK's array is [k, j, i].
    np.testing.assert_array_equal(sitk.GetArrayFromImage(s).transpose(2, 1, 0), img.data)


# -- nibabel's real files ----------------------------------------------------------------------------

def test_nibabel_anatomical():
    path = NIB_DATA / "anatomical.nii"
    if not path.exists():
        pytest.skip("nibabel test data not installed")
    img = load_image(path, role="fixed image")
    ref = nib.load(str(path))
    assert img.shape == (33, 41, 25)
    np.testing.assert_array_equal(img.affine, ref.affine)
    np.testing.assert_array_equal(img.data, np.asanyarray(ref.dataobj))
    np.testing.assert_allclose(img.spacing, ref.header.get_zooms()[:3])


def test_nibabel_example4d_is_rejected():
    path = NIB_DATA / "example4d.nii.gz"
    if not path.exists():
        pytest.skip("nibabel test data not installed")
    with pytest.raises(ImageError) as e:
        load_image(path, role="moving image")
    _assert_one_line(e.value, "moving image", str(path), "4-D (128, 96, 24, 2)", "extract one volume")


def test_singleton_4d_is_squeezed(tmp_path):
    d = _data(np.float32)[..., None]
    nib.Nifti1Image(d, AFFINES["oblique"]).to_filename(str(tmp_path / "one.nii.gz"))
    img = load_image(tmp_path / "one.nii.gz")
    assert img.shape == (9, 10, 11)
    np.testing.assert_array_equal(img.data, d[..., 0])


# -- bad inputs ------------------------------------------------------------------------------------

def _good_bytes(tmp_path, ext=".nii.gz"):
    p = tmp_path / f"good{ext}"
    save_image(Image(_data(np.float32, (20, 21, 22)), np.eye(4)), p)
    return p.read_bytes()


def _bad_header(tmp_path, name, pixdim=None, sform=None):
    """A valid file whose header is then edited byte-wise (nibabel would 'fix' it on saving)."""
    d = _data(np.float32, (4, 5, 6))
    raw = nib.Nifti1Image(d, np.eye(4)).to_bytes()
    hdr = nib.Nifti1Header(raw[:348])
    if pixdim is not None:
        hdr["sform_code"] = 0
        hdr["qform_code"] = 1
        hdr["pixdim"][1:4] = pixdim
    if sform is not None:
        hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = sform[0], sform[1], sform[2]
        hdr["sform_code"] = 1
        hdr["qform_code"] = 0
    p = tmp_path / name
    p.write_bytes(gzip.compress(hdr.binaryblock + raw[348:]))
    return p


def _make_bad(kind: str, tmp_path: Path) -> Path:
    if kind == "missing":
        return tmp_path / "nothere.nii.gz"
    if kind == "directory":
        p = tmp_path / "dir.nii.gz"
        p.mkdir()
        return p
    if kind == "empty":
        p = tmp_path / "empty.nii.gz"
        p.write_bytes(b"")
        return p
    if kind == "truncated_gz":
        b = _good_bytes(tmp_path)
        p = tmp_path / "cut.nii.gz"
        p.write_bytes(b[: len(b) // 2])
        return p
    if kind == "truncated_nii":
        b = _good_bytes(tmp_path, ".nii")
        p = tmp_path / "cut.nii"
        p.write_bytes(b[: len(b) // 2])
        return p
    if kind == "not_nifti":
        p = tmp_path / "text.nii"
        p.write_bytes(b"this is not an image\n" * 40)
        return p
    if kind == "not_gzip":
        p = tmp_path / "plain.nii.gz"
        p.write_bytes(_good_bytes(tmp_path, ".nii"))  # uncompressed bytes under a .gz name
        return p
    if kind == "corrupt_header":
        b = bytearray(gzip.decompress(_good_bytes(tmp_path)))
        b[0:4] = b"\x00\x00\x00\x00"  # sizeof_hdr must be 348
        b[344:348] = b"xxxx"  # magic
        p = tmp_path / "hdr.nii.gz"
        p.write_bytes(gzip.compress(bytes(b)))
        return p
    if kind == "extension":
        p = tmp_path / "image.tif"  # .mha, .nrrd and DICOM are read (tests/test_formats.py)
        p.write_bytes(b"II*\x00")
        return p
    if kind == "zero_spacing":
        return _bad_header(tmp_path, "zero.nii.gz", pixdim=(1.0, 0.0, 1.0))
    if kind == "negative_spacing":
        return _bad_header(tmp_path, "neg.nii.gz", pixdim=(1.0, -2.0, 1.0))
    if kind == "nan_spacing":
        return _bad_header(tmp_path, "nan.nii.gz", pixdim=(np.nan, 1.0, 1.0))
    if kind == "singular_sform":
        s = np.eye(4)
        s[:3, 2] = [1.0, 0.0, 0.0]  # k axis parallel to i
        return _bad_header(tmp_path, "singular.nii.gz", sform=s)
    if kind == "nan_voxels":
        d = _data(np.float32, (4, 5, 6))
        d[1, 2, 3] = np.nan
        d[0, 0, 0] = -np.inf
        p = tmp_path / "nanvox.nii.gz"
        nib.Nifti1Image(d, np.eye(4)).to_filename(str(p))
        return p
    if kind == "2d":
        p = tmp_path / "flat.nii.gz"
        nib.Nifti1Image(np.zeros((5, 6), np.float32), np.eye(4)).to_filename(str(p))
        return p
    if kind == "4d":
        p = tmp_path / "four.nii.gz"
        nib.Nifti1Image(np.zeros((5, 6, 7, 3), np.float32), np.eye(4)).to_filename(str(p))
        return p
    if kind == "complex":
        p = tmp_path / "cplx.nii.gz"
        nib.Nifti1Image(np.zeros((5, 6, 7), np.complex64), np.eye(4)).to_filename(str(p))
        return p
    raise AssertionError(kind)


BAD = {
    "missing": (ImageIOError, "does not exist"),
    "directory": (ImageIOError, "folder"),
    "empty": (ImageIOError, "empty"),
    "truncated_gz": (ImageIOError, "truncated"),
    "truncated_nii": (ImageIOError, "truncated"),
    "not_nifti": (ImageIOError, "cannot be read as NIfTI"),
    "not_gzip": (ImageIOError, "cannot be read as NIfTI"),
    "corrupt_header": (ImageIOError, "cannot be read as NIfTI"),
    "extension": (ImageIOError, "unsupported extension"),
    "zero_spacing": (ImageError, "spacing"),
    "negative_spacing": (ImageError, "spacing"),
    "nan_spacing": (ImageError, "spacing"),
    "singular_sform": (ImageError, "singular"),
    "nan_voxels": (ImageError, "2 NaN/Inf voxels"),
    "2d": (ImageError, "2-D"),
    "4d": (ImageError, "4-D (5, 6, 7, 3)"),
    "complex": (ImageError, "complex"),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_input(tmp_path, kind):
    path = _make_bad(kind, tmp_path)
    cls, text = BAD[kind]
    with pytest.raises(cls) as e:
        load_image(path, role="fixed image")
    assert isinstance(e.value, FastImpactError)
    assert isinstance(e.value, OSError if cls is ImageIOError else ValueError)
    _assert_one_line(e.value, "fixed image", str(path), text)


def test_nan_voxels_can_be_allowed(tmp_path):
    img = load_image(_make_bad("nan_voxels", tmp_path), allow_nonfinite=True)
    assert np.isnan(img.data).sum() == 1 and np.isinf(img.data).sum() == 1


def test_integer_dtype_out_of_range(tmp_path):
    p = tmp_path / "big.nii.gz"
    save_image(Image(np.full((3, 4, 5), 1000, np.int16), np.eye(4)), p)
    with pytest.raises(ImageError) as e:
        load_image(p, dtype=np.uint8, role="moving image")
    _assert_one_line(e.value, "moving image", str(p), "uint8")


def test_save_errors(tmp_path):
    img = Image(np.zeros((3, 4, 5), np.float32), np.eye(4))
    with pytest.raises(ImageIOError) as e:
        save_image(img, tmp_path / "out.tif")
    _assert_one_line(e.value, "out.tif", "unsupported extension")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ImageIOError) as e:
        save_image(img, tmp_path / "afile" / "out.nii.gz")
    _assert_one_line(e.value, "out.nii.gz", "cannot be written")


def test_no_nibabel_at_import():
    code = (
        "import sys, fastimpact.image, fastimpact.io, fastimpact.data; "
        "assert 'nibabel' not in sys.modules, 'nibabel imported'"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert r.returncode == 0, r.stderr


# -- world convention and displacement fields --------------------------------------------------

def test_ras_lps_helpers():
    rng = np.random.default_rng(5)
    p = rng.normal(size=(7, 3))
    np.testing.assert_array_equal(ras_to_lps(p), p * [-1, -1, 1])
    np.testing.assert_array_equal(lps_to_ras(ras_to_lps(p)), p)
    t = np.eye(4)
    t[:3, :3] = _rotation(3) * 1.1
    t[:3, 3] = [4.0, -2.0, 7.0]
    t_lps = ras_matrix_to_lps(t)
    ph = np.c_[p, np.ones(7)]
    np.testing.assert_allclose((np.c_[ras_to_lps(p), np.ones(7)] @ t_lps.T)[:, :3],
                               ras_to_lps((ph @ t.T)[:, :3]), atol=1e-12)


def _smooth_field(shape, seed=0):
    """A non-trivial smooth displacement (X, Y, Z, 3), mm, different in every component."""
    rng = np.random.default_rng(seed)
    i, j, k = np.meshgrid(*(np.linspace(0, 1, n) for n in shape), indexing="ij")
    comps = []
    for c in range(3):
        a, b, d = rng.uniform(1, 3, size=3)
        comps.append((c + 1.5) * np.sin(a * i + 0.3 * c) * np.cos(b * j) + d * k * k + 0.2 * c)
    return np.stack(comps, axis=-1)


@pytest.mark.parametrize("key", ["oblique_flipped", "permuted"])
def test_displacement_read_by_simpleitk(tmp_path, key):
    sitk = pytest.importorskip("SimpleITK")
    shape = (9, 8, 7)
    ref = Image(np.zeros(shape, np.float32), AFFINES[key])
    u = _smooth_field(shape)
    path = tmp_path / "disp.nii.gz"
    save_displacement_itk(u, ref, path)
    hdr = nib.load(str(path)).header
    assert hdr.get_data_shape() == shape + (1, 3)
    assert int(hdr["intent_code"]) == 1007 and hdr.get_data_dtype() == np.float32
    field = sitk.ReadImage(str(path))
    assert field.GetSize() == shape and field.GetNumberOfComponentsPerPixel() == 3
    tx = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    for v in [(0, 0, 0), (4, 3, 2), (8, 7, 6), (1, 6, 5)]:
        x = ref.index_to_world(v)  # fixed point, RAS
        got = np.array(tx.TransformPoint(tuple(ras_to_lps(x).tolist())))
        np.testing.assert_allclose(got, ras_to_lps(x + u[v]), atol=1e-4)
    # Between voxel centres ITK interpolates linearly: check one midpoint as well.
    mid = ref.index_to_world((2.5, 3.0, 4.0))
    got = np.array(tx.TransformPoint(tuple(ras_to_lps(mid).tolist())))
    np.testing.assert_allclose(got, ras_to_lps(mid + 0.5 * (u[2, 3, 4] + u[3, 3, 4])), atol=1e-4)


def test_displacement_round_trip_and_errors(tmp_path):
    shape = (6, 5, 4)
    ref = Image(np.zeros(shape, np.int16), AFFINES["oblique"])
    u = _smooth_field(shape, seed=2)
    path = tmp_path / "d.nii.gz"
    save_displacement_itk(u, ref, path)
    field, grid = load_displacement_itk(path)
    assert field.shape == shape + (3,) and field.dtype == np.float64
    np.testing.assert_allclose(field, u, atol=1e-5)  # float32 on disk
    assert grid.shape == shape
    np.testing.assert_allclose(grid.affine, ref.affine, atol=AFFINE_ATOL)
    with pytest.raises(ImageError) as e:
        save_displacement_itk(u[:-1], ref, tmp_path / "x.nii.gz")
    _assert_one_line(e.value, "(5, 5, 4, 3)")
    bad = u.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ImageError):
        save_displacement_itk(bad, ref, tmp_path / "x.nii.gz")
    assert not (tmp_path / "x.nii.gz").exists()
    scalar = tmp_path / "scalar.nii.gz"
    save_image(Image(np.zeros(shape, np.float32), np.eye(4)), scalar)
    with pytest.raises(ImageError) as e:
        load_displacement_itk(scalar)
    _assert_one_line(e.value, str(scalar), "(X, Y, Z, 1, 3)")
    with pytest.raises(ImageIOError):
        load_displacement_itk(tmp_path / "none.nii.gz")


# -- atomic outputs ----------------------------------------------------------------------------

def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_output_dir_success_and_overwrite(tmp_path):
    out = tmp_path / "a" / "b"
    img = Image(np.ones((3, 4, 5), np.float32), np.eye(4))
    with output_dir(out, force=False, names=["warped.nii.gz", "field.nii.gz"]) as tmp:
        assert tmp.parent == out and tmp.name.startswith(".fastimpact-tmp-")
        save_image(img, tmp / "warped.nii.gz")
        (tmp / "log.json").write_text("{}")
        assert _entries(out) == [tmp.name]  # nothing in place before success
    assert _entries(out) == ["log.json", "warped.nii.gz"]
    with pytest.raises(ImageIOError) as e:
        with output_dir(out, force=False, names=["warped.nii.gz"]):
            pytest.fail("must refuse before yielding")
    _assert_one_line(e.value, str(out / "warped.nii.gz"), "--force")
    # An output not announced in names is still refused at commit time.
    with pytest.raises(ImageIOError):
        with output_dir(out, force=False, names=["other.nii.gz"]) as tmp:
            (tmp / "log.json").write_text("{new}")
    assert (out / "log.json").read_text() == "{}"
    assert _entries(out) == ["log.json", "warped.nii.gz"]
    with output_dir(out, force=True, names=["warped.nii.gz"]) as tmp:
        save_image(img.with_data(np.full((3, 4, 5), 7.0, np.float32)), tmp / "warped.nii.gz")
    assert load_image(out / "warped.nii.gz").data[0, 0, 0] == 7.0
    assert _entries(out) == ["log.json", "warped.nii.gz"]


def test_output_dir_failure_leaves_nothing(tmp_path):
    out = tmp_path / "new" / "run"
    with pytest.raises(RuntimeError):
        with output_dir(out, force=False, names=["warped.nii.gz"]) as tmp:
            (tmp / "warped.nii.gz").write_bytes(b"partial")
            raise RuntimeError("registration failed")
    assert not (tmp_path / "new").exists()
    existing = tmp_path / "old"
    existing.mkdir()
    (existing / "keep.txt").write_text("k")
    with pytest.raises(KeyboardInterrupt):
        with output_dir(existing, force=True, names=["keep.txt"]) as tmp:
            (tmp / "keep.txt").write_text("partial")
            raise KeyboardInterrupt
    assert _entries(existing) == ["keep.txt"] and (existing / "keep.txt").read_text() == "k"


def test_output_dir_not_writable(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ImageIOError) as e:
        with output_dir(tmp_path / "afile" / "out", force=True, names=[]):
            pass
    _assert_one_line(e.value, "not writable", "-o")
    with pytest.raises(ImageIOError) as e:
        with output_dir(tmp_path / "afile", force=True, names=[]):
            pass
    _assert_one_line(e.value, "is a file")


def test_atomic_write_path(tmp_path):
    target = tmp_path / "sub" / "out.nii.gz"
    img = Image(np.ones((3, 4, 5), np.float32), AFFINES["flipped"])
    with atomic_write_path(target, force=False) as tmp:
        assert tmp.parent == target.parent and tmp.name.endswith(".nii.gz")
        save_image(img, tmp)
        assert not target.exists()
    np.testing.assert_array_equal(load_image(target).data, img.data)
    assert _entries(target.parent) == ["out.nii.gz"]
    with pytest.raises(ImageIOError) as e:
        with atomic_write_path(target, force=False):
            pass
    _assert_one_line(e.value, str(target), "--force")
    with pytest.raises(ValueError):
        with atomic_write_path(target, force=True) as tmp:
            tmp.write_bytes(b"partial")
            raise ValueError("boom")
    assert _entries(target.parent) == ["out.nii.gz"]
    np.testing.assert_array_equal(load_image(target).data, img.data)
    with pytest.raises(RuntimeError):
        with atomic_write_path(tmp_path / "fresh" / "x.nii", force=False) as tmp:
            raise RuntimeError
    assert not (tmp_path / "fresh").exists()
    with pytest.raises(ImageIOError):
        with atomic_write_path(tmp_path, force=True):
            pass


# -- demo data ------------------------------------------------------------------------------------

def test_demo_data():
    from fastimpact.data import demo_paths

    paths = demo_paths()
    assert set(paths) == {"t1", "gm", "wm"}
    assert sum(p.stat().st_size for p in paths.values()) < 1.5e6
    assert (paths["t1"].parent / "LICENSE_MNI152.txt").is_file()
    imgs = {k: load_image(p, role=f"demo {k}") for k, p in paths.items()}
    for k, img in imgs.items():
        assert img.shape == (99, 117, 95) and img.dtype == np.uint8, k
        np.testing.assert_allclose(img.spacing, 2.0)
        np.testing.assert_allclose(img.origin, [-98.0, -134.0, -72.0])
        assert imgs["t1"].same_grid(img)
    t1, gm, wm = (imgs[k].data.astype(float) for k in ("t1", "gm", "wm"))
    # Anatomy sanity: WM is brighter than GM on T1, and the tissue maps are probabilities.
    assert t1[wm > 200].mean() > t1[gm > 200].mean() + 20
    assert (gm + wm).max() <= 255 + 2


def test_downsample_keeps_grid_and_levels():
    from fastimpact.data.build_demo_data import downsample

    vol = np.full((11, 8, 9), 42.0)
    small = downsample(vol)
    assert small.shape == (6, 4, 5)
    np.testing.assert_allclose(small, 42.0)
    # A linear ramp is reproduced at the even voxels (the Gaussian is symmetric).
    ramp = np.broadcast_to(np.arange(21.0)[:, None, None], (21, 5, 5))
    np.testing.assert_allclose(downsample(ramp)[2:-2, 2, 2], np.arange(4.0, 17.0, 2.0), atol=1e-9)


def test_mni152_1mm_paths_missing_nilearn(monkeypatch):
    import importlib.util

    from fastimpact.data import mni152_1mm_paths

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "nilearn" else real(name, *a))
    with pytest.raises(ImageIOError) as e:
        mni152_1mm_paths()
    _assert_one_line(e.value, "pip install --no-deps nilearn")


# -- reproducible bytes and concurrent output folders ------------------------------------------

def test_gzip_outputs_have_no_timestamp_and_repeat_byte_for_byte(tmp_path, monkeypatch):
    import time

    shape = (7, 6, 5)
    ref = Image(np.random.default_rng(3).random(shape).astype(np.float32), AFFINES["oblique"])
    u = _smooth_field(shape, seed=4)
    blobs = {}
    for run, fake_now in enumerate((1.0e9, 1.7e9)):  # a different clock for each run
        monkeypatch.setattr(time, "time", lambda fake_now=fake_now: fake_now)
        save_image(ref, tmp_path / f"w{run}.nii.gz")
        save_displacement_itk(u, ref, tmp_path / f"d{run}.nii.gz")
    monkeypatch.undo()
    for name in ("w", "d"):
        a = (tmp_path / f"{name}0.nii.gz").read_bytes()
        b = (tmp_path / f"{name}1.nii.gz").read_bytes()
        assert a[:2] == b"\x1f\x8b" and a[4:8] == b"\x00\x00\x00\x00"  # gzip MTIME field = 0
        assert a == b
        blobs[name] = gzip.decompress(a)
    np.testing.assert_array_equal(load_image(tmp_path / "w1.nii.gz").data, ref.data)
    assert len(blobs["d"]) >= 352 + 4 * u.size  # a whole NIfTI-1 file inside


def test_output_dir_tolerates_a_concurrent_run_creating_the_folder(tmp_path, monkeypatch):
    out = tmp_path / "new" / "run"
    real_mkdir = Path.mkdir

    def racing_mkdir(self, *args, **kwargs):  # another run wins the race for every folder
        real_mkdir(self, *args, **kwargs)
        raise FileExistsError(17, "File exists", str(self))

    monkeypatch.setattr(Path, "mkdir", racing_mkdir)
    with output_dir(out, force=False, names=["warped.nii.gz"]) as tmp:
        (tmp / "warped.nii.gz").write_bytes(b"x")
    assert _entries(out) == ["warped.nii.gz"]
    # the folders belong to the other run: a failure here must not remove them
    out2 = tmp_path / "new" / "run2"
    with pytest.raises(RuntimeError):
        with output_dir(out2, force=False, names=[]):
            raise RuntimeError("registration failed")
    monkeypatch.undo()
    assert out2.is_dir() and _entries(out2) == []
    assert _entries(out) == ["warped.nii.gz"]


# -- interruption (issue 17): stale temporaries and an uncut commit ---------------------------------

def test_stale_temporaries_from_dead_processes_are_removed(tmp_path):
    import socket
    import subprocess
    import sys
    import time

    from fastimpact.io import TMP_MAX_AGE_S, output_dir, remove_stale_temporaries

    host = "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:40]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    names = {
        "dead": f".fastimpact-tmp-{host}-{dead.pid}-abc",
        "alive": f".fastimpact-tmp-{host}-{os.getppid()}-def",  # a running process: its folder stays
        "other_host": f".fastimpact-tmp-otherhost-{dead.pid}-ghi",  # cannot tell: stays (until old)
        "old": ".fastimpact-tmp-xyz",  # an old-style name, older than the limit
        "file": f".fastimpact-tmp-{host}-{dead.pid}-jkl.nii.gz",  # atomic_write_path's temporary file
    }
    for key, n in names.items():
        if key == "file":
            (tmp_path / n).write_bytes(b"partial")
        else:
            (tmp_path / n).mkdir()
            (tmp_path / n / "warped.nii.gz").write_bytes(b"partial")
    past = time.time() - TMP_MAX_AGE_S - 60
    os.utime(tmp_path / names["old"], (past, past))
    (tmp_path / "keep.txt").write_text("not ours")
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted([names["dead"], names["old"], names["file"]])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([names["alive"], names["other_host"], "keep.txt"])
    # output_dir cleans up the folder it writes into
    (tmp_path / names["dead"]).mkdir()
    with output_dir(tmp_path, force=True, names=["a.txt"]) as tmp:
        assert tmp.name.startswith(f".fastimpact-tmp-{host}-{os.getpid()}-")
        (tmp / "a.txt").write_text("new")
    assert not (tmp_path / names["dead"]).exists() and (tmp_path / "a.txt").read_text() == "new"


def test_an_interruption_during_the_commit_waits_for_its_end(tmp_path, monkeypatch):
    import fastimpact.io as fio

    target = tmp_path / "out"
    target.mkdir()
    for n in ("a", "b", "c"):
        (target / n).write_text("old")
    real_replace = os.replace
    calls = []

    def replace(src, dst):  # the signal arrives at the first move; the handler defers it
        calls.append(fio.defer_interrupt(KeyboardInterrupt()))
        real_replace(src, dst)

    monkeypatch.setattr(fio.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        with fio.output_dir(target, force=True, names=["a", "b", "c"]) as tmp:
            for n in ("a", "b", "c"):
                (tmp / n).write_text("new")
    assert calls == [True, True, True]
    assert {p.name: p.read_text() for p in target.iterdir()} == {"a": "new", "b": "new", "c": "new"}
    assert fio.defer_interrupt(KeyboardInterrupt()) is False  # outside a commit: the handler raises


def test_gzip_is_written_in_chunks_and_reads_back_exactly(tmp_path, monkeypatch):
    import fastimpact.io as fio

    monkeypatch.setattr(fio, "GZIP_CHUNK", 1000)  # many pieces, boundaries inside voxels
    shape = (31, 17, 13)
    ref = Image(np.random.default_rng(5).random(shape).astype(np.float32), AFFINES["flipped"])
    save_image(ref, tmp_path / "w.nii.gz")
    np.testing.assert_array_equal(load_image(tmp_path / "w.nii.gz").data, ref.data)
    u = _smooth_field(shape, seed=6)
    save_displacement_itk(u, ref, tmp_path / "d.nii.gz")
    field, _ = load_displacement_itk(tmp_path / "d.nii.gz")
    np.testing.assert_array_equal(field, u.astype(np.float32).astype(np.float64))
    # the same bytes as one whole-buffer deflate would give when decompressed
    raw = gzip.decompress((tmp_path / "w.nii.gz").read_bytes())
    assert raw == nib.load(str(tmp_path / "w.nii.gz")).to_bytes()
