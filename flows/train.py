"""The ``train`` flow: one stage, a committed dataset version → a trained checkpoint."""

from __future__ import annotations

from prefect import flow

from flows.config import PipelineConfig
from tasks.train import train_task


@flow(name="train", log_prints=True)
def train_flow(config: PipelineConfig) -> dict:
    """Train on ``config['data']['name']`` (latest committed version unless data.version).

    ``config`` is the pipeline config; Prefect validates a mapping (a deployment's parameters)
    into :class:`~flows.config.PipelineConfig` before the flow starts, so a run with bad
    parameters fails before Ray is touched.
    """
    cfg = PipelineConfig.model_validate(config)
    return train_task(cfg.to_json_dict())
