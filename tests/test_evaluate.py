"""Evaluation figures (Dice, HD95, TRE, Jacobian, folding, Learn2Reg export), the warnings every
registration carries, and `fastimpact evaluate`; each against an independent computation."""

import json

import nibabel as nib
import numpy as np
import pytest

from fastimpact.cli.main import main
from fastimpact.evaluation import (
    assess_registration,
    dice_per_label,
    hd95_per_label,
    jacobian_determinant,
    jacobian_stats,
    learn2reg_displacement,
    read_points,
    stage_warnings,
    target_registration_error,
)
from fastimpact.image import Image, make_affine
from fastimpact.transforms import AffineTransform, BSplineGrid, CompositeTransform


def rotation(ax, ay, az):
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def world_grid(shape, affine):
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(np.float64)
    return idx @ affine[:3, :3].T + affine[:3, 3]


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------------------------
# Dice and HD95
# ---------------------------------------------------------------------------------------------
def test_dice_against_a_hand_count():
    a = np.zeros((4, 4, 2), np.int16)
    b = np.zeros((4, 4, 2), np.int16)
    a[0:2, 0:2, 0] = 1  # 4 voxels
    b[1:3, 0:2, 0] = 1  # 4 voxels, 2 shared -> 2*2/8
    a[3, 3, 1] = 2      # label 2 only in a -> 0
    b[0, 3, 1] = 5      # label 5 only in b -> 0
    a[2:4, 2:4, 0] = 3  # 4 voxels
    b[2:4, 2:4, 0] = 3
    b[2, 2, 1] = 3      # 5 voxels, 4 shared -> 8/9
    d = dice_per_label(a, b)
    assert d == {1: 0.5, 2: 0.0, 3: pytest.approx(8 / 9), 5: 0.0}
    assert np.isnan(dice_per_label(a, b, labels=[7])[7])
    with pytest.raises(ValueError, match="non-integer"):
        dice_per_label(a + 0.5, b)


def brute_surface(m):
    """Voxels of m with a 6-neighbour outside m (outside the grid counts as outside), by loops."""
    out = np.zeros_like(m)
    for i, j, k in np.argwhere(m):
        for d in ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)):
            n = (i + d[0], j + d[1], k + d[2])
            if not all(0 <= n[t] < m.shape[t] for t in range(3)) or not m[n]:
                out[i, j, k] = True
                break
    return out


def brute_hd95(a, b, affine):
    pa = world_grid(a.shape, affine)[brute_surface(a)]
    pb = world_grid(b.shape, affine)[brute_surface(b)]
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    return max(np.percentile(d.min(axis=1), 95), np.percentile(d.min(axis=0), 95))


@pytest.mark.parametrize("kind", ["anisotropic", "oblique", "sheared"])
def test_hd95_against_brute_force_pairwise_distances(kind):
    rng = np.random.default_rng(1)
    shape = (13, 11, 9)
    affine = make_affine((0.7, 1.3, 2.1), (5.0, -3.0, 2.0), rotation(0.3, -0.2, 0.5) if kind != "anisotropic" else None)
    if kind == "sheared":
        affine[:3, 1] += 0.4 * affine[:3, 0]
    g = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    a = np.zeros(shape, np.int32)
    b = np.zeros(shape, np.int32)
    for lab, (ca, cb, r) in enumerate([((6, 5, 4), (7, 5, 3), 3.5), ((2, 2, 2), (3, 3, 2), 2.2)], start=1):
        a[((g - ca) ** 2).sum(-1) <= r * r] = lab
        b[((g - cb) ** 2 * np.array([1.0, 1.4, 0.8])).sum(-1) <= r * r] = lab
    a[rng.random(shape) < 0.02] = 3  # speckle label: scattered surfaces
    b[rng.random(shape) < 0.02] = 3
    b[0, 0, 0] = 1  # a far-away island of label 1 (also at the grid corner)
    hd = hd95_per_label(a, b, affine)
    for lab in (1, 2, 3):
        assert hd[lab] == pytest.approx(brute_hd95(a == lab, b == lab, affine), rel=1e-9, abs=1e-9), lab
    assert hd95_per_label(a, np.zeros_like(b), affine, labels=[1])[1] is None


