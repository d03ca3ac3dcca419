"""The house's rule (CONTRIBUTING.md): stages may import the shared core; serving and scale-out import
the core and never a stage (scale-out may use serving's readers); the core imports none of the
other wings; `digits` (pipeline/cli.py) fronts serving and scale-out. Inside the core, the flat
modules are infrastructure and each folder is a feature: infrastructure imports no feature (but
training builds the shifts' augmentation into its input pipeline). bench/ imports nothing from
tests/. No function in pipeline/ is longer than a screen."""

import ast

import pytest

from tests.helpers import ROOT

WINGS = {"core": "pipeline/core", "serving": "pipeline/serving", "scale": "pipeline/scale"}
MAY_IMPORT = {
    "stage": {"stage", "core"},
    "core": {"core"},
    "serving": {"serving", "core"},
    "scale": {"scale", "core", "serving"},
    "cli": {"cli", "core", "serving", "scale"},  # `digits`: the command line of serving and scale-out
}


def wing_of(module):
    """'pipeline.core.x' -> 'core'; a module directly in pipeline/ is a stage."""
    parts = module.split(".")
    if module == "pipeline.cli":
        return "cli"
    return parts[1] if len(parts) > 2 and parts[1] in WINGS else "stage"


def imports(path):
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def project_modules(names):
    """Only names that are real modules of pipeline/ (not `from pipeline.core import params as p`'s
    function names, say)."""
    return {n for n in names if n.startswith("pipeline.") and (ROOT / (n.replace(".", "/") + ".py")).exists()}


PIPELINE_FILES = sorted(p for p in (ROOT / "pipeline").rglob("*.py"))


@pytest.mark.parametrize("path", PIPELINE_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_each_wing_imports_only_what_it_may(path):
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    own = wing_of(module)
    crossing = sorted(m for m in project_modules(imports(path)) if wing_of(m) not in MAY_IMPORT[own])
    assert not crossing, f"{module} ({own}) imports {crossing}"


def test_the_rule_sees_a_crossing(tmp_path):
    """The check above can fail: a core module importing a stage is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("from pipeline import train\nfrom pipeline.serving import api\n")
    crossing = {m for m in project_modules(imports(bad)) if wing_of(m) not in MAY_IMPORT["core"]}
    assert crossing == {"pipeline.train", "pipeline.serving.api"}


def test_bench_imports_nothing_from_tests():
    for path in (ROOT / "bench").rglob("*.py"):
        assert not {m for m in imports(path) if m.split(".")[0] == "tests"}, path


INFRASTRUCTURE = {
    "files",
    "layout",
    "models",
    "normalize",
    "params",
    "quiet_tensorflow",
    "registry",
    "tracking",
    "training",
}
FEATURES = {"graph", "reading", "shifts", "trust"}
INFRASTRUCTURE_MAY_USE = {"training": {"shifts"}}  # augmentation layers in the training input pipeline
MAX_FUNCTION_LINES = 80


def test_the_core_is_infrastructure_and_feature_folders():
    core = ROOT / "pipeline/core"
    assert {p.stem for p in core.glob("*.py")} - {"__init__"} == INFRASTRUCTURE
    assert {p.name for p in core.iterdir() if p.is_dir() and (p / "__init__.py").exists()} == FEATURES


@pytest.mark.parametrize("name", sorted(INFRASTRUCTURE))
def test_infrastructure_imports_no_feature(name):
    used = {m.split(".")[2] for m in project_modules(imports(ROOT / f"pipeline/core/{name}.py")) if m.count(".") >= 3}
    assert used & FEATURES <= INFRASTRUCTURE_MAY_USE.get(name, set()), f"pipeline.core.{name} imports {used & FEATURES}"


@pytest.mark.parametrize("path", PIPELINE_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_functions_read_on_one_screen(path):
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno >= MAX_FUNCTION_LINES
    ]
    assert not long, f"split into named steps: {long}"
