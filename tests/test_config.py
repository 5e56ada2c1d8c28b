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


# --- no silent settings (issue 17): zero sizes, subsets, fp16 on the CPU ------------------------

@pytest.mark.parametrize(
    "kwargs, needles",
    [
        ({"voxel_size": 0}, ["voxel_size=0", "mm > 0", "auto"]),
        ({"voxel_size": "0"}, ["voxel_size='0'", "mm > 0"]),
        ({"voxel_size": "1.5 0"}, ["voxel_size='0'"]),  # second model's entry
        ({"voxel_size": -2.0}, ["voxel_size=-2.0"]),
        ({"mode": "jacobian", "patch_size": 0}, ["patch_size=0", "odd number", "auto"]),
        ({"mode": "jacobian", "patch_size": "0"}, ["patch_size='0'"]),
        ({"precision": "fp16"}, ["precision=fp16", "--precision fp32", "--device cuda"]),
    ],
)
def test_meaningless_impact_values_are_refused(kwargs, needles):
    model = "mind mind" if kwargs.get("voxel_size") == "1.5 0" else "mind"
    with pytest.raises(ConfigError) as err:
        RegistrationConfig(metric="impact", model=model, **kwargs)
    msg = str(err.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, (needle, msg)


def test_auto_voxel_and_patch_sizes_still_mean_the_default():
    from fastimpact.features.settings import impact_settings

    for value in (None, "auto", "none", "AUTO"):
        cfg = RegistrationConfig(metric="impact", mode="jacobian", voxel_size=value, patch_size=value)
        use = impact_settings(cfg, 0).models[0]
        assert use.voxel_size is None and use.patch_size is None
    cfg = RegistrationConfig(metric="impact", voxel_size="1.5", levels=1)
    assert impact_settings(cfg, 0).models[0].voxel_size == 1.5


def test_subset_above_the_channels_is_refused_like_pca():
    from fastimpact.features.settings import impact_settings

    # mind has 12 channels in its one layer
    assert impact_settings(RegistrationConfig(metric="impact", subset=12), 0).models[0].layers[0].subset == 12
    with pytest.raises(ConfigError) as err:
        impact_settings(RegistrationConfig(metric="impact", subset=13), 0)
    msg = str(err.value)
    assert "subset=13" in msg and "12 channels" in msg and "at most 12" in msg and "\n" not in msg
    # with PCA the subset is drawn from the components kept
    assert impact_settings(RegistrationConfig(metric="impact", pca=4, subset=4), 0).models[0].layers[0].pca == 4
    with pytest.raises(ConfigError, match=r"subset=5 exceeds the 4 principal components kept \(pca=4\)"):
        impact_settings(RegistrationConfig(metric="impact", pca=4, subset=5), 0)


def test_memory_budget_is_validated_and_round_trips(tmp_path):
    assert RegistrationConfig().memory is None
    cfg = RegistrationConfig(memory=3.5)
    path = tmp_path / "c.toml"
    cfg.save(path)
    assert RegistrationConfig.load(path).memory == 3.5
    for bad in (0, -1.0, float("nan"), "4"):
        with pytest.raises(ConfigError, match="memory="):
            RegistrationConfig(memory=bad)
