"""The forward (noising) process and its posterior.

Every function takes ``t`` as an integer tensor with one entry per batch element (0-based, see
:mod:`diffusion.schedules`) and the noise ``eps`` explicitly: randomness is the caller's.
"""

from __future__ import annotations

from torch import Tensor

from diffusion.schedules import NoiseSchedule, extract


def q_sample(x0: Tensor, t: Tensor, eps: Tensor, schedule: NoiseSchedule) -> Tensor:
    """A draw from q(x_t | x₀) = N(√ᾱ_t x₀, (1 − ᾱ_t) I)  (Ho et al. 2020, Eq. 4):
    x_t = √ᾱ_t x₀ + √(1 − ᾱ_t) ε."""
    abar = extract(schedule.alphas_cumprod, t, x0)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * eps


def q_step(x_prev: Tensor, t: Tensor, eps: Tensor, schedule: NoiseSchedule) -> Tensor:
    """One Markov step q(x_t | x_{t−1}) = N(√(1 − β_t) x_{t−1}, β_t I)  (Ho et al. 2020, Eq. 2).

    With ``t = 0`` the input is x₀ itself (data) and the output is the first noisy latent.
    """
    beta = extract(schedule.betas, t, x_prev)
    return (1 - beta).sqrt() * x_prev + beta.sqrt() * eps


def q_posterior(
    x0: Tensor, xt: Tensor, t: Tensor, schedule: NoiseSchedule
) -> tuple[Tensor, Tensor]:
    """Mean and variance of q(x_{t−1} | x_t, x₀) = N(μ̃_t(x_t, x₀), β̃_t I)  (Ho et al., Eqs. 6–7):

    μ̃_t = β_t √ᾱ_{t−1} / (1 − ᾱ_t) · x₀ + (1 − ᾱ_{t−1}) √α_t / (1 − ᾱ_t) · x_t,
    β̃_t = (1 − ᾱ_{t−1}) / (1 − ᾱ_t) · β_t.

    At t = 0 the "previous" latent is x₀ itself: mean x₀, variance 0.
    The variance is returned broadcastable to ``xt`` ([B, 1, 1, ...]).
    """
    mean = (
        extract(schedule.posterior_mean_coef1, t, xt) * x0
        + extract(schedule.posterior_mean_coef2, t, xt) * xt
    )
    return mean, extract(schedule.posterior_variance, t, xt)
