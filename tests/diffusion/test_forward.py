"""The forward process: the Markov chain q(x_t | x_{t−1}) and its closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion.forward import q_posterior, q_sample, q_step
from diffusion.schedules import NoiseSchedule

SCHEDULES = {"linear": NoiseSchedule.linear(1000), "cosine": NoiseSchedule.cosine(1000)}
Z = 4.5  # standard errors allowed; with a handful of checks per test, false alarms ≈ 1e-4


def full(t: int, n: int) -> torch.Tensor:
    return torch.full((n,), t, dtype=torch.int64)


@pytest.mark.parametrize("name", SCHEDULES)
def test_markov_chain_matches_closed_form(name):
    """Iterating q(x_s | x_{s−1}) for s = 0..t gives q(x_t | x₀) = N(√ᾱ_t x₀, (1 − ᾱ_t) I), checked
    along one chain at t = 0, 1, 10, 100, 999 (t = 0 is the first noising step)."""
    schedule = SCHEDULES[name]
    g = torch.Generator().manual_seed(len(name))
    n, d = 8000, 4  # ≤ 32768 elements: torch keeps the loop single-threaded
    x0 = torch.tensor([-1.0, -0.3, 0.5, 1.0], dtype=torch.float64).expand(n, d)
    checkpoints = {0, 1, 10, 100, 999}
    x = x0
    for t in range(max(checkpoints) + 1):
        x = q_step(x, full(t, n), torch.randn(n, d, generator=g, dtype=torch.float64), schedule)
        if t not in checkpoints:
            continue
        eps = torch.randn(n, d, generator=g, dtype=torch.float64)
        closed = q_sample(x0, full(t, n), eps, schedule)
        abar = schedule.alphas_cumprod[t].item()
        mean, var = math.sqrt(abar) * x0[0], 1 - abar
        for sample in (x, closed):
            # per-dimension means: standard error √(var/n)
            assert ((sample.mean(0) - mean).abs() <= Z * math.sqrt(var / n)).all(), t
            # pooled variance around the known mean: standard error var·√(2/(n d))
            pooled = ((sample - mean) ** 2).mean().item()
            assert abs(pooled - var) <= Z * var * math.sqrt(2 / (n * d)), t


@pytest.mark.parametrize("name", SCHEDULES)
def test_markov_chain_moments_exactly(name):
    """Noise-free version of the seed equation: the chain's mean and variance recursions
    m_t = √α_t m_{t−1}, v_t = α_t v_{t−1} + β_t give √ᾱ_t x₀ and 1 − ᾱ_t at every t."""
    schedule = SCHEDULES[name]
    x0 = torch.tensor([[0.7]], dtype=torch.float64)
    m, v = x0, 0.0
    for t in range(schedule.T):
        m = q_step(m, full(t, 1), torch.zeros_like(m), schedule)
        v = schedule.alphas[t].item() * v + schedule.betas[t].item()
        assert m.item() == pytest.approx(
            math.sqrt(schedule.alphas_cumprod[t].item()) * 0.7, rel=1e-9, abs=1e-15
        )
        assert v == pytest.approx(1 - schedule.alphas_cumprod[t].item(), rel=1e-9)


def test_first_step_of_chain_equals_closed_form():
    s = SCHEDULES["linear"]
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(8, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = full(0, 8)
    torch.testing.assert_close(
        q_step(x0, t, eps, s), q_sample(x0, t, eps, s), rtol=1e-12, atol=1e-14
    )


def test_last_latent_is_standard_normal():
    """With linear T = 1000, x_{T−1} ~ N(√ᾱ x₀, 1 − ᾱ) with ᾱ ≈ 4e-5: data at ±1 moves the mean by
    ≈ 0.006, below what 50 000 samples per sign can resolve (4.5 standard errors ≈ 0.02)."""
    s = SCHEDULES["linear"]
    n = 100_000
    g = torch.Generator().manual_seed(3)
    x0 = torch.tensor([-1.0, 1.0], dtype=torch.float64).repeat(n // 2).reshape(n, 1)
    xt = q_sample(x0, full(999, n), torch.randn(n, 1, generator=g, dtype=torch.float64), s)
    for sign in (-1, 1):
        x = xt[x0 == sign]
        m = x.numel()
        assert abs(x.mean().item()) <= Z / math.sqrt(m)
        assert abs(x.var().item() - 1) <= Z * math.sqrt(2 / m)


def bayes_posterior(x0: float, xt: float, t: int, s: NoiseSchedule) -> tuple[float, float]:
    """q(x_{t−1} | x_t, x₀) by Gaussian conditioning, in float64 scalars:
    prior x_{t−1} | x₀ ~ N(√ᾱ_{t−1} x₀, 1 − ᾱ_{t−1}),
    likelihood x_t | x_{t−1} ~ N(√α_t x_{t−1}, β_t).
    Precision-weighted: 1/v = 1/v_prior + α_t/β_t, m = v (m_prior/v_prior + √α_t x_t / β_t)."""
    abar_prev = s.alphas_cumprod_prev[t].item()
    alpha, beta = s.alphas[t].item(), s.betas[t].item()
    m_prior, v_prior = math.sqrt(abar_prev) * x0, 1 - abar_prev
    v = 1 / (1 / v_prior + alpha / beta)
    return v * (m_prior / v_prior + math.sqrt(alpha) * xt / beta), v


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("t", [1, 2, 10, 500, 999])
def test_posterior_is_bayes_rule(name, t):
    s = SCHEDULES[name]
    pairs = [(-1.0, 0.3), (0.25, -2.0), (0.9, 0.9), (0.0, 1.7)]
    x0 = torch.tensor([[p[0]] for p in pairs], dtype=torch.float64)
    xt = torch.tensor([[p[1]] for p in pairs], dtype=torch.float64)
    mean, var = q_posterior(x0, xt, full(t, len(pairs)), s)
    for i, (a, b) in enumerate(pairs):
        m_ref, v_ref = bayes_posterior(a, b, t, s)
        assert mean[i].item() == pytest.approx(m_ref, rel=1e-9, abs=1e-12)
        assert var[i].item() == pytest.approx(v_ref, rel=1e-9)


def test_posterior_at_first_step_is_the_data():
    s = SCHEDULES["linear"]
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64)
    xt = torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64)
    mean, var = q_posterior(x0, xt, full(0, 5), s)
    torch.testing.assert_close(mean, x0, rtol=1e-12, atol=1e-12)
    assert var.shape == (5, 1, 1, 1)
    assert bool((var == 0).all())


def test_posterior_float32_shapes():
    s = SCHEDULES["cosine"]
    x0, xt = torch.zeros(3, 1, 8, 8), torch.ones(3, 1, 8, 8)
    mean, var = q_posterior(x0, xt, torch.tensor([0, 5, 999]), s)
    assert mean.dtype == var.dtype == torch.float32
    assert mean.shape == x0.shape and var.shape == (3, 1, 1, 1)
