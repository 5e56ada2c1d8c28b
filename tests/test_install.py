"""A built wheel installed into a fresh venv: compiled kernels are cached outside the package, and an
editable install over it leaves a working ``fastimpact`` command (issue 13, item 1).

The venv has no system site packages; the dependencies come from the test interpreter's
site-packages through a folder of links that leaves out fastimpact itself (so the editable
install of the source tree cannot shadow the wheel under test, and pip never sees it).
"""

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_SKIP = ("fastimpact", "__editable__", "_fastimpact", "__pycache__")


def _run(cmd, env, cwd, timeout=120):
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    assert out.returncode == 0, f"{cmd}: {out.stdout[-1500:]} {out.stderr[-1500:]}"
    return out


def _compiled_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.suffix in (".nbi", ".nbc")] if folder.exists() else []


def _deps_folder(tmp: Path) -> Path:
    deps = tmp / "deps"
    deps.mkdir()
    for sp in site.getsitepackages():
        for entry in Path(sp).iterdir():
            if entry.name.lower().startswith(_SKIP) or entry.suffix == ".pth" or (deps / entry.name).exists():
                continue
            (deps / entry.name).symlink_to(entry)
    return deps


@pytest.mark.slow
def test_wheel_then_editable_install_keep_a_working_command(tmp_path):
    # a copy of the source tree, so building and installing touch nothing in the checkout
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".venv", ".git", "tests", "benchmarks", "*.egg-info", "__pycache__", "build", "dist", "fastimpact-demo",
        "*.nbi", "*.nbc", ".pytest_cache", "venv", ".whl"))
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("NUMBA_CACHE_DIR", "FASTIMPACT_CACHE_DIR", "XDG_CACHE_HOME", "PYTHONPATH", "VIRTUAL_ENV")}
    env["HOME"] = str(home)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    _run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "wheels"), str(src)], env, tmp_path)
    wheel = next((tmp_path / "wheels").glob("fastimpact-*.whl"))

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], env, tmp_path)
    py = venv / "bin" / "python"
    purelib = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        env, tmp_path).stdout.strip())
    (purelib / "_fastimpact_test_deps.pth").write_text(str(_deps_folder(tmp_path)) + "\n")
    vpip = pip + ["--python", str(py)]
    _run(vpip + ["install", "--no-deps", "-q", str(wheel)], env, tmp_path)
    installed = purelib / "fastimpact"
    assert (installed / "kernels" / "cpu.py").is_file()

    # the installed command, from a neutral folder, compiles a kernel (a real Numba cache=True entry)
    fi = str(venv / "bin" / "fastimpact")
    work = tmp_path / "work"
    work.mkdir()
    assert "fastimpact 0.1.0" in _run([fi, "--version"], env, work).stdout
    code = ("import numpy as np, fastimpact; from fastimpact.kernels import get_kernel; "
            "print(fastimpact.__file__); "
            "print(get_kernel('points_affine', 'cpu')(np.ones((5, 3)), np.diag([2.0, 2, 2, 1]))[0])")
    out = _run([str(py), "-c", code], env, work).stdout.split("\n")
    assert out[0].startswith(str(installed)), out
    assert out[1].split() == ["[2.", "2.", "2.]"]
    assert _compiled_files(installed) == []
    cache = home / ".cache" / "fastimpact" / "numba"
    assert _compiled_files(cache), "no compiled kernel in the user cache folder"

    # an editable install over the wheel: the package folder goes, the command still works
    _run(vpip + ["install", "--no-deps", "--no-build-isolation", "-q", "-e", str(src)], env, tmp_path)
    assert not installed.exists(), sorted(str(p) for p in installed.rglob("*"))[:10]
    assert "fastimpact 0.1.0" in _run([fi, "--version"], env, work).stdout
    out = _run([str(py), "-c", code], env, work).stdout.split("\n")
    assert out[0].startswith(str(src / "fastimpact")), out
    assert _compiled_files(src) == []


def test_cache_dir_precedence(tmp_path, monkeypatch):
    import fastimpact

    for k in ("FASTIMPACT_CACHE_DIR", "NUMBA_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert fastimpact.cache_dir() == str(tmp_path / "home" / ".cache" / "fastimpact" / "numba")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert fastimpact.cache_dir() == str(tmp_path / "xdg" / "fastimpact" / "numba")
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "nb"))
    assert fastimpact.cache_dir() == str(tmp_path / "nb")
    monkeypatch.setenv("FASTIMPACT_CACHE_DIR", str(tmp_path / "fi"))
    assert fastimpact.cache_dir() == str(tmp_path / "fi" / "numba")
    # the package folder itself is never the cache
    assert not fastimpact.cache_dir().startswith(str(Path(fastimpact.__file__).parent))


def test_cache_dir_applies_when_numba_was_imported_first(tmp_path):
    """numba.core.config reads NUMBA_CACHE_DIR once, at import: fastimpact then sets the config value
    itself, which Numba reads when a cache=True kernel is defined (our kernel modules load lazily)."""
    code = ("import numba, numpy as np; assert not numba.config.CACHE_DIR; import fastimpact; "
            "from fastimpact.kernels import get_kernel; print(numba.config.CACHE_DIR); "
            "get_kernel('points_affine', 'cpu')(np.ones((2, 3)), np.eye(4))")
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME")}
    env["FASTIMPACT_CACHE_DIR"] = str(tmp_path / "fi")
    before = {p: p.stat().st_mtime_ns for p in _compiled_files(ROOT / "kernels")}  # left by older versions
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == str(tmp_path / "fi" / "numba")
    assert _compiled_files(tmp_path / "fi" / "numba")
    assert {p: p.stat().st_mtime_ns for p in _compiled_files(ROOT / "kernels")} == before
