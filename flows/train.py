"""The ``train`` flow: one stage, a committed dataset version → a trained checkpoint."""

from __future__ import annotations

from prefect import flow

from flows.config import PipelineConfig
from tasks.train import train_task


@flow(name="train", log_prints=True)
def train_flow(config: dict) -> dict:
    """Train on ``config['data']['name']`` (latest committed version unless data.version).

    ``config`` is a :class:`~flows.config.PipelineConfig` as JSON; it is validated here first,
    so a deployment run with bad parameters fails before Ray is touched.
    """
    cfg = PipelineConfig.model_validate(config)
    return train_task(cfg.to_json_dict())
