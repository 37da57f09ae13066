"""The ``train`` flow: one stage, a committed dataset version → a trained checkpoint."""

from __future__ import annotations

from prefect import flow, task
from prefect.logging import get_run_logger

import flows.hooks  # noqa: F401 - installs the stop signal and cancellation check of tasks.jobs
from flows.config import PipelineConfig, with_overrides
from flows.progress import ProgressArtifact
from flows.retry import transient_retries
from tasks.stages import execute


# A retry after a lost cluster connection resumes the run from its latest checkpoint (or, with
# Ray Jobs, re-attaches to the job that still runs).
@task(name="train", task_run_name="train {config[data][name]}", **transient_retries())
def train_task(config: dict) -> dict:
    """Train on the dataset named in ``config`` (a PipelineConfig as JSON), here or as a Ray
    Job (:mod:`tasks.stages`)."""
    return execute("train", {"config": config}, echo=get_run_logger().info,
                   progress=ProgressArtifact("training steps done"))


@flow(name="train", log_prints=True)
def train_flow(config: PipelineConfig, overrides: list[str] | None = None) -> dict:
    """Train on ``config['data']['name']`` (latest committed version unless data.version).

    ``config`` is the pipeline config; Prefect validates a mapping (a deployment's parameters)
    into :class:`~flows.config.PipelineConfig` before the flow starts, so a run with bad
    parameters fails before Ray is touched. ``overrides`` (``section.key=value``) change single
    keys of it for one run, e.g. ``["train.steps=1000"]``.
    """
    cfg = with_overrides(config, overrides)
    return train_task(cfg.to_json_dict())
