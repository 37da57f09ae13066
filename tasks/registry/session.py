"""MLflow sessions: bounded HTTP retries, MLflow's process-wide settings guarded, errors that
name the URI.

Tracking: ``tasks.tracking.tracking_uri`` (SQLite under the storage root by default, any MLflow
server by ``runtime.mlflow_uri`` / ``MLFLOW_TRACKING_URI``). MLflow's HTTP client retries for
minutes by default; around our calls its retries and timeouts are bounded by ``registry.retries``
and ``registry.timeout_s`` (MLflow reads ``MLFLOW_HTTP_REQUEST_*`` at every request), and an
unreachable server becomes :class:`RegistryUnavailable` naming the URI.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import threading
from collections.abc import Iterator
from typing import Any

from tasks.errors import RegistryError, RegistryUnavailable
from tasks.registry.config import RegistryConfig
from tasks.storage import redact
from tasks.tracking import connect_uri, is_unreachable

_ENV_GUARD = threading.Lock()
_ENV_USERS = 0
_ENV_SAVED: dict[str, str | None] = {}
_FLUENT_GUARD = threading.Lock()  # mlflow's fluent API keeps the tracking URI in a global


@contextlib.contextmanager
def _http_bounds(cfg: RegistryConfig) -> Iterator[None]:
    """MLflow's HTTP retry/timeout variables set from ``cfg`` while any registry call runs.

    MLflow reads them at every request (mlflow.utils.rest_utils.http_request), so they take effect
    without a new client. Reference-counted, so concurrent calls in one process keep them set
    until the last one leaves; the caller's own values come back afterwards.
    """
    global _ENV_USERS
    values = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(cfg.retries),
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, math.ceil(cfg.timeout_s))),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",  # urllib3: sleeps 0, 2, 4... seconds
        "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # no progress bars in task logs
    }
    with _ENV_GUARD:
        if _ENV_USERS == 0:
            _ENV_SAVED.clear()
            _ENV_SAVED.update({k: os.environ.get(k) for k in values})
        _ENV_USERS += 1
        os.environ.update(values)
    try:
        yield
    finally:
        with _ENV_GUARD:
            _ENV_USERS -= 1
            if _ENV_USERS == 0:
                for k, v in _ENV_SAVED.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v


def _error_code(e: BaseException) -> str:
    return str(getattr(e, "error_code", ""))


@contextlib.contextmanager
def _mlflow(uri: str, cfg: RegistryConfig, what: str) -> Iterator[Any]:
    """An MlflowClient for ``uri`` (tracking and registry), bounded retries, errors explained."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    where = redact(uri)
    unreachable = (f"cannot reach MLflow at {where} to {what} (gave up after {cfg.retries} "
                   f"retries, {cfg.timeout_s:g} s timeout each)")
    hint = "check runtime.mlflow_uri / MLFLOW_TRACKING_URI and that the server is up"
    with _http_bounds(cfg):
        try:
            yield MlflowClient(tracking_uri=connect_uri(uri), registry_uri=connect_uri(uri))
        except RegistryError:
            raise
        except MlflowException as e:
            if is_unreachable(e):
                raise RegistryUnavailable(f"{unreachable}: {_cause(e)}; {hint}") from e
            raise RegistryError(f"MLflow at {where} refused to {what}: {_first_line(e)}") from e
        except Exception as e:
            if is_unreachable(e):
                raise RegistryUnavailable(f"{unreachable}: {_cause(e)}; {hint}") from e
            raise


def _cause(e: BaseException) -> str:
    """The short reason inside urllib3's long connection errors ("[Errno 111] Connection
    refused", "Read timed out"), else the first line of the message."""
    m = re.search(r"\[Errno -?\d+\][^\"')\]]*|Read timed out|timed out|database is locked", str(e))
    return m.group(0).strip() if m else _first_line(e)


def _first_line(e: BaseException) -> str:
    msg = getattr(e, "message", None) or str(e)
    return f"{type(e).__name__}: {msg.strip().splitlines()[0] if msg.strip() else ''}"[:500]


@contextlib.contextmanager
def _fluent_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's global tracking URI set to ``uri`` for the block, then restored.

    ``mlflow.set_tracking_uri`` also writes MLFLOW_TRACKING_URI into os.environ (and unsets it when
    given None), so the caller's variable is saved and put back as well.
    """
    import mlflow
    from mlflow.tracking._tracking_service import utils

    old_global, old_env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(connect_uri(uri))
    try:
        yield
    finally:
        mlflow.set_tracking_uri(old_global)
        if old_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_env
