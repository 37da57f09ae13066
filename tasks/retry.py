"""Which failures are worth retrying: transient ones only.

A storage endpoint that did not answer, an MLflow server that was restarting, a Ray cluster that
was not reachable yet: trying again later may succeed, so every stage task retries those with
exponential backoff and jitter (the Prefect task options are :mod:`flows.retry`'s). A bad
config, bad data, a refused promotion, tampered weights or a bug fails the same way every time;
those fail the task at once, with their one clear message.
"""

from __future__ import annotations

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
