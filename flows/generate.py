"""The ``generate`` flow: a batch generation job on Ray Data (see :mod:`tasks.generate`)."""

from __future__ import annotations

from prefect import flow, task
from prefect.logging import get_run_logger

import flows.hooks  # noqa: F401 - installs the stop signal and cancellation check of tasks.jobs
from flows.config import PipelineConfig, with_overrides
from flows.progress import ProgressArtifact
from flows.retry import transient_retries
from tasks.registry import model_name_for
from tasks.stages import execute


@task(name="generate", task_run_name="generate {config[generate][num_samples]} samples",
      **transient_retries())
def generate_task(config: dict, default_model: str | None = None) -> dict:
    """Run the generation job of ``config`` (a PipelineConfig as JSON), here or as a Ray Job
    (:mod:`tasks.stages`)."""
    return execute("generate", {"config": config, "default_model": default_model},
                   echo=get_run_logger().info,
                   progress=ProgressArtifact("samples generated"))


@flow(name="generate", log_prints=True)
def generate_flow(config: PipelineConfig, overrides: list[str] | None = None) -> dict:
    """Generate ``generate.num_samples`` samples from ``generate.model`` (default: the
    ``champion`` of ``registry.model_name``); resumes a killed job, returns a complete one.

    ``config`` is the pipeline config; Prefect validates a mapping (a deployment's
    parameters) into :class:`~flows.config.PipelineConfig` before the flow starts.
    ``overrides`` (``section.key=value``) change single keys of it for one run, e.g.
    ``["generate.num_samples=100000"]``.
    """
    cfg = with_overrides(config, overrides)
    default = f"models:/{model_name_for(cfg.registry, cfg.data.name)}@champion"
    return generate_task(cfg.to_json_dict(), default_model=default)
