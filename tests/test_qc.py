"""QC pictures: plane orientation in physical space, seams and edges that show misalignment, the
deformed grid following the field, folds marked, the HTML page, and `register --qc`."""

import json

import numpy as np
import pytest
from PIL import Image as PILImage

from conftest import blob_volume
from fastimpact.cli.main import main
from fastimpact.evaluation import jacobian_determinant
from fastimpact.image import Image, make_affine
from fastimpact.qc import FOLD_RGB, PLANES, QC_FILES, _Planes, checkerboard, deformed_grid, edge_overlay, write_qc

GAP, TOP = 6, 14  # the layout of qc._compose


def world(shape, affine):
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(np.float64)
    return idx @ affine[:3, :3].T + affine[:3, 3]


def panel(img, planes, which):
    """Crop plane ``which`` (0 sagittal, 1 coronal, 2 axial) out of a composed picture."""
    a = np.asarray(img)
    x = GAP
    for pl in PLANES[:which]:
        x += planes.size(pl)[0] + GAP
    w, h = planes.size(PLANES[which])
    return a[TOP:TOP + h, x:x + w]


def test_planes_show_world_axes_whatever_the_voxel_order():
    # voxel axis 0 -> world -y, 1 -> +z, 2 -> -x, slightly rotated, anisotropic
    direction = np.array([[0.0, 0.0, -1.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    c, s = np.cos(0.1), np.sin(0.1)
    direction = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ direction
    shape, spacing = (18, 14, 22), (1.5, 2.5, 1.0)
    affine = make_affine(spacing, (5.0, -7.0, 3.0), direction)
    planes = _Planes(shape, affine)
    x = world(shape, affine)
    center = np.array(shape) // 2
    for name, wn, wh, wv in PLANES:
        pl = (name, wn, wh, wv)
        horiz = planes.slice2d(x[..., wh], pl, center)
        vert = planes.slice2d(x[..., wv], pl, center)
        assert np.all(np.diff(horiz, axis=1) > 0), name  # world coordinate grows to the right
        assert np.all(np.diff(vert, axis=0) < 0), name   # and upwards
        # square pixels in mm: the display size follows the physical extents
        w, h = planes.size(pl)
        ext = np.array(shape) * np.array(spacing)
        assert w == round(ext[planes.vox[wh]] / planes.mm_per_px) and h == round(ext[planes.vox[wv]] / planes.mm_per_px)


def test_checkerboard_seams_and_edges_show_misalignment():
    affine = make_affine((2.0, 2.0, 2.0), (0, 0, 0))
    f = blob_volume((24, 26, 22))
    shifted = blob_volume((24, 26, 22), shift=(3.0, -2.0, 2.0))
    planes = _Planes(f.shape, affine)
    c = np.array(f.shape) // 2

    def seams(img):
        g = np.asarray(img)[TOP:, :, 0].astype(int)
        return np.abs(np.diff(g, axis=1)).max()

    assert seams(checkerboard(planes, f, shifted, c)) > 3 * seams(checkerboard(planes, f, f, c))

    def one_sided(img):
        a = np.asarray(img)[TOP:].astype(int)
        green = (a[..., 1] == 255) & (a[..., 0] < 255)
        magenta = (a[..., 0] == 255) & (a[..., 2] == 255) & (a[..., 1] < 255)
        return green.sum() + magenta.sum()

    same = edge_overlay(planes, f, f, c)
    assert one_sided(same) == 0 and (np.asarray(same)[TOP:] == 255).all(axis=-1).sum() > 50  # white edges only
    assert one_sided(edge_overlay(planes, f, shifted, c)) > 100


def test_deformed_grid_moves_with_the_field():
    shape = (24, 20, 16)
    affine = make_affine((2.0, 2.0, 2.0), (0, 0, 0))
    planes = _Planes(shape, affine)
    assert planes.mm_per_px == pytest.approx(1 / 6)
    f = np.ones(shape, np.float32)
    c = np.array(shape) // 2

    def line_columns(u, which):
        p = panel(deformed_grid(planes, f, u, c), planes, which).astype(int)
        yellow = (p[..., 0] == 255) & (p[..., 1] == 215)
        return np.flatnonzero(yellow.sum(axis=0) > 0.8 * p.shape[0])

    zero = np.zeros(shape + (3,), np.float32)
    u = zero.copy()
    u[..., 0] = 2.0  # 2 mm to the right (world +x) = 12 pixels
    for which in (1, 2):  # coronal and axial show world x horizontally
        assert len(line_columns(u, which)) >= 8
        assert np.array_equal(line_columns(u, which), line_columns(zero, which)[:len(line_columns(u, which))] + 12)
    assert len(line_columns(zero, 0)) >= 8 and np.array_equal(line_columns(u, 0), line_columns(zero, 0))  # the sagittal plane shows y: unchanged


def folding_field(shape, affine):
    x = world(shape, affine)
    cx = x[..., 0].mean()
    r2 = ((x - x.reshape(-1, 3).mean(0)) ** 2).sum(-1)
    u = np.zeros(shape + (3,), np.float32)
    u[..., 0] = -3.0 * (x[..., 0] - cx) * np.exp(-r2 / (2 * 5.0**2))
    return u


def test_write_qc_marks_folds_and_links_the_figures(tmp_path):
    shape = (26, 24, 20)
    affine = make_affine((1.5, 1.5, 2.0), (-10, -10, -10))
    fixed = Image(blob_volume(shape), affine)
    u = folding_field(shape, affine)
    det = jacobian_determinant(u, affine)
    assert (det <= 0).any()
    figures = {"warnings": ["folding: 1.2% of the voxels fold"], "quality": {"jacobian": {"region": "none", "all": {
        "n_voxels": det.size, "min": float(det.min()), "max": float(det.max()), "std_log_jacobian": 0.1,
        "folded_voxels": int((det <= 0).sum()), "folding_fraction": float((det <= 0).mean())}}},
        "labels": {"dice_mean": 0.8125}}
    (tmp_path / "bad").mkdir()
    (tmp_path / "good").mkdir()
    paths = write_qc(tmp_path / "bad", fixed, fixed.data, u, figures=figures, links={"report.json": "../report.json"})
    write_qc(tmp_path / "good", fixed, fixed.data, np.zeros_like(u))
    assert {p.name for p in (tmp_path / "bad").iterdir()} == set(QC_FILES)

    def fold_pixels(folder):
        a = np.asarray(PILImage.open(folder / "jacobian.png").convert("RGB"))[:-30]  # above the colour bar
        return int(np.all(a == FOLD_RGB, axis=-1).sum())

    assert fold_pixels(tmp_path / "bad") > 50 and fold_pixels(tmp_path / "good") == 0
    page = (tmp_path / "bad" / "report.html").read_text()
    assert "This result looks unreliable" in page and "folding: 1.2% of the voxels fold" in page
    assert "0.8125" in page and "href='../report.json'" in page
    assert all(f"src='{n}'" in page for n in QC_FILES if n.endswith(".png"))
    assert "most folded voxel" in page and "No warning" in (tmp_path / "good" / "report.html").read_text()
    assert paths["jacobian"].endswith("jacobian.png")


def test_register_qc_writes_the_pictures_in_the_output_folder(tmp_path, capsys, write_nifti):
    f = write_nifti("f.nii.gz", blob_volume())
    m = write_nifti("m.nii.gz", blob_volume(shift=(1.0, -1.0, 0.5)))
    mask = np.zeros((28, 30, 26), np.uint8)
    mask[4:24, 5:25, 3:22] = 1
    fm = write_nifti("mask.nii.gz", mask)
    out = tmp_path / "out"
    fast = ["--levels", "1", "--iterations", "20", "--samples", "500", "--affine-iterations", "5", "--grid-spacing", "16"]
    code = main([str(a) for a in ["register", f, m, "-o", out, "--json", "--qc", "--fixed-mask", fm, *fast]])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["outputs"]["qc"] == str(out / "qc" / "report.html") and isinstance(doc["warnings"], list)
    assert {p.name for p in (out / "qc").iterdir()} == set(QC_FILES)
    rep = json.loads((out / "report.json").read_text())
    assert "qc" in rep["timings_s"] and rep["quality"]["jacobian"]["all"]["n_voxels"] == 28 * 30 * 26
    jac = rep["quality"]["jacobian"]  # inside / outside the --fixed-mask
    assert jac["region"] == "fixed mask" and jac["inside"]["n_voxels"] == mask.sum() and doc["jacobian"]["region"] == "fixed mask"
    assert "../report.json" in (out / "qc" / "report.html").read_text()
    # the qc folder is an output like the others: not overwritten without --force
    code = main([str(a) for a in ["register", f, m, "-o", out, "--qc", *fast]])
    _, err = capsys.readouterr()
    assert code != 0 and "--force" in err