# ---------------------------------------------------------------------------------------------
# Jacobian determinant and folding
# ---------------------------------------------------------------------------------------------
def oblique_grid():
    affine = make_affine((1.5, 0.8, 2.5), (-20.0, 10.0, 3.0), rotation(0.4, 0.25, -0.6))
    affine[:3, 2] += 0.3 * affine[:3, 0]  # and sheared
    return (14, 12, 10), affine


def test_jacobian_of_an_affine_field_is_det_of_i_plus_a_on_an_oblique_anisotropic_grid():
    shape, affine = oblique_grid()
    x = world_grid(shape, affine)
    A = np.array([[0.10, -0.05, 0.20], [0.03, -0.15, 0.07], [-0.12, 0.04, 0.25]])
    u = x @ A.T + np.array([3.0, -2.0, 1.0])
    det = jacobian_determinant(u.astype(np.float32), affine)
    assert np.allclose(det, np.linalg.det(np.eye(3) + A), atol=1e-5)
    # slabs of any size give the same map
    from fastimpact.evaluation import jacobian_determinant_numpy

    assert np.allclose(jacobian_determinant_numpy(u, affine, chunk=3), np.linalg.det(np.eye(3) + A), atol=1e-9)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_jacobian_kernel_matches_the_numpy_reference(dtype):
    from fastimpact.evaluation import jacobian_determinant_numpy

    shape, affine = (9, 7, 5), oblique_grid()[1]
    u = np.random.default_rng(0).normal(0, 2, shape + (3,)).astype(dtype)
    assert np.allclose(jacobian_determinant(u, affine), jacobian_determinant_numpy(u, affine, chunk=4), atol=1e-10)
    # a non-contiguous view computes the same
    big = np.zeros((12, 7, 5, 3), dtype)
    big[::2][:6] = u[:6]
    assert np.allclose(jacobian_determinant(big[::2][:6], affine), jacobian_determinant_numpy(u[:6], affine), atol=1e-10)


def test_jacobian_of_a_quadratic_field_matches_the_analytic_derivative():
    shape, affine = oblique_grid()
    x = world_grid(shape, affine)
    c = np.array([0.01, -0.02, 0.015])
    u = np.zeros(shape + (3,))
    u[..., 0] = c[0] * x[..., 0] ** 2          # du_x/dx = 2 c0 x
    u[..., 1] = c[1] * x[..., 1] * x[..., 2]    # du_y/dy = c1 z, du_y/dz = c1 y
    u[..., 2] = c[2] * x[..., 2] ** 2          # du_z/dz = 2 c2 z
    jac = np.zeros(shape + (3, 3))
    jac[..., 0, 0] = 1 + 2 * c[0] * x[..., 0]
    jac[..., 1, 1] = 1 + c[1] * x[..., 2]
    jac[..., 1, 2] = c[1] * x[..., 1]
    jac[..., 2, 2] = 1 + 2 * c[2] * x[..., 2]
    truth = np.linalg.det(jac)
    det = jacobian_determinant(u, affine)
    inner = (slice(1, -1),) * 3  # central differences are exact for quadratics; the border is one-sided
    assert np.allclose(det[inner], truth[inner], atol=1e-9)


def test_folding_detected_where_the_analytic_determinant_is_negative():
    shape = (40, 30, 20)
    affine = make_affine((1.0, 1.2, 1.5), (0, 0, 0))
    x = world_grid(shape, affine)
    cx, s, k = 20.0, 4.0, 3.0
    r2 = ((x - np.array([cx, 18.0, 15.0])) ** 2).sum(-1)
    gauss = np.exp(-r2 / (2 * s * s))
    u = np.zeros(shape + (3,))
    u[..., 0] = -k * (x[..., 0] - cx) * gauss  # only u_x: det = 1 + du_x/dx
    truth = 1 - k * gauss * (1 - (x[..., 0] - cx) ** 2 / (s * s))
    det = jacobian_determinant(u, affine)
    folded = truth <= 0
    assert folded.sum() > 20
    clear = np.abs(truth) > 0.2  # away from the zero crossing the finite differences agree in sign
    assert np.array_equal((det <= 0)[clear], folded[clear])
    mask = x[..., 0] < cx  # half of the fold inside the mask
    st = jacobian_stats(det, mask)
    assert st["inside"]["folded_voxels"] == np.count_nonzero((det <= 0) & mask)
    assert st["outside"]["folding_fraction"] == pytest.approx(np.count_nonzero((det <= 0) & ~mask) / np.count_nonzero(~mask))
    assert st["all"]["min"] == pytest.approx(det.min()) and st["inside"]["min"] < 0
    q, warnings, _ = assess_registration(u, affine, fixed_mask=mask)
    assert any("folding" in w and "inside the fixed mask" in w for w in warnings)
    q, warnings, _ = assess_registration(np.zeros_like(u), affine, fixed_mask=mask)
    assert warnings == [] and q["jacobian"]["inside"]["folding_fraction"] == 0


