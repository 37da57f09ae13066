"""Stage tasks retry transient failures (storage, MLflow, Ray unreachable) and nothing else."""

from __future__ import annotations

import contextlib

import pytest

from diffusion.serialization import WeightsIntegrityError
from flows.evaluate import evaluate_task
from flows.generate import generate_task
from flows.preprocess import preprocess_task
from flows.registry import promote_task, register_task, rollback_task
from flows.retry import retry_transient, transient_retries
from flows.train import train_task
from tasks import retry
from tasks.errors import (
    EvalError,
    PreprocessError,
    RegistryError,
    RegistryUnavailable,
    StorageError,
    StorageUnavailable,
    TrackingError,
    TrackingUnavailable,
    TrainConfigError,
    TrainingDiverged,
)
from tasks.storage import explain


@pytest.mark.parametrize("exc", [
    StorageUnavailable("endpoint down"), RegistryUnavailable("mlflow down"),
    TrackingUnavailable("mlflow down"), ConnectionError("ray: could not connect"),
    TimeoutError("read timed out"), ConnectionRefusedError(111, "refused"),
])
def test_transient_failures_are_retried(exc):
    from prefect.states import Failed

    assert retry.is_transient(exc)
    assert retry_transient(None, None, Failed(data=exc))


@pytest.mark.parametrize("exc", [
    StorageError("bucket 'x' does not exist"), PreprocessError("no usable input"),
    TrainConfigError("bad steps"), TrainingDiverged("nan at 7"), EvalError("no val split"),
    RegistryError("no such model"), WeightsIntegrityError("tampered"),
    TrackingError("refused"), ValueError("bug"), KeyError("bug"), None,
])
def test_deterministic_failures_are_not(exc):
    from prefect.states import Failed

    assert not retry.is_transient(exc)
    if exc is not None:
        assert not retry_transient(None, None, Failed(data=exc))


def test_an_unreachable_endpoint_is_transient_but_a_missing_bucket_is_not():
    import botocore.exceptions

    down = explain(botocore.exceptions.EndpointConnectionError(endpoint_url="http://s3:9"),
                   "s3://b/k")
    assert isinstance(down, StorageUnavailable)
    missing = explain(FileNotFoundError("The specified bucket does not exist"), "s3://b/k")
    assert isinstance(missing, StorageError) and not retry.is_transient(missing)


@pytest.mark.parametrize("task", [preprocess_task, train_task, evaluate_task, generate_task,
                                  register_task, promote_task, rollback_task])
def test_every_stage_task_retries_transient_failures_with_backoff(task):
    assert task.retries >= 2
    assert task.retry_condition_fn is retry_transient
    delays = task.retry_delay_seconds
    assert isinstance(delays, list) and len(delays) == task.retries
    assert delays == sorted(delays) and delays[0] > 0  # exponential backoff
    assert task.retry_jitter_factor and task.retry_jitter_factor > 0


def test_a_flow_retries_a_transient_failure_and_not_a_deterministic_one(prefect_harness):
    """Real Prefect task runs with the stage options (delays shortened)."""
    from prefect import flow, task

    calls = {"transient": 0, "bad": 0}
    opts = transient_retries(retries=3) | {"retry_delay_seconds": 0}

    @task(**opts)
    def flaky() -> str:
        calls["transient"] += 1
        if calls["transient"] < 3:
            raise StorageUnavailable("cannot reach http://127.0.0.1:9 (test)")
        return "ok"

    @task(**opts)
    def bad() -> None:
        calls["bad"] += 1
        raise PreprocessError("data.source holds no usable input")

    @flow
    def pipeline() -> str:
        out = flaky()
        with contextlib.suppress(PreprocessError):
            bad()
        return out

    assert pipeline() == "ok"
    assert calls == {"transient": 3, "bad": 1}
