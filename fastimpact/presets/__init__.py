"""Presets: complete, documented registration settings for common tasks, shipped as plain TOML
files in the ``--config`` format (``fastimpact presets list|show NAME``; ``--preset NAME``).

A preset is the base of a run's settings: an elastix parameter file, a ``--config`` file and
command-line options override it, in that order. The first comment lines of each file say what
it is for and on which kind of pair it was measured (``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

from pathlib import Path

from ..config import RegistrationConfig, read_config_file
from ..errors import ConfigError

PRESETS_DIR = Path(__file__).resolve().parent


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))


def preset_path(name: str) -> Path:
    path = PRESETS_DIR / f"{name}.toml"
    if not isinstance(name, str) or "/" in name or not path.is_file():
        raise ConfigError(f"preset {name!r} does not exist: choose one of {', '.join(preset_names())} "
                          "(fastimpact presets list)")
    return path


def preset_summary(name: str) -> str:
    """The preset's first comment line."""
    for line in preset_path(name).read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def load_preset(name: str) -> dict:
    """The settings of preset ``name`` as a dict of RegistrationConfig fields (validated)."""
    data = read_config_file(preset_path(name))
    RegistrationConfig.from_dict(data, source=f"preset '{name}'")
    return data


__all__ = ["PRESETS_DIR", "load_preset", "preset_names", "preset_path", "preset_summary"]
