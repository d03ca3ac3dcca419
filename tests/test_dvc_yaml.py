"""dvc.yaml's rule: each stage lists as deps exactly the pipeline modules its code runs."""

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
            if node.module == "pipeline":  # from pipeline import a, b: submodules
                found |= {f"pipeline.{a.name}" for a in node.names}
            else:
                found.add(node.module)
    return {m for m in found if (ROOT / (m.replace(".", "/") + ".py")).exists()}


def code_run_by(module):
    """The module's file and every pipeline module it imports, transitively, with the package's
    __init__ (which importing any submodule runs) and what that imports."""
    files, todo = set(), [module, "pipeline.__init__"]
    while todo:
        path = todo.pop().replace(".", "/") + ".py"
        if path not in files:
            files.add(path)
            todo += imported_modules(ROOT / path)
    return files


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_deps_list_every_module_it_imports(name):
    stage = STAGES[name]
    module = stage["cmd"].split()[2]  # python -m pipeline.<stage>
    declared = {d for d in stage["deps"] if d.startswith("pipeline/")}
    assert declared == code_run_by(module)
