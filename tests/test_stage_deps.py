"""Every code file a stage runs is one of its deps in dvc.yaml, so DVC re-runs a stage when its code changes.

The files a stage runs are found by following `from sda... / from stages... import` statements from
the stage's module. An import that brings in only a name whose code cannot change the stage's
outputs (an exception class caught for its message, a tuple of allowed values, a path constant
the stage declares anyway) is listed in NAME_ONLY with why, and not followed: declaring those files
as deps would re-run minutes of training for an edit to, say, the MNIST download code.
"""

import ast

import yaml

from tests.conftest import ROOT

PACKAGES = ("sda", "stages")
NAME_ONLY = {  # (importer, imported): the names imported, and why they cannot change outputs
    ("stages.common", "sda.data"): ({"DataSourceError"}, "caught to print its message"),
    ("stages.common", "sda.training"): ({"DivergenceError"}, "caught to print its message"),
    ("stages.params", "sda.data"): ({"DATASETS"}, "the names data.dataset may take"),
    ("stages.params", "sda.noise"): ({"MASKING_MODES", "NOISE_KINDS"}, "the names a layer's masking and noise may take"),
    ("stages.params", "sda.dae"): ({"RECONSTRUCTION_LOSSES"}, "the names a layer's loss may take"),
    ("stages.params", "sda.training"): ({"ENGINES"}, "the names engine may take"),
    ("stages.evaluate", "stages.finetune"): ({"MODEL_PATH"}, "the models/finetuned path evaluate also declares"),
    ("stages.track", "stages.environment"): ({"RECORD_DIR"}, "the folder of the records track reads"),
}
# Non-Python files a module runs: sda/kernels.py compiles and loads sda/kernels.c.
RUNS_ALSO = {"sda.kernels": ["sda/kernels.c"]}


def imports(module: str) -> list[tuple[str, set[str]]]:
    """(imported module, names imported from it) for each project import statement of ``module``."""
    tree = ast.parse((ROOT / (module.replace(".", "/") + ".py")).read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
            found.append((node.module, {alias.name for alias in node.names}))
        elif isinstance(node, ast.Import):
            found.extend((alias.name, set()) for alias in node.names if alias.name.split(".")[0] in PACKAGES)
    return found


def imported_modules(module: str) -> set[str]:
    """The modules ``module`` runs code of: its imports, less those of names in NAME_ONLY only."""
    return {imported for imported, names in imports(module)
            if not ((module, imported) in NAME_ONLY and names and names <= NAME_ONLY[module, imported][0])}


def code_run_by(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo.extend(imported_modules(current))
    files = {m.replace(".", "/") + ".py" for m in seen}
    return files.union(*(RUNS_ALSO.get(m, []) for m in seen))


def test_every_stage_depends_on_the_code_it_runs():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert set(stages) == {"prepare", "pretrain", "finetune", "evaluate", "track"}
    missing = {}
    for name, stage in stages.items():
        stage = stage.get("do", stage)
        module = stage["cmd"].split()[2]  # "python -m stages.<name> ..."
        if lacking := code_run_by(module) - set(stage["deps"]):
            missing[name] = sorted(lacking)
    assert not missing, f"dvc.yaml: these stages run code they do not depend on: {missing}"


def test_every_name_only_import_is_still_made():
    # The exemptions must describe real imports, or they would hide nothing and explain nothing.
    for (importer, imported), (names, _) in NAME_ONLY.items():
        assert (imported, names) in imports(importer), (importer, imported, names)
