"""dvc.yaml's rule: each stage lists as deps exactly the pipeline modules its code runs (a folder
standing for all of its modules)."""

import ast

import pytest
import yaml

from tests.helpers import ROOT

STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def imported_modules(path):
    """pipeline modules imported anywhere in `path` (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "pipeline"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pipeline":
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # from pipeline.core import a: submodules
    return {m for m in found if (ROOT / (m.replace(".", "/") + ".py")).exists()}


def packages_of(module):
    """The __init__ modules that importing `module` runs: pipeline.core.x runs pipeline/__init__.py
    and pipeline/core/__init__.py."""
    parts = module.split(".")[:-1]
    return [".".join(parts[: i + 1]) + ".__init__" for i in range(len(parts)) if parts[i] != "__init__"]


def code_run_by(module):
    """The module's file and every pipeline module it imports, transitively, with each package's
    __init__ (which importing any submodule runs) and what that imports."""
    files, todo = set(), [module]
    while todo:
        name = todo.pop()
        path = name.replace(".", "/") + ".py"
        if path not in files:
            files.add(path)
            todo += [*imported_modules(ROOT / path), *packages_of(name)]
    return files


def modules_in(dep):
    """A dep's Python modules: the file, or every module in the folder (DVC hashes the whole folder;
    .dvcignore keeps __pycache__ out of it)."""
    path = ROOT / dep
    return {str(p.relative_to(ROOT)) for p in path.rglob("*.py")} if path.is_dir() else {dep}


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_deps_list_every_module_it_imports(name):
    stage = STAGES[name]
    module = stage["cmd"].split()[2]  # python -m pipeline.<stage>
    declared = [modules_in(d) for d in stage["deps"] if d.startswith("pipeline/")]
    assert set().union(*declared) == code_run_by(module)
    assert stage["deps"][0] == module.replace(".", "/") + ".py", "the stage's own module comes first"


def test_a_folder_dep_is_exact():
    """A folder in a stage's deps reruns it when any module in the folder changes, so every module
    in it must be one the stage runs: pipeline/core/trust for calibrate, say."""
    calibrate = code_run_by("pipeline.calibrate")
    assert modules_in("pipeline/core/trust") <= calibrate
    assert not modules_in("pipeline/core/trust") <= code_run_by("pipeline.evaluate")  # no calibration search
