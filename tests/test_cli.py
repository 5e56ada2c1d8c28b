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
from fastimpact.result import OUTPUT_NAMES  # noqa: E402

OUTPUTS = set(OUTPUT_NAMES)  # warped, displacement, transform.json, report.json and the transform files


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


# -- issue 13: --json on every outcome, notes, rough edges; issue 17: interruption ----------------

def _one_json(stdout):
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, stdout
    return json.loads(lines[0])


def test_json_errors_are_one_object_on_stdout(pair, tmp_path, capsys, write_nifti):
    cases = {
        "missing input": (["register", tmp_path / "nope.nii.gz", pair[1], "-o", tmp_path / "a", "--json"], 2, "does not exist"),
        "bad value": (["register", *pair, "-o", tmp_path / "b", "--json", "--levels", "0"], 2, "levels"),
        "unknown option": (["register", *pair, "--json", "--frobnicate", "3"], 2, "frobnicate"),
        "bad choice": (["demo", "--json", "--case", "nope"], 2, "nope"),
        "missing transform": (["apply", tmp_path / "none.json", pair[1], "-o", pair[0], "--json"], 2, "transform"),
    }
    for name, (argv, code_expected, text) in cases.items():
        code, out, err = run(argv, capsys)
        assert code == code_expected, (name, err)
        doc = _one_json(out)
        assert doc["status"] == "error" and doc["exit_code"] == code and text in doc["message"], (name, doc)
        assert err.count("\n") == 1 and text in err, (name, err)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def _elastix_file(path, text):
    path.write_text(text)
    return path


def test_elastix_notes_reach_json_and_report_and_files_chain(pair, tmp_path, capsys):
    affine = _elastix_file(tmp_path / "affine.txt", '(Transform "EulerTransform")\n(MaximumNumberOfIterations 7)\n'
                           '(NumberOfResolutions 1)\n(Metric "AdvancedMeanSquares")\n(NumberOfSpatialSamples 500)\n'
                           '(FancyNewOption 3)\n')
    bspline = _elastix_file(tmp_path / "bspline.txt", '(Transform "BSplineTransform")\n(MaximumNumberOfIterations 9)\n'
                            '(NumberOfResolutions 1)\n(Metric "AdvancedMeanSquares")\n'
                            '(FinalGridSpacingInPhysicalUnits 16)\n(NumberOfSpatialSamples 500)\n')
    out = tmp_path / "o"
    code, stdout, err = run(["register", *pair, "-o", out, "--json", "--elastix-params", affine,
                             "--elastix-params", bspline], capsys)
    assert code == 0, err
    doc = _one_json(stdout)
    assert any("FancyNewOption" in n for n in doc["notes"]), doc.get("notes")
    rep = json.loads((out / "report.json").read_text())
    assert rep["notes"] == doc["notes"]
    # both files count: the rigid stage from the first (EulerTransform), the B-spline stage from the second
    its = {(s["stage"], s["iterations"]) for s in rep["stages"]}
    assert its == {("rigid", 7), ("bspline", 9)}, its
    assert "note: " in run(["register", *pair, "-o", tmp_path / "o2", "--elastix-params", affine,
                            "--elastix-params", bspline], capsys)[2]
    # the wrong order is refused, not silently replaced
    code, stdout, err = run(["register", *pair, "-o", tmp_path / "o3", "--json", "--elastix-params", bspline,
                             "--elastix-params", affine], capsys)
    assert code == 2 and "order" in _one_json(stdout)["message"]
    assert not (tmp_path / "o3").exists()


def test_readme_demo_options_exist(capsys):
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code, help_text, _ = run(["demo", "--help"], capsys)
    assert code == 0
    import re

    used = set()
    for line in readme.splitlines():
        for m in re.finditer(r"fastimpact demo((?: --?[\w-]+(?: [\w'+*.]+)?)*)", line):
            used |= set(re.findall(r"(--[\w-]+)", m.group(1)))
    for m in re.finditer(r"`(--[\w-]+)[^`]*`", readme[readme.find("`fastimpact demo`"):][:800]):
        used.add(m.group(1))
    assert used, "no demo options found in the README"
    for opt in used:
        assert opt in help_text, f"README uses `fastimpact demo {opt}`, which does not exist"


