"""The training objective: the simplified loss of Ho et al. 2020 on ε, x₀ or v, optionally
min-SNR-γ weighted.

    L_simple = E_{t, x₀, ε} ‖target − f_θ(x_t, t)‖²,   x_t = √ᾱ_t x₀ + √(1 − ᾱ_t) ε   (Ho Eq. 14)

Min-SNR-γ (Hang et al. 2023) reweights each timestep so the loss equals, up to a constant,
min(SNR_t, γ) · ‖x₀ − x̂₀‖²: in ε-space the weight is min(SNR, γ)/SNR, in x₀-space min(SNR, γ),
in v-space min(SNR, γ)/(SNR + 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from diffusion.denoiser import ModelFn
from diffusion.forward import q_sample
from diffusion.parameterization import Prediction, check_prediction, target
from diffusion.schedules import NoiseSchedule, extract


@dataclass(frozen=True)
class LossConfig:
    prediction: Prediction = "eps"
    min_snr_gamma: float | None = None  # None: unweighted L_simple

    def __post_init__(self) -> None:
        check_prediction(self.prediction)
        if self.min_snr_gamma is not None and self.min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be > 0 or None, got {self.min_snr_gamma}")


def snr_weight(
    t: Tensor, schedule: NoiseSchedule, prediction: Prediction, gamma: float | None, like: Tensor
) -> Tensor:
    """Per-sample weight (shape [B]) of the min-SNR-γ strategy; ones when ``gamma`` is None."""
    if gamma is None:
        return torch.ones(t.shape[0], dtype=like.dtype, device=like.device)
    snr = extract(schedule.snr, t, like).reshape(-1)
    clipped = snr.clamp(max=gamma)
    if prediction == "eps":
        return clipped / snr
    if prediction == "x0":
        return clipped
    return clipped / (snr + 1)


def training_loss(
    model: ModelFn,
    x0: Tensor,
    schedule: NoiseSchedule,
    config: LossConfig = LossConfig(),
    *,
    t: Tensor | None = None,
    eps: Tensor | None = None,
    labels: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Per-sample loss (shape [B]): mean over pixels of the weighted squared error.

    ``t`` defaults to uniform draws from 0..T−1 and ``eps`` to N(0, I), both from ``generator``.
    Take ``.mean()`` for the minibatch objective.
    """
    b = x0.shape[0]
    device = generator.device if generator is not None else x0.device  # draw where it lives
    if t is None:
        t = torch.randint(0, schedule.T, (b,), generator=generator, device=device).to(x0.device)
    if eps is None:
        eps = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
        eps = eps.to(x0.device)
    xt = q_sample(x0, t, eps, schedule)
    output = model(xt, t, labels)
    goal = target(config.prediction, x0, eps, t, schedule)
    mse = (output.float() - goal.float()).pow(2).flatten(1).mean(1)
    return mse * snr_weight(t, schedule, config.prediction, config.min_snr_gamma, mse)
