"""Many registrations: a CSV of pairs run on Dask distributed (or in this process), resumable.

PAIRS.csv has a header with the columns ``fixed`` and ``moving`` and optionally ``fixed_mask``,
``moving_mask``, ``fixed_labels``, ``moving_labels`` and ``name``; relative paths are relative to the
CSV's folder; empty cells mean "none". Pair ``name`` (default: the moving file's name without its
ending, made unique) is the sub-folder of the output folder that receives the usual outputs of
``fastimpact register`` plus ``batch.json``, written last: a pair whose ``batch.json`` says ``ok``
is done and is skipped on the next run (``force`` reruns it).

Scheduling: one task per pair; a LocalCluster of ``workers`` processes with one thread each (one
registration at a time per process, so the compiled kernels and ONNX sessions loaded by the first
pair are reused by the next) and ``threads`` Numba threads per registration; or the workers of an
existing scheduler (``scheduler`` address). With ``device='cuda'`` on a LocalCluster, worker ``n``
sees GPU ``n mod (number of GPUs)`` only (CUDA_VISIBLE_DEVICES set before CUDA starts); workers of
an external scheduler keep the devices their launcher gave them. A pair that fails (bad file,
registration error, even an internal error) reports its one-line message and the others go on.
"""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

from .errors import ConfigError, ImageIOError

COLUMNS = ("fixed", "moving", "fixed_mask", "moving_mask", "fixed_labels", "moving_labels", "name")
MARKER = "batch.json"


def read_pairs(path) -> list[dict]:
    """The pairs of a CSV file: dicts with absolute paths (or None) and a unique ``name``."""
    p = Path(path)
    if not p.is_file():
        raise ImageIOError(f"pairs file '{p}' does not exist: give a CSV with a header fixed,moving[,...]")
    try:
        rows = list(csv.DictReader(p.read_text().splitlines()))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ImageIOError(f"pairs file '{p}' cannot be read as CSV ({type(exc).__name__})") from None
    header = [h.strip() for h in (rows[0].keys() if rows else [])]
    if not rows:
        raise ConfigError(f"pairs file '{p}' holds no pairs: a header fixed,moving then one row per pair")
    missing = [c for c in ("fixed", "moving") if c not in header]
    unknown = [c for c in header if c not in COLUMNS]
    if missing or unknown:
        raise ConfigError(f"pairs file '{p}': {'missing column(s) ' + ', '.join(missing) if missing else ''}"
                          f"{'; ' if missing and unknown else ''}{'unknown column(s) ' + ', '.join(unknown) if unknown else ''}"
                          f": the columns are {', '.join(COLUMNS)} (fixed and moving required)")
    base = p.parent
    pairs, seen = [], set()
    for n, row in enumerate(rows, start=1):
        row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
        pair = {"row": n}
        for col in COLUMNS[:-1]:
            v = row.get(col, "")
            pair[col] = str((base / v).resolve()) if v else None
        if not pair["fixed"] or not pair["moving"]:
            raise ConfigError(f"pairs file '{p}', row {n}: fixed and moving are required")
        if (pair["fixed_labels"] is None) != (pair["moving_labels"] is None):
            raise ConfigError(f"pairs file '{p}', row {n}: give both fixed_labels and moving_labels or neither")
        name = row.get("name") or _stem(pair["moving"])
        if any(c in name for c in "/\\") or name in (".", ".."):
            raise ConfigError(f"pairs file '{p}', row {n}: name {name!r} must be a plain folder name")
        if name in seen:
            if row.get("name"):
                raise ConfigError(f"pairs file '{p}', row {n}: the name {name!r} is used twice: names must be unique")
            k = 2
            while f"{name}_{k}" in seen:
                k += 1
            name = f"{name}_{k}"
        seen.add(name)
        pair["name"] = name
        pairs.append(pair)
    return pairs


def _stem(path: str) -> str:
    n = Path(path).name
    for end in (".nii.gz", ".nii"):
        if n.lower().endswith(end):
            return n[: -len(end)]
    return Path(n).stem


def done_record(outdir, pair) -> dict | None:
    """The batch.json of a finished pair, or None."""
    f = Path(outdir) / pair["name"] / MARKER
    try:
        rec = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    return rec if rec.get("status") == "ok" else None


def _pin_gpu(n_gpus: int) -> None:
    """On a LocalCluster worker named n: see GPU n mod n_gpus only (before CUDA is initialised)."""
    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):
        return
    try:
        idx = int(name) % n_gpus
    except (TypeError, ValueError):
        return
    os.environ["CUDA_VISIBLE_DEVICES"] = str(idx)


