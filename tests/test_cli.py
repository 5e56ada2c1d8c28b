"""The command line: outputs, --json, apply, and one-line errors for bad input."""

import gzip
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from fastimpact.cli.main import main
from conftest import blob_volume

FAST = ["--levels", "1", "--iterations", "20", "--samples", "500", "--affine-iterations", "5", "--grid-spacing", "16"]
OUTPUTS = {"warped.nii.gz", "displacement.nii.gz", "transform.json", "report.json"}


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def pair(write_nifti):
    return write_nifti("fixed.nii.gz", blob_volume()), write_nifti("moving.nii.gz", blob_volume(shift=(1.0, -1.0, 0.5)))


def test_version_is_light():
    code = (
        "import sys; from fastimpact.cli.main import main; rc = main(['--version']);"
        "heavy = [m for m in ('numpy', 'numba', 'nibabel', 'scipy') if m in sys.modules];"
        "print(rc, heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "fastimpact 0.1.0" in out
    assert out.strip().endswith("0 []")


def test_register_writes_all_outputs_and_json(pair, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = run(["register", *pair, "-o", out, "--json", *FAST], capsys)
    assert code == 0, err
    res = json.loads(stdout)
    assert res["status"] == "ok"
    assert {p.name for p in out.iterdir()} == OUTPUTS
    disp = nib.load(str(out / "displacement.nii.gz"))
    assert disp.shape == (28, 30, 26, 1, 3) and disp.header.get_intent()[0] == "vector"
    rep = json.loads((out / "report.json").read_text())
    assert rep["seed"] == 0 and rep["stages"] and "timings_s" in rep and rep["versions"]["numpy"]
    # existing outputs are not overwritten without --force
    code, _, err = run(["register", *pair, "-o", out, *FAST], capsys)
    assert code != 0 and "--force" in err and err.count("\n") == 1
    code, _, err = run(["register", *pair, "-o", out, "--force", *FAST], capsys)
    assert code == 0, err


def test_apply_reproduces_warped_image(pair, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(["register", *pair, "-o", out, *FAST, "--interpolation", "linear"], capsys)[0] == 0
    applied = tmp_path / "applied.nii.gz"
    code, _, err = run(["apply", out / "transform.json", pair[1], "-o", applied, "--interpolation", "linear"], capsys)
    assert code == 0, err
    a = nib.load(str(applied)).get_fdata()
    w = nib.load(str(out / "warped.nii.gz")).get_fdata()
    np.testing.assert_allclose(a, w, atol=1e-3)
    # labels keep integer values with nearest
    labels = (blob_volume(shift=(1.0, -1.0, 0.5)) > 50).astype(np.int16) * 3
    lp = tmp_path / "labels.nii.gz"
    nib.save(nib.Nifti1Image(labels, np.diag([2.0, 2.0, 2.0, 1.0])), str(lp))
    lo = tmp_path / "labels_out.nii.gz"
    assert run(["apply", out / "transform.json", lp, "-o", lo, "--interpolation", "nearest"], capsys)[0] == 0
    li = nib.load(str(lo))
    assert set(np.unique(np.asanyarray(li.dataobj))) <= {0, 3}


def _bad_inputs(tmp_path, write_nifti):
    good = write_nifti("good.nii.gz", blob_volume())
    empty = tmp_path / "empty.nii.gz"
    empty.write_bytes(b"")
    trunc = tmp_path / "trunc.nii.gz"
    raw = gzip.compress(nib.Nifti1Image(blob_volume(), np.eye(4)).to_bytes())
    trunc.write_bytes(raw[: len(raw) // 2])
    corrupt = tmp_path / "corrupt.nii"
    corrupt.write_bytes(b"not a nifti file at all" * 50)
    four = write_nifti("four.nii.gz", np.zeros((10, 10, 10, 2), np.float32))
    zero_sp = tmp_path / "zero.nii.gz"  # header edited byte-wise: nibabel would 'fix' it on saving
    raw = nib.Nifti1Image(blob_volume(), np.eye(4)).to_bytes()
    hdr = nib.Nifti1Header(raw[:348])
    hdr["sform_code"], hdr["qform_code"] = 0, 1
    hdr["pixdim"][1:4] = (2.0, 0.0, 2.0)
    zero_sp.write_bytes(gzip.compress(hdr.binaryblock + raw[348:]))
    nan = blob_volume()
    nan[3, 3, 3] = np.nan
    nanp = write_nifti("nan.nii.gz", nan)
    const = write_nifti("const.nii.gz", np.full((28, 30, 26), 7, np.float32))
    tiny = write_nifti("tiny.nii.gz", blob_volume((3, 30, 26)))
    emptymask = write_nifti("emptymask.nii.gz", np.zeros((28, 30, 26), np.uint8))
    fm = np.zeros((28, 30, 26), np.uint8)
    fm[:8] = 1
    mm = np.zeros((28, 30, 26), np.uint8)
    mm[-8:] = 1
    fmask = write_nifti("fmask.nii.gz", fm)
    mmask = write_nifti("mmask.nii.gz", mm)
    return {
        "missing file": ([tmp_path / "nope.nii.gz", good], "does not exist"),
        "empty file": ([empty, good], "empty"),
        "truncated file": ([good, trunc], "trunc"),
        "corrupt file": ([corrupt, good], "corrupt.nii"),
        "non-3D": ([four, good], "4-D"),
        "zero spacing": ([zero_sp, good], "spacing"),
        "NaN voxels": ([nanp, good], "NaN"),
        "constant image": ([good, const], "constant"),
        "too small": ([tiny, good], "too small"),
        "empty mask": ([good, good, "--fixed-mask", emptymask], "empty"),
        "disjoint masks": ([good, good, "--fixed-mask", fmask, "--moving-mask", mmask, "--init", "geometry"], "sample points"),
        "iterations": ([good, good, "--iterations", "-3"], "iterations"),
        "nothing to optimise": ([good, good, "--iterations", "0", "--no-affine"], "nothing would be optimised"),
        "samples": ([good, good, "--samples", "-1"], "samples"),
        "levels": ([good, good, "--levels", "0"], "levels"),
        "spacing": ([good, good, "--grid-spacing", "-4"], "grid_spacing"),
        "unknown option": ([good, good, "--frobnicate", "3"], "frobnicate"),
        "bad choice": ([good, good, "--metric", "ssd"], "ssd"),
    }


def test_bad_inputs_give_one_line_errors_and_no_outputs(tmp_path, write_nifti, capsys):
    cases = _bad_inputs(tmp_path, write_nifti)
    for name, (args, needle) in cases.items():
        out = tmp_path / f"out_{name.replace(' ', '_')}"
        code, stdout, err = run(["register", *FAST, *args, "-o", out], capsys)
        assert code != 0, name
        assert err.startswith("error: ") and err.count("\n") == 1, (name, err)
        assert needle.lower() in err.lower(), (name, err)
        assert "Traceback" not in err and "array(" not in err
        assert not out.exists() or not any(out.iterdir()), name


def test_unwritable_output_folder(pair, tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    code, _, err = run(["register", *pair, "-o", blocker / "sub", *FAST], capsys)
    assert code != 0 and err.count("\n") == 1 and "-o" in err
    if os.geteuid() != 0:  # root ignores permissions
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        code, _, err = run(["register", *pair, "-o", ro / "out", *FAST], capsys)
        assert code != 0 and "not writable" in err


def test_config_file_and_override(pair, tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text('metric = "ncc"\nlevels = 1\niterations = [15]\nsamples = 400\naffine = false\ngrid_spacing = 16.0\n')
    out = tmp_path / "o"
    code, stdout, err = run(["register", *pair, "-o", out, "--config", cfg, "--metric", "mi", "--json"], capsys)
    assert code == 0, err
    rep = json.loads((out / "report.json").read_text())
    assert rep["config"]["metric"] == "mi" and rep["config"]["iterations"] == [15]
    assert [s["stage"] for s in rep["stages"]] == ["bspline"]


def test_displacement_field_maps_points_like_fastimpact_in_simpleitk(pair, tmp_path, capsys):
    """SimpleITK reads displacement.nii.gz as a displacement-field transform that maps fixed
    points (LPS) to the moving points fastimpact's own transform gives."""
    import SimpleITK as sitk

    from fastimpact.apply import load_transform
    from fastimpact.io import lps_to_ras, ras_to_lps

    out = tmp_path / "o"
    assert run(["register", *pair, "-o", out, *FAST], capsys)[0] == 0
    transform, ref = load_transform(out / "transform.json")
    field = sitk.ReadImage(str(out / "displacement.nii.gz"), sitk.sitkVectorFloat64)
    tx = sitk.DisplacementFieldTransform(field)
    rng = np.random.default_rng(0)
    idx = rng.integers(2, np.array(ref.shape) - 2, size=(20, 3)).astype(float)  # voxel centres
    x = idx @ ref.affine[:3, :3].T + ref.affine[:3, 3]
    ours = transform.map_world(x)
    theirs = np.array([tx.TransformPoint(tuple(p)) for p in ras_to_lps(x)])
    np.testing.assert_allclose(lps_to_ras(theirs), ours, atol=1e-3)  # float32 field


def test_device_choice(pair, tmp_path, capsys, monkeypatch):
    from fastimpact.backend import cuda_available

    out = tmp_path / "d"
    monkeypatch.delenv("NUMBA_ENABLE_CUDASIM", raising=False)  # no simulator: a machine without a GPU
    if not cuda_available()[0]:
        code, _, err = run(["register", *pair, "-o", out, *FAST, "--device", "cuda"], capsys)
        assert code == 1 and err.count("\n") == 1 and "--device cpu" in err
        assert not out.exists()
    code, _, err = run(["register", *pair, "-o", out, *FAST, "--device", "auto"], capsys)
    assert code == 0 and "running on the CPU" in err


def test_models_list_and_show(capsys):
    code, out, err = run(["models", "list"], capsys)
    assert code == 0 and "mind-r1d2 (mind)" in out and "mind-r2d1" in out
    code, out, err = run(["models", "show", "mind"], capsys)
    assert code == 0 and json.loads(out)["layers"][0]["channels"] == 12
    code, out, err = run(["models", "show", "nope"], capsys)
    assert code == 2 and err.count("\n") == 1 and "mind-r1d2" in err
