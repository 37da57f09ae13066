"""Which failures a Prefect task retries: transient ones only.

A storage endpoint that did not answer, an MLflow server that was restarting, a Ray cluster that
was not reachable yet: trying again later may succeed, so every stage task retries those with
exponential backoff and jitter. A bad config, bad data, a refused promotion, tampered weights or
a bug fails the same way every time; those fail the task at once, with their one clear message.
"""

from __future__ import annotations

from typing import Any

from tasks.errors import PipelineError, TransientError


def is_transient(exc: BaseException | None) -> bool:
    """True for failures worth retrying: a :class:`~tasks.errors.TransientError` (storage or
    MLflow unreachable), Ray not reachable."""
    if exc is None:
        return False
    if isinstance(exc, TransientError):
        return True
    if isinstance(exc, PipelineError):  # e.g. StageTimeout, a TimeoutError that is no blip
        return False
    # ray.init(address=...) raises ConnectionError when the cluster is not (yet) reachable;
    # sockets raise ConnectionError / TimeoutError subclasses.
    return isinstance(exc, ConnectionError | TimeoutError)


def _exception_of(state) -> BaseException | None:
    exc = state.data if isinstance(getattr(state, "data", None), BaseException) else None
    if exc is None:
        try:
            state.result()
        except BaseException as e:
            exc = e
    return exc


def retry_transient(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry only :func:`is_transient` failures."""
    return is_transient(_exception_of(state))


def transient_retries(retries: int = 3, backoff_s: float = 10.0) -> dict[str, Any]:
    """``@task`` options: up to ``retries`` retries of transient failures, waiting
    ``backoff_s`` × 2^k seconds (k = 0, 1, ...) with ±50 % jitter; none for anything else."""
    from prefect.tasks import exponential_backoff

    return {"retries": retries,
            "retry_delay_seconds": exponential_backoff(backoff_factor=backoff_s),
            "retry_jitter_factor": 0.5,
            "retry_condition_fn": retry_transient}
