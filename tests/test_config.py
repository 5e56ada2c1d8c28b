"""Configuration: per-level values, validation, TOML/JSON files."""

import json

import pytest

from fastimpact.config import RegistrationConfig
from fastimpact.errors import ConfigError


def test_defaults_and_per_level():
    cfg = RegistrationConfig()
    assert cfg.per_level("iterations") == (500, 500, 500)
    assert cfg.grid_spacings() == (32.0, 16.0, 8.0)
    cfg = RegistrationConfig(levels=2, iterations=[100, 200], samples=[3000])
    assert cfg.per_level("iterations") == (100, 200)
    assert cfg.per_level("samples") == (3000, 3000)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"iterations": 0, "affine": False}, "nothing would be optimised"),
        ({"iterations": -5}, "iterations"),
        ({"samples": 3}, "samples"),
        ({"levels": 0}, "levels"),
        ({"levels": 2.5}, "levels"),
        ({"grid_spacing": 0.0}, "grid_spacing"),
        ({"grid_spacing": float("inf")}, "grid_spacing"),
        ({"metric": "ssd"}, "mse, ncc, mi"),
        ({"iterations": [10, 20]}, "2 values for 3 levels"),
        ({"bending_weight": -1.0}, "bending_weight"),
        ({"bins": 2}, "bins"),
        ({"device": "tpu"}, "cpu, cuda, auto"),
        ({"affine": "yes"}, "affine"),
    ],
)
def test_invalid_values_are_rejected(kwargs, needle):
    with pytest.raises(ConfigError) as info:
        RegistrationConfig(**kwargs)
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_option():
    with pytest.raises(ConfigError, match="unknown option"):
        RegistrationConfig().with_options(iteratons=5)


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_save_load_roundtrip(tmp_path, suffix):
    cfg = RegistrationConfig(metric="mi", levels=2, iterations=[50, 60], bins=16, affine=False)
    p = tmp_path / f"c{suffix}"
    cfg.save(p)
    assert RegistrationConfig.load(p) == cfg


def test_bad_files(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("metric = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        RegistrationConfig.load(p)
    p = tmp_path / "unk.json"
    p.write_text(json.dumps({"metrc": "mse"}))
    with pytest.raises(ConfigError, match="unknown setting"):
        RegistrationConfig.load(p)
    with pytest.raises(ConfigError, match="does not exist"):
        RegistrationConfig.load(tmp_path / "missing.toml")
