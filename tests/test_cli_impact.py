"""The command line with IMPACT: `register --metric impact ...`, --elastix-params, `features`, `models list`.

Small blob volumes (28 x 30 x 26 voxels at 2 mm) and few iterations: the file runs in seconds.
"""

import json

import nibabel as nib
import numpy as np
import pytest

from conftest import blob_volume
from fastimpact.cli.main import main

SHAPE = (28, 30, 26)
from fastimpact.result import OUTPUT_NAMES  # noqa: E402

OUTPUTS = set(OUTPUT_NAMES)
IMPACT = ["--metric", "impact", "--model", "mind", "--distance", "l2", "--levels", "2", "--iterations", "30",
          "--affine-iterations", "20", "--samples", "500"]
# a quicker IMPACT run for the cases where only the plumbing matters
QUICK = ["--levels", "2", "--iterations", "15", "--affine-iterations", "5", "--samples", "300", "--grid-spacing", "16"]
# an image whose grid is RAS-ordered (so the feature grid is the image grid) but with an origin,
# so that an affine copied without its translation would be caught
AFFINE = np.array([[2.0, 0, 0, -27.0], [0, 2.0, 0, -29.0], [0, 0, 2.0, -25.0], [0, 0, 0, 1.0]])


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, needles=()):
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle.lower() in err.lower(), (needle, err)


def assert_no_outputs(out):
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())


@pytest.fixture
def pair(write_nifti):
    return write_nifti("fixed.nii.gz", blob_volume()), write_nifti("moving.nii.gz", blob_volume(shift=(1.0, -1.0, 0.5)))


@pytest.fixture
def image(write_nifti):
    return write_nifti("image.nii.gz", blob_volume(), affine=AFFINE)


def report(out):
    return json.loads((out / "report.json").read_text())


# --------------------------------------------------------------------------------------------
# register with IMPACT
# --------------------------------------------------------------------------------------------
def test_register_impact_writes_outputs_and_reports_config(pair, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = run(["register", *pair, "-o", out, *IMPACT, "--json"], capsys)
    assert code == 0, err
    res = json.loads(stdout)
    assert res["status"] == "ok" and res["metric"] == "impact"
    assert {p.name for p in out.iterdir()} == OUTPUTS
    rep = report(out)
    cfg = rep["config"]
    assert cfg["metric"] == "impact" and cfg["model"] == "mind" and cfg["distance"] == "l2"
    assert cfg["mode"] == "static" and cfg["levels"] == 2
    assert rep["timings_s"]["features"] > 0 and res["timings_s"]["features"] > 0
    stages = [(s["stage"], s["level"], s["iterations"]) for s in rep["stages"]]
    assert stages == [("affine", 1, 20), ("affine", 2, 20), ("bspline", 1, 30), ("bspline", 2, 30)]
    # IMPACT with MIND on a mono-modal shifted pair: the finest B-spline level ends lower than the
    # coarsest affine level started (L2 feature distance normalised by the level's first value)
    assert rep["stages"][-1]["metric_end"] < rep["stages"][0]["metric_start"]
    disp = nib.load(str(out / "displacement.nii.gz"))
    assert disp.shape == SHAPE + (1, 3)
    assert np.isfinite(np.asarray(disp.dataobj)).all()


def test_register_weighted_sum_and_per_level_distance(pair, tmp_path, capsys):
    out = tmp_path / "sum"
    code, stdout, err = run(["register", *pair, "-o", out, *QUICK, "--metric", "impact+0.1*mi", "--json"], capsys)
    assert code == 0, err
    assert {p.name for p in out.iterdir()} == OUTPUTS
    rep = report(out)
    assert rep["config"]["metric"] == "impact+0.1*mi"
    assert rep["timings_s"]["features"] > 0
    assert json.loads(stdout)["metric"] == "impact+0.1*mi"

    out = tmp_path / "perlevel"
    code, _, err = run(["register", *pair, "-o", out, *QUICK, "--metric", "impact", "--distance", "l2;l1",
                        "--layer-weights", "1; 2", "--json"], capsys)
    assert code == 0, err
    cfg = report(out)["config"]
    assert cfg["distance"] == ["l2", "l1"]
    assert [float(w) for w in cfg["layer_weights"]] == [1.0, 2.0]


def test_register_impact_text_mode_prints_levels(pair, tmp_path, capsys):
    out = tmp_path / "txt"
    code, stdout, err = run(["register", *pair, "-o", out, *QUICK, "--metric", "impact", "--model", "mind-r2d1",
                             "--feature-norm", "l2", "--subset", "3", "--pca", "4"], capsys)  # 3 of 4 components
    assert code == 0, err
    assert stdout == ""  # without --json, everything goes to stderr
    assert "bspline level 2" in err and "Traceback" not in err
    cfg = report(out)["config"]
    assert cfg["model"] == "mind-r2d1" and cfg["feature_norm"] == "l2"
    assert int(cfg["subset"]) == 3 and int(cfg["pca"]) == 4


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--metric", "impact", "--model", "nope"], ["nope", "mind-r1d2"]),
        (["--metric", "impact", "--model", "mind", "--layers", "2"], ["layers", "'2'"]),
        (["--metric", "impact", "--model", "mind", "--layers", "00"], ["layers", "'00'"]),
        (["--metric", "impact", "--model", "mind", "--layers", "011"], ["layers", "'011'", "1 output layer"]),
        (["--metric", "impact", "--distance", "l3"], ["distance", "'l3'", "l1"]),
        (["--metric", "impact", "--distance", "l2;l1;l1"], ["distance", "3 values", "2 levels"]),
        (["--metric", "impact", "--feature-norm", "max"], ["feature_norm", "max"]),
        (["--metric", "impact", "--mode", "jacobian", "--model", "deepbet", "--layers", "11", "--patch-size", "7"],
         ["patch_size=7", "deepbet"]),
        (["--metric", "impact+"], ["metric", "impact+"]),
        (["--metric", "x*mi"], ["metric", "x*mi"]),
        (["--metric", "impact+mi+impact"], ["twice"]),
        (["--metric", "impact+-1*mi"], ["positive"]),
        (["--metric", "mi", "--model", "deepbet"], ["--model", "impact"]),
    ],
    ids=["unknown-model", "layer-mask-digit", "layer-mask-zeros", "layer-mask-too-long", "distance",
         "distance-levels", "feature-norm", "jacobian", "metric-trailing-plus", "metric-bad-weight",
         "metric-twice", "metric-negative-weight", "impact-option-without-impact"],
)
def test_register_impact_bad_options(pair, tmp_path, capsys, args, needles):
    out = tmp_path / "bad"
    code, stdout, err = run(["register", *pair, "-o", out, *QUICK, *args], capsys)
    assert_one_line_error(code, err, needles)
    assert stdout == ""
    assert_no_outputs(out)


