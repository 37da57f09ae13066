"""The sampling pipeline: model + schedule + sampler + per-sample noise → uint8 images.

The diffusers split: the *model* (a network, :mod:`diffusion.unet`), the *scheduler* (a
:class:`NoiseSchedule` built from a :class:`DiffusionConfig`, and a :class:`SamplerConfig`), and
the *pipeline* that runs one with the other. Every caller that turns a model into images — the
training stage's sample grid, evaluation, batch generation, the served MLflow model and the demo
— calls :func:`sample_images`, so a given checkpoint gives the same image for sample i wherever
it is drawn.

    schedule = DiffusionConfig.from_dict(config["diffusion"]).schedule()
    images = sample_images(model, schedule, (1, 8, 8), SampleNoise(seed, range(n)),
                           SamplerConfig("dpmpp_2m", steps=10), labels=labels,
                           guidance_scale=1.5, null_label=num_classes)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from diffusion.denoiser import Denoiser, ModelFn, classifier_free_guidance
from diffusion.losses import LossConfig
from diffusion.noise import SampleNoise
from diffusion.parameterization import Prediction
from diffusion.pixels import unit_to_uint8
from diffusion.samplers import SamplerConfig, sample
from diffusion.schedules import NoiseSchedule, ScheduleConfig, ScheduleKind

MAX_T = 100_000


@dataclass(frozen=True)
class DiffusionConfig:
    """The diffusion process a network is trained on: its noise schedule and what it predicts.

    This is the ``diffusion`` section of the pipeline config and of every saved model's
    ``config.json``; ``min_snr_gamma`` weights the training loss (:mod:`diffusion.losses`).
    The checks are the schedule's and the loss's own, run at construction.
    """

    schedule: ScheduleKind = "linear"
    T: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction: Prediction = "eps"
    min_snr_gamma: float | None = None

    # Read by pydantic (no import needed) when the pipeline config embeds this dataclass:
    # unknown keys are an error there too, as in from_dict; NaN and infinity too, as
    # in every section (tasks.bounds).
    __pydantic_config__: ClassVar[dict[str, Any]] = {"extra": "forbid", "allow_inf_nan": False}

    def __post_init__(self) -> None:
        if not 1 <= self.T <= MAX_T:
            raise ValueError(f"diffusion.T must be in 1..{MAX_T}, got {self.T}")
        self.schedule_config()
        self.loss_config()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DiffusionConfig:
        """From a saved ``diffusion`` section; unknown keys are an error naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown diffusion config keys {unknown}; valid: {sorted(names)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def schedule_config(self) -> ScheduleConfig:
        return ScheduleConfig(kind=self.schedule, T=int(self.T), beta_start=float(self.beta_start),
                              beta_end=float(self.beta_end))

    def build_schedule(self) -> NoiseSchedule:
        """The training noise schedule (float64 tables)."""
        return self.schedule_config().build()

    def loss_config(self) -> LossConfig:
        return LossConfig(prediction=self.prediction, min_snr_gamma=self.min_snr_gamma)


@torch.no_grad()
def sample_images(
    model: ModelFn,
    schedule: NoiseSchedule,
    shape: tuple[int, int, int],
    noise: SampleNoise,
    sampler: SamplerConfig | None = None,
    *,
    prediction: Prediction = "eps",
    labels: Tensor | None = None,
    guidance_scale: float = 1.0,
    null_label: int | None = None,
    batch_size: int | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> Tensor:
    """``len(noise)`` images, uint8 [N, C, H, W] on the CPU.

    ``model`` is the network on ``noise.device``; ``schedule`` and ``prediction`` are what it was
    trained with. Sample i starts from ``noise``'s row i (see :mod:`diffusion.noise`), so it is
    the same in any batch; ``batch_size`` (None: all at once) only bounds memory.

    Conditioning: ``null_label`` is a conditional network's null class (None: unconditional
    network). With ``labels`` (one class id per sample) and ``guidance_scale`` ≠ 1 the network
    is wrapped in classifier-free guidance; without ``labels`` a conditional network is given
    the null class for every sample (unguided unconditional samples). ``autocast_dtype`` runs
    the network under ``torch.autocast`` (e.g. bfloat16 on a GPU).
    """
    n = len(noise)
    device = noise.device
    if labels is not None:
        if null_label is None:
            raise ValueError("labels were given for an unconditional network (null_label None)")
        labels = torch.as_tensor(labels, dtype=torch.long)
        if labels.shape != (n,):
            raise ValueError(f"labels must hold one class per sample ({n}), got {labels.shape}")
    elif null_label is not None:
        labels = torch.full((n,), null_label, dtype=torch.long)
    net = model
    if labels is not None and guidance_scale != 1.0:
        net = classifier_free_guidance(model, guidance_scale, null_label=null_label)
    step = batch_size or max(n, 1)
    out = []
    for start in range(0, n, step):
        rows = slice(start, min(n, start + step))
        lab = None if labels is None else labels[rows].to(device)
        denoiser = Denoiser(net, schedule, prediction, labels=lab)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            x = sample(denoiser, shape, noise[rows], sampler)
        out.append(unit_to_uint8(x.float()).cpu())
    if not out:
        return torch.empty((0, *shape), dtype=torch.uint8)
    return torch.cat(out)
