"""The package's shape: imports go one way, down the layers, with no circle (function-local imports
count too); every module imports alone; the config tree and sample data in the package are the
repository's conf/ and data/; and running an entry file as a script lets none of our module names
shadow another package."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT, cli_env

SRC = ROOT / "src"
PACKAGE = SRC / "lorasweep"

# Lowest first: a module may import from its own layer and the ones before it, never after.
LAYERS = [
    ("foundation", ("lorasweep", "lorasweep.errors", "lorasweep.interrupts",
                    "lorasweep.distributed", "lorasweep.console", "lorasweep.redaction",
                    "lorasweep.outputs")),
    ("config", ("lorasweep.config",)),
    ("data and evaluation", ("lorasweep.data", "lorasweep.evaluation")),
    ("model", ("lorasweep.model",)),
    ("tracking", ("lorasweep.tracking",)),
    ("training", ("lorasweep.training",)),
    ("runs", ("lorasweep.runs",)),
    ("cli", ("lorasweep.cli",)),
    ("entry points", ("lorasweep.train", "lorasweep.predict", "lorasweep.export")),
]


def module_files() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its name, from __init__.py)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        if any(part in ("conf", "sample_data") for part in path.relative_to(PACKAGE).parts):
            continue  # the linked config tree and sample data hold no modules of the package
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    return modules


def imported_modules(path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # `from lorasweep import outputs` imports the module lorasweep.outputs
            targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules
                       else node.module for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target:
                found.add(target)
    return found


def layer_of(module: str) -> int:
    for index, (_, members) in enumerate(LAYERS):
        if any(module == m or (m != "lorasweep" and module.startswith(m + ".")) for m in members):
            return index
    raise AssertionError(f"{module}: in no layer of tests/test_layout.py's LAYERS")


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    graph = {}
    for name, path in modules.items():
        # a package's own __init__ is imported on the way to any of its modules: not an edge
        graph[name] = {m for m in imported_modules(path, modules)
                       if m != name and not name.startswith(m + ".")}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_a_layer_above_its_own():
    graph = import_graph()
    upward = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})"
              for m, targets in sorted(graph.items()) for t in sorted(targets)
              if layer_of(t) > layer_of(m)]
    assert upward == []


def test_no_modules_import_each_other_even_inside_functions():
    assert circles(import_graph()) == []


def test_the_circle_finder_finds_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [["a", "b", "c"]]


@pytest.fixture(scope="module")
def imported_one_by_one() -> dict:
    """One interpreter started as `python src/lorasweep/train.py` starts (src/lorasweep/ first on
    sys.path) imports each module of the package with none of lorasweep's others loaded before it
    (they are dropped from sys.modules between two imports; third-party libraries stay, which
    only saves importing them again), then every plugin and library a run loads. What failed,
    and which modules came from src/lorasweep/ under a name outside lorasweep."""
    script = f"""
import importlib, json, sys, traceback
sys.path.insert(0, {str(PACKAGE)!r})
failures = []
for module in {sorted(module_files())!r}:
    for name in [n for n in sys.modules if n == "lorasweep" or n.startswith("lorasweep.")]:
        del sys.modules[name]
    try:
        importlib.import_module(module)
    except Exception:
        failures.append(module + ": " + traceback.format_exc(limit=1).strip()[-300:])
import mlflow, optuna, deepspeed, peft, evaluate, datasets, sklearn, matplotlib.pyplot
import hydra_plugins.hydra_optuna_sweeper.optuna_sweeper
import hydra_plugins.hydra_joblib_launcher.joblib_launcher
here = {str(PACKAGE)!r}
strays = sorted(name for name, module in list(sys.modules.items())
                if (getattr(module, "__file__", None) or "").startswith(here)
                and name != "lorasweep" and not name.startswith("lorasweep."))
print(json.dumps({{"failures": failures, "strays": strays}}))
"""
    proc = subprocess.run([sys.executable, "-c", script], env=cli_env(), capture_output=True,
                          text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_every_module_imports_alone(imported_one_by_one):
    """None needs another of the package's modules to have been imported first."""
    assert imported_one_by_one["failures"] == []


@pytest.mark.slow
def test_an_entry_file_run_as_a_script_shadows_no_other_package(imported_one_by_one):
    """`python src/lorasweep/train.py` puts src/lorasweep/ first on sys.path: a module there
    named like another package (say `data`, `config`) would be imported in its place. With the
    package, every plugin and the libraries a run uses imported, nothing came from there under a
    name outside lorasweep."""
    assert imported_one_by_one["strays"] == []


def test_the_packages_config_tree_and_sample_data_are_the_repositorys():
    """One copy: the package's conf/ and sample_data/ are links to the top-level conf/ and data/
    (a built wheel holds the files themselves: tests/test_install.py)."""
    from lorasweep.config import CONF_DIR, package_dir

    assert Path(CONF_DIR).resolve() == (ROOT / "conf").resolve()
    assert Path(package_dir("lorasweep", "sample_data")).resolve() == (ROOT / "data").resolve()


def test_every_package_the_code_imports_is_a_declared_dependency():
    """A package lorasweep imports (at the top or in a function) but pyproject.toml does not
    declare works in a venv that happens to hold it, and fails in a user's."""
    import importlib.metadata
    import re
    import tomllib

    declared = {re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0].lower().replace("_", "-")
                for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
                ["dependencies"]}
    providers = importlib.metadata.packages_distributions()
    undeclared = set()
    for path in module_files().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "lorasweep":
                    continue
                if top == "hydra_plugins":  # a namespace: the plugin's own package names it
                    dists = [name.split(".")[1].replace("_", "-")]
                else:
                    dists = providers.get(top, [top])
                if not any(d.lower().replace("_", "-") in declared for d in dists):
                    undeclared.add(f"{name} ({', '.join(dists)})")
    assert sorted(undeclared) == []