# --------------------------------------------------------------------------------------------
# --elastix-params
# --------------------------------------------------------------------------------------------
ELASTIX_OK = """// a small IMPACT parameter file, as the reference elastix metric reads it
(Metric "Impact")
(NumberOfResolutions 2)
(MaximumNumberOfIterations 20)
(NumberOfSpatialSamples 500)
(FinalGridSpacingInPhysicalUnits 16)
(ImpactMode "Static")
(ImpactModelsPath "{model}")
(ImpactLayersMask "1")
(ImpactDistance "L1")
(ImpactSubsetFeatures 0)
(RandomSeed 3)
"""


@pytest.mark.parametrize("model, expected", [("/Data/Models/MIND/R1D2.pt", "mind-r1d2"), ("mind", "mind")])
def test_elastix_params_file_runs_and_options_override(pair, tmp_path, capsys, model, expected):
    params = tmp_path / "impact.txt"
    params.write_text(ELASTIX_OK.format(model=model))
    out = tmp_path / "ex"
    code, stdout, err = run(["register", *pair, "-o", out, "--elastix-params", params, "--affine-iterations", "5"],
                            capsys)
    assert code == 0, err
    assert {p.name for p in out.iterdir()} == OUTPUTS
    cfg = report(out)["config"]
    assert cfg["metric"] == "impact" and cfg["levels"] == 2 and cfg["mode"] == "static"
    assert cfg["iterations"] == 20 and cfg["samples"] == 500 and cfg["grid_spacing"] == 16.0
    assert cfg["model"] == expected and cfg["distance"] == "l1" and cfg["seed"] == 3
    assert int(cfg["subset"]) == 1  # elastix clamps a subset of 0 to one channel
    assert cfg["affine_iterations"] == 5
    assert len(report(out)["stages"]) == 4
    # the import notes go to stderr (one line each) in text mode
    assert "note: ImpactSubsetFeatures0 0" in err
    if expected == "mind-r1d2":
        assert "imported as the built-in mind-r1d2" in err

    # command-line options override the file
    out2 = tmp_path / "ex2"
    code, stdout, err = run(["register", *pair, "-o", out2, "--elastix-params", params, "--levels", "1",
                             "--distance", "l2", "--iterations", "10", "--affine-iterations", "5", "--json"], capsys)
    assert code == 0, err
    assert "note:" not in err  # --json keeps stderr quiet
    cfg = report(out2)["config"]
    assert cfg["levels"] == 1 and cfg["distance"] == "l2" and cfg["iterations"] == 10
    assert cfg["model"] == expected and cfg["samples"] == 500  # the rest still from the file
    assert [(s["stage"], s["iterations"]) for s in report(out2)["stages"]] == [("affine", 5), ("bspline", 10)]


