"""The top-level kernels/ and cli/ folders install as fastimpact.kernels and fastimpact.cli."""

import importlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_installed_layout_maps_subpackages():
    k = importlib.import_module("fastimpact.kernels")
    c = importlib.import_module("fastimpact.cli.main")
    assert Path(k.__file__).parent.name == "kernels"
    assert Path(c.__file__).parent.name == "cli"
    assert callable(c.main)


@pytest.mark.slow
def test_wheel_contents(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    wheel = next(tmp_path.glob("fastimpact-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for required in ("fastimpact/__init__.py", "fastimpact/kernels/__init__.py", "fastimpact/kernels/cpu.py",
                     "fastimpact/cli/main.py", "fastimpact/data/mni152_t1_2mm.nii.gz",
                     "fastimpact/data/LICENSE_MNI152.txt", "fastimpact/optimizers/asgd.py",
                     "fastimpact/onnx_models/__init__.py", "fastimpact/onnx_models/mind-r1d2.onnx",
                     "fastimpact/onnx_models/mind-r1d2.json", "fastimpact/cli/models.py"):
        assert required in names, required
    assert not any(n.startswith(("kernels/", "cli/", "onnx_models/", "tests/")) for n in names)
    entry = [n for n in names if n.endswith("entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry[0]).decode()
    assert "fastimpact = fastimpact.cli.main:console_main" in text