# ---------------------------------------------------------------------------------------------
# TRE and landmark files
# ---------------------------------------------------------------------------------------------
def test_tre_of_known_points_and_landmark_conventions(tmp_path):
    rng = np.random.default_rng(3)
    tf = CompositeTransform(AffineTransform(rotation(0.1, 0.0, -0.2) * 1.05, [3.0, -1.0, 2.0], [10.0, 0.0, 5.0]))
    fixed = rng.uniform(-50, 50, (7, 3))
    err = rng.normal(0, 2, (7, 3))
    moving = tf.map_world(fixed) + err
    res = target_registration_error(fixed, moving, tf.map_world)
    assert np.allclose(res["per_point_mm"], np.linalg.norm(err, axis=1))
    assert res["mean"] == pytest.approx(np.linalg.norm(err, axis=1).mean())
    assert res["before"]["max"] == pytest.approx(np.linalg.norm(fixed - moving, axis=1).max())

    lps = fixed * [-1, -1, 1]
    (tmp_path / "plain.csv").write_text("\n".join(",".join(f"{v:.12g}" for v in p) for p in fixed) + "\n")
    (tmp_path / "header.csv").write_text("name,x,y,z\n" + "".join(f"p{i},{p[0]:.12g},{p[1]:.12g},{p[2]:.12g}\n" for i, p in enumerate(fixed)))
    (tmp_path / "lps.csv").write_text("# CoordinateSystem = LPS\nx,y,z\n" + "".join(f"{p[0]:.12g},{p[1]:.12g},{p[2]:.12g}\n" for p in lps))
    (tmp_path / "undeclared.txt").write_text("".join(f"{p[0]:.12g} {p[1]:.12g} {p[2]:.12g}\n" for p in lps))
    (tmp_path / "slicer.fcsv").write_text("# Markups fiducial file version = 4.11\n# CoordinateSystem = LPS\n"
                                          "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"
                                          + "".join(f"vtkMRMLMarkupsFiducialNode_{i},{p[0]:.12g},{p[1]:.12g},{p[2]:.12g},0,0,0,1,1,1,0,F-{i},,\n"
                                                    for i, p in enumerate(lps)))
    for name, opt in (("plain.csv", None), ("header.csv", None), ("lps.csv", None), ("lps.csv", True),
                      ("undeclared.txt", True), ("slicer.fcsv", None)):
        pts, conv = read_points(tmp_path / name, lps=opt)
        assert np.allclose(pts, fixed, atol=1e-9), name
    assert read_points(tmp_path / "lps.csv")[1] == "LPS"
    with pytest.raises(ValueError, match="declares LPS"):
        read_points(tmp_path / "lps.csv", lps=False)
    (tmp_path / "bad.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match="not 3 numbers"):
        read_points(tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="paired"):
        target_registration_error(fixed, moving[:3], tf.map_world)


# ---------------------------------------------------------------------------------------------
# Learn2Reg export
# ---------------------------------------------------------------------------------------------
def test_learn2reg_voxel_displacement_samples_the_moving_image_like_the_challenge():
    from scipy import ndimage

    f_aff = make_affine((2.0, 1.5, 1.0), (-10.0, 5.0, 0.0), rotation(0.2, 0.0, 0.1))
    m_aff = make_affine((1.0, 1.0, 1.5), (-30.0, -20.0, -10.0), rotation(-0.1, 0.3, 0.0))
    shape, mshape = (10, 12, 9), (40, 44, 36)
    x = world_grid(shape, f_aff)
    u = np.stack([np.sin(x[..., 1] / 7.0), 0.5 * np.cos(x[..., 0] / 5.0), 0.2 * x[..., 2] / 10.0], -1)
    coeff, off = np.array([0.3, -0.7, 1.1]), 4.0
    moving = world_grid(mshape, m_aff) @ coeff + off  # linear in world: trilinear sampling is exact
    d = learn2reg_displacement(u, f_aff, m_aff)
    assert d.shape == shape + (3,) and d.dtype == np.float32
    ident = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), 0).astype(np.float64)
    sampled = ndimage.map_coordinates(moving, ident + np.moveaxis(d, -1, 0), order=1)
    assert np.allclose(sampled, (x + u) @ coeff + off, atol=2e-3)
    # one shared grid: the field in voxels is F_lin^-1 u
    same = learn2reg_displacement(u, f_aff, f_aff)
    assert np.allclose(same, u @ np.linalg.inv(f_aff[:3, :3]).T, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# warnings of a registration
# ---------------------------------------------------------------------------------------------
def stage(metric_start, metric_end, mean10, clipped=0, iterations=100, name="bspline", level=1):
    return {"stage": name, "level": level, "iterations": iterations, "metric_start": metric_start,
            "metric_end": metric_end, "metric_end_mean10": mean10, "clipped_steps": clipped, "time_s": 0.1}


def test_stage_warnings_metric_rise_and_clipped_steps():
    assert stage_warnings([stage(1.0, 0.5, 0.52, clipped=5)]) == []
    w = stage_warnings([stage(1191.4, 1322.1, 1354.1, name="affine")])  # the mse demo on the T2 case
    assert len(w) == 1 and "affine level 1: the metric rose" in w[0] and "--metric mi or impact" in w[0]
    # MI-like negative values: a rise of the noisy mean but not of the last value is not flagged
    assert stage_warnings([stage(-0.9397, -0.9375, -0.9204)]) == []
    assert "rose" in stage_warnings([stage(-0.9, -0.7, -0.75)])[0]
    w = stage_warnings([stage(1.0, 0.4, 0.4, clipped=60, iterations=100)])
    assert len(w) == 1 and "60 of 100 steps were clipped" in w[0]


def folding_transform(shape, affine, amplitude=25.0):
    grid = BSplineGrid.for_image(shape, affine, 8.0)
    coef = np.zeros(tuple(grid.shape) + (3,))
    g = tuple(n // 2 for n in grid.shape)
    coef[g[0], g[1], g[2], 0] = amplitude  # neighbouring control points pushed past each other
    coef[g[0] + 1, g[1], g[2], 0] = -amplitude
    return CompositeTransform(AffineTransform(), grid, coef)


def make_result(shape=(24, 22, 20), fold=True, stages=None, mask=None):
    from fastimpact.config import RegistrationConfig
    from fastimpact.result import Result

    affine = make_affine((2.0, 2.0, 2.0), (-20.0, -20.0, -20.0))
    rng = np.random.default_rng(0)
    fixed = Image(rng.random(shape).astype(np.float32) + 1, affine)
    tf = folding_transform(shape, affine) if fold else CompositeTransform(AffineTransform())
    report = {"stages": stages or [stage(1.0, 0.5, 0.5)], "timings_s": {}}
    return Result(tf, fixed, fixed, RegistrationConfig(levels=1), report, fixed_mask=mask)


def test_result_report_holds_jacobian_figures_and_warnings(tmp_path):
    mask = np.zeros((24, 22, 20), bool)
    mask[4:20, 4:18, 4:16] = True
    res = make_result(mask=mask, stages=[stage(1.0, 1.5, 1.4, name="affine")])
    res.save(tmp_path / "out")
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    jac = rep["quality"]["jacobian"]
    det = jacobian_determinant(res.transform.displacement_field(res.fixed.shape, res.fixed.affine), res.fixed.affine)
    assert jac["region"] == "fixed mask" and jac["inside"]["folded_voxels"] == np.count_nonzero((det <= 0) & mask) > 0
    assert jac["all"]["min"] == pytest.approx(det.min(), rel=1e-6)
    assert any("metric rose" in w for w in rep["warnings"]) and any("folding" in w for w in rep["warnings"])
    clean = make_result(fold=False)
    assert clean.warnings == [] and clean.report["quality"]["jacobian"]["all"]["folding_fraction"] == 0


def test_register_json_and_stderr_carry_the_warnings(tmp_path, capsys, monkeypatch, write_nifti):
    import fastimpact.engine as reg

    f = write_nifti("f.nii.gz", np.random.default_rng(0).random((24, 22, 20)).astype(np.float32))
    bad = make_result(stages=[stage(2295.9, 2500.0, 2490.0, name="affine", level=3)])
    monkeypatch.setattr(reg, "register", lambda *a, **k: bad)
    code, out, err = run(["register", f, f, "-o", tmp_path / "o1", "--json"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    assert any("affine level 3: the metric rose" in w for w in doc["warnings"])
    assert any(w.startswith("folding") for w in doc["warnings"]) and doc["jacobian"]["all"]["min"] < 0
    bad.report.pop("quality")
    code, out, err = run(["register", f, f, "-o", tmp_path / "o2"], capsys)
    assert code == 0 and err.count("warning: ") == len(doc["warnings"]) and "metric rose" in err


# ---------------------------------------------------------------------------------------------
# `fastimpact evaluate`
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def registered(tmp_path):
    """A saved registration whose transform is a known translation, fixed and moving label maps on
    different grids (the moving one flipped along x, another origin), and paired landmarks."""
    from fastimpact.config import RegistrationConfig
    from fastimpact.result import Result

    shape = (20, 18, 16)
    f_aff = make_affine((2.0, 1.5, 2.5), (-20.0, -12.0, -18.0))
    m_aff = make_affine((2.0, 1.5, 2.5), (30.0, -15.0, -23.0), np.diag([-1.0, 1.0, 1.0]))
    shift = np.array([4.0, -3.0, -5.0])  # T(x) = x + shift: fixed voxel centres land on moving ones
    tf = CompositeTransform(AffineTransform(translation=shift))
    fl = np.zeros(shape, np.int16)
    fl[3:9, 4:12, 2:7] = 1
    fl[10:17, 2:8, 8:14] = 2
    fl[12:15, 12:16, 3:6] = 3
    # the moving labels that T maps exactly onto fl, then a part of label 2 removed
    mshape = (26, 24, 20)
    ml = np.zeros(mshape, np.int16)
    mq = (world_grid(shape, f_aff) + shift) @ np.linalg.inv(m_aff[:3, :3]).T + np.linalg.inv(m_aff)[:3, 3]
    mq = np.rint(mq).astype(int)
    ml[mq[..., 0], mq[..., 1], mq[..., 2]] = fl
    expected = fl.copy()
    ml[ml == 2] = 0
    keep = fl == 2
    keep[10:13] = False
    expected[(fl == 2) & ~keep] = 0
    ml[mq[..., 0][keep], mq[..., 1][keep], mq[..., 2][keep]] = 2
    fixed_img = Image(np.random.default_rng(0).random(shape).astype(np.float32), f_aff)
    moving_img = Image(np.zeros(mshape, np.float32) + 1, m_aff)
    res = Result(tf, fixed_img, moving_img, RegistrationConfig(levels=1),
                 {"stages": [stage(1191.4, 1322.1, 1354.1, name="affine")], "timings_s": {}})
    res.save(tmp_path / "reg")
    paths = {}
    for name, data, aff in (("fl", fl, f_aff), ("ml", ml, m_aff)):
        paths[name] = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(data, aff), str(paths[name]))
    pts = np.array([[0.0, 0.0, 0.0], [10.0, -5.0, 3.0], [-8.0, 7.0, 2.0]])
    err = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, -3.0]])
    paths["fp"] = tmp_path / "fp.csv"
    paths["mp"] = tmp_path / "mp.csv"
    paths["fp"].write_text("x,y,z\n" + "".join(",".join(map(str, p)) + "\n" for p in pts))
    # the moving file in LPS, declared in a comment
    paths["mp"].write_text("# CoordinateSystem = LPS\nx,y,z\n" + "".join(",".join(map(str, p)) + "\n" for p in (pts + shift + err) * [-1, -1, 1]))
    return tmp_path / "reg", paths, expected, f_aff, shift


