"""The stage tasks' retry options: Prefect retries transient failures only.

Which failures are transient is :func:`tasks.retry.is_transient`'s to say; this module turns
that into Prefect ``@task`` options (exponential backoff with jitter, a ``retry_condition_fn``).
"""

from __future__ import annotations

from typing import Any

from prefect.tasks import exponential_backoff

from tasks.retry import is_transient


def _exception_of(state) -> BaseException | None:
    exc = state.data if isinstance(getattr(state, "data", None), BaseException) else None
    if exc is None:
        try:
            state.result()
        except BaseException as e:
            exc = e
    return exc


def retry_transient(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry only :func:`~tasks.retry.is_transient` failures."""
    return is_transient(_exception_of(state))


def transient_retries(retries: int = 3, backoff_s: float = 10.0) -> dict[str, Any]:
    """``@task`` options: up to ``retries`` retries of transient failures, waiting
    ``backoff_s`` × 2^k seconds (k = 0, 1, ...) with ±50 % jitter; none for anything else."""
    return {"retries": retries,
            "retry_delay_seconds": exponential_backoff(backoff_factor=backoff_s),
            "retry_jitter_factor": 0.5,
            "retry_condition_fn": retry_transient}
