"""The job: everything that determines a generation's output, its id, its shards, and the
label of each sample.

A job is ``(model weights, sampler, steps, guidance, labels, seed, N, shard size, format,
device, bf16)``; its fingerprint is the *job id*. The last two are the numerics, as used: the
device kind the actors sample on and whether they sample in bfloat16 (``generate.bf16``
resolved), because they change the pixels: a job on other hardware or at the other precision is
another job, and never finishes or reuses this one's shards.

Sample i draws its noise from ``SampleNoise(seed, [i])`` and its label (when labels are drawn
from a distribution) from the same (seed, i) stream, so sample i depends on the job and i alone:
not on the batch size, the number of actors, the shard it lands in or the order shards run in.
It is also what the registered pyfunc returns for ``{"seed": seed, "index": i, "label":
label_i}``.

Both sides use it: the driver resolves it (:mod:`tasks.generate.resolve`), the sampler actors
rebuild it from its fields (:mod:`tasks.generate.worker`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

LABEL_STEP = -2  # the noise-stream step whose draw picks sample i's label (never a sampler step)


@dataclass
class Job:
    """Everything that determines the output, resolved and checked before any work starts."""

    model_ref: str
    model_version: str | None  # registry version, when from models:/
    weights_sha256: str
    config: dict  # the model's {"unet", "diffusion", "class_names"}
    sampler: dict  # SamplerConfig fields
    guidance_scale: float | None  # None: no guidance (unconditional model or labels none)
    labels: Any  # None, an int, or a list of class weights
    seed: int
    num_samples: int
    shard_size: int
    format: str
    device: str  # the actors' device kind, as device_kind() names it
    bf16: bool  # sampled under bfloat16 autocast

    def identity(self) -> dict:
        d = asdict(self)
        del d["model_ref"]  # the same weights under another name are the same job
        return d

    @property
    def job_id(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()
                              ).hexdigest()[:16]

    @property
    def shape(self) -> tuple[int, int, int]:
        u = self.config["unet"]
        return (u["in_channels"], u["resolution"], u["resolution"])

    def shards(self) -> list[tuple[int, int, int]]:
        """(shard number, first index, end index) for every shard."""
        n, s = self.num_samples, self.shard_size
        return [(k, k * s, min(n, (k + 1) * s)) for k in range((n + s - 1) // s)]


def device_kind(use_gpu: bool) -> str:
    """The kind of device a sampler actor in this process samples on, as a job records it:
    ``cuda:<GPU model>`` for a GPU actor that sees a GPU (models differ in kernels, so in the
    last bits of an image), else ``cpu`` (every CPU is taken as one kind, although BLAS
    libraries differ in rounding too)."""
    import torch

    if use_gpu and torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name()}"
    return "cpu"


def labels_for(job: Job, indices: np.ndarray) -> np.ndarray | None:
    """Sample i's label: fixed, or drawn from the class weights by the (seed, i) stream."""
    if job.labels is None:
        return None
    if isinstance(job.labels, int):
        return np.full(len(indices), job.labels, np.int64)
    from diffusion.noise import stream_seed

    cdf = np.cumsum(np.asarray(job.labels, np.float64))
    cdf /= cdf[-1]
    u = np.array([stream_seed(job.seed, int(i), LABEL_STEP) / 2.0 ** 63 for i in indices])
    return np.minimum(np.searchsorted(cdf, u, side="right"), len(cdf) - 1).astype(np.int64)