def run_pair(pair: dict, config: dict, outdir, *, qc: bool = False, n_gpus: int = 0) -> dict:
    """Register one pair into ``outdir/name`` and return its summary (never raises).

    Summary: name, status ('ok' or 'error'), time_s, message (errors), warnings, jacobian
    (min, max, folding fractions), evaluation (Dice / HD95 means when labels are given), outputs.
    """
    if n_gpus:
        _pin_gpu(n_gpus)
    t0 = time.perf_counter()
    out = Path(outdir) / pair["name"]
    rec = {"name": pair["name"], "row": pair.get("row"), "fixed": pair["fixed"], "moving": pair["moving"]}
    try:
        import numpy as np

        from .config import RegistrationConfig
        from .engine import register
        from .inputs import as_image
        from .interpolation import warp_image

        cfg = RegistrationConfig.from_dict(config, source="batch settings")
        result = register(pair["fixed"], pair["moving"], fixed_mask=pair.get("fixed_mask"),
                          moving_mask=pair.get("moving_mask"), config=cfg)
        if pair.get("fixed_mask") and getattr(result, "fixed_mask", None) is None:
            result.fixed_mask = as_image(pair["fixed_mask"], "fixed mask", mask=True).data > 0
        if pair.get("fixed_labels"):
            from .evaluation import label_array, label_metrics
            from .image import Image

            fl = as_image(pair["fixed_labels"], "fixed labels", mask=True)
            ml = as_image(pair["moving_labels"], "moving labels", mask=True)
            mlab = Image(np.ascontiguousarray(label_array(ml, "moving labels").astype(np.int32)), ml.affine)
            u = result.transform.displacement_field(fl.shape, fl.affine)
            warped = warp_image(mlab, fl, u, "nearest").data
            lm = label_metrics(label_array(fl, "fixed labels"), warped, fl.affine)
            result.report["evaluation"] = {"labels": lm}
        paths = result.save(out, force=True, fixed_name=pair["fixed"], moving_name=pair["moving"], qc=qc)
        rep = result.report
        jac = rep["quality"]["jacobian"]
        rec.update({
            "status": "ok",
            "warnings": rep.get("warnings", []),
            "jacobian": {"region": jac["region"], "min": jac["all"]["min"], "max": jac["all"]["max"],
                         "folding_fraction": jac["all"]["folding_fraction"],
                         "folding_inside": jac["inside"]["folding_fraction"] if jac.get("inside") else None,
                         "folding_outside": jac["outside"]["folding_fraction"] if jac.get("outside") else None},
            "outputs": paths,
        })
        ev = (rep.get("evaluation") or {}).get("labels")
        if ev:
            rec["evaluation"] = {"dice_mean": ev["dice_mean"], "hd95_mean_mm": ev["hd95_mean_mm"]}
    except MemoryError:
        rec.update({"status": "error", "message": "out of memory: use fewer --samples, fewer --workers or a smaller image"})
    except Exception as exc:  # a broken pair fails alone, whatever the cause
        from .errors import FastImpactError

        text = " ".join(str(exc).split())[:400] or type(exc).__name__
        rec.update({"status": "error",
                    "message": text if isinstance(exc, FastImpactError) else f"internal error {type(exc).__name__}: {text}"})
    rec["time_s"] = round(time.perf_counter() - t0, 3)
    if rec["status"] == "ok":
        tmp = out / f".{MARKER}.tmp"
        tmp.write_text(json.dumps(rec, indent=2, default=str) + "\n")
        os.replace(tmp, out / MARKER)  # written last: the pair is done
    return rec


