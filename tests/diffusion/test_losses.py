"""The training loss: its Bayes-optimal value, its zero, and the min-SNR-γ weighting."""

from __future__ import annotations

import math

import pytest
import torch
from oracle import alpha_sigma, gaussian_data, gaussian_oracle

from diffusion.losses import LossConfig, snr_weight, training_loss
from diffusion.parameterization import PREDICTIONS, eps_from_x0, target
from diffusion.schedules import NoiseSchedule

SCHEDULE = NoiseSchedule.linear(1000)
Z = 4.0


@pytest.mark.parametrize("t", [0, 50, 200, 500, 999])
def test_bayes_optimal_eps_loss_equals_its_analytic_minimum(t):
    """For x₀ ~ N(m, s²) the exact ε̂ = E[ε | x_t] leaves E‖ε − ε̂‖² = α²s²/(α²s² + σ²) per dimension.

    Each squared error is that value times a χ²₁ variable (variance 2v²), so the mean over n·d
    entries has standard error v √(2/(n d))."""
    data = gaussian_data(channels=16)
    g = torch.Generator().manual_seed(t)
    n = 2000
    x0 = data.sample(n, g)
    ts = torch.full((n,), t, dtype=torch.int64)
    loss = training_loss(gaussian_oracle(data, SCHEDULE), x0, SCHEDULE, t=ts, generator=g)
    assert loss.shape == (n,)
    abar = SCHEDULE.alphas_cumprod[t].item()
    v = data.eps_loss_minimum(math.sqrt(abar), math.sqrt(1 - abar))
    stderr = v * math.sqrt(2 / (n * 16))
    assert abs(loss.mean().item() - v) <= Z * stderr


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_perfect_predictor_has_zero_loss(prediction):
    """A network that returns the true target (it is told x₀ and ε) has loss exactly 0."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 1, 4, 4, generator=g) * 2 - 1
    eps = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 1, 100, 500, 998, 999])

    def oracle(xt, t_in, labels):
        assert torch.equal(t_in, t)
        return target(prediction, x0, eps, t_in, SCHEDULE)

    for gamma in (None, 5.0):
        cfg = LossConfig(prediction=prediction, min_snr_gamma=gamma)
        loss = training_loss(oracle, x0, SCHEDULE, cfg, t=t, eps=eps)
        assert torch.equal(loss, torch.zeros(6))


def test_unweighted_loss_is_the_plain_mse():
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(4, 2, 3, 3, generator=g) * 2 - 1
    eps = torch.randn(x0.shape, generator=g)
    t = torch.tensor([3, 30, 300, 900])
    out = torch.randn(x0.shape, generator=g)
    for prediction in PREDICTIONS:
        loss = training_loss(lambda *a: out, x0, SCHEDULE, LossConfig(prediction), t=t, eps=eps)
        goal = target(prediction, x0, eps, t, SCHEDULE)
        torch.testing.assert_close(loss, ((out - goal) ** 2).mean((1, 2, 3)))


@pytest.mark.parametrize("gamma", [0.5, 5.0, 1e6])
def test_min_snr_weights_match_their_formulas(gamma):
    t = torch.arange(0, 1000, 37)
    snr = SCHEDULE.alphas_cumprod[t] / (1 - SCHEDULE.alphas_cumprod[t])
    clipped = torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64))
    like = torch.zeros(t.numel(), dtype=torch.float64)
    expected = {"eps": clipped / snr, "x0": clipped, "v": clipped / (snr + 1)}
    for prediction in PREDICTIONS:
        w = snr_weight(t, SCHEDULE, prediction, gamma, like)
        torch.testing.assert_close(w, expected[prediction], rtol=1e-12, atol=0)
    ones = torch.ones(t.numel(), dtype=torch.float64)
    assert torch.equal(snr_weight(t, SCHEDULE, "eps", None, like), ones)


@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_loss_is_the_same_objective_in_every_parameterization(gamma):
    """Hang et al. 2023: with min-SNR-γ weights every parameterization minimises
    min(SNR_t, γ) · ‖x₀ − x̂₀‖² (mean over pixels). Feed the same x̂₀ in each parameterization."""
    g = torch.Generator().manual_seed(2)
    t = torch.tensor([0, 5, 50, 150, 300, 600, 999])
    x0 = torch.rand(t.numel(), 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    alpha, sigma = alpha_sigma(SCHEDULE, t, x0)
    xt = alpha * x0 + sigma * eps

    def x0_hat(xt_in):  # some imperfect denoiser
        return 0.8 * torch.tanh(xt_in) + 0.05

    snr = (alpha / sigma) ** 2
    expected = snr.clamp(max=gamma).reshape(-1) * ((x0 - x0_hat(xt)) ** 2).mean((1, 2, 3))
    for prediction in PREDICTIONS:

        def model(xt_in, t_in, labels, prediction=prediction):
            x0_pred = x0_hat(xt_in)
            eps_pred = eps_from_x0(xt_in, t_in, x0_pred, SCHEDULE)
            return target(prediction, x0_pred, eps_pred, t_in, SCHEDULE)

        cfg = LossConfig(prediction=prediction, min_snr_gamma=gamma)
        loss = training_loss(model, x0, SCHEDULE, cfg, t=t, eps=eps)
        # the loss is accumulated in float32; in ε-space at t = T−1 the error α/σ·(x₀ − x̂₀) is
        # a difference of O(1) numbers ~100× smaller, so allow a few float32 ulps × 100
        torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=0)


def test_loss_config_rejects_bad_values():
    with pytest.raises(ValueError, match="prediction 'score' is unknown"):
        LossConfig(prediction="score")
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="min_snr_gamma must be > 0"):
            LossConfig(min_snr_gamma=bad)


def test_default_draws_come_from_the_generator():
    data = gaussian_data(channels=4)
    x0 = data.sample(8, torch.Generator().manual_seed(0))
    model = gaussian_oracle(data, SCHEDULE)
    a = training_loss(model, x0, SCHEDULE, generator=torch.Generator().manual_seed(5))
    b = training_loss(model, x0, SCHEDULE, generator=torch.Generator().manual_seed(5))
    c = training_loss(model, x0, SCHEDULE, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