def test_models_show_without_onnxruntime_gives_the_install_hint(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    code, out, err = run(["models", "show", "mind"], capsys)
    assert code == 1 and err.count("\n") == 1
    assert 'pip install "fastimpact[cpu]"' in err and "internal error" not in err
    code, out, err = run(["models", "show", "mind", "--no-check"], capsys)
    assert code == 0 and json.loads(out)["layers"][0]["channels"] == 12


def test_apply_picks_nearest_for_labels_and_keeps_dtype(pair, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(["register", *pair, "-o", out, *FAST], capsys)[0] == 0
    labels = (blob_volume(shift=(1.0, -1.0, 0.5)) > 50).astype(np.uint8) * 4
    lp = tmp_path / "labels.nii.gz"
    nib.save(nib.Nifti1Image(labels, np.diag([2.0, 2.0, 2.0, 1.0])), str(lp))
    code, stdout, err = run(["apply", out / "transform.json", lp, "-o", tmp_path / "l.nii.gz", "--json"], capsys)
    assert code == 0, err
    doc = _one_json(stdout)
    assert doc["interpolation"] == "nearest" and any("label map" in n for n in doc["notes"])
    li = nib.load(str(tmp_path / "l.nii.gz"))
    assert li.get_data_dtype() == np.uint8 and set(np.unique(np.asanyarray(li.dataobj))) <= {0, 4}
    # a grey-level image stays cubic, and an explicit choice wins
    code, stdout, _ = run(["apply", out / "transform.json", pair[1], "-o", tmp_path / "g.nii.gz", "--json"], capsys)
    assert _one_json(stdout)["interpolation"] == "cubic"
    code, _, err = run(["apply", out / "transform.json", lp, "-o", tmp_path / "c.nii.gz", "--interpolation", "cubic"], capsys)
    assert code == 0 and "label map" not in err
    assert nib.load(str(tmp_path / "c.nii.gz")).get_data_dtype() == np.float32


def test_is_label_map():
    from fastimpact.apply import is_label_map

    assert is_label_map(np.array([[[0, 3], [250, 3]]], np.uint8))
    assert is_label_map(np.array([[[-5, 7]]], np.int8)) and is_label_map(np.zeros((2, 2, 2), bool))
    assert not is_label_map(np.arange(1000, dtype=np.int16).reshape(10, 10, 10))  # a CT-like grey-level image
    assert not is_label_map(np.zeros((2, 2, 2), np.float32))


def test_progress_one_line_per_level_with_real_times(pair, tmp_path, capsys):
    import io

    from rich.console import Console

    from fastimpact.cli.main import _progress

    # off a terminal: only the level lines, each once, with the level's own time
    code, _, err = run(["register", *pair, "-o", tmp_path / "o", *FAST, "--levels", "2"], capsys)
    assert code == 0
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    import re

    lines = [ln for ln in err.splitlines() if re.match(r"(affine|bspline) +level \d+:", ln)]
    assert len(lines) == len(rep["stages"]) == 4, err
    for ln, s in zip(lines, rep["stages"]):
        assert ln.startswith(f"{s['stage']:7s} level {s['level']}:") and f"{s['time_s']:.2f} s" in ln
    assert "━" not in err and "\r" not in err
    # on a terminal: a transient bar whose clock shows tenths of seconds, then the same one line
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=100)
    ctx, callback = _progress(True, console=console)
    import time

    with ctx:
        callback("level_start", {"stage": "bspline", "level": 0, "iterations": 3})
        for k in range(3):
            time.sleep(0.15)
            callback("iteration", {"stage": "bspline", "level": 0, "iteration": k, "value": 1.0 / (k + 1)})
        callback("level_end", {"stage": "bspline", "level": 1, "iterations": 3, "metric_start": 1.0,
                               "metric_end": 0.33, "time_s": 0.45})
        console.print("", end="")
    text = buf.getvalue()
    assert text.count("bspline level 1: metric 1 -> 0.33 (3 it, 0.45 s)") == 1
    assert _progress(False)[1] is None


def test_demo_writes_fixed_and_moving(tmp_path, capsys, monkeypatch):
    import fastimpact.cli.main as cli

    from fastimpact.config import RegistrationConfig

    real = RegistrationConfig

    def quick(**kw):  # the demo's pair and outputs, with a short schedule
        return real(**kw, levels=1, iterations=5, affine_iterations=3, samples=300)

    monkeypatch.setattr("fastimpact.config.RegistrationConfig", quick)
    out = tmp_path / "demo"
    code, stdout, err = run(["demo", "-o", out, "--json"], capsys)
    assert code == 0, err
    doc = _one_json(stdout)
    assert {p.name for p in out.iterdir()} == OUTPUTS | {"fixed.nii.gz", "moving.nii.gz", "qc"}
    assert (out / "qc" / "report.html").is_file()
    assert doc["outputs"]["fixed"] == str(out / "fixed.nii.gz")
    # the default demo: IMPACT on the multimodal case, with MI beside it
    assert doc["metric"] == "impact" and doc["comparison"]["metric"] == "mi"
    for ev in (doc["evaluation"], doc["comparison"]):
        assert ev["error_after_mm"]["mean"] > 0
    from fastimpact.synthetic import make_case

    case = make_case("t2", resolution="2mm", seed=0)
    f = nib.load(str(out / "fixed.nii.gz"))
    np.testing.assert_allclose(f.affine, case.fixed.affine)
    np.testing.assert_allclose(np.asanyarray(f.dataobj), case.fixed.data)
    np.testing.assert_allclose(np.asanyarray(nib.load(str(out / "moving.nii.gz")).dataobj), case.moving.data)
    assert cli.DEMO_INPUTS == ("fixed.nii.gz", "moving.nii.gz")


_DRIVER = r'''
import os, sys, time
from pathlib import Path
import fastimpact.io as io

marker = Path(sys.argv[1])
original = io.save_image


def slow_save(img, path, dtype=None):  # a file in the temporary folder, then a pause: "during the write"
    original(img, path, dtype)
    marker.write_text(str(path))
    for _ in range(40):
        time.sleep(0.05)


io.save_image = slow_save
from fastimpact.cli.main import main

sys.exit(main(sys.argv[2:]))
'''


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signal_during_the_output_write_leaves_old_outputs_and_no_temporary(pair, tmp_path, sig):
    import signal
    import time

    out = tmp_path / "out"
    out.mkdir()
    old = {name: f"old {name}".encode() for name in OUTPUTS}
    for name, data in old.items():
        (out / name).write_bytes(data)
    # a temporary folder left by a killed run (a dead pid of this machine) is removed by the next run
    import socket

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:40]
    stale = out / f".fastimpact-tmp-{host}-{dead.pid}-abc123"
    stale.mkdir()
    (stale / "warped.nii.gz").write_bytes(b"partial")
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    marker = tmp_path / "writing"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, str(driver), str(marker), "register", *map(str, pair), "-o", str(out),
                             "--force", *FAST], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert ".fastimpact-tmp-" in marker.read_text() and not stale.exists()
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == (143 if sig == "SIGTERM" else 130), err
    assert err.strip().splitlines()[-1].startswith("error: interrupted"), err
    assert "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)  # no temporary folder left
    for name, data in old.items():
        assert (out / name).read_bytes() == data


