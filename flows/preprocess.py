"""The ``preprocess`` flow: one stage, source → versioned Parquet dataset."""

from __future__ import annotations

from prefect import flow

from flows.config import PipelineConfig
from tasks.preprocess import preprocess_task


@flow(name="preprocess", log_prints=True)
def preprocess_flow(config: PipelineConfig) -> dict:
    """Preprocess ``config.data`` under ``config.runtime``; returns the dataset reference.

    ``config`` is the pipeline config; Prefect validates a mapping (a deployment's parameters)
    into :class:`~flows.config.PipelineConfig` before the flow starts, so bad parameters fail at
    once.
    """
    cfg = PipelineConfig.model_validate(config)
    return preprocess_task(cfg.data.model_dump(mode="json"), cfg.runtime.model_dump(mode="json"))
