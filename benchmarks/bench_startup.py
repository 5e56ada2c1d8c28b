"""Start-up cost of the command line: `fastimpact --version` against a bare interpreter.

Target (issue: core engine): `fastimpact --version` answers in under 0.5 s. Prints a table with
the median of N runs of each command and the ratio against `python -c pass` measured in the
same run.

    python benchmarks/bench_startup.py [--runs 15]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time


def median_wall(cmd: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    exe = shutil.which("fastimpact") or sys.exit("fastimpact is not on PATH: pip install the package first")
    rows = [
        ("python -c pass (peer)", [sys.executable, "-c", "pass"]),
        ("python -c 'import numpy'", [sys.executable, "-c", "import numpy"]),
        ("fastimpact --version", [exe, "--version"]),
        ("fastimpact register --help", [exe, "register", "--help"]),
    ]
    base = None
    print(f"{'command':32s} {'median s':>9s} {'x python':>9s}")
    for name, cmd in rows:
        t = median_wall(cmd, args.runs)
        base = t if base is None else base
        print(f"{name:32s} {t:9.3f} {t / base:9.1f}")


if __name__ == "__main__":
    main()