@pytest.mark.parametrize(
    "text, needles",
    [
        ('(Metric "Impact")\n(NumberOfResolutions 2)\nNumberOfResolutions 3\n', ["line 3", "NumberOfResolutions 3"]),
        ('(Metric "Impact")\n(ImpactDistance0 "L2)\n', ["line 2", "quotes"]),
        ('(Metric "Impact")\n(NumberOfResolutions 1)\n(NumberOfResolutions 2)\n', ["line 3", "twice", "line 2"]),
        ('(Metric "Impact")\n(NumberOfResolutions 1)\n(ImpactMode "Static")\n'
         '(ImpactModelsPath0 "/Data/Models/TS/M730_2_Layers.pt")\n', ["ImpactModelsPath0", "M730_2_Layers.pt", "onnx"]),
        ('(Metric "Impact")\n(NumberOfResolutions 1)\n(ImpactMode "Static")\n(ImpactModelsPath0 "MIND/R2D2.pt")\n',
         ["ImpactModelsPath0", "R2D2.pt", "no built-in"]),
        ('(Metric "Impact")\n(NumberOfResolutions 2)\n(ImpactMode "Static")\n(ImpactModelsPath0 "mind")\n',
         ["ImpactModelsPath1", "level 1"]),
        ('(Metric "Impact")\n(NumberOfResolutions 1)\n(ImpactMode "Static")\n(ImpactModelsPath0 "mind")\n'
         '(ImpactDistance0 "L3")\n', ["ImpactDistance0", "L3"]),
        ('(Metric "AdvancedKappaStatistic")\n', ["AdvancedKappaStatistic"]),
    ],
    ids=["malformed-line", "odd-quotes", "given-twice", "torchscript-model", "unmappable-mind", "missing-level",
         "bad-distance", "unknown-metric"],
)
def test_elastix_params_bad_files(pair, tmp_path, capsys, text, needles):
    params = tmp_path / "bad.txt"
    params.write_text(text)
    out = tmp_path / "bad"
    code, stdout, err = run(["register", *pair, "-o", out, "--elastix-params", params], capsys)
    assert_one_line_error(code, err, needles)
    assert "bad.txt" in err or "elastix" in err.lower()
    assert_no_outputs(out)


def test_elastix_params_missing_file(pair, tmp_path, capsys):
    out = tmp_path / "o"
    code, _, err = run(["register", *pair, "-o", out, "--elastix-params", tmp_path / "nope.txt"], capsys)
    assert_one_line_error(code, err, ["nope.txt", "does not exist"])
    assert_no_outputs(out)


# --------------------------------------------------------------------------------------------
# fastimpact features
# --------------------------------------------------------------------------------------------
def _png_size(path):
    from PIL import Image as PILImage

    with PILImage.open(path) as im:
        im.load()  # a truncated file fails here
        return im.size, im.mode


def test_features_mind_writes_nifti_and_png(image, tmp_path, capsys):
    out = tmp_path / "feat"
    code, stdout, err = run(["features", image, "--model", "mind", "-o", out], capsys)
    assert code == 0, err
    assert {p.name for p in out.iterdir()} == {"mind-r1d2_mind.nii.gz", "mind-r1d2_mind.png"}
    assert sorted(stdout.split()) == sorted(str(out / n) for n in ("mind-r1d2_mind.nii.gz", "mind-r1d2_mind.png"))
    nimg = nib.load(str(out / "mind-r1d2_mind.nii.gz"))
    assert nimg.shape == SHAPE + (12,)
    assert nimg.get_data_dtype() == np.float32
    np.testing.assert_allclose(nimg.affine, AFFINE, atol=1e-5)  # stride 1: the image's own grid
    data = np.asarray(nimg.dataobj)
    assert np.isfinite(data).all() and data.std() > 0
    # MIND-SSC descriptors are non-negative and differ between channels
    assert data.min() >= -1e-6 and np.ptp(data.reshape(-1, 12).mean(axis=0)) > 0
    # PCA-RGB of the central axial slice: width X, height Y
    assert _png_size(out / "mind-r1d2_mind.png") == ((SHAPE[0], SHAPE[1]), "RGB")


