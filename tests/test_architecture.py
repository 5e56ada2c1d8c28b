"""The source tree is the import tree: no import circle inside the package, no private name imported
from another module, one term interface, no stage-name branches outside the parameterisations."""

import ast
import pathlib

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# package name -> source folder (pyproject's package-dir)
PACKAGES = {"fastimpact": ROOT / "fastimpact", "fastimpact.kernels": ROOT / "kernels",
            "fastimpact.cli": ROOT / "cli", "fastimpact.onnx_models": ROOT / "onnx_models"}


def _modules():
    out = {}
    for pkg, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([pkg, *parts])
            if pkg == "fastimpact" and parts and parts[0] in ("kernels", "cli", "onnx_models"):
                continue  # symlinks of a development layout, if any
            out[name] = path
    return out


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    is_pkg = MODULES[module].name == "__init__.py"
    base = module.split(".")
    base = base if is_pkg else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, top_level_only: bool):
    """(target module, imported names) of ``module``'s imports; ``top_level_only``: not inside a
    function (those run when called)."""
    tree = ast.parse(MODULES[module].read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # also imports under `if` / `try` at module level
        nodes = [n for top in tree.body for n in ast.walk(top) if not isinstance(top, (ast.FunctionDef, ast.ClassDef))]
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            for alias in node.names:
                full = f"{target}.{alias.name}"
                # "from package import submodule" imports the submodule itself, not a name
                yield (full, None) if full in MODULES else (target, alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None


def _graph(top_level_only: bool):
    graph = {}
    for m in MODULES:
        graph[m] = {t for t, _ in _imports(m, top_level_only) if t in MODULES and t != m}
    return graph


def _cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def _without_package_inits(graph):
    """A module importing from its own package's __init__ (the root's ``__version__``, a package's
    shared helpers) is not a layer violation: drop those edges (edges to other packages stay)."""
    return {m: {t for t in ts if not (t == "fastimpact" or m.startswith(t + "."))} for m, ts in graph.items()}


def test_no_import_circle_between_modules():
    cycles = _cycles(_without_package_inits(_graph(top_level_only=False)))
    assert not cycles, f"import circles: {cycles}"


def test_no_private_name_imported_from_another_module():
    bad = []
    for m in MODULES:
        for target, name in _imports(m, top_level_only=False):
            if name and name.startswith("_") and not name.startswith("__") and target in MODULES:
                bad.append(f"{m} imports {name} from {target}")
    assert not bad, bad


def test_no_stage_name_branches_outside_the_parameterisations():
    allowed = {"fastimpact.transforms.parameterisation", "fastimpact.transforms.linear", "fastimpact.elastix_params",
               "fastimpact.evaluation", "fastimpact.interchange", "fastimpact.qc", "fastimpact.memory"}
    bad = []
    for m, path in MODULES.items():
        if m in allowed:
            continue
        text = path.read_text()
        for stage in ("affine", "bspline", "rigid"):
            for pattern in (f'stage == "{stage}"', f"stage == '{stage}'", f'stage != "{stage}"'):
                if pattern in text:
                    bad.append(f"{m}: {pattern}")
    assert not bad, bad


def test_no_getattr_dispatch_on_term_flags():
    for m in ("fastimpact.engine.cost", "fastimpact.engine.driver", "fastimpact.engine.estimation",
              "fastimpact.engine.device_loop"):
        assert 'getattr(' not in MODULES[m].read_text(), m


def test_kernels_import_from_an_editable_install():
    import fastimpact.kernels as k

    assert k.get_kernel("bspline_eval", "numpy") is not None


@pytest.mark.parametrize("metric", ["mse", "ncc", "mi"])
def test_every_metric_is_a_term_with_pairs(metric):
    from fastimpact.metrics import make_metric
    from fastimpact.metrics.term import SampleBatch, Term, TransformView

    m = make_metric(metric)
    assert isinstance(m, Term) and m.needs_pairs and not m.needs_points
    rng = np.random.default_rng(0)
    f, mv = rng.normal(size=200), rng.normal(size=200)
    m.prepare(f, mv)
    out = m.evaluate(SampleBatch(np.arange(200), None, None, f, mv, None, TransformView(np.eye(4))))
    v, d = m.value_and_derivative(f, mv)
    assert out.value == v and np.array_equal(out.dvalue_dm, d)


def test_weighted_sum_combines_values_gradients_and_supports():
    from fastimpact.metrics.term import SampleBatch, Support, Term, TermValue, TransformView, WeightedSum

    class PointTerm(Term):
        needs_points = True

        def __init__(self, c, offsets=None, radius=0.0):
            self.c = c
            self.support = Support(patch_offsets=offsets, receptive_radius_mm=radius)

        def evaluate(self, batch):
            return TermValue(self.c * float(np.sum(batch.y)), dvalue_dy=np.full_like(batch.y, self.c),
                             points=batch.x[:1], point_gradient=np.ones((1, 3)))

        def exact_gradient_samples(self, n, default):
            return min(default, 3 * n)

    a = PointTerm(2.0, offsets=np.ones((2, 3)), radius=1.5)
    b = PointTerm(-1.0, radius=4.0)
    s = WeightedSum([(0.5, a), (3.0, b)])
    assert s.needs_points and not s.needs_pairs
    assert s.support.receptive_radius_mm == 4.0 and s.support.patch_offsets.shape == (2, 3)
    assert s.exact_gradient_samples(10, 100_000) == 30
    x = np.arange(12.0).reshape(4, 3)
    out = s.evaluate(SampleBatch(np.arange(4), x, x + 1, None, None, None, TransformView(np.eye(4))))
    total = float(np.sum(x + 1))
    assert out.value == pytest.approx(0.5 * 2 * total - 3 * total)
    np.testing.assert_allclose(out.dvalue_dy, np.full((4, 3), 0.5 * 2 - 3.0))
    assert out.points.shape == (2, 3)
    np.testing.assert_allclose(out.point_gradient, [[0.5] * 3, [3.0] * 3])
    assert s.device_form() is None  # point terms have no device form


def test_impact_options_need_an_impact_metric():
    from fastimpact.config import RegistrationConfig
    from fastimpact.errors import ConfigError

    with pytest.raises(ConfigError, match="applies to the IMPACT metric"):
        RegistrationConfig(metric="mse", mode="jacobian")
    with pytest.raises(ConfigError, match="layers"):
        RegistrationConfig(metric="mi", layers="1")
    RegistrationConfig(metric="impact+0.1*mi", mode="jacobian")  # fine with IMPACT in the sum
    RegistrationConfig(metric="mi", model="mind")  # the default value is not a setting of IMPACT's


@pytest.mark.parametrize("stage", ["rigid", "affine", "bspline"])
def test_parameterisation_gradient_is_the_adjoint_of_its_probe(stage):
    """sum_n <dT(x_n)/dtheta v, g_n> == <v, gradient(g)> for random v, g: the chain and the probe
    describe the same Jacobian; and max_displacement bounds the displacement of a step."""
    from fastimpact.transforms import AffineTransform, BSplineGrid, CompositeTransform
    from fastimpact.transforms.parameterisation import PARAMETERISATIONS

    rng = np.random.default_rng(1)
    fa = np.array([[1.9, 0.2, 0, -20], [-0.2, 1.9, 0, 5], [0, 0, 2.1, 3], [0, 0, 0, 1]])
    shape = (20, 18, 16)
    grid = BSplineGrid.for_image(shape, fa, 12.0)
    tr = CompositeTransform(AffineTransform(np.eye(3), rng.normal(size=3), np.array([1.0, 2.0, 3.0])), grid,
                            rng.normal(size=tuple(grid.shape) + (3,)))
    cls = PARAMETERISATIONS[stage]
    p = cls(tr, fa, 25.0, "cpu")
    idx = rng.uniform(0, 15, size=(50, 3))
    x, y, coords = p.map_index(idx)
    np.testing.assert_allclose(p.map_world(x), y, atol=1e-9)
    np.testing.assert_allclose(p.coords_from_world(x), coords, atol=1e-9)
    g = rng.normal(size=(50, 3))
    v = rng.normal(size=p.n_params)
    jac = p.probe(idx)
    jv = jac.apply(v).reshape(50, 3)
    grad = np.array(p.gradient(coords, g)).copy()
    assert float(np.sum(jv * g)) == pytest.approx(float(v @ grad), rel=1e-9, abs=1e-9)
    assert np.linalg.norm(jv, axis=1).max() <= p.max_displacement(v, shape) * (1 + 1e-9)
