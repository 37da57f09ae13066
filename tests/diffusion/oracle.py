"""Exact denoisers for data whose posterior E[x₀ | x_t] has a closed form.

Each oracle is a network in the package's sense, ``model(x_t, t, labels) -> ε̂``, built from the
schedule it will be used with. With α = √ᾱ_t, σ² = 1 − ᾱ_t and x_t = α x₀ + σ ε:

* :func:`gaussian_oracle` — x₀ ~ N(m, s² I) independently per dimension:
  E[x₀ | x_t] = m + α s² / (α² s² + σ²) · (x_t − α m).
* :func:`two_point_oracle` — x₀ = +A with probability p, −A otherwise, independently per
  dimension: E[x₀ | x_t] = A tanh(α A x_t / σ² + ½ log(p / (1 − p)))  (p = ½: A tanh(α A x_t/σ²)).

and ε̂ = (x_t − α x̂₀) / σ, the exact E[ε | x_t]. A sampler driven by one of these should
reproduce the data distribution up to its own discretisation error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from diffusion.schedules import NoiseSchedule, extract


def alpha_sigma(schedule: NoiseSchedule, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """(α, σ) = (√ᾱ_t, √(1 − ᾱ_t)), shaped to broadcast against ``like``."""
    abar = extract(schedule.alphas_cumprod, t, like)
    return abar.sqrt(), (1 - abar).sqrt()


@dataclass
class GaussianData:
    """x₀ ~ N(m, s² I) per dimension; ``m`` broadcasts against [B, C, H, W]."""

    m: Tensor
    s: float

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        shape = (n, *self.m.shape[1:])
        return self.m + self.s * torch.randn(shape, generator=generator, dtype=self.m.dtype)

    def posterior_mean(self, xt: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        m = self.m.to(xt.dtype)
        gain = alpha * self.s**2 / (alpha**2 * self.s**2 + sigma**2)
        return m + gain * (xt - alpha * m)

    def eps_loss_minimum(self, alpha: float, sigma: float) -> float:
        """E ‖ε − E[ε | x_t]‖² per dimension = α² Var(x₀ | x_t) / σ² = α²s² / (α²s² + σ²)."""
        a2s2 = alpha**2 * self.s**2
        return a2s2 / (a2s2 + sigma**2)


def gaussian_data(channels: int = 16, s: float = 0.3) -> GaussianData:
    """The standard test distribution: means linspace(−½, ½, C) over C channels, s = 0.3."""
    m = torch.linspace(-0.5, 0.5, channels, dtype=torch.float64).reshape(1, channels, 1, 1)
    return GaussianData(m=m, s=s)


def gaussian_oracle(data: GaussianData, schedule: NoiseSchedule):
    """The Bayes-optimal ε predictor for :class:`GaussianData`: ``model(xt, t, labels)``."""

    def model(xt: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        alpha, sigma = alpha_sigma(schedule, t, xt)
        x0 = data.posterior_mean(xt, alpha, sigma)
        return (xt - alpha * x0) / sigma

    return model


def two_point_oracle(amplitude: float, schedule: NoiseSchedule, p_plus: float = 0.5):
    """The Bayes-optimal ε predictor for x₀ = +A (probability ``p_plus``) or −A per dimension.

    P(+A | x_t) / P(−A | x_t) = p/(1 − p) · exp(2 α A x_t / σ²), so
    E[x₀ | x_t] = A (P(+A | x_t) − P(−A | x_t)) = A tanh(α A x_t / σ² + ½ log(p/(1 − p)))."""
    half_logit = 0.5 * math.log(p_plus / (1 - p_plus))

    def model(xt: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        alpha, sigma = alpha_sigma(schedule, t, xt)
        x0 = amplitude * torch.tanh(alpha * amplitude * xt / sigma**2 + half_logit)
        return (xt - alpha * x0) / sigma

    return model


class CallCounter:
    """Wraps a network and counts its calls (the number of function evaluations, NFE)."""

    def __init__(self, model):
        self.model = model
        self.calls = 0

    def __call__(self, xt: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        self.calls += 1
        return self.model(xt, t, labels)