def test_features_deepbet_layers_follow_strides(image, tmp_path, capsys):
    out = tmp_path / "deep"
    code, _, err = run(["features", image, "--model", "deepbet", "--layers", "11", "-o", out], capsys)
    assert code == 0, err
    names = {p.name for p in out.iterdir()}
    assert names == {"deepbet_s0.nii.gz", "deepbet_s0.png", "deepbet_s1.nii.gz", "deepbet_s1.png"}
    for layer, stride in (("s0", 2), ("s1", 4)):
        nimg = nib.load(str(out / f"deepbet_{layer}.nii.gz"))
        shape = tuple(-(-n // stride) for n in SHAPE)
        assert nimg.shape == shape + (16,), layer
        # voxel j of a stride-s layer sits on input voxel s*j: same origin, spacing times s
        np.testing.assert_allclose(nimg.affine, AFFINE @ np.diag([stride, stride, stride, 1.0]), atol=1e-5)
        assert np.isfinite(np.asarray(nimg.dataobj)).all()
        assert _png_size(out / f"deepbet_{layer}.png") == ((shape[0], shape[1]), "RGB")


def test_features_voxel_size_changes_grid(image, tmp_path, capsys):
    out = tmp_path / "vox"
    code, _, err = run(["features", image, "--voxel-size", "4", "-o", out], capsys)
    assert code == 0, err
    nimg = nib.load(str(out / "mind-r1d2_mind.nii.gz"))
    # 2 mm -> 4 mm over the same extent from the same origin: floor((n - 1) / 2) + 1 voxels
    shape = tuple((n - 1) // 2 + 1 for n in SHAPE)
    assert nimg.shape == shape + (12,)
    expected = AFFINE.copy()
    expected[:3, :3] *= 2.0
    np.testing.assert_allclose(nimg.affine, expected, atol=1e-5)
    assert _png_size(out / "mind-r1d2_mind.png") == ((shape[0], shape[1]), "RGB")


def test_features_existing_outputs_need_force(image, tmp_path, capsys):
    out = tmp_path / "exist"
    out.mkdir()
    old = {"mind-r1d2_mind.nii.gz": b"old nifti", "mind-r1d2_mind.png": b"old png"}
    for name, content in old.items():
        (out / name).write_bytes(content)
    code, stdout, err = run(["features", image, "--model", "mind", "-o", out], capsys)
    assert_one_line_error(code, err, ["exists", "--force"])
    assert stdout == ""
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old  # untouched, no temporary folder left


def test_features_force_overwrites(image, tmp_path, capsys):
    out = tmp_path / "force"
    out.mkdir()
    (out / "mind-r1d2_mind.nii.gz").write_bytes(b"old nifti")
    (out / "unrelated.txt").write_text("keep me")
    code, _, err = run(["features", image, "--model", "mind", "-o", out, "--force"], capsys)
    assert code == 0, err
    assert {p.name for p in out.iterdir()} == {"mind-r1d2_mind.nii.gz", "mind-r1d2_mind.png", "unrelated.txt"}
    assert nib.load(str(out / "mind-r1d2_mind.nii.gz")).shape == SHAPE + (12,)
    assert (out / "unrelated.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--model", "mind", "--layers", "2"], ["layers", "'2'", "mind-r1d2"]),
        (["--model", "mind", "--layers", "0"], ["layers", "'0'"]),
        (["--model", "mind", "--layers", "11"], ["layers", "'11'", "1 layers"]),
        (["--model", "deepbet", "--layers", "1111111"], ["layers", "deepbet", "6 layers"]),
        (["--model", "nope"], ["nope", "mind-r1d2"]),
        (["--model", "mind", "--voxel-size", "-1"], ["voxel_size", "positive"]),
    ],
    ids=["digit", "no-one", "too-long-mind", "too-long-deepbet", "unknown-model", "voxel-size"],
)
def test_features_bad_options(image, tmp_path, capsys, args, needles):
    out = tmp_path / "badfeat"
    code, stdout, err = run(["features", image, *args, "-o", out], capsys)
    assert_one_line_error(code, err, needles)
    assert stdout == ""
    assert_no_outputs(out)


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------
def test_models_list_names_builtins(capsys):
    code, out, err = run(["models", "list"], capsys)
    assert code == 0, err
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    assert "deepbet" in names and "mind-r1d2" in names and "mind-r2d1" in names
    deepbet = next(line for line in out.splitlines() if line.startswith("deepbet"))
    assert "s0:16ch/s2" in deepbet and "s1:16ch/s4" in deepbet


