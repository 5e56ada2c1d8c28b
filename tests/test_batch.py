"""`fastimpact batch`: the pairs CSV, a broken pair failing alone, resuming, and the Dask path."""

import json
import os

import nibabel as nib
import numpy as np
import pytest

from conftest import blob_volume
from fastimpact.batch import read_pairs, run_batch
from fastimpact.cli.main import main

FAST = ["--levels", "1", "--iterations", "20", "--samples", "500", "--affine-iterations", "5", "--grid-spacing", "16"]
FAST_CFG = {"levels": 1, "iterations": 20, "samples": 500, "affine_iterations": 5, "grid_spacing": 16.0}


@pytest.fixture
def cohort(tmp_path):
    """Two good pairs (with labels) and one whose moving file is missing; paths relative to the CSV."""
    d = tmp_path / "data"
    d.mkdir()
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    rows = ["fixed,moving,fixed_labels,moving_labels,name"]
    for i in range(2):
        f, m = blob_volume(seed=i), blob_volume(shift=(1.0, -1.0, 0.5), seed=i)
        for name, data in ((f"f{i}", f), (f"m{i}", m), (f"fl{i}", (f > 50).astype(np.uint8)), (f"ml{i}", (m > 50).astype(np.uint8))):
            nib.save(nib.Nifti1Image(data, aff), str(d / f"{name}.nii.gz"))
        rows.append(f"f{i}.nii.gz,m{i}.nii.gz,fl{i}.nii.gz,ml{i}.nii.gz,")
    rows.append("f0.nii.gz,missing.nii.gz,,,broken")
    (d / "pairs.csv").write_text("\n".join(rows) + "\n")
    return d / "pairs.csv"


def test_read_pairs_resolves_paths_and_names(tmp_path):
    csv = tmp_path / "p.csv"
    csv.write_text("moving,fixed,fixed_mask\nsub/a.nii.gz,f.nii.gz,\nother/a.nii.gz,f.nii.gz,mask.nii\n")
    pairs = read_pairs(csv)
    assert [p["name"] for p in pairs] == ["a", "a_2"]
    assert pairs[0]["moving"] == str((tmp_path / "sub" / "a.nii.gz").resolve()) and pairs[0]["fixed_mask"] is None
    assert pairs[1]["fixed_mask"] == str((tmp_path / "mask.nii").resolve())
    for text, msg in (("fixed\nf.nii\n", "missing column(s) moving"), ("fixed,moving,colour\na,b,c\n", "unknown column(s) colour"),
                      ("fixed,moving,fixed_labels\na,b,c\n", "both fixed_labels and moving_labels"),
                      ("fixed,moving,name\na,b,x\nc,d,x\n", "used twice"), ("fixed,moving\n", "no pairs")):
        csv.write_text(text)
        with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            read_pairs(csv)


def test_batch_writes_every_pair_reports_the_broken_one_and_resumes(cohort, tmp_path, capsys):
    out = tmp_path / "out"
    code = main([str(a) for a in ["batch", cohort, "-o", out, "--workers", "0", "--json", *FAST]])
    stdout, err = capsys.readouterr()
    assert code == 1  # one pair failed
    doc = json.loads(stdout)
    st = {p["name"]: p for p in doc["pairs"]}
    assert doc["ok"] == 2 and doc["failed"] == 1
    assert st["broken"]["status"] == "error" and "missing.nii.gz" in st["broken"]["message"]
    for name in ("m0", "m1"):
        assert st[name]["status"] == "ok" and (out / name / "warped.nii.gz").is_file()
        rep = json.loads((out / name / "report.json").read_text())
        assert st[name]["jacobian"]["min"] == rep["quality"]["jacobian"]["all"]["min"]
        assert 0 < st[name]["evaluation"]["dice_mean"] <= 1
        assert rep["evaluation"]["labels"]["dice_mean"] == st[name]["evaluation"]["dice_mean"]
    assert not (out / "broken" / "report.json").exists()
    lines = (out / "summary.csv").read_text().splitlines()
    assert lines[0].startswith("name,status") and len(lines) == 4
    # a rerun skips what is done (nothing rewritten) and retries the broken pair
    stamp = (out / "m0" / "report.json").stat().st_mtime_ns
    code = main([str(a) for a in ["batch", cohort, "-o", out, "--workers", "0", *FAST]])
    stdout, err = capsys.readouterr()
    assert code == 1 and (out / "m0" / "report.json").stat().st_mtime_ns == stamp
    table = {ln.split()[0]: ln.split()[1] for ln in stdout.splitlines()[1:]}
    assert table == {"m0": "done", "m1": "done", "broken": "error"}
    assert "0 registered, 2 done before, 1 failed" in err


def test_batch_on_a_dask_scheduler_gives_the_same_results(cohort, tmp_path):
    from distributed import LocalCluster

    pairs = read_pairs(cohort)
    seen = []
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        recs = run_batch(pairs, FAST_CFG, tmp_path / "dask", scheduler=cluster.scheduler_address, threads=1,
                         on_result=lambda r, n, t: seen.append((r["name"], n, t)))
    loop = run_batch(pairs[:1], FAST_CFG, tmp_path / "loop", workers=0, threads=1)
    assert [r["status"] for r in recs] == ["ok", "ok", "error"]  # in the CSV's order
    assert sorted(s[0] for s in seen) == ["broken", "m0", "m1"] and [s[1:] for s in seen] == [(1, 3), (2, 3), (3, 3)]
    a = json.loads((tmp_path / "dask" / "m0" / "report.json").read_text())["quality"]["jacobian"]["all"]
    b = json.loads((tmp_path / "loop" / "m0" / "report.json").read_text())["quality"]["jacobian"]["all"]
    assert a["min"] == pytest.approx(b["min"], rel=1e-6) and loop[0]["status"] == "ok"


def test_local_gpu_workers_see_one_device_each(monkeypatch):
    import distributed

    from fastimpact.batch import _pin_gpu

    for name, n_gpus, expected in ((0, 2, "0"), (3, 2, "1"), (5, 4, "1")):
        monkeypatch.setattr(distributed, "get_worker", lambda name=name: type("W", (), {"name": name})())
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
        _pin_gpu(n_gpus)
        assert os.environ["CUDA_VISIBLE_DEVICES"] == expected
