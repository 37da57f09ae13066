"""The variational bound in bits/dim: its Gaussian pieces and a model whose bound is known."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion.denoiser import Denoiser
from diffusion.likelihood import (
    NLLResult,
    discretized_gaussian_log_likelihood,
    nll_bits_per_dim,
    normal_kl,
    uint8_to_unit,
)
from diffusion.schedules import NoiseSchedule

# --- Gaussian pieces --------------------------------------------------------------------------


def test_normal_kl_of_equal_gaussians_is_zero():
    mean = torch.linspace(-3, 3, 7, dtype=torch.float64)
    logvar = torch.linspace(-9, 2, 7, dtype=torch.float64)
    assert torch.equal(normal_kl(mean, logvar, mean, logvar), torch.zeros(7, dtype=torch.float64))


@pytest.mark.parametrize(
    ("m1", "s1", "m2", "s2"), [(0.0, 1.0, 0.0, 2.0), (1.5, 0.1, -0.5, 0.7), (0.0, 3.0, 0.2, 0.01)]
)
def test_normal_kl_matches_closed_form(m1, s1, m2, s2):
    # KL(N(μ₁, σ₁²) ‖ N(μ₂, σ₂²)) = log(σ₂/σ₁) + (σ₁² + (μ₁ − μ₂)²)/(2σ₂²) − ½
    expected = math.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    kl = normal_kl(t(m1), t(2 * math.log(s1)), t(m2), t(2 * math.log(s2)))
    assert kl.item() == pytest.approx(expected, rel=1e-12)
    assert kl.item() > 0


BIN_CENTRES64 = torch.arange(256, dtype=torch.float64) / 127.5 - 1


@pytest.mark.parametrize("scale", [1e-6, 1e-4, 1e-2, 0.1, 1.0, 3.0])
@pytest.mark.parametrize("mean", [-3.0, -1.0, -0.3, 0.0, 1 / 255, 0.5, 1.0, 2.5])
def test_discretized_likelihood_is_a_distribution_over_256_bins(mean, scale):
    """The 256 bins (the outer two extended to ±∞) partition ℝ, so the probabilities sum to 1.

    Adjacent bins share an edge x_k + 1/255 = x_{k+1} − 1/255 only up to rounding δ of the bin
    centres, which moves probability by ≈ φ·δ/scale at the edges near the mean:
    δ ≈ 1e-16 in float64 and ≈ 6e-8 for the float32 centres of ``uint8_to_unit``. In float32,
    Φ(b) − Φ(a) is also computed as Φ(b)(1 − e^{log Φ(a) − log Φ(b)}), which loses ≈ ε₃₂·Φ/p
    relative accuracy on a bin of probability p (≈ 1e-4 for the widest scale here)."""
    for centres, delta, floor in (
        (BIN_CENTRES64, 1e-16, 1e-12),
        (uint8_to_unit(torch.arange(256, dtype=torch.uint8)), 6e-8, 1e-4),
    ):
        logp = discretized_gaussian_log_likelihood(
            centres,
            torch.tensor(mean, dtype=centres.dtype),
            torch.tensor(math.log(scale), dtype=centres.dtype),
        )
        assert bool(torch.isfinite(logp).all())
        assert bool((logp <= 0).all())
        total = logp.double().exp().sum().item()
        assert total == pytest.approx(1.0, abs=floor + 2 * delta / scale)


def test_discretized_likelihood_matches_normal_cdf():
    mean, scale = 0.1, 0.05
    x = BIN_CENTRES64[[0, 100, 140, 255]]
    logp = discretized_gaussian_log_likelihood(
        x,
        torch.tensor(mean, dtype=torch.float64),
        torch.tensor(math.log(scale), dtype=torch.float64),
    )
    cdf = lambda z: 0.5 * math.erfc(-z / math.sqrt(2))  # noqa: E731  (exact in the left tail)
    h = 1 / 255
    expected = [
        cdf((-1 + h - mean) / scale),  # first bin: (−∞, −1 + 1/255], ≈ 1e-107
        cdf((x[1].item() + h - mean) / scale) - cdf((x[1].item() - h - mean) / scale),
        cdf((x[2].item() + h - mean) / scale) - cdf((x[2].item() - h - mean) / scale),
        cdf(-(1 - h - mean) / scale),  # last bin: [1 − 1/255, ∞), by symmetry, ≈ 1e-72
    ]
    for got, want in zip(logp.tolist(), expected, strict=True):
        assert got == pytest.approx(math.log(want), rel=1e-9)


def test_uint8_to_unit():
    x = uint8_to_unit(torch.tensor([0, 255, 128], dtype=torch.uint8))
    assert x.dtype == torch.float32
    assert x.tolist() == pytest.approx([-1.0, 1.0, 128 / 127.5 - 1], abs=1e-7)
    for bad in (torch.tensor([0.0, 1.0]), torch.tensor([0, 255], dtype=torch.int32)):
        with pytest.raises(TypeError, match="expected uint8 pixels"):
            uint8_to_unit(bad)


# --- the bound of a model that knows the data -------------------------------------------------


def cheating_denoiser(x_uint8: torch.Tensor, schedule: NoiseSchedule) -> Denoiser:
    """Predicts the true x₀ at every t: then p_θ(x_{t−1} | x_t) has q's posterior mean."""
    x0 = uint8_to_unit(x_uint8)
    return Denoiser(lambda xt, t, labels: x0, schedule, "x0")


