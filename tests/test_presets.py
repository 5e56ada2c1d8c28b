"""Presets: shipped TOML settings in the --config format, listed, shown, loaded, overridden, run."""

import json

import numpy as np
import pytest

from conftest import blob_volume
from fastimpact.cli.main import main
from fastimpact.config import RegistrationConfig
from fastimpact.errors import ConfigError
from fastimpact.presets import load_preset, preset_names, preset_path

EXPECTED = {"mono", "multimodal-brain", "mr-ct", "ct-cbct", "fast-cpu"}


def test_every_preset_is_a_valid_config_file_with_a_summary():
    assert EXPECTED <= set(preset_names())
    for name in preset_names():
        cfg = RegistrationConfig.load(preset_path(name))  # the --config format
        assert RegistrationConfig.from_dict(load_preset(name)) == cfg
        assert preset_path(name).read_text().startswith("# ")
    with pytest.raises(ConfigError, match="preset 'nope' does not exist: choose one of"):
        load_preset("nope")


def test_presets_list_and_show(capsys):
    assert main(["presets", "list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in EXPECTED)
    assert main(["presets", "show", "ct-cbct"]) == 0
    assert capsys.readouterr().out == preset_path("ct-cbct").read_text()
    assert main(["presets", "show", "nope"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_preset_runs_on_a_small_pair_and_options_override_it(name, write_nifti, tmp_path, capsys):
    fixed = write_nifti("f.nii.gz", blob_volume())
    # the moving image on another grid: 1.5 x 1.5 x 3 mm, shifted
    aff = np.diag([1.5, 1.5, 3.0, 1.0])
    aff[:3, 3] = (1.0, -1.5, 2.0)
    moving = write_nifti("m.nii.gz", blob_volume(shape=(37, 40, 17), shift=(1.0, -1.0, 0.5)), aff)
    out = tmp_path / f"out-{name}"
    code = main(["register", str(fixed), str(moving), "-o", str(out), "--preset", name, "--levels", "2",
                 "--iterations", "8", "--affine-iterations", "4", "--samples", "300", "--threads", "1", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    doc = json.loads(captured.out.strip().splitlines()[-1])
    assert doc["status"] == "ok"
    report = json.loads((out / "report.json").read_text())
    preset = load_preset(name)
    assert report["config"]["metric"] == preset["metric"]  # from the preset
    assert report["config"]["levels"] == 2 and report["config"]["iterations"] == 8  # overridden
    assert report["config"]["grid_spacing"] == preset["grid_spacing"]


def test_presets_json_on_success_and_failure(capsys):
    assert main(["presets", "list", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["status"] == "ok" and {p["name"] for p in doc["presets"]} >= EXPECTED
    assert main(["presets", "show", "mono", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["settings"] == load_preset("mono")
    assert main(["presets", "show", "nope", "--json"]) == 2
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert doc["status"] == "error" and "does not exist" in doc["message"] and doc["exit_code"] == 2


def test_models_and_features_json(capsys, write_nifti, tmp_path):
    assert main(["models", "list", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["status"] == "ok" and any(m["name"] == "mind-r1d2" for m in doc["models"])
    assert main(["models", "show", "mind", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["name"] == "mind-r1d2"
    assert main(["models", "show", "nope", "--json"]) == 2
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["status"] == "error"
    img = write_nifti("img.nii.gz", blob_volume())
    assert main(["features", str(img), "-o", str(tmp_path / "feat"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert doc["status"] == "ok" and all((tmp_path / "feat").joinpath(p.split("/")[-1]).exists() for p in doc["outputs"])
