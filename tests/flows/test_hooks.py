"""flows/ tells tasks/ what Prefect knows: its stop signal, a cancelled flow run, the flow run's
id (tasks/ never imports Prefect: tests/test_layers.py)."""

from __future__ import annotations

import ast
import importlib
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest

import flows
import tasks.jobs

FLOWS = Path(flows.__file__).parent


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return found


# The modules whose Prefect tasks run stages (the job-run command, in a Ray job, runs none).
STAGE_RUNNERS = sorted(p.stem for p in FLOWS.glob("*.py")
                       if "tasks.stages.execute" in _imports(p))


def test_every_flow_module_that_runs_a_stage_installs_prefects_hooks():
    from prefect.exceptions import TerminationSignal

    assert {"preprocess", "train", "evaluate", "generate"} <= set(STAGE_RUNNERS)
    lacking = [m for m in STAGE_RUNNERS if "flows.hooks" not in _imports(FLOWS / f"{m}.py")]
    assert not lacking, f"flows/{lacking[0]}.py runs stages but does not import flows.hooks"
    for m in STAGE_RUNNERS:
        importlib.import_module(f"flows.{m}")
    from flows.hooks import PREFECT, flow_run_cancelling

    assert tasks.jobs.HOOKS is PREFECT
    assert PREFECT.stop_signals == (TerminationSignal,)
    assert PREFECT.cancelled is flow_run_cancelling


def test_the_flow_run_id_comes_from_prefects_runtime(monkeypatch):
    from flows.hooks import flow_run_id

    monkeypatch.delenv("PREFECT__FLOW_RUN_ID", raising=False)
    assert flow_run_id() is None  # not in a flow run
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "0b5e1d2c-flow-run")
    assert flow_run_id() == "0b5e1d2c-flow-run"


@pytest.mark.parametrize(("state", "cancelling"), [
    ("CANCELLING", True), ("CANCELLED", True), ("RUNNING", False), (None, False)])
def test_a_flow_run_is_cancelling_when_the_api_says_so(monkeypatch, state, cancelling):
    import flows.hooks

    asked: list[str] = []

    @contextmanager
    def client(sync_client: bool):
        def read_flow_run(run_id):
            asked.append(run_id)
            return SimpleNamespace(state=state and SimpleNamespace(
                type=SimpleNamespace(value=state)))

        yield SimpleNamespace(read_flow_run=read_flow_run)

    monkeypatch.setattr(flows.hooks, "get_client", client)
    monkeypatch.delenv("PREFECT__FLOW_RUN_ID", raising=False)
    assert flows.hooks.flow_run_cancelling() is False and asked == []  # no flow run: no call
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "0b5e1d2c-flow-run")
    assert flows.hooks.flow_run_cancelling() is cancelling
    assert asked == ["0b5e1d2c-flow-run"]
