"""The pipeline's errors: one hierarchy in a leaf module, a transient branch the retry policy
reads by type, errors that cross a Ray worker boundary as themselves, and no import circle."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest

from tasks import errors, retry
from tasks.errors import PipelineError, TransientError

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("diffusion", "tasks", "flows")

# each error and the builtin base it had before the hierarchy (``except ValueError`` still works)
BUILTIN_BASE = {
    "ConfigError": ValueError, "StorageError": RuntimeError, "StorageUnavailable": RuntimeError,
    "DatasetNotFound": LookupError, "PreprocessError": ValueError,
    "TrainConfigError": ValueError, "TrainingBusy": RuntimeError,
    "TrainingLeaseLost": RuntimeError,
    "TrainingDiverged": RuntimeError, "RunNotFound": LookupError, "CheckpointError": ValueError,
    "LeaseBusy": RuntimeError, "EvalError": RuntimeError, "RegistryError": RuntimeError,
    "RegistryUnavailable": RuntimeError, "TrackingError": RuntimeError,
    "TrackingUnavailable": RuntimeError, "GenerateError": ValueError,
    "ClusterUnreachable": ConnectionError, "ClusterAuthError": PermissionError,
    "StageJobFailed": RuntimeError, "StageTimeout": TimeoutError, "CodeMismatch": RuntimeError,
}
TRANSIENT = {"StorageUnavailable": "StorageError", "RegistryUnavailable": "RegistryError",
             "TrackingUnavailable": "TrackingError", "ClusterUnreachable": "TransientError"}


def _defined_errors() -> set[str]:
    return {name for name, obj in vars(errors).items()
            if isinstance(obj, type) and issubclass(obj, BaseException)
            and obj.__module__ == errors.__name__}


def test_every_error_is_a_pipeline_error_and_keeps_its_builtin_base():
    assert _defined_errors() == set(BUILTIN_BASE) | {"PipelineError", "TransientError"}
    for name, base in BUILTIN_BASE.items():
        cls = getattr(errors, name)
        assert issubclass(cls, PipelineError) and issubclass(cls, base), name


def test_the_transient_branch_is_what_the_retry_policy_retries():
    for name in BUILTIN_BASE:
        e = getattr(errors, name)("x")
        assert isinstance(e, TransientError) == (name in TRANSIENT), name
        assert retry.is_transient(e) == (name in TRANSIENT), name
    for name, family in TRANSIENT.items():  # "unavailable" is still its family's error
        assert issubclass(getattr(errors, name), getattr(errors, family))


@pytest.mark.parametrize("name", sorted(BUILTIN_BASE))
def test_an_error_pickles_as_itself(name):
    """Ray ships a worker's error to the driver by pickling it; tasks.evaluate re-raises it."""
    e = getattr(errors, name)(f"{name}: what went wrong and what to set")
    again = pickle.loads(pickle.dumps(e))
    assert type(again) is type(e) and again.args == e.args and str(again) == str(e)


def _module_files():
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            yield name.removesuffix(".__init__"), path


def test_errors_live_in_tasks_errors_only():
    """No stage defines an error of its own; tasks.decode.SkipInput is a control-flow signal
    caught inside the decoder (the reason goes to the manifest), not a pipeline error."""
    allowed = {("tasks.decode", "SkipInput"), ("diffusion.serialization", "WeightsIntegrityError")}
    found = set()
    for module, path in _module_files():
        if module == "tasks.errors":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                    ast.unparse(b).endswith(("Error", "Exception")) for b in node.bases):
                found.add((module, node.name))
    assert found <= allowed, sorted(found - allowed)


def _import_graph() -> dict[str, set[str]]:
    """Module → the project modules it imports, at module level or inside functions."""
    paths = dict(_module_files())

    def project_module(name: str) -> str | None:
        while name and name not in paths:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets |= {f"{node.module}.{a.name}" for a in node.names}
        graph[module] = {m for m in map(project_module, targets) if m and m != module}
    return graph


def test_tasks_errors_is_a_leaf():
    assert _import_graph()["tasks.errors"] == set()


def test_no_import_circle_and_imports_point_flows_to_tasks_to_diffusion():
    graph = _import_graph()
    layer = {"flows": 2, "tasks": 1, "diffusion": 0}
    upward = [(a, b) for a, bs in graph.items() for b in bs
              if layer[b.split(".")[0]] > layer[a.split(".")[0]]]
    assert not upward
    # depth-first search for a back edge; report the circle it closes
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                pytest.fail("import circle: " + " → ".join([*path[path.index(n):], n]))
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
