"""The ``train`` flow: one stage, a committed dataset version → a trained checkpoint."""

from __future__ import annotations

from prefect import flow, task
from prefect.logging import get_run_logger

from diffusion.pipeline import DiffusionConfig
from diffusion.unet import UNetConfig
from flows.config import PipelineConfig
from tasks.datasets import DataConfig
from tasks.retry import transient_retries
from tasks.runtime import RuntimeConfig
from tasks.train import TrainConfig, run_training


# A retry after a lost cluster connection resumes the run from its latest checkpoint.
@task(name="train", task_run_name="train {config[data][name]}", **transient_retries())
def train_task(config: dict) -> dict:
    """Train on the dataset named in ``config`` (a PipelineConfig as JSON)."""
    res = run_training(
        DataConfig(**config["data"]), UNetConfig.from_dict(config["model"]),
        DiffusionConfig.from_dict(config["diffusion"]), TrainConfig(**config["train"]),
        RuntimeConfig(**config["runtime"]), pipeline=config, echo=get_run_logger().info)
    return res.summary()


@flow(name="train", log_prints=True)
def train_flow(config: PipelineConfig) -> dict:
    """Train on ``config['data']['name']`` (latest committed version unless data.version).

    ``config`` is the pipeline config; Prefect validates a mapping (a deployment's parameters)
    into :class:`~flows.config.PipelineConfig` before the flow starts, so a run with bad
    parameters fails before Ray is touched.
    """
    cfg = PipelineConfig.model_validate(config)
    return train_task(cfg.to_json_dict())
