"""fastimpact on the GPU vs fastimpact on the CPU vs FireANTs, on one known-truth brain pair.

Case (:func:`fastimpact.synthetic.make_case`, seed 0, max 10 mm in the brain): MNI152 2009a T1 at
1 mm (197 x 233 x 189, nilearn's file) or 2 mm (the packaged demo) under a known smooth
deformation. ``mono``: moving = the T1 itself; ``t2``: moving = a T2-like synthesis of the same
anatomy. Rows (``--device-rows`` / ``--cpu-rows``, comma separated, ``all`` or ``none``):

  mse, ncc                 intensity metrics on mono
  mi                       Mattes MI (32 bins) on t2
  impact-mind              IMPACT static, MIND (--model mind --distance l2) on t2
  impact-deepbet           IMPACT static, deepbet stage 0 (--layers 1 --voxel-size 1) on mono
  jacobian-mind            IMPACT Jacobian mode, MIND (--mode jacobian) on t2
  jacobian-deepbet         IMPACT Jacobian mode, deepbet stages 0+1 (--layers 11) on mono

deepbet rows run on ``mono``: deepbet's features carry no minimum at the true alignment on the
T1 / T2-like pair (benchmarks/RESULTS.md: static deepbet diverges there, 14 mm), so an error on t2
would measure the features, not the implementation. Every fastimpact row: affine stage (3 levels x
250 ASGD iterations) + B-spline FFD, final grid 8 mm (32 / 16 / 8), 3 levels x 500 ASGD
iterations, 2000 random samples per iteration, no masks; ``--device cuda`` for the GPU rows,
``--device cpu --threads N`` (all cores by default) for the CPU rows.

FireANTs (``--fireants-rows``: ``cc`` on mono, ``mi`` on t2) is the peer: its documented Python API
(``fireants.io.Image`` / ``BatchedImages``, ``fireants.registration.affine.AffineRegistration``,
``fireants.registration.greedy.GreedyRegistration``) with its tutorial settings: scales [4, 2, 1]
(our 3 levels), affine Adam lr 3e-3 x [200, 100, 50] iterations, greedy compositive Adam lr 0.5 x
[200, 100, 25] iterations, smooth_grad_sigma 1, CC kernel 5; on the GPU when
``torch.cuda.is_available()``, else on the CPU. Its outputs: the warped image and the ANTs
displacement field (``save_as_ants_transforms``: fixed grid, LPS mm, fixed x -> moving x + u), read
with :func:`fastimpact.io.load_displacement_itk` like every other field here.
:func:`fireants_convention_check` registers a pure known translation with the same code and checks
sign and size of the recovered field in RAS mm (printed in the header; ``--check-only``).

Timing. Every row runs in its own subprocess (this file re-invoked as a worker) that registers
``--repeat`` times in one process (``--cpu-repeat`` for the CPU rows). fastimpact runs are the CLI
command ``fastimpact register ... --json`` called in-process (``fastimpact.cli.main.main``), so
each run writes warped.nii.gz + displacement.nii.gz + transform.json + report.json. Run ``1`` wall
= from launching the process to the end of the first run (interpreter start, imports, CUDA context,
JIT compilation of the CUDA kernels, which Numba does not cache on disk, ONNX Runtime sessions);
run ``2`` = the second run in the same process. Stage times come from report.json (``timings_s``).
Numba caches its CPU kernels on disk (NUMBA_CACHE_DIR, shared by all workers; ``--warm-cache``
fills it with untimed 2 mm runs first, so no timed run carries CPU JIT compilation) but compiles
the CUDA kernels in every process: GPU run ``1`` includes that, run ``2`` does not.
GPU kernel time (``--kernel-time``): one more run in the same process (run ``k``, kept out of the
wall columns) under two timers: ``profiler`` = torch.profiler (Kineto / CUPTI), every CUDA kernel
and copy of the process, Numba's and ONNX Runtime's alike (needs torch with CUDA; reported when it
saw kernels); ``events`` = a CUDA event pair around each Numba kernel launch on its stream, summed
(an upper bound: it includes the launch gap when the GPU idles, and misses ONNX Runtime). ``auto``
(default) runs both, ``profiler`` / ``events`` one, ``off`` none. The timers slow run ``k`` down.

Errors: |u_est - u_true| in mm at every voxel of the fixed brain mask (mean / p95); ``check`` =
mean |warped - moving resampled with the field read| / p99 intensity in the mask: ~1e-6 for
fastimpact, ~1e-2 for FireANTs (its warped image is trilinear, the check resamples cubic); the
same field negated or left in LPS gives 0.10-0.14 (measured at 2 mm), so a convention mistake
shows. ``x FireANTs`` = wall / FireANTs wall of the same case and run (cc for mono rows, mi for
t2 rows, else whichever FireANTs row ran). The second table puts one row's numbers on one line.

GPU machine (see shared/GPU.md): carry onnxruntime-gpu (CUDA provider for IMPACT; without it the
IMPACT rows say "features on the CPU" in their status), nibabel, SimpleITK, nilearn (the 1 mm
template), tqdm if missing, and the FireANTs wheel. One command does everything; a device command
may run 10 minutes at most, so split it, keep the work folder and Numba cache in /tmp (never under
$OUT: the 1 mm fields are ~100 MB each) and send only the JSON back::

    python benchmarks/bench_gpu.py --cpu-rows none --numba-cache /tmp/nbc --json-out $OUT/gpu.json
    python benchmarks/bench_gpu.py --device-rows none --skip-fireants --numba-cache /tmp/nbc \\
        --json-out $OUT/cpu.json          # add --cpu-rows all for the ~30 min jacobian-deepbet row
    python benchmarks/bench_gpu.py --merge $OUT/gpu.json $OUT/cpu.json     # one table from both

Smoke test without a GPU::

    python benchmarks/bench_gpu.py --resolution 2mm --iterations 20 --cpu-rows mse,mi,impact-mind \\
        --threads 2 --fireants-iterations 20,10,5:20,10,5
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_core as core  # noqa: E402  (runners' helpers, evaluation, tables, machine info)

# name -> (case, metric, extra fastimpact options)
ROWS = {
    "mse": ("mono", "mse", []),
    "ncc": ("mono", "ncc", []),
    "mi": ("t2", "mi", []),
    "impact-mind": ("t2", "impact", ["--model", "mind", "--distance", "l2"]),
    "impact-deepbet": ("mono", "impact", ["--model", "deepbet", "--layers", "1", "--distance", "l2",
                                          "--voxel-size", "1"]),
    "jacobian-mind": ("t2", "impact", ["--mode", "jacobian", "--model", "mind", "--distance", "l2"]),
    "jacobian-deepbet": ("mono", "impact", ["--mode", "jacobian", "--model", "deepbet", "--layers", "11",
                                            "--distance", "l2"]),
}
# The CPU Jacobian deepbet row takes ~30 min on 2 cores at 1 mm: not in the default CPU rows.
DEFAULT_CPU_ROWS = tuple(r for r in ROWS if r != "jacobian-deepbet")

# FireANTs rows: name -> (case, loss_type)
FIREANTS_ROWS = {"cc": ("mono", "cc"), "mi": ("t2", "mi")}
FIREANTS_SCALES = [4, 2, 1]
FIREANTS_AFFINE_ITERS = [200, 100, 50]
FIREANTS_GREEDY_ITERS = [200, 100, 25]
FIREANTS_AFFINE_LR = 3e-3
FIREANTS_GREEDY_LR = 0.5
FIREANTS_CC_KERNEL = 5
FIREANTS_SMOOTH_GRAD_SIGMA = 1.0

# The convention check: a pure translation, RAS mm, fixed x <-> moving x + t. Multiples of the
# 2 mm voxel so the moving image is an exact voxel shift; different sizes and signs per axis so a
# swapped axis or a lost LPS flip shows.
CHECK_TRANSLATION_MM = (4.0, -6.0, 2.0)
CHECK_TOLERANCE_MM = 1.0


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -------------------------------------------------------------------------------------------------
# GPU kernel time (used inside the fastimpact worker)
# -------------------------------------------------------------------------------------------------


class EventKernelTimer:
    """A CUDA event pair around every Numba kernel launch, on the launch's stream.

    Patches ``__call__`` of Numba's launch-configuration class (whatever ``kernel[grid, block]``
    returns), so every configured launch of the process is timed until :meth:`uninstall`. The sum
    is an upper bound of kernel time: when the GPU idles, the start event completes at once and the
    interval also holds the host's launch latency. ONNX Runtime's kernels are not seen.
    """

    method = "events"

    def __init__(self):
        from numba import cuda

        self.cuda = cuda
        from numba import config

        self.simulated = bool(config.ENABLE_CUDASIM)  # the simulator's events take no arguments

        @cuda.jit
        def _probe(x):  # never launched: only its launch configuration's class is needed
            pass

        self.cls = type(_probe[1, 1])
        self.orig = self.cls.__call__
        self.records: list = []

    def _event(self):
        return self.cuda.event() if self.simulated else self.cuda.event(timing=True)

    def install(self):
        timer = self
        orig = self.orig

        def timed_call(cfg, *args):
            if getattr(cfg, "_device", False):  # the simulator calls device functions through this too
                return orig(cfg, *args)
            stream = getattr(cfg, "stream", 0) or 0
            disp = getattr(cfg, "dispatcher", cfg)
            fn = getattr(disp, "py_func", None) or getattr(disp, "fn", None)
            name = getattr(fn, "__name__", "kernel")
            start, end = timer._event(), timer._event()
            start.record(stream)
            out = orig(cfg, *args)
            end.record(stream)
            timer.records.append((name, start, end))
            return out

        self.cls.__call__ = timed_call
        return self

    def uninstall(self):
        self.cls.__call__ = self.orig

    def summary(self) -> dict:
        self.cuda.synchronize()
        per: dict[str, list] = {}
        total = 0.0
        for name, start, end in self.records:
            end.synchronize()
            ms = float(start.elapsed_time(end))
            total += ms
            acc = per.setdefault(name, [0, 0.0])
            acc[0] += 1
            acc[1] += ms
        top = sorted(per.items(), key=lambda kv: -kv[1][1])[:10]
        return {"method": self.method, "kernel_ms": total, "launches": len(self.records), "memcpy_ms": None,
                "top": [{"name": n, "count": c, "ms": round(ms, 3)} for n, (c, ms) in top]}


class ProfilerKernelTimer:
    """torch.profiler (Kineto with CUPTI) over one run: every CUDA kernel and copy of the process.

    CUPTI's activity records are per process, so kernels launched by Numba and by ONNX Runtime are
    collected although torch launches none of them. The sum of the kernels' GPU durations
    (chrome-trace events of category ``kernel``) is the GPU kernel time; copies and memsets are
    summed apart.
    """

    method = "profiler"

    def __init__(self, trace_path: Path):
        import torch
        from torch.profiler import ProfilerActivity, profile

        if not torch.cuda.is_available():
            raise RuntimeError("torch has no CUDA (torch.cuda.is_available() is False)")
        self.trace_path = Path(trace_path)
        self.prof = profile(activities=[ProfilerActivity.CUDA])

    def install(self):
        self.prof.__enter__()
        return self

    def uninstall(self):
        import torch

        torch.cuda.synchronize()
        self.prof.__exit__(None, None, None)

    def summary(self) -> dict:
        self.prof.export_chrome_trace(str(self.trace_path))
        events = json.loads(self.trace_path.read_text()).get("traceEvents", [])
        self.trace_path.unlink(missing_ok=True)
        per: dict[str, list] = {}
        kernel_us = copy_us = 0.0
        launches = 0
        for e in events:
            cat = str(e.get("cat", "")).lower()
            dur = float(e.get("dur", 0.0) or 0.0)
            if cat == "kernel":
                kernel_us += dur
                launches += 1
                acc = per.setdefault(str(e.get("name", "?"))[:60], [0, 0.0])
                acc[0] += 1
                acc[1] += dur / 1000.0
            elif cat in ("gpu_memcpy", "gpu_memset"):
                copy_us += dur
        top = sorted(per.items(), key=lambda kv: -kv[1][1])[:10]
        return {"method": self.method, "kernel_ms": kernel_us / 1000.0, "launches": launches,
                "memcpy_ms": copy_us / 1000.0,
                "top": [{"name": n, "count": c, "ms": round(ms, 3)} for n, (c, ms) in top]}


def _make_kernel_timers(method: str, work: Path):
    """(timers, note). ``auto``: the profiler (if torch has CUDA) and the event timer together; the
    profiler's numbers are reported, the events' sum is kept as a cross-check and a fallback."""
    if method == "off":
        return [], "off"
    timers, errors = [], []
    if method in ("auto", "profiler"):
        try:
            timers.append(ProfilerKernelTimer(work / "kernel_trace.json"))
        except Exception as exc:  # torch missing or without CUDA: say so
            errors.append(f"profiler unavailable ({type(exc).__name__}: {str(exc)[:80]})")
    if method in ("auto", "events"):
        try:
            timers.append(EventKernelTimer())
        except Exception as exc:
            errors.append(f"events unavailable ({type(exc).__name__}: {str(exc)[:80]})")
    return timers, "; ".join(errors)


def _combine_kernel_summaries(summaries: list[dict]) -> dict | None:
    """The first summary that saw kernels (profiler before events), the others attached."""
    if not summaries:
        return None
    seen = [s for s in summaries if s.get("launches")]
    main = dict(seen[0] if seen else summaries[0])
    main["others"] = [{k: s[k] for k in ("method", "kernel_ms", "launches")} for s in summaries
                      if s["method"] != main["method"]]
    return main


# -------------------------------------------------------------------------------------------------
# workers (each runs in its own process: `bench_gpu.py --fastimpact-worker spec.json`)
# -------------------------------------------------------------------------------------------------


def _write_json(path: Path, obj) -> None:
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(obj, default=str))
    tmp.replace(path)


def _fastimpact_worker(spec_path: str) -> None:
    """Run ``fastimpact register`` (the CLI, in-process) once per entry of spec['runs']."""
    spec = json.loads(Path(spec_path).read_text())
    from fastimpact.cli.main import main as cli_main
    import fastimpact.engine  # noqa: F401  (its import is part of the command's start-up)

    result = {"ready": time.time(), "runs": []}
    result_path = Path(spec["result"])
    _write_json(result_path, result)
    for run in spec["runs"]:
        timers, note = [], ""
        if run.get("kernel_time", "off") != "off":
            timers, note = _make_kernel_timers(run["kernel_time"], Path(run["out"]).parent)
        buf = io.StringIO()
        t0 = time.time()
        kt = None
        rc = None
        error = ""
        try:
            installed = []
            try:
                for timer in timers:
                    try:
                        installed.append(timer.install())
                    except Exception as exc:  # a timer that cannot start leaves the run untouched
                        why = f"{timer.method} did not start ({type(exc).__name__}: {str(exc)[:80]})"
                        note = f"{note}; {why}".strip("; ")
                with contextlib.redirect_stdout(buf):
                    rc = cli_main(run["argv"])
            finally:
                for timer in reversed(installed):
                    timer.uninstall()
            summaries = []
            for timer in installed:
                try:
                    summaries.append(timer.summary())
                except Exception as exc:  # one timer failing keeps the other's numbers
                    note = f"{note}; {timer.method} failed ({type(exc).__name__}: {str(exc)[:80]})".strip("; ")
            kt = _combine_kernel_summaries(summaries)
        except Exception as exc:  # a failed run is reported, the next one still runs
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        end = time.time()
        summary = core._last_json_line(buf.getvalue()) or {}
        report = {}
        rp = Path(run["out"]) / "report.json"
        if rp.is_file():
            try:
                report = json.loads(rp.read_text())
            except json.JSONDecodeError:
                pass
        result["runs"].append({
            "label": run["label"], "start": t0, "end": end, "rc": rc, "error": error,
            "summary": summary, "timings_s": report.get("timings_s", summary.get("timings_s", {})),
            "device": report.get("device"), "device_note": report.get("device_note", ""),
            "kernel": kt, "kernel_note": note,
        })
        _write_json(result_path, result)


def _fireants_worker(spec_path: str) -> None:
    """Affine + greedy FireANTs registration, ``spec['repeat']`` times in this process; each run
    writes warped.nii.gz and the ANTs displacement field displacement.nii.gz."""
    spec = json.loads(Path(spec_path).read_text())
    import torch

    import fireants  # noqa: F401
    from fireants.io import BatchedImages, Image
    from fireants.registration.affine import AffineRegistration
    from fireants.registration.greedy import GreedyRegistration

    device = spec["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(int(spec["threads"]))
    gpu = device.startswith("cuda")

    def sync():
        if gpu:
            torch.cuda.synchronize()

    result = {"ready": time.time(), "device": device, "runs": [],
              "torch": torch.__version__, "gpu_name": torch.cuda.get_device_name(0) if gpu else None}
    result_path = Path(spec["result"])
    _write_json(result_path, result)
    for label, out in zip(spec["labels"], spec["outs"]):
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        t = {}
        t0 = time.time()
        error = ""
        try:
            s = time.perf_counter()
            fixed = Image.load_file(spec["fixed"], device=device)
            moving = Image.load_file(spec["moving"], device=device)
            fb, mb = BatchedImages([fixed]), BatchedImages([moving])
            sync()
            t["load"] = time.perf_counter() - s
            s = time.perf_counter()
            aff = AffineRegistration(FIREANTS_SCALES, spec["affine_iterations"], fb, mb, loss_type=spec["loss"],
                                     optimizer="Adam", optimizer_lr=FIREANTS_AFFINE_LR,
                                     cc_kernel_size=FIREANTS_CC_KERNEL, progress_bar=False)
            aff.optimize()
            init = aff.get_affine_matrix().detach()
            sync()
            t["affine"] = time.perf_counter() - s
            s = time.perf_counter()
            reg = GreedyRegistration(scales=FIREANTS_SCALES, iterations=spec["greedy_iterations"],
                                     fixed_images=fb, moving_images=mb, loss_type=spec["loss"],
                                     cc_kernel_size=FIREANTS_CC_KERNEL, deformation_type="compositive",
                                     smooth_grad_sigma=FIREANTS_SMOOTH_GRAD_SIGMA, optimizer="adam",
                                     optimizer_lr=FIREANTS_GREEDY_LR, init_affine=init, progress_bar=False)
            reg.optimize()
            sync()
            t["greedy"] = time.perf_counter() - s
            s = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):  # its file lock prints to stdout
                moved = reg.evaluate(fb, mb)
                reg.save_moved_images(moved, str(out / "warped.nii.gz"))
            t["warp_write"] = time.perf_counter() - s
            s = time.perf_counter()
            reg.save_as_ants_transforms(str(out / "displacement.nii.gz"))
            t["field_write"] = time.perf_counter() - s
            del reg, aff, fb, mb, fixed, moving, moved, init
            if gpu:
                torch.cuda.empty_cache()
        except Exception as exc:
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        result["runs"].append({"label": label, "start": t0, "end": time.time(), "timings_s": t, "error": error})
        _write_json(result_path, result)


# -------------------------------------------------------------------------------------------------
# running the rows (parent side)
# -------------------------------------------------------------------------------------------------


def _worker_env(threads: int, numba_cache: Path | None, cuda_sim: bool = False) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if not cuda_sim:
        env.pop("NUMBA_ENABLE_CUDASIM", None)
    if numba_cache is not None:
        env["NUMBA_CACHE_DIR"] = str(numba_cache)
    return env


def _split_runs(result: dict, launch: float) -> list[dict]:
    """Per run: wall of the run itself; the first from the process launch (start-up included)."""
    out = []
    for i, r in enumerate(result.get("runs", [])):
        d = dict(r)
        d["wall_s"] = r["end"] - (launch if i == 0 else r["start"])
        if i == 0:
            d["start_s"] = result.get("ready", launch) - launch
        out.append(d)
    return out


def run_fastimpact_row(name: str, device: str, fixed: Path, moving: Path, out: Path, args, repeat: int,
                       kernel_time: str, numba_cache: Path) -> list[dict]:
    """One subprocess: ``repeat`` timed runs (+ run 'k' under the kernel timer). One dict per run."""
    _, metric, extra = ROWS[name]
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    common = [str(fixed), str(moving), "--metric", metric, "--json", "--force",
              "--levels", str(args.levels), "--iterations", str(args.iterations),
              "--samples", str(args.samples), "--grid-spacing", str(args.grid_spacing),
              "--affine-iterations", str(args.affine_iterations), "--seed", str(args.seed),
              "--threads", str(args.threads), "--device", device] + list(extra)
    runs = []
    labels = [str(i + 1) for i in range(repeat)] + (["k"] if kernel_time != "off" else [])
    for label in labels:
        o = out / f"run{label}"
        runs.append({"label": label, "out": str(o), "kernel_time": kernel_time if label == "k" else "off",
                     "argv": ["register"] + common[:2] + ["-o", str(o)] + common[2:]})
    spec = {"runs": runs, "result": str(out / "worker_result.json")}
    (out / "worker_spec.json").write_text(json.dumps(spec))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--fastimpact-worker", str(out / "worker_spec.json")]
    cache_files = sum(1 for _ in numba_cache.rglob("*.nbi")) if numba_cache.exists() else 0
    launch = time.time()
    proc, wall, cpu = core._timed_run(cmd, _worker_env(args.threads, numba_cache), args.timeout)
    (out / "worker.log").write_text((proc.stdout or "") + "\n--- stderr ---\n" + (proc.stderr or ""))
    rp = Path(spec["result"])
    result = json.loads(rp.read_text()) if rp.is_file() else {}
    records = []
    done = _split_runs(result, launch)
    for label in labels:
        r = next((d for d in done if d["label"] == label), None)
        rec = {"row": name, "tool": "fastimpact", "device": device, "run": label, "process_wall_s": wall,
               "process_cpu_s": cpu, "numba_cache_files_before": cache_files,
               "field": str(out / f"run{label}" / "displacement.nii.gz"),
               "warped": str(out / f"run{label}" / "warped.nii.gz")}
        if r is None:
            rec.update(ok=False, wall_s=None, timings_s={},
                       message=core._failure_message(proc) if proc.returncode else "run did not happen")
        else:
            ok = r.get("rc") == 0 and r.get("summary", {}).get("status") == "ok" and not r.get("error")
            msg = ""
            if not ok:
                msg = r.get("error") or core._failure_message(proc)
            rec.update(ok=ok, wall_s=r["wall_s"], start_s=r.get("start_s"), timings_s=r.get("timings_s", {}),
                       device_used=r.get("device"), device_note=r.get("device_note", ""),
                       kernel=r.get("kernel"), kernel_note=r.get("kernel_note", ""), message=msg)
        records.append(rec)
    return records


def warm_cpu_cache(rows: list[str], args, work: Path, numba_cache: Path) -> str:
    """Fill the shared Numba CPU cache (NUMBA_CACHE_DIR) before anything is timed.

    Numba caches the CPU kernels on disk; the CUDA kernels it compiles in every process. Without
    this, the first timed row would carry the CPU JIT compilation of every kernel it uses. One
    untimed process registers the 2 mm mono pair briefly (2 levels, 2 iterations) once per row
    on the CPU, which compiles the same kernel signatures as the timed runs. Returns a note.
    """
    if any(numba_cache.rglob("*.nbi")):
        return f"Numba CPU cache: reused ({numba_cache})"
    from fastimpact.io import save_image
    from fastimpact.synthetic import make_case

    d = work / "warmup"
    d.mkdir(parents=True, exist_ok=True)
    case = make_case("mono", "2mm", seed=args.seed)
    fixed, moving = d / "fixed.nii.gz", d / "moving.nii.gz"
    save_image(case.fixed, fixed)
    save_image(case.moving, moving)
    runs = []
    for name in rows:
        _, metric, extra = ROWS[name]
        o = d / name
        runs.append({"label": name, "out": str(o), "kernel_time": "off",
                     "argv": ["register", str(fixed), str(moving), "-o", str(o), "--metric", metric, "--json",
                              "--force",
                              "--levels", "2", "--iterations", "2", "--affine-iterations", "2", "--samples", "500",
                              "--threads", str(args.threads), "--device", "cpu"] + list(extra)})
    spec = {"runs": runs, "result": str(d / "worker_result.json")}
    (d / "worker_spec.json").write_text(json.dumps(spec))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--fastimpact-worker", str(d / "worker_spec.json")]
    proc, wall, _ = core._timed_run(cmd, _worker_env(args.threads, numba_cache), args.timeout)
    rp = d / "worker_result.json"
    done = json.loads(rp.read_text()).get("runs", []) if rp.is_file() else []
    failed = [r["label"] for r in done if r.get("rc") != 0 or r.get("error")]
    msg = f"Numba CPU cache: warmed before timing in {wall:.0f} s (untimed 2 mm runs of {', '.join(rows)})"
    if failed or len(done) != len(rows):
        msg += f"; warm-up failed for {', '.join(failed) or 'some rows'}: {core._failure_message(proc)}"
    return msg


def run_fireants_row(name: str, fixed: Path, moving: Path, out: Path, args, repeat: int,
                     affine_iterations, greedy_iterations, device: str = "auto") -> list[dict]:
    _, loss = FIREANTS_ROWS[name]
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    labels = [str(i + 1) for i in range(repeat)]
    spec = {"fixed": str(fixed), "moving": str(moving), "loss": loss, "device": device, "threads": args.threads,
            "affine_iterations": list(affine_iterations), "greedy_iterations": list(greedy_iterations),
            "labels": labels, "outs": [str(out / f"run{lb}") for lb in labels],
            "result": str(out / "worker_result.json")}
    (out / "worker_spec.json").write_text(json.dumps(spec))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--fireants-worker", str(out / "worker_spec.json")]
    launch = time.time()
    proc, wall, cpu = core._timed_run(cmd, _worker_env(args.threads, None), args.timeout)
    (out / "worker.log").write_text((proc.stdout or "") + "\n--- stderr ---\n" + (proc.stderr or ""))
    rp = Path(spec["result"])
    result = json.loads(rp.read_text()) if rp.is_file() else {}
    done = _split_runs(result, launch)
    records = []
    for label in labels:
        r = next((d for d in done if d["label"] == label), None)
        o = out / f"run{label}"
        rec = {"row": f"fireants-{name}", "tool": "fireants", "device": result.get("device", "?"), "run": label,
               "process_wall_s": wall, "process_cpu_s": cpu, "field": str(o / "displacement.nii.gz"),
               "warped": str(o / "warped.nii.gz"), "gpu_name": result.get("gpu_name"),
               "torch": result.get("torch")}
        if r is None:
            rec.update(ok=False, wall_s=None, timings_s={}, message=core._failure_message(proc))
        else:
            ok = not r.get("error") and (o / "displacement.nii.gz").is_file()
            rec.update(ok=ok, wall_s=r["wall_s"], start_s=r.get("start_s"), timings_s=r.get("timings_s", {}),
                       message="" if ok else (r.get("error") or core._failure_message(proc)))
        records.append(rec)
    return records


# -------------------------------------------------------------------------------------------------
# FireANTs convention check: a pure known translation
# -------------------------------------------------------------------------------------------------


def _check_variants(t1: np.ndarray, affine: np.ndarray):
    """The 2 mm template as stored (RAS, diagonal) and with axis 0 flipped and axes 0/1 swapped
    (a non-diagonal ITK direction): same anatomy, same world coordinates."""
    yield "stored", t1, affine
    n0 = t1.shape[0]
    # new[a, b, c] = old[n0 - 1 - b, a, c]: old index = M @ (a, b, c, 1)
    data = np.ascontiguousarray(np.transpose(t1[::-1], (1, 0, 2)))
    m = np.array([[0, -1, 0, n0 - 1], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=np.float64)
    yield "flipped+permuted", data, affine @ m


def fireants_convention_check(work: Path, args, *, device: str = "auto",
                              translation=CHECK_TRANSLATION_MM, tolerance=CHECK_TOLERANCE_MM) -> dict:
    """Register moving(y) = fixed(y - t) with the FireANTs runner; the field read back in RAS mm
    (fixed x -> moving x + u) must be t inside the brain, in sign and size (|mean - t| <= tolerance
    per axis), for the stored orientation and for a flipped + permuted one.

    Returns {"ok": bool, "device": str, "variants": [{name, mean_u, max_abs_dev, ok, ...}]}.
    """
    import nibabel as nib

    from fastimpact import data
    from fastimpact.image import Image as FImage
    from fastimpact.io import load_displacement_itk, save_image
    from fastimpact.synthetic import warp

    t = np.asarray(translation, dtype=np.float64)
    img = nib.load(str(data.demo_paths()["t1"]))
    t1 = np.asarray(img.get_fdata(), dtype=np.float32)
    out = {"translation_mm": t.tolist(), "tolerance_mm": tolerance, "variants": [], "device": None}
    for name, arr, aff in _check_variants(t1, np.asarray(img.affine, dtype=np.float64)):
        d = work / f"fireants_check_{name.replace('+', '_')}"
        d.mkdir(parents=True, exist_ok=True)
        moving = warp(arr, aff, np.broadcast_to(-t, arr.shape + (3,)).copy(), order=1)
        fixed_p, moving_p = d / "fixed.nii.gz", d / "moving.nii.gz"
        save_image(FImage(arr, aff), fixed_p)
        save_image(FImage(moving, aff), moving_p)
        ns = argparse.Namespace(threads=args.threads, timeout=args.timeout)
        recs = run_fireants_row("cc", fixed_p, moving_p, d / "run", ns, 1, args.check_affine_iterations,
                                args.check_greedy_iterations, device)
        rec = recs[0]
        out["device"] = rec.get("device")
        v = {"name": name, "ok": False, "wall_s": rec.get("wall_s")}
        if not rec["ok"]:
            v["message"] = rec["message"]
        else:
            u, ref = load_displacement_itk(rec["field"])
            # brain voxels away from the border (the shifted image is extrapolated there)
            mask = arr > 0.3 * np.percentile(arr[arr > 0], 99)
            mask[:6], mask[-6:], mask[:, :6], mask[:, -6:], mask[:, :, :6], mask[:, :, -6:] = (False,) * 6
            mean_u = u[mask].mean(axis=0)
            dev = np.abs(mean_u - t)
            v.update(mean_u=[round(float(x), 3) for x in mean_u], max_abs_dev=float(dev.max()),
                     sign_ok=bool(np.all(np.sign(mean_u) == np.sign(t))),
                     grid_ok=bool(np.allclose(ref.affine, aff, atol=1e-3)), ok=bool(dev.max() <= tolerance))
            v["ok"] = v["ok"] and v["sign_ok"] and v["grid_ok"]
            # the same field with LPS components left as they are would give (-tx, -ty, tz)
            v["mean_u_if_read_as_ras"] = [round(float(x), 3) for x in mean_u * np.array([-1.0, -1.0, 1.0])]
        out["variants"].append(v)
    out["ok"] = all(v["ok"] for v in out["variants"])
    return out


def format_check(check: dict | None) -> str:
    if not check:
        return "FireANTs convention check: not run"
    parts = []
    for v in check["variants"]:
        if "mean_u" in v:
            parts.append(f"{v['name']}: mean u {v['mean_u']} mm (|dev| max {v['max_abs_dev']:.2f}, "
                         f"{'ok' if v['ok'] else 'FAILED'})")
        else:
            parts.append(f"{v['name']}: FAILED ({v.get('message', '')})")
    return (f"FireANTs convention check ({check.get('device')}): translation t = {check['translation_mm']} mm RAS, "
            f"field read as RAS fixed->moving; " + "; ".join(parts) + f" -> {'PASS' if check['ok'] else 'FAIL'}")


# -------------------------------------------------------------------------------------------------
# tables
# -------------------------------------------------------------------------------------------------


def _stage_summary(rec: dict) -> str:
    t = rec.get("timings_s") or {}
    parts = []
    if rec.get("start_s") is not None:
        parts.append(f"start {rec['start_s']:.1f}")
    if rec["tool"] == "fireants":
        keys = [("load", "load"), ("affine", "affine"), ("greedy", "greedy"), ("warp_write", "warp+write"),
                ("field_write", "field write")]
        parts += [f"{short} {float(t[k]):.1f}" for k, short in keys if k in t]
        return ", ".join(parts)
    s = core._stage_summary("fastimpact", rec)
    return ", ".join(parts + ([s] if s else []))


def _kernel_cell(rec: dict) -> str:
    k = rec.get("kernel")
    if not k:
        return "-"
    cell = f"{k['kernel_ms'] / 1000.0:.2f} s / {k['launches']} ({k['method']})"
    if k.get("memcpy_ms"):
        cell += f", copies {k['memcpy_ms'] / 1000.0:.2f} s"
    for o in k.get("others", []):
        cell += f"; {o['method']} {o['kernel_ms'] / 1000.0:.2f} s / {o['launches']}"
    return cell


def _fireants_reference(records, case: str, run: str):
    """The FireANTs record a fastimpact row on ``case`` is compared with (same run if possible)."""
    preferred = {"mono": "fireants-cc", "t2": "fireants-mi"}.get(case)
    fa = [r for r in records if r["tool"] == "fireants" and r.get("ok") and r.get("wall_s")]
    for cond in (lambda r: r["row"] == preferred and r["run"] == run, lambda r: r["row"] == preferred,
                 lambda r: r["run"] == run, lambda r: True):
        hit = [r for r in fa if cond(r)]
        if hit:
            return hit[0]
    return None


def make_rows(records):
    rows = []
    for rec in records:
        err = rec.get("error") or {}
        case = rec.get("case", "")
        ratio = "-"
        if rec["tool"] == "fastimpact" and rec.get("ok") and rec.get("wall_s") and rec["run"] != "k":
            ref = _fireants_reference(records, case, rec["run"])
            if ref is not None:
                ratio = f"{rec['wall_s'] / ref['wall_s']:.2f} ({ref['row'][9:]} {ref['run']})"
        status = "ok" if rec.get("ok") else rec.get("message", "failed")
        if rec.get("ok") and rec.get("numba_cache_files_before") == 0 and rec["run"] == "1":
            status += " (Numba CPU cache was empty: run 1 includes CPU JIT)"
        note = rec.get("device_note") or ""
        if rec.get("ok") and note:
            status += f" ({note})"
        if rec.get("kernel_note"):
            status += f" [kernel timer: {rec['kernel_note']}]"
        if rec.get("eval_note"):
            status += f" [{rec['eval_note']}]"
        device = rec.get("device_used") or rec.get("device", "")
        rows.append([rec["row"], case, f"{rec['tool']} {device}".strip(), rec["run"], core._fmt(rec.get("wall_s"), 1),
                     _stage_summary(rec) if rec.get("timings_s") or rec.get("start_s") else "-",
                     _kernel_cell(rec), core._fmt(err.get("mean")), core._fmt(err.get("p95")),
                     f"{rec['consistency']:.1e}" if rec.get("consistency") is not None else "-", ratio, status])
    return rows


HEADER = ["row", "case", "tool device", "run", "wall s", "stage times s", "GPU kernels (time / launches)",
          "err mean", "err p95", "check", "x FireANTs", "status"]


def _by(records, row, tool, devices, run):
    for r in records:
        dev = r.get("device_used") or r.get("device")
        if r["row"] == row and r["tool"] == tool and dev in devices and r["run"] == run and r.get("ok"):
            return r
    return None


def summary_rows(records):
    """One line per row: GPU and CPU first / second run, GPU kernel time, errors, FireANTs."""
    def w(r):
        return core._fmt(r["wall_s"], 1) if r else "-"

    def e(r):
        return f"{r['error']['mean']:.2f} / {r['error']['p95']:.2f}" if r and r.get("error") else "-"

    out = []
    names = [n for n in ROWS if any(r["row"] == n for r in records)]
    for n in names:
        g1, g2, gk = (_by(records, n, "fastimpact", ("cuda",), run) for run in ("1", "2", "k"))
        c1, c2 = (_by(records, n, "fastimpact", ("cpu",), run) for run in ("1", "2"))
        case = ROWS[n][0]
        fa1, fa2 = (_fireants_reference(records, case, run) for run in ("1", "2"))
        skipped = next((r["message"] for r in records
                        if r["row"] == n and str(r.get("message", "")).startswith("skipped")), "")
        best_g = g2 or g1
        ratio_fa = "-"
        fa = fa2 if (g2 and fa2 and fa2["run"] == "2") else fa1
        if best_g and fa:
            ratio_fa = f"{best_g['wall_s'] / fa['wall_s']:.2f}"
        cpu_gpu = "-"
        best_c = c2 or c1
        if best_g and best_c:
            cpu_gpu = f"{best_c['wall_s'] / best_g['wall_s']:.1f}"
        kern = f"{gk['kernel']['kernel_ms'] / 1000.0:.2f}" if gk and gk.get("kernel") else "-"
        out.append([n, case, w(g1), w(g2) if g2 else ("skipped" if skipped else "-"), kern, e(best_g), w(c1), w(c2),
                    e(best_c), cpu_gpu,
                    f"{w(fa1)} / {w(fa2)} ({fa1['row'][9:]}, {fa1.get('device')})" if fa1 else "-", ratio_fa])
    for r in records:
        if r["tool"] == "fireants" and r["run"] == "1":
            r2 = _by(records, r["row"], "fireants", (r.get("device"),), "2")
            e1 = r.get("error") or (r2 or {}).get("error")
            out.append([r["row"], r.get("case", ""), w(r) if r.get("device") == "cuda" else "-",
                        w(r2) if r.get("device") == "cuda" else "-", "-",
                        f"{e1['mean']:.2f} / {e1['p95']:.2f}" if e1 and r.get("device") == "cuda" else "-",
                        w(r) if r.get("device") != "cuda" else "-", w(r2) if r.get("device") != "cuda" else "-",
                        f"{e1['mean']:.2f} / {e1['p95']:.2f}" if e1 and r.get("device") != "cuda" else "-",
                        "-", "-", "-"])
    for r in records:
        if r["row"] == "identity":
            ident = f"{r['error']['mean']:.2f} / {r['error']['p95']:.2f}"
            out.append(["identity", r["case"], "-", "-", "-", ident, "-", "-", ident, "-", "-", "-"])
    return out


SUMMARY_HEADER = ["row", "case", "GPU 1st s", "GPU 2nd s", "GPU kernels s", "GPU err mean / p95", "CPU 1st s",
                  "CPU 2nd s", "CPU err mean / p95", "CPU / GPU", "FireANTs 1st / 2nd s", "GPU / FireANTs"]


def print_report(doc: dict) -> None:
    records = doc["records"]
    for line in doc.get("header", []):
        print(line)
    rows = make_rows(records)
    core.print_table(rows, HEADER)
    srows = summary_rows(records)
    print()
    core.print_table(srows, SUMMARY_HEADER)
    print("\nMarkdown:\n")
    for line in doc.get("header", []):
        print(line + "  ")
    print()
    print(core.markdown_table(rows, HEADER))
    print()
    print(core.markdown_table(srows, SUMMARY_HEADER))


# -------------------------------------------------------------------------------------------------
# main
# -------------------------------------------------------------------------------------------------


def _rows_arg(value: str, allowed, default) -> list[str]:
    v = value.strip().lower()
    if v == "none":
        return []
    if v == "all":
        return list(allowed)
    if v == "default":
        return list(default)
    return core._csv(value, tuple(allowed))


def _iters_pair(value: str):
    """'A,A,A:G,G,G' -> ([A...], [G...]) with 3 entries each (FireANTs' 3 scales)."""
    try:
        a, g = value.split(":")
        aff = [int(x) for x in a.split(",")]
        gre = [int(x) for x in g.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r}: use AFFINE:GREEDY iterations per scale, e.g. 200,100,50:200,100,25")
    if len(aff) != len(FIREANTS_SCALES) or len(gre) != len(FIREANTS_SCALES) or min(aff + gre) < 0:
        raise argparse.ArgumentTypeError(
            f"{value!r}: give {len(FIREANTS_SCALES)} non-negative counts on each side of ':'")
    return aff, gre


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device-rows", type=lambda v: _rows_arg(v, ROWS, ROWS), default=list(ROWS),
                   help=f"GPU rows (--device cuda): {', '.join(ROWS)}, all or none (default all)")
    p.add_argument("--cpu-rows", type=lambda v: _rows_arg(v, ROWS, DEFAULT_CPU_ROWS), default=list(DEFAULT_CPU_ROWS),
                   help="CPU rows (--device cpu), same names, all or none (default all but jacobian-deepbet, "
                        "~30 min on 2 cores at 1 mm)")
    p.add_argument("--fireants-rows", type=lambda v: _rows_arg(v, FIREANTS_ROWS, FIREANTS_ROWS),
                   default=list(FIREANTS_ROWS), help="FireANTs rows: cc (mono), mi (t2), all or none")
    p.add_argument("--skip-fireants", action="store_true", help="no FireANTs rows and no convention check")
    p.add_argument("--fireants-device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="auto: cuda when torch.cuda.is_available(), else cpu")
    p.add_argument("--fireants-iterations", type=_iters_pair,
                   default=(FIREANTS_AFFINE_ITERS, FIREANTS_GREEDY_ITERS),
                   help="FireANTs AFFINE:GREEDY iterations at scales 4,2,1 "
                        "(default its tutorial's 200,100,50:200,100,25)")
    p.add_argument("--fireants-check", action=argparse.BooleanOptionalAction, default=True,
                   help="run the FireANTs convention check (2 mm translation) before the FireANTs rows")
    p.add_argument("--check-iterations", type=_iters_pair, default=([100, 50, 25], [20, 10, 5]),
                   help="FireANTs iterations of the convention check (default 100,50,25:20,10,5)")
    p.add_argument("--check-only", action="store_true", help="run the FireANTs convention check only")
    p.add_argument("--resolution", choices=("1mm", "2mm"), default="1mm")
    p.add_argument("--iterations", type=core._positive_int, default=500, help="B-spline ASGD iterations per level")
    p.add_argument("--affine-iterations", type=core._positive_int, default=250)
    p.add_argument("--levels", type=core._positive_int, default=3)
    p.add_argument("--samples", type=core._positive_int, default=2000)
    p.add_argument("--grid-spacing", type=float, default=8.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=core._positive_int, default=2,
                   help="runs in one process for the GPU and FireANTs rows (1 = first run only; default 2)")
    p.add_argument("--cpu-repeat", type=core._positive_int, default=1, help="runs in one process for the CPU rows")
    p.add_argument("--kernel-time", choices=("auto", "profiler", "events", "off"), default="auto",
                   help="GPU kernel time in one extra run 'k' per GPU row (auto: profiler, else events)")
    p.add_argument("--threads", type=core._positive_int, default=os.cpu_count(), help="CPU threads (default all cores)")
    p.add_argument("--workdir", type=Path, default=None, help="keep inputs/outputs here (default: a temp dir)")
    p.add_argument("--numba-cache", type=Path, default=None,
                   help="NUMBA_CACHE_DIR shared by the workers (default: <workdir>/numba_cache)")
    p.add_argument("--warm-cache", action=argparse.BooleanOptionalAction, default=True,
                   help="compile the Numba CPU kernels (untimed 2 mm runs) before timing when the cache is empty")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per row process")
    p.add_argument("--json-out", type=Path, default=None, help="write header + records as JSON (after every row)")
    p.add_argument("--merge", type=Path, nargs="+", default=None, help="print one table from --json-out files and exit")
    args = p.parse_args(argv)
    if args.skip_fireants:
        args.fireants_rows = []
    args.check_affine_iterations, args.check_greedy_iterations = args.check_iterations
    return args


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("fastimpact", "numba", "numba-cuda", "cupy-cuda13x", "cupy-cuda12x", "onnxruntime",
                "onnxruntime-gpu", "torch", "fireants", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _gpu_name() -> str:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return "no GPU (nvidia-smi not found)"
    try:
        proc = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
        return proc.stdout.strip().splitlines()[0] if proc.stdout.strip() else "nvidia-smi gave nothing"
    except Exception as exc:  # pragma: no cover - machine dependent
        return f"nvidia-smi failed ({type(exc).__name__})"


def _evaluate(rec: dict, case) -> None:
    if rec.get("ok"):
        try:
            rec.update(core.evaluate(rec, case, True))
        except Exception as exc:  # an unreadable field is reported in the row, the table still prints
            rec["eval_note"] = f"evaluation failed: {type(exc).__name__}: {str(exc)[:120]}"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.merge:
        docs = [json.loads(p.read_text()) for p in args.merge]
        merged = {"header": [], "records": []}
        for p, d in zip(args.merge, docs):
            merged["header"] += [f"[{p.name}] {h}" for h in d.get("header", [])]
            merged["records"] += d.get("records", [])
        print_report(merged)
        return 0

    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="fastimpact-bench-gpu-")
        work = Path(tmp.name)
    else:
        work = args.workdir
        work.mkdir(parents=True, exist_ok=True)
    numba_cache = args.numba_cache or (work / "numba_cache")
    numba_cache.mkdir(parents=True, exist_ok=True)

    from fastimpact.backend import cuda_available

    cuda_ok, cuda_why = cuda_available()
    info = core.machine_info(args.threads)
    versions = _versions()
    gpu = _gpu_name()
    fa_default = (list(args.fireants_iterations[0]) == FIREANTS_AFFINE_ITERS
                  and list(args.fireants_iterations[1]) == FIREANTS_GREEDY_ITERS)
    header = [
        f"fastimpact GPU benchmark: MNI152 2009a {args.resolution}, known deformation (make_case seed {args.seed}, "
        f"max 10 mm); affine {args.levels} x {args.affine_iterations} it + B-spline grid {args.grid_spacing:g} mm, "
        f"{args.levels} levels x {args.iterations} it, {args.samples} samples",
        f"machine: {info['cpu']}, {info['cores']} cores, CPU rows {args.threads} threads; GPU: {gpu}; "
        f"fastimpact CUDA: {'usable' if cuda_ok else 'not usable: ' + cuda_why}",
        "versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        "FireANTs: not run" if not args.fireants_rows else
        f"FireANTs: affine + greedy (compositive), scales {FIREANTS_SCALES}, affine Adam lr {FIREANTS_AFFINE_LR:g} x "
        f"{args.fireants_iterations[0]}, greedy Adam lr {FIREANTS_GREEDY_LR:g} x {args.fireants_iterations[1]} it, "
        f"smooth_grad_sigma {FIREANTS_SMOOTH_GRAD_SIGMA:g}, CC kernel {FIREANTS_CC_KERNEL} (tutorial settings"
        f"{'' if fa_default else ', iterations overridden'})",
        f"runs: '1' = new process (launch to end of run 1), '2' = second run in that process; 'k' = extra run "
        f"under the GPU kernel timer ({args.kernel_time}); wall includes writing warped + displacement NIfTI",
    ]
    doc = {"header": header, "records": [], "machine": info, "versions": versions, "gpu": gpu,
           "args": {k: str(v) for k, v in vars(args).items()}}

    def save_doc():
        if args.json_out:
            args.json_out.parent.mkdir(parents=True, exist_ok=True)
            _write_json(args.json_out, doc)

    for line in header:
        _log(line)
    check = None
    try:
        if args.check_only or (args.fireants_rows and args.fireants_check):
            _log("FireANTs convention check (2 mm, pure translation) ...")
            try:
                check = fireants_convention_check(work, args, device=args.fireants_device)
            except Exception as exc:
                check = {"ok": False, "variants": [{"name": "all", "message": f"{type(exc).__name__}: {exc}"}],
                         "translation_mm": list(CHECK_TRANSLATION_MM), "device": args.fireants_device}
            header.append(format_check(check))
            doc["fireants_check"] = check
            _log(header[-1])
            save_doc()
            if args.check_only:
                print("\n".join(header))
                return 0 if check["ok"] else 1

        from fastimpact.io import save_image
        from fastimpact.synthetic import make_case

        jobs = [("cuda", r) for r in args.device_rows] + [("cpu", r) for r in args.cpu_rows]
        jobs += [("fireants", r) for r in args.fireants_rows]
        cases_needed = []
        for kind, r in jobs:
            c = FIREANTS_ROWS[r][0] if kind == "fireants" else ROWS[r][0]
            if c not in cases_needed:
                cases_needed.append(c)
        cases = {}
        for c in cases_needed:
            t = time.perf_counter()
            case = make_case(c, args.resolution, seed=args.seed)
            cdir = work / f"{c}_{args.resolution}"
            cdir.mkdir(parents=True, exist_ok=True)
            fixed_p, moving_p = cdir / "fixed.nii.gz", cdir / "moving.nii.gz"
            save_image(case.fixed, fixed_p)
            save_image(case.moving, moving_p)
            cases[c] = (case, fixed_p, moving_p)
            ini = case.initial_error()
            _log(f"case {c} {args.resolution}: shape {case.fixed.shape}, initial error mean {ini['mean']:.2f} / p95 "
                 f"{ini['p95']:.2f} mm ({time.perf_counter() - t:.1f} s)")
            doc["records"].append({"row": "identity", "case": c, "tool": "-", "device": "", "run": "-",
                                   "ok": True, "wall_s": None, "error": ini, "message": "no registration"})

        if args.warm_cache and (args.cpu_rows or (args.device_rows and cuda_ok)):
            warm_rows = [r for r in ROWS if r in args.cpu_rows or (cuda_ok and r in args.device_rows)]
            _log(f"warming the Numba CPU cache ({', '.join(warm_rows)}) ...")
            header.append(warm_cpu_cache(warm_rows, args, work, numba_cache))
            _log(header[-1])
        for kind, r in jobs:
            if kind == "fireants":
                case, fixed_p, moving_p = cases[FIREANTS_ROWS[r][0]]
                _log(f"  fireants-{r} on {case.kind} ({args.repeat} run(s)) ...")
                recs = run_fireants_row(r, fixed_p, moving_p, work / f"fireants_{r}", args, args.repeat,
                                        *args.fireants_iterations, device=args.fireants_device)
            else:
                case, fixed_p, moving_p = cases[ROWS[r][0]]
                if kind == "cuda" and not cuda_ok:
                    recs = [{"row": r, "tool": "fastimpact", "device": "cuda", "run": "-", "ok": False,
                             "wall_s": None, "message": f"skipped: {cuda_why}"}]
                    _log(f"  fastimpact cuda {r}: skipped ({cuda_why})")
                    doc["records"] += [dict(recs[0], case=case.kind)]
                    continue
                else:
                    repeat = args.repeat if kind == "cuda" else args.cpu_repeat
                    kt = args.kernel_time if kind == "cuda" else "off"
                    extra_run = ", + kernel-time run" if kt != "off" else ""
                    _log(f"  fastimpact {kind} {r} on {case.kind} ({repeat} run(s){extra_run}) ...")
                    recs = run_fastimpact_row(r, kind, fixed_p, moving_p, work / f"fastimpact_{kind}_{r}", args,
                                              repeat, kt, numba_cache)
            for rec in recs:
                rec["case"] = case.kind
                _evaluate(rec, case)
                e = rec.get("error") or {}
                _log(f"    run {rec['run']}: wall {core._fmt(rec.get('wall_s'), 1)} s, "
                     f"error mean {core._fmt(e.get('mean'))} mm"
                     + (f", kernels {_kernel_cell(rec)}" if rec.get("kernel") else "")
                     + ("" if rec.get("ok") else f", {rec.get('message')}"))
            doc["records"] += recs
            save_doc()
    finally:
        if tmp is not None:
            tmp.cleanup()

    info["load_average_end"] = os.getloadavg()
    header.append(f"load average before {tuple(round(x, 2) for x in info['load_average'])}, after "
                  f"{tuple(round(x, 2) for x in info['load_average_end'])}")
    save_doc()
    print()
    print_report(doc)
    bad = [r for r in doc["records"] if not r.get("ok") and not str(r.get("message", "")).startswith("skipped")]
    return 1 if bad or (check is not None and not check["ok"]) else 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--fastimpact-worker":
        _fastimpact_worker(sys.argv[2])
    elif len(sys.argv) == 3 and sys.argv[1] == "--fireants-worker":
        _fireants_worker(sys.argv[2])
    else:
        sys.exit(main())