def images(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (3, 2, 4, 4), generator=g, dtype=torch.uint8)
    x[0, 0, 0, :2] = torch.tensor([0, 255], dtype=torch.uint8)  # edge bins present
    return x


def decoder_bits(x_uint8: torch.Tensor, std: float) -> torch.Tensor:
    """−log₂ P(x | mean = x) per image and dim, from the normal CDF written with math.erf:
    interior bins hold erf(h/(std√2)), the two outer ones ½(1 + erf(h/(std√2))), h = 1/255."""
    p_mid = math.erf((1 / 255) / (std * math.sqrt(2)))
    p_edge = 0.5 * (1 + p_mid)
    out = []
    for img in x_uint8:
        values = img.flatten().tolist()
        nats = sum(-math.log(p_edge if v in (0, 255) else p_mid) for v in values)
        out.append(nats / (len(values) * math.log(2)))
    return torch.tensor(out)


def test_bound_of_the_true_x0_predictor():
    schedule = NoiseSchedule.linear(50)
    x = images()
    res = nll_bits_per_dim(
        cheating_denoiser(x, schedule), x, generator=torch.Generator().manual_seed(0)
    )
    assert res.terms.shape == (3, 50) and res.total.shape == res.prior.shape == (3,)
    # every L_t, t ≥ 1, is KL(q(x_{t−1}|x_t,x₀) ‖ N(μ̃(x_t, x₀), β̃_t)) = 0 up to float32 rounding
    assert float(res.terms[:, 1:].abs().max()) < 1e-6
    # so the bound is the prior plus the decoder, the latter at std √β̃₁ around the true pixel
    std = math.sqrt(schedule.posterior_variance[1].item())
    torch.testing.assert_close(
        res.terms[:, 0].double(), decoder_bits(x, std).double(), rtol=1e-5, atol=0
    )
    torch.testing.assert_close(res.total, res.prior + res.terms[:, 0], rtol=1e-6, atol=1e-6)
    assert bool((res.total > 0).all())


