"""No import cycle among the project's modules, counting every import statement (also those inside
functions: a lazy import is still a dependency)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> project modules it imports (a package's own ``__init__`` import of a parent is not counted)."""
    mods = {}
    for pkg in ("featurize", "risk_model"):
        for f in (root / pkg).rglob("*.py"):
            parts = list(f.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = f

    def resolve(name):
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for m, f in mods.items():
        base = m if f.name == "__init__.py" else m.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                deps.update(resolve(a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    b = base
                    for _ in range(node.level - 1):
                        b = b.rpartition(".")[0]
                    mod = f"{b}.{node.module}" if node.module else b
                else:
                    mod = node.module
                for a in node.names:  # `from pkg import submodule`
                    full = f"{mod}.{a.name}"
                    deps.add(full if full in mods else resolve(mod))
        deps.discard(None)
        deps.discard(m)
        graph[m] = {d for d in deps if not m.startswith(d + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle():
    graph = import_graph()
    assert "risk_model.serve" in graph and "featurize.schema" in graph
    assert cycles(graph) == []


def test_featurize_never_imports_risk_model():
    graph = import_graph()
    for m, deps in graph.items():
        if m.startswith("featurize"):
            assert not [d for d in deps if d.startswith("risk_model")], m


def test_schema_and_serving_are_light():
    """What serving reads imports no torch, scipy, pandas, scikit-learn or xgboost at module level."""
    heavy = {"torch", "scipy", "pandas", "sklearn", "xgboost", "mlflow", "matplotlib"}
    for rel in ("featurize/schema.py", "risk_model/serve.py", "risk_model/predictor.py", "risk_model/booster.py",
                "risk_model/features.py", "risk_model/errors.py"):
        tree = ast.parse((ROOT / rel).read_text())
        top = set()
        for node in tree.body:  # module level only: imports inside functions are where they are used
            if isinstance(node, ast.Import):
                top.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level:
                top.add(node.module.split(".")[0])
        assert not top & heavy, (rel, top & heavy)
