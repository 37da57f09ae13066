"""The ``preprocess`` flow: one stage, source → versioned Parquet dataset."""

from __future__ import annotations

from prefect import flow

from flows.config import PipelineConfig
from tasks.preprocess import preprocess_task


@flow(name="preprocess", log_prints=True)
def preprocess_flow(config: dict) -> dict:
    """Preprocess ``config['data']`` under ``config['runtime']``; returns the dataset reference.

    ``config`` is a :class:`~flows.config.PipelineConfig` as JSON (what the CLI and deployments
    pass); it is validated again here so a deployment run with bad parameters fails at once.
    """
    cfg = PipelineConfig.model_validate(config)
    return preprocess_task(cfg.data.model_dump(mode="json"), cfg.runtime.model_dump(mode="json"))
