"""Many pairs in one process: the first and the second registration through the Python API.

``fastimpact.register`` keeps what is expensive to make between calls of one process: the Numba
kernels (compiled, or loaded from the on-disk cache, once per process), the ONNX Runtime
sessions (one per graph file, thread count and providers) and the IMPACT models' manifests. So
the second registration of a batch pays no start-up. This times, per metric, the first and the
second registration of two different pairs (seed 0 and seed 1 of the same case) in one fresh
subprocess each, and the import of fastimpact itself.

    python benchmarks/bench_reuse.py --resolution 2mm --metrics mse,mi,impact,impact-jacobian
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_core as core  # noqa: E402

CONFIGS = {
    "mse": {"metric": "mse"},
    "mi": {"metric": "mi"},
    "impact": {"metric": "impact", "model": "mind"},
    "impact-jacobian": {"metric": "impact", "mode": "jacobian", "model": "mind", "samples": 1000,
                        "iterations": 100},
}

WORKER = r"""
import json, sys, time
t0 = time.perf_counter()
import fastimpact
from fastimpact.synthetic import field_error, make_case
t_import = time.perf_counter() - t0
opts = json.loads(sys.argv[1]); res = sys.argv[2]; case = sys.argv[3]; device = sys.argv[4]
out = {"import_s": t_import, "runs": []}
for seed in (0, 1):
    c = make_case(case, res, seed=seed)
    t = time.perf_counter()
    r = fastimpact.register(c.fixed, c.moving, device=device, **opts)
    field = r.displacement  # the dense field is part of the job
    dt = time.perf_counter() - t
    err = field_error(field, c.u_true, c.mask)
    out["runs"].append({"seconds": dt, "error_mm": float(err["mean"])})
print(json.dumps(out))
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--metrics", type=lambda v: core._csv(v, tuple(CONFIGS)), default=list(CONFIGS))
    p.add_argument("--resolution", choices=("1mm", "2mm"), default="2mm")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args(argv)
    info = core.machine_info(args.threads)
    rows = []
    for name in args.metrics:
        opts = {**CONFIGS[name], "threads": args.threads}
        case = "t2" if name.startswith("impact") or name == "mi" else "mono"
        proc = subprocess.run([sys.executable, "-c", WORKER, json.dumps(opts), args.resolution, case, args.device],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{name}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            return 1
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        first, second = r["runs"]
        rows.append([name, case, f"{r['import_s']:.2f}", f"{first['seconds']:.2f}", f"{second['seconds']:.2f}",
                     f"{first['seconds'] / second['seconds']:.2f}", f"{first['error_mm']:.3f} / {second['error_mm']:.3f}"])
        print(" ".join(rows[-1]), file=sys.stderr, flush=True)
    header = ["metric", "case", "import s", "first s", "second s", "first / second", "error mm (1st / 2nd)"]
    print(f"\nTwo registrations in one process ({args.resolution}, device {args.device}), {info['cpu']}, "
          f"{args.threads} threads")
    core.print_table(rows, header)
    print("\nMarkdown:\n")
    print(core.markdown_table(rows, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
