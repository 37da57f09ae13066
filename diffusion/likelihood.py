"""The variational bound and negative log-likelihood in bits/dim (Ho et al. 2020, Eq. 5;
Sohl-Dickstein et al. 2015; Nichol & Dhariwal 2021, §2).

In this package's 0-based time (``schedule.T`` steps, latents x_0..x_{T−1} after the data x):

    −log p(x) ≤ L_prior + Σ_{t=1}^{T−1} L_t + L_dec
    L_prior = KL(q(x_{T−1} | x) ‖ N(0, I))
    L_t     = KL(q(x_{t−1} | x_t, x) ‖ p_θ(x_{t−1} | x_t)),  p_θ = N(μ̃_t(x_t, x̂₀), Σ_t)
    L_dec   = −log p_θ(x | x_0), a Gaussian N(x̂₀, Σ_0) discretized to the 256 uint8 bins (Eq. 13)

Σ_t is fixed (the network predicts only the mean): β̃_t ("beta_tilde") or β_t ("beta"); at the
decoder β̃ is replaced by its clipped value β̃_1, since β̃_0 = 0. Nats are divided by D·ln 2 for
bits/dim, D the number of pixels times channels of one image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from diffusion.denoiser import Denoiser
from diffusion.forward import q_posterior, q_sample
from diffusion.pixels import uint8_to_unit
from diffusion.schedules import extract

Variance = Literal["beta_tilde", "beta"]


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(μ₁, e^{v₁}) ‖ N(μ₂, e^{v₂})) elementwise, in nats."""
    return 0.5 * (
        logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
        - 1.0
    )


def _log_diff_ndtr(a: Tensor, b: Tensor) -> Tensor:
    """log(Φ(b) − Φ(a)) for a < b, without cancellation in either tail."""
    # In the right tail use the mirror image Φ(b) − Φ(a) = Φ(−a) − Φ(−b).
    flip = a > 0
    lo = torch.where(flip, -b, a)
    hi = torch.where(flip, -a, b)
    log_hi, log_lo = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    return log_hi + torch.log1p(-torch.exp((log_lo - log_hi).clamp(max=0)).clamp(max=1 - 1e-12))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log P(x) elementwise for x ∈ [−1, 1] on the 256-level grid (bins of width 2/255) under
    N(mean, e^{2·log_scale}); the first and last bins extend to ∓∞ (Ho et al. 2020, Eq. 13)."""
    inv_std = torch.exp(-log_scale)
    lower = (x - mean - 1.0 / 255) * inv_std
    upper = (x - mean + 1.0 / 255) * inv_std
    log_cdf_upper = torch.special.log_ndtr(upper)  # x = −1: P = Φ(upper)
    log_sf_lower = torch.special.log_ndtr(-lower)  # x = +1: P = 1 − Φ(lower)
    mid = _log_diff_ndtr(lower, upper)
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, mid))


@dataclass
class NLLResult:
    """Per-image bits/dim: ``total`` = ``prior`` + Σ ``terms``; ``terms[:, 0]`` is the decoder
    L_dec and ``terms[:, t]`` the KL term L_t."""

    total: Tensor  # [B]
    prior: Tensor  # [B]
    terms: Tensor  # [B, T]

    def mean_and_stderr(self) -> tuple[float, float]:
        n = self.total.numel()
        mean = float(self.total.mean())
        stderr = float(self.total.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
        return mean, stderr


@torch.no_grad()
def nll_bits_per_dim(
    denoiser: Denoiser,
    x_uint8: Tensor,
    *,
    variance: Variance = "beta_tilde",
    generator: torch.Generator | None = None,
) -> NLLResult:
    """Every term of the variational bound for a batch of uint8 images, in bits/dim.

    One draw x_t ~ q(x_t | x) per timestep (the standard unbiased estimate of each L_t); T network
    evaluations per batch. ``generator`` makes the draws reproducible.
    """
    if variance not in ("beta_tilde", "beta"):
        raise ValueError(f"variance must be 'beta_tilde' or 'beta', got {variance!r}")
    schedule = denoiser.schedule
    x = uint8_to_unit(x_uint8)
    b, dims = x.shape[0], x[0].numel()
    to_bits = 1.0 / (dims * math.log(2.0))
    if variance == "beta_tilde":
        log_var_table = schedule.posterior_log_variance_clipped
    else:
        log_var_table = torch.log(schedule.betas)

    # L_prior: q(x_{T−1} | x) = N(√ᾱ x, (1 − ᾱ) I) against N(0, I)
    last = torch.full((b,), schedule.T - 1, dtype=torch.int64, device=x.device)
    abar = extract(schedule.alphas_cumprod, last, x)
    prior = normal_kl(
        abar.sqrt() * x, torch.log1p(-abar).expand_as(x), torch.zeros_like(x), torch.zeros_like(x)
    )
    prior_bits = prior.flatten(1).sum(1) * to_bits

    terms = torch.zeros(b, schedule.T, dtype=torch.float32, device=x.device)
    gen_device = generator.device if generator is not None else x.device
    for step in range(schedule.T):
        t = torch.full((b,), step, dtype=torch.int64, device=x.device)
        eps = torch.randn(x.shape, generator=generator, device=gen_device).to(x.device)
        xt = q_sample(x, t, eps, schedule)
        x0_pred, _ = denoiser(xt, t)
        log_var = extract(log_var_table, t, x).expand_as(x)
        if step == 0:
            nats = -discretized_gaussian_log_likelihood(x, x0_pred, 0.5 * log_var)
        else:
            true_mean, true_var = q_posterior(x, xt, t, schedule)
            pred_mean, _ = q_posterior(x0_pred, xt, t, schedule)
            true_log_var = torch.log(true_var).expand_as(x)
            nats = normal_kl(true_mean, true_log_var, pred_mean, log_var)
        terms[:, step] = nats.flatten(1).sum(1) * to_bits
    return NLLResult(total=prior_bits + terms.sum(1), prior=prior_bits, terms=terms)
