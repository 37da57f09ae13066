"""The ``train`` section and the checks on it; the run's identity and its default name.

Everything here is plain data and runs on the driver before any worker starts (the retrain
flow calls :func:`check_config` before any work at all); workers re-read :class:`TrainConfig`
from the JSON job.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationInfo, field_validator

from diffusion.pipeline import DiffusionConfig
from diffusion.training import OPTIM_BOUNDS, OptimConfig, check_optim_value
from tasks.bounds import SECTION, Seed
from tasks.errors import TrainConfigError

RUN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class TrainConfig(BaseModel):
    """The ``train`` section."""

    model_config = SECTION

    # The optimiser's keys (diffusion.training.OptimConfig's, same names) are range-checked by
    # its own OPTIM_BOUNDS (_optim_bounds below), so the two can never disagree.
    steps: int = Field(800, description="Optimizer steps in total (not epochs).")
    batch_size: int = Field(128, ge=1, description="Global batch, split evenly over workers.")
    lr: float = 2e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    ema_decay: float = 0.999
    label_dropout: float = Field(0.1, description="Null-label share (guidance).")
    hflip: bool = Field(False, description="Random horizontal flips.")
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0, description="Ray CPUs reserved per worker.")
    cpu_threads: int | None = Field(
        None, ge=1, description="Torch threads per CPU worker. Default: the node's cores divided "
        "by the workers on that node, as a plain PyTorch process would use.")
    gpus_per_worker: float = Field(1.0, gt=0)
    bf16: Literal["auto", "on", "off"] = Field("auto", description="auto: on with GPUs.")
    channels_last: Literal["auto", "on", "off"] = "auto"
    compile: bool = Field(False, description="torch.compile the model.")
    checkpoint_every: int = Field(500, ge=1)
    keep_checkpoints: int = Field(3, ge=1)
    log_every: int = Field(50, ge=1)
    sample_every: int = Field(0, ge=0, description="Log a sample grid every N steps (0: off).")
    max_failures: int = Field(3, ge=0, description="Worker-group restarts before giving up.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="How workers are placed on nodes (SPREAD: one per node if possible).")
    seed: Seed = 0
    run_name: str | None = Field(
        None, description="Names the run; the same name resumes it. Default: derived from the "
        "dataset version and the config, so an unchanged rerun resumes (or finds it done).")

    @field_validator(*OPTIM_BOUNDS)
    @classmethod
    def _optim_bounds(cls, v, info: ValidationInfo):
        return check_optim_value(info.field_name, v)

    @field_validator("run_name")
    @classmethod
    def _run_name(cls, v):
        if v is not None and not RUN_NAME_RE.match(v):
            raise ValueError(f"train.run_name {v!r} must be 1-128 letters, digits, '.', '_', '-'")
        return v


def optim_config(train: TrainConfig, diffusion: DiffusionConfig) -> OptimConfig:
    """The optimiser settings: ``train``'s keys that OptimConfig has, and ``diffusion``'s loss."""
    shared = {f.name for f in dataclasses.fields(OptimConfig)} & set(TrainConfig.model_fields)
    return OptimConfig(**{k: getattr(train, k) for k in shared}, loss=diffusion.loss_config())


# --------------------------------------------------------------------------------------------
# Validation against the dataset (driver, before any worker starts)
# --------------------------------------------------------------------------------------------


def check_config(train: TrainConfig, diffusion: DiffusionConfig) -> None:
    """The checks that need no dataset (the retrain flow runs them before any work)."""
    if train.warmup_steps > train.steps:
        raise TrainConfigError(
            f"train.warmup_steps={train.warmup_steps} exceeds train.steps={train.steps}")
    if train.batch_size % train.num_workers:
        raise TrainConfigError(
            f"train.batch_size={train.batch_size} is not divisible by train.num_workers="
            f"{train.num_workers}; each worker takes an equal share")
    try:
        optim_config(train, diffusion)
    except ValueError as e:
        raise TrainConfigError(f"invalid train/diffusion config: {e}") from None


def validate(model: Any, train: TrainConfig, manifest: dict,
             diffusion: DiffusionConfig | None = None) -> None:
    """Raise TrainConfigError (naming the field) for anything a worker would trip over."""
    check_config(train, diffusion or DiffusionConfig())
    c, h, w = manifest["shape"]
    if model.resolution != h:
        raise TrainConfigError(
            f"model.resolution={model.resolution} does not match the dataset "
            f"{manifest['name']}@{manifest['version']} ({h}x{w}); set model.resolution={h}")
    if model.in_channels != c:
        raise TrainConfigError(
            f"model.in_channels={model.in_channels} does not match the dataset's {c} channel(s);"
            f" set model.in_channels={c}")
    n_classes = manifest["num_classes"]
    if model.num_classes is not None and model.num_classes != n_classes:
        raise TrainConfigError(
            f"model.num_classes={model.num_classes} but the dataset has {n_classes} classes "
            f"({', '.join(manifest['class_names'][:10]) or 'unlabelled'}); set "
            f"model.num_classes={n_classes or 'null'}")
    rows = manifest["splits"]["train"]["rows"]
    if train.batch_size > rows:
        raise TrainConfigError(
            f"train.batch_size={train.batch_size} is larger than the dataset's train split "
            f"({rows} rows); lower train.batch_size")


# --------------------------------------------------------------------------------------------
# The run's identity: what it computes, and the default name derived from it
# --------------------------------------------------------------------------------------------

# How a run is executed and observed, not what it computes: left out of the default run name,
# so changing them resumes the same run instead of starting a new one.
EXECUTION_KEYS = frozenset({
    "run_name", "log_every", "sample_every", "checkpoint_every", "keep_checkpoints",
    "max_failures", "placement_strategy", "cpus_per_worker", "gpus_per_worker", "cpu_threads",
})


def run_identity(model: Any, diffusion: DiffusionConfig, train: TrainConfig) -> dict:
    """The model, diffusion and train sections as JSON: the start of the workers' job."""
    return {"model": model.to_dict(), "diffusion": diffusion.to_dict(),
            "train": train.model_dump(mode="json")}


def default_run_name(manifest: dict, job: dict) -> str:
    """``<dataset>-<version[:8]>-<digest of model, diffusion and train minus EXECUTION_KEYS>``."""
    identity = {"model": job["model"], "diffusion": job["diffusion"],
                "train": {k: v for k, v in job["train"].items() if k not in EXECUTION_KEYS}}
    payload = json.dumps(identity, sort_keys=True)
    digest = hashlib.sha256(payload.encode()).hexdigest()[:10]
    return f"{manifest['name']}-{manifest['version'][:8]}-{digest}"