def test_bound_with_beta_variance_adds_the_variance_mismatch():
    """With Σ_t = β_t the mean is still exact, so L_t = KL(N(μ, β̃_t) ‖ N(μ, β_t)) per dimension:
    ½(log(β_t/β̃_t) + β̃_t/β_t − 1), independent of the data."""
    schedule = NoiseSchedule.linear(50)
    x = images(1)
    res = nll_bits_per_dim(
        cheating_denoiser(x, schedule),
        x,
        variance="beta",
        generator=torch.Generator().manual_seed(0),
    )
    beta, tilde = schedule.betas[1:], schedule.posterior_variance[1:]
    per_dim = 0.5 * (torch.log(beta / tilde) + tilde / beta - 1) / math.log(2)
    torch.testing.assert_close(
        res.terms[:, 1:].double(), per_dim.expand(3, -1), rtol=1e-4, atol=1e-7
    )
    std = math.sqrt(schedule.betas[0].item())
    torch.testing.assert_close(
        res.terms[:, 0].double(), decoder_bits(x, std).double(), rtol=1e-5, atol=0
    )


def test_prior_term_is_negligible_for_linear_1000():
    """KL(N(√ᾱ x, 1 − ᾱ) ‖ N(0, 1)) ≈ ½ ᾱ x² + ¼ ᾱ² per dim with ᾱ ≈ 4e-5: < 3e-5 bits/dim.

    The package computes it in float32, where −1 + e^{log(1−ᾱ)} cancels: absolute error of a few
    ε₃₂ ≈ 1e-7 nats per dimension."""
    schedule = NoiseSchedule.linear(1000)
    x = images(2)[:1]
    res = nll_bits_per_dim(
        cheating_denoiser(x, schedule), x, generator=torch.Generator().manual_seed(0)
    )
    assert 0 < res.prior.item() < 1e-4
    abar = schedule.alphas_cumprod[-1].item()
    unit = uint8_to_unit(x).double()
    kl = 0.5 * (-math.log1p(-abar) - abar + abar * unit**2)
    expected = kl.mean().item() / math.log(2)
    assert res.prior.item() == pytest.approx(expected, abs=5e-7)


def test_generator_makes_the_bound_reproducible():
    schedule = NoiseSchedule.linear(20)
    x = images(3)
    model = Denoiser(lambda xt, t, labels: 0.5 * xt, schedule, "x0")
    a = nll_bits_per_dim(model, x, generator=torch.Generator().manual_seed(4))
    b = nll_bits_per_dim(model, x, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.total, b.total)
    # every term is a KL or a −log P, so ≥ 0 up to float32 rounding: a dimension's KL is
    # ½(S − 1), S the float32 sum near 1 of Δlog σ², e^{−Δlog σ²} and the mean term. Where the
    # KL is ~0 (the last steps here: 2e-8 bits/dim) exp's last bit (vectorised kernels promise
    # 1 ulp) and the two roundings can leave S up to 2 steps of ε₃₂/2 below 1: KL ≥ −ε₃₂/2 nats,
    # −ε₃₂/(2 ln 2) bits per dimension, and so per image. (An exp one ulp low gives −2.1e-8.)
    floor = -torch.finfo(torch.float32).eps / (2 * math.log(2))
    assert bool((a.terms >= floor).all()), float(a.terms.min())


def test_nll_rejects_unknown_variance():
    schedule = NoiseSchedule.linear(5)
    x = images()
    with pytest.raises(ValueError, match="variance must be 'beta_tilde' or 'beta'"):
        nll_bits_per_dim(cheating_denoiser(x, schedule), x, variance="learned")


def test_mean_and_stderr():
    total = torch.tensor([1.0, 2.0, 3.0, 6.0])
    res = NLLResult(total=total, prior=torch.zeros(4), terms=torch.zeros(4, 1))
    mean, stderr = res.mean_and_stderr()
    assert mean == pytest.approx(3.0)
    sd = math.sqrt(sum((v - 3.0) ** 2 for v in (1, 2, 3, 6)) / 3)
    assert stderr == pytest.approx(sd / 2)
    one = NLLResult(total=torch.tensor([2.5]), prior=torch.zeros(1), terms=torch.zeros(1, 1))
    m1, s1 = one.mean_and_stderr()
    assert m1 == 2.5 and math.isnan(s1)