def test_evaluate_matches_independent_dice_hd95_tre(registered, capsys, tmp_path):
    out, p, expected, f_aff, shift = registered
    fl = nib.load(str(p["fl"])).get_fdata().astype(int)
    code, stdout, err = run(["evaluate", out, "--fixed-labels", p["fl"], "--moving-labels", p["ml"],
                             "--fixed-points", p["fp"], "--moving-points", p["mp"], "--json"], capsys)
    assert code == 0, err
    doc = json.loads(stdout)
    rows = {r["label"]: r for r in doc["labels"]["labels"]}
    for lab in (1, 2, 3):
        a, b = fl == lab, expected == lab
        assert rows[lab]["dice"] == pytest.approx(2 * np.count_nonzero(a & b) / (a.sum() + b.sum()))
        assert rows[lab]["hd95_mm"] == pytest.approx(brute_hd95(a, b, f_aff), abs=1e-9)
    assert rows[1]["dice"] == 1.0 and rows[2]["dice"] < 1.0
    assert doc["tre"]["per_point_mm"] == pytest.approx([1.0, 2.0, 3.0])
    assert doc["tre"]["conventions"] == {"fixed": "RAS", "moving": "LPS"}
    assert doc["jacobian"]["all"]["min"] == pytest.approx(1.0) and doc["jacobian"]["region"] == "labelled region"
    assert any("metric rose" in w for w in doc["warnings"])  # from report.json next to transform.json
    # the table, with the warnings on stderr
    code, stdout, err = run(["evaluate", out / "transform.json", "--fixed-labels", p["fl"], "--moving-labels", p["ml"],
                             "--labels", "1,3"], capsys)
    assert code == 0 and "label" in stdout.splitlines()[0] and "mean" in stdout and "warning: affine level 1" in err
    assert len([ln for ln in stdout.splitlines() if ln.split()[0] in ("1", "3")]) == 2


