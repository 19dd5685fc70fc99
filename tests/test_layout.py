"""The layout rules: no import cycle among the project's modules, and sda/ knows nothing of DVC or MLflow."""

import ast

from tests.conftest import ROOT

PACKAGES = ("sda", "stages", "sweeps")


def project_imports(module: str) -> set[str]:
    """The project modules ``module`` imports, at any depth of its code (lazy imports included)."""
    tree = ast.parse((ROOT / (module.replace(".", "/") + ".py")).read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            found |= {n for n in names if (ROOT / (n.replace(".", "/") + ".py")).is_file()} or {node.module}
        elif isinstance(node, ast.ImportFrom) and node.module is None:
            continue
        elif isinstance(node, ast.ImportFrom) and node.module in PACKAGES:
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] in PACKAGES}
    return {m for m in found if not m.endswith(".__init__")}


def modules() -> list[str]:
    return sorted(f"{p.parent.name}.{p.stem}" for package in PACKAGES for p in (ROOT / package).glob("*.py")
                  if p.stem != "__init__")


def test_no_module_imports_itself_through_others():
    graph = {module: project_imports(module) for module in modules()}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        for imported in sorted(graph.get(module, ())):
            if imported == path[0]:
                cycles.append(" -> ".join([*path, imported]))
            elif imported not in path and imported > path[0]:  # each cycle once, from its smallest module
                visit(imported, [*path, imported])

    for module in graph:
        visit(module, [module])
    assert not cycles, "import cycles: " + "; ".join(cycles)


def test_the_walk_sees_real_imports():
    # The walk must follow `from sda.x import y` and `from sda import x`, or it would find no cycle anywhere.
    assert "sda.generators" in project_imports("sda.data")
    assert "stages.params" in project_imports("stages.pretrain")


def test_the_library_imports_neither_dvc_nor_mlflow():
    for path in (ROOT / "sda").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not [n for n in names if n.split(".")[0] in ("dvc", "mlflow")], f"{path.name} imports {names}"