def test_elastix_chain_fields(tmp_path):
    from fastimpact.elastix_params import config_from_elastix, config_from_elastix_chain
    from fastimpact.errors import ConfigError

    rigid = _elastix_file(tmp_path / "rigid.txt", '(Transform "EulerTransform")\n(MaximumNumberOfIterations 11)\n'
                          '(AutomaticTransformInitialization "true")\n')
    affine = _elastix_file(tmp_path / "affine.txt", '(Transform "AffineTransform")\n(MaximumNumberOfIterations 22)\n'
                           '(NumberOfResolutions 2)\n')
    bspline = _elastix_file(tmp_path / "bspline.txt", '(Transform "BSplineTransform")\n(MaximumNumberOfIterations 33)\n'
                            '(NumberOfResolutions 3)\n(FinalGridSpacingInPhysicalUnits 12)\n')
    assert config_from_elastix_chain([bspline]) == config_from_elastix(bspline)
    fields, notes = config_from_elastix_chain([rigid, affine, bspline])
    assert fields["affine"] is True and fields["affine_iterations"] == 22 and fields["iterations"] == 33
    assert fields["init"] == "geometry"  # the first file initialises, as elastix's later stages start from it
    assert fields["grid_spacing"] == 12 and fields["levels"] == 3
    # rigid.txt is the rigid stage now, affine.txt the affine stage: nothing folded
    assert fields["rigid"] is True and fields["rigid_iterations"] == 11
    assert not any("folded" in n for n in notes)
    _, notes2 = config_from_elastix_chain([affine, affine, bspline])
    assert any("affine.txt" in n and "folded into the affine stage" in n for n in notes2)
    assert any("levels differs" in n for n in notes)
    assert not any("no affine stage" in n for n in notes)
    fields, _ = config_from_elastix_chain([rigid, affine])  # affine files only: no B-spline stage
    assert fields["iterations"] == 0 and fields["affine_iterations"] == 22
    for bad in ([bspline, bspline], [bspline, affine]):
        with pytest.raises(ConfigError, match="order"):
            config_from_elastix_chain(bad)