def default_workers() -> int:
    return max(1, min(4, (os.cpu_count() or 2) // 2))


def run_batch(pairs: list[dict], config: dict, outdir, *, workers: int | None = None, scheduler: str | None = None,
              threads: int | None = None, qc: bool = False, force: bool = False, on_result=None) -> list[dict]:
    """Run every pair not yet done; return one record per pair (in the CSV's order).

    workers: LocalCluster processes (0: no Dask, a plain loop in this process; default: one per
    GPU with device='cuda', else min(4, cores / 2)). scheduler: an
    address such as 'tcp://host:8786' (then ``workers`` is ignored). threads: Numba threads per
    registration (default: the cores divided among the local workers). on_result(record, n_done,
    n_total) is called as each pair finishes (skipped pairs first).
    """
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    records: dict[str, dict] = {}
    todo = []
    for p in pairs:
        rec = None if force else done_record(out, p)
        if rec is not None:
            records[p["name"]] = {**rec, "status": "done", "previous_time_s": rec.get("time_s"), "time_s": 0.0}
        else:
            todo.append(p)
    total = len(pairs)
    n = 0
    for rec in records.values():
        n += 1
        if on_result:
            on_result(rec, n, total)
    local = scheduler is None
    cfg = dict(config)
    n_gpus = _gpu_count() if local and workers != 0 and cfg.get("device") == "cuda" else 0
    if workers is None:
        workers = n_gpus or default_workers()  # on GPUs: one worker per device
    if threads is None and local and cfg.get("threads") is None:
        threads = max(1, (os.cpu_count() or 1) // max(1, workers))
    if threads is not None:
        cfg["threads"] = int(threads)
    if not todo:
        pass
    elif local and workers == 0:
        for p in todo:
            rec = run_pair(p, cfg, str(out), qc=qc)
            records[p["name"]] = rec
            n += 1
            if on_result:
                on_result(rec, n, total)
    else:
        client, cluster = _client(scheduler, workers)
        try:
            futures = {client.submit(run_pair, p, cfg, str(out), qc=qc, n_gpus=n_gpus, pure=False,
                                     key=f"fastimpact-{p['row']}-{p['name']}"): p for p in todo}
            from distributed import as_completed

            for fut in as_completed(futures):
                p = futures[fut]
                try:
                    rec = fut.result()
                except Exception as exc:  # the worker died (killed, out of memory): this pair only
                    rec = {"name": p["name"], "row": p["row"], "fixed": p["fixed"], "moving": p["moving"],
                           "status": "error", "time_s": None,
                           "message": f"the worker running this pair failed ({type(exc).__name__}: "
                                      f"{' '.join(str(exc).split())[:200]})"}
                records[p["name"]] = rec
                n += 1
                if on_result:
                    on_result(rec, n, total)
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
    return [records[p["name"]] for p in pairs]


def _gpu_count() -> int:
    try:
        from numba import cuda

        return len(cuda.gpus) if cuda.is_available() else 0
    except Exception:  # pragma: no cover - no CUDA stack
        return 0


def _client(scheduler, workers):
    try:
        import logging

        from distributed import Client, LocalCluster
    except ImportError:  # pragma: no cover - dask is an extra
        raise ConfigError("batch needs Dask distributed: pip install 'dask[distributed]' (or use --workers 0)") from None
    if scheduler is not None:
        try:
            return Client(scheduler, timeout="20s"), None
        except (OSError, TimeoutError) as exc:
            raise ConfigError(f"cannot reach the Dask scheduler at {scheduler!r} ({type(exc).__name__}): start it "
                              "(dask scheduler) or drop --scheduler for a local cluster") from None
    cluster = LocalCluster(n_workers=int(workers), threads_per_worker=1, processes=True, dashboard_address=None,
                           silence_logs=logging.ERROR)
    return Client(cluster), cluster


SUMMARY_FIELDS = ("name", "status", "time_s", "jacobian_min", "folding_inside", "folding_outside", "dice_mean",
                  "hd95_mean_mm", "warnings", "message")


def summary_rows(records: list[dict]) -> list[dict]:
    rows = []
    for r in records:
        jac = r.get("jacobian") or {}
        ev = r.get("evaluation") or {}
        rows.append({"name": r["name"], "status": r["status"], "time_s": r.get("time_s"),
                     "jacobian_min": jac.get("min"),
                     "folding_inside": jac.get("folding_inside") if jac.get("folding_inside") is not None else jac.get("folding_fraction"),
                     "folding_outside": jac.get("folding_outside"),
                     "dice_mean": ev.get("dice_mean"), "hd95_mean_mm": ev.get("hd95_mean_mm"),
                     "warnings": len(r.get("warnings") or []), "message": r.get("message", "")})
    return rows


def write_summary(outdir, records: list[dict], wall_s: float) -> dict:
    """summary.json (every record) and summary.csv (one row per pair) in ``outdir``."""
    out = Path(outdir)
    rows = summary_rows(records)
    doc = {"n_pairs": len(records), "ok": sum(r["status"] == "ok" for r in records),
           "done_before": sum(r["status"] == "done" for r in records),
           "failed": sum(r["status"] == "error" for r in records), "wall_time_s": round(wall_s, 3), "pairs": records}
    tmp = out / ".summary.json.tmp"
    tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    os.replace(tmp, out / "summary.json")
    tmp = out / ".summary.csv.tmp"
    with tmp.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=SUMMARY_FIELDS)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, out / "summary.csv")
    return doc
