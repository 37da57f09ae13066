"""The ``preprocess`` flow: one stage, source → versioned Parquet dataset."""

from __future__ import annotations

from prefect import flow, task
from prefect.logging import get_run_logger

import flows.hooks  # noqa: F401 - installs the stop signal and cancellation check of tasks.jobs
from flows.config import PipelineConfig, with_overrides
from flows.retry import transient_retries
from tasks.stages import execute


@task(name="preprocess", task_run_name="preprocess {data[name]}", **transient_retries())
def preprocess_task(data: dict, runtime: dict) -> dict:
    """Preprocess ``data`` (a DataConfig as a dict); returns the dataset reference. Runs here, or
    as a Ray Job when the Ray address is a Jobs API address (:mod:`tasks.stages`)."""
    return execute("preprocess", {"data": data, "runtime": runtime},
                   echo=get_run_logger().info)


@flow(name="preprocess", log_prints=True)
def preprocess_flow(config: PipelineConfig, overrides: list[str] | None = None) -> dict:
    """Preprocess ``config.data`` under ``config.runtime``; returns the dataset reference.

    ``config`` is the pipeline config; Prefect validates a mapping (a deployment's parameters)
    into :class:`~flows.config.PipelineConfig` before the flow starts, so bad parameters fail at
    once. ``overrides`` (``section.key=value``) change single keys of it for one run, e.g.
    ``["data.val_fraction=0.2"]``.
    """
    cfg = with_overrides(config, overrides)
    return preprocess_task(cfg.data.model_dump(mode="json"), cfg.runtime.model_dump(mode="json"))
