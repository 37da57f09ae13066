"""Imports point one way: ``flows`` → ``tasks`` → ``diffusion`` (README, "Imports point one way").

``diffusion`` is the math: importing any of its modules loads none of the orchestration or
storage stack, nor the project's other packages. ``tasks`` is the stages' work: it imports
neither Prefect nor ``flows``, and does not look Prefect up in ``sys.modules`` either; retries,
cancellation and the flow run's id reach it from ``flows`` (:mod:`flows.retry`,
:mod:`flows.hooks`). Checked twice: in the source (every import statement, module-level or
inside a function) and in a fresh interpreter (what importing every module really loads, third-
party dependencies included).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Not loaded by importing diffusion: the orchestration and storage stack, the other packages.
NOT_IN_DIFFUSION = ("prefect", "ray", "mlflow", "pyarrow", "fsspec", "s3fs", "PIL", "tasks",
                    "flows")
NOT_IN_TASKS = ("prefect", "flows")

# Imports every module of one package (found by walking it, not listed by hand) in a fresh
# interpreter, then prints the modules found and the top-level packages loaded.
PROBE = """
import importlib, json, pkgutil, sys
import {package} as package
names = sorted(m.name for m in pkgutil.walk_packages(package.__path__, "{package}."))
for name in names:
    importlib.import_module(name)
print(json.dumps({{"modules": names,
                  "loaded": sorted({{n.split(".")[0] for n in sys.modules}})}}))
"""


def _import_everything(package: str) -> tuple[list[str], set[str]]:
    out = subprocess.run([sys.executable, "-c", PROBE.format(package=package)], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"importing every module of {package} failed:\n{out.stderr}"
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    return seen["modules"], set(seen["loaded"])


def test_importing_all_of_diffusion_keeps_the_stack_and_the_other_packages_out():
    modules, loaded = _import_everything("diffusion")
    assert {"diffusion.samplers", "diffusion.unet", "diffusion.schedules"} <= set(modules)
    assert "torch" in loaded
    leaked = sorted(loaded & set(NOT_IN_DIFFUSION))
    assert not leaked, f"importing diffusion's {len(modules)} modules loaded {leaked}"


def test_importing_all_of_tasks_loads_neither_prefect_nor_flows():
    modules, loaded = _import_everything("tasks")
    assert {"tasks.jobs", "tasks.retry", "tasks.registry.lineage"} <= set(modules)
    leaked = sorted(loaded & set(NOT_IN_TASKS))
    assert not leaked, (f"importing tasks' {len(modules)} modules loaded {leaked}: tasks/ must "
                        "not depend on them, not even through a third-party package")


# -- the source ---------------------------------------------------------------------------------


def _root(name: str | None) -> str:
    return (name or "").split(".")[0]


def _is_sys_modules(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "modules"
            and isinstance(node.value, ast.Name) and node.value.id == "sys")


def forbidden_imports(path: Path, roots: tuple[str, ...]) -> list[str]:
    """``file:line what`` for each import of a package in ``roots`` in the file at ``path``:
    ``import``/``from`` statements anywhere (module level or in a function),
    ``importlib.import_module("…")``/``__import__("…")`` with a literal name, and a literal name
    looked up in ``sys.modules`` (which is how a module sniffs whether a package is loaded)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    where = path.relative_to(REPO)
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute | ast.Name) and \
                getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                    "import_module", "__import__"):
            names = [a.value for a in node.args[:1]
                     if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        elif isinstance(node, ast.Compare | ast.Call | ast.Subscript) and any(
                _is_sys_modules(n) for n in ast.walk(node)):
            names = [n.value for n in ast.walk(node)
                     if isinstance(n, ast.Constant) and isinstance(n.value, str)]
            names = [f"sys.modules[{n!r}]" for n in names if _root(n) in roots]
            found += [f"{where}:{node.lineno} {n}" for n in names]
            continue
        found += [f"{where}:{node.lineno} import {n}" for n in names if _root(n) in roots]
    return sorted(set(found))


@pytest.mark.parametrize(("package", "roots"), [("tasks", ("prefect", "flows")),
                                                 ("diffusion", ("tasks", "flows"))])
def test_no_module_imports_against_the_direction(package, roots):
    files = sorted((REPO / package).rglob("*.py"))
    assert len(files) > 10, f"found only {len(files)} files under {package}/"
    found = [hit for f in files for hit in forbidden_imports(f, roots)]
    assert not found, (f"{package}/ must not import {' or '.join(roots)}; pass what it needs in "
                       "from flows/ (values, callbacks: flows/hooks.py):\n" + "\n".join(found))


def test_the_scan_finds_every_kind_of_import(tmp_path, monkeypatch):
    """The scan itself: each way a module can reach Prefect is caught, the allowed ones not."""
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    src = tmp_path / "m.py"
    src.write_text(
        "import os, prefect.runtime\n"
        "from prefect import flow\n"
        "def f():\n"
        "    from flows.config import PipelineConfig\n"
        "    import importlib; importlib.import_module('prefect.exceptions')\n"
        "    if 'prefect' in sys.modules: pass\n"
        "    sys.modules.get('prefect.exceptions')\n"
        "    from . import prefect_like\n"
        "    import prefectish_not_really.x\n"
        "    text = 'prefect is a word here'\n")
    assert forbidden_imports(src, ("prefect", "flows")) == [
        "m.py:1 import prefect.runtime", "m.py:2 import prefect",
        "m.py:4 import flows.config", "m.py:5 import prefect.exceptions",
        "m.py:6 sys.modules['prefect']", "m.py:7 sys.modules['prefect.exceptions']"]
