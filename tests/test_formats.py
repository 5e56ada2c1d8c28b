"""MetaImage, NRRD and DICOM through SimpleITK: the same physical space as NIfTI (issue 13, item 2).

Independent checks: SimpleITK's own TransformIndexToPhysicalPoint (LPS) and nibabel's affine (RAS)
of the same image, written by the other library.
"""

import json
import sys

import nibabel as nib
import numpy as np
import pytest

sitk = pytest.importorskip("SimpleITK")

from conftest import blob_volume  # noqa: E402
from fastimpact.cli.main import main  # noqa: E402
from fastimpact.errors import FastImpactError, ImageError, ImageIOError  # noqa: E402
from fastimpact.image import Image, make_affine  # noqa: E402
from fastimpact.io import affine_from_itk, itk_from_affine, load_image, save_image  # noqa: E402

FAST = ["--levels", "1", "--iterations", "20", "--samples", "500", "--affine-iterations", "5", "--grid-spacing", "16"]


def _rotation(ax, ay, az):
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


OBLIQUE = make_affine((0.8, 1.3, 2.1), (10.0, -20.0, 5.0), _rotation(0.35, -0.26, 0.52) @ np.diag([1, -1, 1]))


def _ras_of_index_sitk(simg, idx):
    p = np.asarray(simg.TransformIndexToPhysicalPoint(tuple(int(i) for i in idx)))
    return p * [-1.0, -1.0, 1.0]


@pytest.mark.parametrize("ext", [".mha", ".nrrd", ".mhd"])
def test_oblique_anisotropic_round_trip_matches_nifti(tmp_path, ext):
    data = blob_volume((9, 11, 7))
    save_image(Image(data, OBLIQUE), tmp_path / f"a{ext}")
    save_image(Image(data, OBLIQUE), tmp_path / "a.nii.gz")
    back = load_image(tmp_path / f"a{ext}")
    np.testing.assert_array_equal(back.data, data)
    assert back.data.dtype == np.float32
    np.testing.assert_allclose(back.affine, OBLIQUE, atol=1e-9)
    # independently: SimpleITK's world points of the file vs nibabel's of the NIfTI version
    simg = sitk.ReadImage(str(tmp_path / f"a{ext}"))
    nimg = nib.load(str(tmp_path / "a.nii.gz"))
    for idx in [(0, 0, 0), (8, 10, 6), (3, 7, 2)]:
        np.testing.assert_allclose(_ras_of_index_sitk(simg, idx), (nimg.affine @ [*idx, 1])[:3], atol=1e-5)
        assert simg.GetPixel(tuple(int(i) for i in idx)) == pytest.approx(float(data[idx]))