def test_evaluate_a_folding_displacement_field_file_and_exports(tmp_path, capsys):
    res = make_result()
    res.save(tmp_path / "fold")
    field = tmp_path / "fold" / "displacement.nii.gz"
    code, stdout, err = run(["evaluate", field, "--json", "--learn2reg", tmp_path / "l2r.nii.gz"], capsys)
    assert code != 0 and "moving grid" in err and err.count("\n") == 1  # no moving grid known
    ml = tmp_path / "ml.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((24, 22, 20), np.uint8), res.fixed.affine), str(ml))
    code, stdout, err = run(["evaluate", field, "--json", "--learn2reg", tmp_path / "l2r.nii.gz",
                             "--fixed-labels", ml, "--moving-labels", ml, "--qc", tmp_path / "qc"], capsys)
    assert code == 0, err
    doc = json.loads(stdout)
    det = jacobian_determinant(res.displacement, res.fixed.affine)
    assert doc["jacobian"]["all"]["folded_voxels"] == np.count_nonzero(det <= 0) > 0
    assert any(w.startswith("folding") for w in doc["warnings"])
    l2r = nib.load(str(tmp_path / "l2r.nii.gz"))
    assert l2r.shape == (24, 22, 20, 3)
    assert np.allclose(l2r.get_fdata(), res.displacement / 2.0, atol=1e-4)  # 2 mm voxels, one grid
    assert {f.name for f in (tmp_path / "qc").iterdir()} >= {"jacobian.png", "report.html", "evaluation.json"}
    # outputs are not overwritten without --force
    code, _, err = run(["evaluate", field, "--learn2reg", tmp_path / "l2r.nii.gz", "--fixed-labels", ml,
                        "--moving-labels", ml], capsys)
    assert code != 0 and "--force" in err


