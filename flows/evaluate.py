"""The ``evaluate`` flow: one stage, a trained model → its evaluation (metrics, frontier)."""

from __future__ import annotations

from prefect import flow, task
from prefect.logging import get_run_logger

import flows.hooks  # noqa: F401 - installs the stop signal and cancellation check of tasks.jobs
from flows.config import PipelineConfig
from flows.retry import transient_retries
from tasks.stages import execute


@task(name="evaluate", task_run_name="evaluate {model_ref}", **transient_retries())
def evaluate_task(model_ref: str, config: dict, dataset_version: str | None = None) -> dict:
    """Evaluate ``model_ref`` with the ``evaluate`` section of ``config`` (PipelineConfig), here
    or as a Ray Job (:mod:`tasks.stages`)."""
    return execute("evaluate", {"model_ref": model_ref, "config": config,
                                "dataset_version": dataset_version},
                   echo=get_run_logger().info)


@flow(name="evaluate", log_prints=True)
def evaluate_flow(config: PipelineConfig, model: str | None = None,
                  dataset_version: str | None = None) -> dict:
    """Evaluate ``model`` (``models:/...``, a checkpoint or model URI; default: the finished
    training run that ``config`` names) with ``config['evaluate']``.

    ``config`` is the pipeline config; Prefect validates a mapping (a deployment's
    parameters) into :class:`~flows.config.PipelineConfig` before the flow starts.
    """
    cfg = PipelineConfig.model_validate(config)
    if model is None:
        from tasks.train import finished_run

        model = finished_run(cfg.data, cfg.model, cfg.diffusion, cfg.train,
                             cfg.runtime)["checkpoint_uri"]
    return evaluate_task(model, cfg.to_json_dict(), dataset_version)
