"""The ``generate`` section of the pipeline config: what to generate, from which model, how."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator

from tasks.bounds import SECTION, Seed


class GenerateConfig(BaseModel):
    """The ``generate`` section."""

    model_config = SECTION

    model: str | None = Field(
        None, description="models:/<name>@<alias>, models:/<name>/<version> or a checkpoint / "
        "model directory URI. Default: models:/<registry model name>@champion.")
    num_samples: int = Field(500, ge=1, description="Samples in all.")
    sampler: str | None = Field(None, description="Default: the model's recorded sampler.")
    steps: int | None = Field(None, ge=1, description="Default: the model's recorded steps.")
    guidance_scale: float | None = Field(
        None, ge=0, description="Classifier-free guidance (conditional models). Default: the "
        "model's recorded scale.")
    labels: str | int | list[float] = Field(
        "auto", description="auto (uniform over classes for conditional models, none "
        "otherwise), uniform, none (unconditional), a class id, or per-class weights.")
    seed: Seed = 0
    batch_size: int = Field(256, ge=1, description="Images per sampler call.")
    shard_size: int = Field(4096, ge=1, description="Samples per output file.")
    output: str | None = Field(None, description="Default: ROOT/generations/<job id>.")
    format: Literal["parquet", "parquet+png"] = "parquet"
    num_actors: int | None = Field(
        None, ge=1, description="Sampler actors (model copies). Default: as many as the "
        "cluster's GPUs (or CPUs, for CPU actors) allow, at most one per shard.")
    gpus_per_actor: float = Field(0.0, ge=0)
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs per actor; a CPU actor runs "
                                  "torch on this many threads.")
    bf16: Literal["auto", "on", "off"] = Field(
        "auto", description="auto: on for GPU actors (generate.gpus_per_actor > 0).")

    @field_validator("labels")
    @classmethod
    def _labels(cls, v):
        if isinstance(v, str) and v not in ("auto", "uniform", "none"):
            raise ValueError("generate.labels must be auto, uniform, none, a class id or a list "
                             f"of per-class weights, got {v!r}")
        if isinstance(v, int) and v < 0:
            raise ValueError(f"generate.labels class id must be >= 0, got {v}")
        if isinstance(v, list) and (not v or any(w < 0 for w in v) or sum(v) <= 0):
            raise ValueError("generate.labels weights must be non-negative with a positive sum")
        return v