def test_files_written_by_simpleitk_read_like_their_nifti_conversion(tmp_path):
    arr = (blob_volume((7, 8, 9)) // 10).astype(np.int16)  # ITK array order is (z, y, x)
    simg = sitk.GetImageFromArray(arr.transpose(2, 1, 0))
    simg.SetSpacing((0.7, 1.1, 3.0))
    simg.SetOrigin((-12.0, 30.5, 4.0))
    simg.SetDirection(tuple(_rotation(0.1, 0.4, -0.3).ravel()))
    sitk.WriteImage(simg, str(tmp_path / "s.nrrd"))
    sitk.WriteImage(simg, str(tmp_path / "s.nii.gz"))  # SimpleITK's own LPS -> RAS conversion
    ours = load_image(tmp_path / "s.nrrd")
    ref = load_image(tmp_path / "s.nii.gz")
    assert ours.data.dtype == np.int16
    np.testing.assert_array_equal(ours.data, arr)
    np.testing.assert_array_equal(ours.data, ref.data)
    np.testing.assert_allclose(ours.affine, ref.affine, atol=1e-5)


def test_itk_geometry_helpers_are_inverse():
    origin, spacing, direction = itk_from_affine(OBLIQUE)
    np.testing.assert_allclose(spacing, (0.8, 1.3, 2.1))
    np.testing.assert_allclose(affine_from_itk(origin, spacing, direction), OBLIQUE, atol=1e-12)
    # the RAS x and y axes are ITK's -L and -P
    np.testing.assert_allclose(affine_from_itk((1, 2, 3), (1, 1, 1), np.eye(3))[:3, 3], (-1, -2, 3))


def test_label_dtypes_are_kept(tmp_path):
    labels = (blob_volume((6, 7, 8)) > 40).astype(np.uint8) * 7
    save_image(Image(labels, OBLIQUE), tmp_path / "l.mha")
    back = load_image(tmp_path / "l.mha")
    assert back.data.dtype == np.uint8
    np.testing.assert_array_equal(back.data, labels)
    save_image(Image(labels > 0, OBLIQUE), tmp_path / "b.nrrd")  # bool -> uint8, as for NIfTI
    assert load_image(tmp_path / "b.nrrd").data.dtype == np.uint8


def _write_dicom_series(folder, arr, spacing, origin, direction):
    folder.mkdir()
    vol = sitk.GetImageFromArray(arr.transpose(2, 1, 0))
    vol.SetSpacing(spacing)
    vol.SetOrigin(origin)
    vol.SetDirection(tuple(np.asarray(direction).ravel()))
    d = np.asarray(direction)
    orient = "\\".join(f"{v:.10f}" for v in (*d[:, 0], *d[:, 1]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(arr.shape[2]):
        sl = vol[:, :, k]
        pos = vol.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, value in (("0008|0060", "MR"), ("0020|000d", "1.2.826.0.1.3680043.2.1125.1"),
                           ("0020|000e", "1.2.826.0.1.3680043.2.1125.1.1"), ("0020|0013", str(k + 1)),
                           ("0020|0032", "\\".join(f"{v:.10f}" for v in pos)), ("0020|0037", orient),
                           ("0018|0050", f"{spacing[2]:.10f}"), ("0008|0018", f"1.2.826.0.1.3680043.2.1125.1.1.{k + 1}")):
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(sl)


def test_dicom_series_folder_reads_with_its_geometry(tmp_path):
    arr = (blob_volume((10, 12, 6)) * 5).astype(np.int16)
    direction = _rotation(0.0, 0.0, 0.3)
    _write_dicom_series(tmp_path / "series", arr, (0.9, 0.9, 2.5), (-50.0, 20.0, 10.0), direction)
    img = load_image(tmp_path / "series", role="fixed image")
    np.testing.assert_array_equal(img.data, arr)
    expect = affine_from_itk((-50.0, 20.0, 10.0), (0.9, 0.9, 2.5), direction)
    np.testing.assert_allclose(img.affine, expect, atol=1e-4)
    # a folder with no series is refused in one line
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ImageIOError, match="no DICOM series"):
        load_image(tmp_path / "nothing", role="fixed image")


def test_missing_simpleitk_gives_the_install_hint(tmp_path, monkeypatch):
    save_image(Image(blob_volume((5, 6, 7)), OBLIQUE), tmp_path / "a.mha")
    monkeypatch.setitem(sys.modules, "SimpleITK", None)
    for call in (lambda: load_image(tmp_path / "a.mha", role="moving image"),
                 lambda: save_image(Image(np.zeros((4, 4, 4), np.float32)), tmp_path / "b.nrrd")):
        with pytest.raises(ImageIOError) as e:
            call()
        msg = str(e.value)
        assert 'pip install "fastimpact[itk]"' in msg and "\n" not in msg
    assert not (tmp_path / "b.nrrd").exists()


def test_bad_itk_files_give_one_line_errors(tmp_path):
    bad = tmp_path / "bad.mha"
    bad.write_bytes(b"ObjectType = Image\nNDims = 3\n")
    with pytest.raises(FastImpactError) as e:
        load_image(bad, role="fixed image")
    assert "bad.mha" in str(e.value) and "\n" not in str(e.value)
    flat = sitk.GetImageFromArray(np.zeros((5, 6), np.float32))
    sitk.WriteImage(flat, str(tmp_path / "flat.mha"))
    with pytest.raises(ImageError, match="2-D"):
        load_image(tmp_path / "flat.mha")
    vec = sitk.GetImageFromArray(np.zeros((4, 5, 6, 3), np.float32), isVector=True)
    sitk.WriteImage(vec, str(tmp_path / "vec.mha"))
    with pytest.raises(ImageError, match="components"):
        load_image(tmp_path / "vec.mha")


def test_register_on_mha_inputs_matches_nifti_inputs(tmp_path, capsys):
    fixed_aff = make_affine((2.0, 1.6, 2.4), (-30.0, -25.0, -20.0), _rotation(0.2, 0.0, -0.15))
    moving_aff = make_affine((1.8, 2.0, 2.0), (-28.0, -27.0, -22.0), _rotation(0.0, 0.1, 0.1))
    f, m = blob_volume(), blob_volume(shift=(1.0, -1.0, 0.5))
    paths = {}
    for ext in (".nii.gz", ".mha"):
        paths[ext] = (tmp_path / f"f{ext}", tmp_path / f"m{ext}")
        save_image(Image(f, fixed_aff), paths[ext][0])
        save_image(Image(m, moving_aff), paths[ext][1])
    res = {}
    for ext, (fp, mp) in paths.items():
        out = tmp_path / f"out{ext.replace('.', '_')}"
        code = main(["register", str(fp), str(mp), "-o", str(out), "--json", *FAST])
        stdout, err = capsys.readouterr()
        assert code == 0, err
        assert json.loads(stdout)["status"] == "ok"
        res[ext] = load_image(out / "warped.nii.gz")
    np.testing.assert_allclose(res[".mha"].affine, fixed_aff, atol=1e-9)
    np.testing.assert_allclose(res[".mha"].data, res[".nii.gz"].data, atol=1e-4)
    # apply onto an .mha label map: nearest by itself, dtype kept, .mha and .mhd outputs
    labels = (m > 40).astype(np.uint8) * 5
    save_image(Image(labels, moving_aff), tmp_path / "labels.mha")
    for name in ("lab_out.mha", "lab_out.mhd"):
        code = main(["apply", str(tmp_path / "out_mha" / "transform.json"), str(tmp_path / "labels.mha"),
                     "-o", str(tmp_path / name)])
        _, err = capsys.readouterr()
        assert code == 0, err
        assert "nearest" in err
        lab = load_image(tmp_path / name)
        assert lab.data.dtype == np.uint8 and set(np.unique(lab.data)) <= {0, 5}
        np.testing.assert_allclose(lab.affine, fixed_aff, atol=1e-9)
    assert not list(tmp_path.glob(".fastimpact-tmp-*"))