def test_register_dense_jacobian_mode_with_precision(pair, tmp_path, capsys):
    out = tmp_path / "dense"
    code, stdout, err = run(["register", *pair, "-o", out, *QUICK, "--metric", "impact", "--mode", "jacobian-dense",
                             "--precision", "tf32", "--json"], capsys)
    assert code == 0, err
    assert {p.name for p in out.iterdir()} == OUTPUTS
    cfg = report(out)["config"]
    assert cfg["mode"] == "jacobian-dense" and cfg["precision"] == "tf32"
    # precision without the impact metric is a one-line error
    code, _, err = run(["register", *pair, "-o", tmp_path / "p", "--metric", "mse", "--precision", "fp16"], capsys)
    assert_one_line_error(code, err, ["--precision", "impact"])


# --------------------------------------------------------------------------------------------
# no silent settings; manifest mismatches (issue 17)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, needles",
    [
        (["--voxel-size", "0"], ["voxel_size='0'", "mm > 0", "auto"]),
        (["--mode", "jacobian", "--patch-size", "0"], ["patch_size='0'", "odd number", "auto"]),
        (["--subset", "13"], ["subset=13", "12 channels", "at most 12"]),
        (["--pca", "3", "--subset", "4"], ["subset=4", "pca=3"]),
        (["--mode", "jacobian", "--precision", "fp16"], ["precision=fp16", "--precision fp32", "--device cuda"]),
    ],
    ids=["voxel-size-0", "patch-size-0", "subset-above-channels", "subset-above-pca", "fp16-on-cpu"],
)
def test_register_refuses_meaningless_impact_values(pair, tmp_path, capsys, args, needles):
    out = tmp_path / "bad"
    code, stdout, err = run(["register", *pair, "-o", out, *QUICK, "--metric", "impact", "--model", "mind", *args],
                            capsys)
    assert_one_line_error(code, err, needles)
    assert stdout == ""
    assert_no_outputs(out)


def _user_mind(folder, **changes):
    """A copy of the built-in mind model (all its graphs) with a modified manifest."""
    import shutil

    from fastimpact.onnx_models import load_model_spec

    spec = load_model_spec("mind")
    manifest = json.loads(spec.manifest_path.read_text())
    folder.mkdir()
    for key in ("file", "patch_file", "vjp_file", "vjp_full_file"):
        shutil.copy(spec.manifest_path.parent / manifest[key], folder)
    shutil.move(folder / manifest["file"], folder / "user.onnx")
    manifest.update(name="user-mind", file="user.onnx", **changes)
    (folder / "user.json").write_text(json.dumps(manifest))
    return folder / "user.onnx"


@pytest.mark.parametrize("mode", ["static", "jacobian"])
@pytest.mark.parametrize(
    "changes, needles",
    [
        ({"layers": [{"name": "mind", "channels": 10, "stride": 1}]}, ["user-mind", "12", "10"]),
        ({"input_channels": 2}, ["user-mind", "2 channel"]),
        ({"dimension": 2}, ["user-mind", "rank"]),
    ],
    ids=["channels", "input-channels", "dimension"],
)
def test_manifest_mismatch_is_one_line_exit_2_before_any_work(pair, tmp_path, capsys, mode, changes, needles):
    model = _user_mind(tmp_path / "model", **changes)
    out = tmp_path / "out"
    code, stdout, err = run(["register", *pair, "-o", out, *QUICK, "--metric", "impact", "--model", model,
                             "--mode", mode], capsys)
    assert_one_line_error(code, err, needles)
    assert "ONNXRuntimeError" not in err and "level 1" not in err  # nothing ran
    assert_no_outputs(out)


def test_correct_user_manifest_passes_the_check(pair, tmp_path, capsys):
    model = _user_mind(tmp_path / "model")
    out = tmp_path / "out"
    code, _, err = run(["register", *pair, "-o", out, *QUICK, "--metric", "impact", "--model", model], capsys)
    assert code == 0, err
    assert OUTPUTS <= {p.name for p in out.iterdir()}
