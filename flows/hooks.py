"""What tasks/ learns from Prefect without importing it.

tasks/ never imports Prefect (tests/test_layers.py); what a stage needs from the flow run
reaches it from here:

    stop signal    Prefect raises ``TerminationSignal`` on SIGTERM: an interruption, like Ctrl-C
    cancellation   a job driver interrupted while its flow run is being cancelled stops its Ray
                   job (:class:`tasks.jobs.RunHooks`)
    flow run id    recorded on a registered version as ``prefect.flow_run_id`` (passed in its
                   lineage by :func:`flows.registry.register_task`)

Importing this module installs the hooks into :mod:`tasks.jobs`; every flow module that runs a
stage (``tasks.stages.execute``) imports it.
"""

from __future__ import annotations

from prefect import get_client
from prefect.exceptions import TerminationSignal
from prefect.runtime import flow_run

from tasks.jobs import RunHooks, set_run_hooks


def flow_run_id() -> str | None:
    """The Prefect flow run this process is working for, if any."""
    try:
        return str(flow_run.id) if flow_run.id else None
    except Exception:
        return None


def flow_run_cancelling() -> bool:
    """True if this process runs a Prefect flow run that is being cancelled (asks the API)."""
    run_id = flow_run_id()
    if run_id is None:
        return False
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(run_id).state
    return state is not None and state.type.value in ("CANCELLING", "CANCELLED")


PREFECT = RunHooks(stop_signals=(TerminationSignal,), cancelled=flow_run_cancelling)

set_run_hooks(PREFECT)
