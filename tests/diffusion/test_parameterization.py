"""ε / x₀ / v: exact, mutually inverse conversions given x_t = α x₀ + σ ε (α² + σ² = 1)."""

from __future__ import annotations

import pytest
import torch

from diffusion.forward import q_sample
from diffusion.parameterization import (
    PREDICTIONS,
    eps_from_x0,
    target,
    to_x0_eps,
    v_from,
    x0_from_eps,
)
from diffusion.schedules import NoiseSchedule

SCHEDULES = {"linear": NoiseSchedule.linear(1000), "cosine": NoiseSchedule.cosine(1000)}
# Every kind of timestep: the first (σ ≈ 0.01), the middle, and the last (α ≈ 0.006 linear,
# ≈ 5e-5 cosine), where dividing by α or σ amplifies rounding the most.
T_VALUES = torch.tensor([0, 0, 1, 10, 250, 500, 750, 998, 999, 999])


def draws(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (T_VALUES.numel(), 2, 3, 3)
    x0 = torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(shape, generator=g, dtype=torch.float64)
    return x0, eps


def alpha_sigma(schedule):
    abar = schedule.alphas_cumprod[T_VALUES].reshape(-1, 1, 1, 1)
    return abar.sqrt(), (1 - abar).sqrt()


def tolerance(schedule):
    """float64 rounding (~1e-16) amplified by 1/α and 1/σ in the conversions."""
    alpha, sigma = alpha_sigma(schedule)
    amplification = float((1 / alpha).max() + (1 / sigma).max())
    return dict(rtol=1e-12, atol=1e-14 * amplification)


@pytest.mark.parametrize("name", SCHEDULES)
def test_eps_and_x0_conversions_are_inverse(name):
    s = SCHEDULES[name]
    x0, eps = draws()
    xt = q_sample(x0, T_VALUES, eps, s)
    torch.testing.assert_close(eps_from_x0(xt, T_VALUES, x0, s), eps, **tolerance(s))
    torch.testing.assert_close(x0_from_eps(xt, T_VALUES, eps, s), x0, **tolerance(s))
    # and the pair of maps are inverse for any (not only the true) prediction
    other = torch.randn(x0.shape, generator=torch.Generator().manual_seed(9), dtype=x0.dtype)
    back = eps_from_x0(xt, T_VALUES, x0_from_eps(xt, T_VALUES, other, s), s)
    torch.testing.assert_close(back, other, **tolerance(s))


@pytest.mark.parametrize("name", SCHEDULES)
def test_v_identities(name):
    """v = α ε − σ x₀ (Salimans & Ho 2022): x₀ = α x_t − σ v, ε = σ x_t + α v, and (x_t, v) is a
    rotation of (x₀, ε), so x_t² + v² = x₀² + ε² elementwise."""
    s = SCHEDULES[name]
    x0, eps = draws(1)
    xt = q_sample(x0, T_VALUES, eps, s)
    v = v_from(x0, eps, T_VALUES, s)
    alpha, sigma = alpha_sigma(s)
    torch.testing.assert_close(v, alpha * eps - sigma * x0, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(alpha * xt - sigma * v, x0, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(sigma * xt + alpha * v, eps, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(xt**2 + v**2, x0**2 + eps**2, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_target_and_to_x0_eps_round_trip(name, prediction):
    s = SCHEDULES[name]
    x0, eps = draws(2)
    xt = q_sample(x0, T_VALUES, eps, s)
    out = target(prediction, x0, eps, T_VALUES, s)
    x0_back, eps_back = to_x0_eps(prediction, out, xt, T_VALUES, s)
    torch.testing.assert_close(x0_back, x0, **tolerance(s))
    torch.testing.assert_close(eps_back, eps, **tolerance(s))
    # x_t = α x̂₀ + σ ε̂ holds for the decoded pair
    alpha, sigma = alpha_sigma(s)
    torch.testing.assert_close(alpha * x0_back + sigma * eps_back, xt, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_to_x0_eps_is_consistent_for_any_output(prediction):
    """Whatever the network outputs, the decoded (x̂₀, ε̂) satisfy x_t = α x̂₀ + σ ε̂, and encoding
    them back with ``target`` returns the output."""
    s = SCHEDULES["linear"]
    g = torch.Generator().manual_seed(3)
    xt = torch.randn(T_VALUES.numel(), 1, 4, 4, generator=g, dtype=torch.float64)
    out = torch.randn(xt.shape, generator=g, dtype=torch.float64)
    x0_hat, eps_hat = to_x0_eps(prediction, out, xt, T_VALUES, s)
    alpha, sigma = alpha_sigma(s)
    torch.testing.assert_close(alpha * x0_hat + sigma * eps_hat, xt, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        target(prediction, x0_hat, eps_hat, T_VALUES, s), out, **tolerance(s)
    )


def test_conversions_keep_dtype():
    s = SCHEDULES["cosine"]
    g = torch.Generator().manual_seed(4)
    xt, out = torch.randn(2, 3, 1, 2, 2, generator=g)
    t = torch.tensor([0, 10, 999])
    for prediction in PREDICTIONS:
        x0_hat, eps_hat = to_x0_eps(prediction, out, xt, t, s)
        assert x0_hat.dtype == eps_hat.dtype == torch.float32


def test_unknown_prediction_is_rejected():
    s = SCHEDULES["linear"]
    x = torch.zeros(1, 1)
    t = torch.zeros(1, dtype=torch.int64)
    with pytest.raises(ValueError, match="prediction 'score' is unknown; use one of eps, x0, v"):
        target("score", x, x, t, s)
    with pytest.raises(ValueError, match="prediction 'score' is unknown"):
        to_x0_eps("score", x, x, t, s)