def test_evaluate_bad_input_one_line_errors(registered, capsys, tmp_path, write_nifti):
    out, p, *_ = registered
    cases = [
        (["evaluate", out, "--fixed-labels", p["fl"]], "go together"),
        (["evaluate", out, "--fixed-points", p["fp"]], "go together"),
        (["evaluate", tmp_path], "no transform.json"),
        (["evaluate", out, "--labels", "a,b"], "--labels"),
        (["evaluate", out, "--fixed-labels", write_nifti("float.nii.gz", np.full((4, 4, 4), 0.5, np.float32)),
          "--moving-labels", p["ml"]], "non-integer"),
    ]
    for argv, msg in cases:
        code, stdout, err = run(argv, capsys)
        assert code == 2 and msg in err and err.count("\n") == 1, (argv, err)


def test_evaluate_a_real_registration_against_scipy_and_the_synthetic_jacobian(tmp_path, capsys, write_nifti):
    """A real (short) registration, then evaluate: labels warped independently with
    scipy.ndimage.map_coordinates through transform.json, Dice and HD95 by brute force, the field's
    Jacobian by fastimpact.synthetic.jacobian_determinant on displacement.nii.gz, TRE by hand."""
    from scipy import ndimage

    from conftest import blob_volume
    from fastimpact.apply import load_transform
    from fastimpact.io import load_displacement_itk
    from fastimpact.synthetic import jacobian_determinant as synthetic_jacobian

    f_aff = np.diag([2.0, 2.0, 2.0, 1.0])
    m_aff = make_affine((2.2, 1.8, 2.0), (-3.0, 2.0, 1.0), rotation(0.05, 0.0, -0.04))  # another grid
    fixed = blob_volume()
    mgrid = world_grid((26, 32, 26), m_aff)
    # the moving image: the fixed one seen through a shift, sampled on the moving grid
    q = (mgrid - np.array([1.5, -1.0, 0.8])) @ np.linalg.inv(f_aff[:3, :3]).T
    moving = ndimage.map_coordinates(fixed, np.moveaxis(q, -1, 0), order=1, mode="nearest").astype(np.float32)
    f = write_nifti("f.nii.gz", fixed, f_aff)
    m = write_nifti("m.nii.gz", moving, m_aff)
    fl = write_nifti("fl.nii.gz", ((fixed > 40).astype(np.uint8) + (fixed > 90)), f_aff)
    ml = write_nifti("ml.nii.gz", ((moving > 40).astype(np.uint8) + (moving > 90)), m_aff)
    pts = np.array([[20.0, 25.0, 20.0], [30.0, 30.0, 28.0], [15.0, 35.0, 22.0]])
    mpts = pts + np.array([1.5, -1.0, 0.8])
    (tmp_path / "fp.csv").write_text("x,y,z\n" + "".join(",".join(map(str, p)) + "\n" for p in pts))
    (tmp_path / "mp.csv").write_text("x,y,z\n" + "".join(",".join(map(str, p)) + "\n" for p in mpts))
    out = tmp_path / "reg"
    fast = ["--levels", "1", "--iterations", "30", "--samples", "800", "--affine-iterations", "30", "--grid-spacing", "16"]
    assert main([str(a) for a in ["register", f, m, "-o", out, "--json", *fast]]) == 0
    capsys.readouterr()
    code, stdout, err = run(["evaluate", out, "--fixed-labels", fl, "--moving-labels", ml, "--fixed-points",
                             tmp_path / "fp.csv", "--moving-points", tmp_path / "mp.csv", "--json"], capsys)
    assert code == 0, err
    doc = json.loads(stdout)
    tf, ref = load_transform(out / "transform.json")
    y = tf.map_world(world_grid(ref.shape, f_aff).reshape(-1, 3)).reshape(ref.shape + (3,))
    qm = (y - m_aff[:3, 3]) @ np.linalg.inv(m_aff[:3, :3]).T
    mlab = nib.load(str(ml)).get_fdata()
    warped = ndimage.map_coordinates(mlab, np.moveaxis(qm, -1, 0), order=0, mode="constant", cval=0).astype(int)
    flab = nib.load(str(fl)).get_fdata().astype(int)
    rows = {r["label"]: r for r in doc["labels"]["labels"]}
    for lab in (1, 2):
        a, b = flab == lab, warped == lab
        assert rows[lab]["dice"] == pytest.approx(2 * np.count_nonzero(a & b) / (a.sum() + b.sum()), abs=1e-12)
        assert rows[lab]["hd95_mm"] == pytest.approx(brute_hd95(a, b, f_aff), abs=1e-9)
    u, grid = load_displacement_itk(out / "displacement.nii.gz")
    det = synthetic_jacobian(u, grid.affine)
    assert doc["jacobian"]["all"]["min"] == pytest.approx(det.min(), abs=1e-4)
    assert doc["jacobian"]["all"]["folded_voxels"] == np.count_nonzero(det <= 0)
    assert doc["tre"]["per_point_mm"] == pytest.approx(np.linalg.norm(tf.map_world(pts) - mpts, axis=1), abs=1e-6)
