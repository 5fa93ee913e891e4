"""The layering of the modules, read from their import statements (`ast`, lazy imports inside functions included):
each layer imports only the layers below it (docs/code.md, "Reading the code").

    bottom   DataHandler.py, Utils/*.py          arrays, graphs, flags' value types, metrics, the run folder
    models   Model.py, Models/*.py               one model each, through the contract of Models/base.py
    harness  inference.py, Params.py, Main.py, api.py, evaluate.py, recommend.py, prepare.py
    drivers  Experiments/*.py

Besides: using a finished run (`api.py`, `inference.py`) never imports the training harness `Main`, and every
import of a module of this package names one that exists (no import of a module that was split or removed).
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import List, Optional, Set, Tuple

import pytest

from conftest import ROOT

PACKAGE = {"DataHandler", "Utils", "Model", "Models", "inference", "Params", "Main", "api", "evaluate", "recommend",
           "prepare", "Experiments"}
HARNESS = {"inference", "Params", "Main", "api", "evaluate", "recommend", "prepare"}


def files(*patterns: str) -> List[str]:
    return sorted(str(p.relative_to(ROOT)) for pattern in patterns for p in ROOT.glob(pattern))


BOTTOM = files("DataHandler.py", "Utils/*.py")
MODELS = files("Model.py", "Models/*.py")
HARNESS_FILES = files(*(f"{name}.py" for name in sorted(HARNESS)))
EVERY = files("*.py", "Utils/*.py", "Models/*.py", "Experiments/*.py", "tests/*.py")


def imports(path: Path) -> List[Tuple[str, Optional[str]]]:
    """Every import of `path` as (module, name): ('Utils.cli', 'flag_value') for `from Utils.cli import flag_value`,
    ('Utils', 'run_folder') for `from Utils import run_folder`, ('Utils.openmp', None) for `import Utils.openmp`."""
    found: List[Tuple[str, Optional[str]]] = []
    for node in ast.walk(ast.parse(Path(path).read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.module, alias.name) for alias in node.names]
    return found


def top_level(path: Path) -> Set[str]:
    return {module.split(".")[0] for module, _ in imports(path)}


def module_file(module: str) -> Optional[Path]:
    """The file of a module of this package ('Utils.cli' -> Utils/cli.py, 'Models' -> Models/__init__.py)."""
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def defined_names(path: Path) -> Set[str]:
    """The names a module defines at its top level (also inside top-level if/try blocks): functions, classes,
    assigned names and imported names."""
    names: Set[str] = set()
    body = list(ast.parse(path.read_text(encoding="utf-8")).body)
    while body:
        node = body.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for target in targets for n in ast.walk(target) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, (ast.If, ast.Try)):
            body += node.body + node.orelse + getattr(node, "finalbody", [])
            body += [n for handler in getattr(node, "handlers", []) for n in handler.body]
    return names


@pytest.mark.parametrize("path", BOTTOM)
def test_the_bottom_layer_imports_nothing_above_it(path):
    above = top_level(ROOT / path) & (PACKAGE - {"DataHandler", "Utils"})
    assert not above, f"{path} imports {sorted(above)}, which are above the bottom layer"


@pytest.mark.parametrize("path", MODELS)
def test_models_import_no_harness_entry_and_no_driver(path):
    # Params is allowed: a model compares its flags with their defaults (Params.baseline_args)
    above = top_level(ROOT / path) & (HARNESS - {"Params"} | {"Experiments"})
    assert not above, f"{path} imports {sorted(above)}"


@pytest.mark.parametrize("path", HARNESS_FILES)
def test_the_harness_does_not_import_the_drivers(path):
    assert "Experiments" not in top_level(ROOT / path), path


@pytest.mark.parametrize("path", ["api.py", "inference.py"])
def test_using_a_finished_run_does_not_import_the_training_harness(path):
    assert "Main" not in top_level(ROOT / path), f"{path} imports Main: what it needs belongs in inference.py"


@pytest.mark.parametrize("path", EVERY)
def test_every_import_of_the_package_names_a_module_and_a_name_that_exist(path):
    for module, name in imports(ROOT / path):
        if module.split(".")[0] not in PACKAGE:
            continue
        found = module_file(module)
        assert found is not None, f"{path} imports {module}, which is not a module of this package"
        if name is None or name == "*":
            continue
        submodule = found.name == "__init__.py" and module_file(f"{module}.{name}") is not None
        assert submodule or name in defined_names(found), f"{path} imports {name} from {module}, which has none"


def test_no_grab_bag_module_is_left():
    assert not (ROOT / "Utils" / "helpers.py").exists(), "Utils/helpers.py was split by concern; do not bring it back"
