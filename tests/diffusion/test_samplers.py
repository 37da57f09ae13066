"""Samplers driven by exact denoisers reproduce the data distribution; their contracts.

Tolerances. Every sampler output here is a statistic of N i.i.d. samples of D independent
dimensions: a per-dimension mean has standard error s/√N, the sample std a relative standard
error 1/√(2N) (1/√(2ND) pooled over dimensions of equal s), a sign share p a standard error
√(p(1 − p)/(N D)). On top of that each sampler is allowed its discretisation bias, stated below;
the std biases were computed exactly for this Gaussian by propagating the (linear) sampler
updates' variance step by step (they are affine maps plus Gaussian noise):

    ddpm 1000, β̃: −1.25%   ddpm 1000, β: +0.3%   ddim/euler 50: −3.8%   ddim η=1 100: −4.1%
    dpmpp_2m 20: +1.45%    dpmpp_2m 10: +2.6%    heun 20: +1.5%         langevin: +1.6%

(the ODE samplers' errors shrink as 1/steps for DDIM/Euler and ~1/steps² for Heun and
DPM-Solver++(2M), as they should). Means additionally carry ≈ 1e-3 of bias because x_T is drawn
from N(0, I), not from q(x_{T−1}) = N(√ᾱ m, 1 − ᾱ + ᾱ s²).
"""

from __future__ import annotations

import math

import pytest
import torch
from oracle import CallCounter, gaussian_data, gaussian_oracle, two_point_oracle

from diffusion.denoiser import Denoiser, classifier_free_guidance
from diffusion.noise import SampleNoise
from diffusion.parameterization import PREDICTIONS, target
from diffusion.samplers import (
    SAMPLERS,
    SamplerConfig,
    get_sampler,
    network_evaluations,
    sample,
)
from diffusion.schedules import SPACINGS, NoiseSchedule, grid_timesteps

SCHEDULE = NoiseSchedule.linear(1000)
D = 32  # independent dimensions per sample
Z = 4.0  # standard errors allowed on pooled statistics
Z_MAX = 4.5  # on the largest of D per-dimension statistics (false alarm ≈ D · 7e-6)
MEAN_ALLOWANCE = 0.003


def case(cfg: SamplerConfig, n: int, allowance: float, *, slow: bool = False):
    marks = [pytest.mark.slow] if slow else []
    label = (
        f"{cfg.name}-{cfg.steps}"
        + (f"-eta{cfg.eta}" if cfg.eta else "")
        + (f"-{cfg.variance}" if cfg.name == "ddpm" else "")
    )
    return pytest.param(cfg, n, allowance, marks=marks, id=label)


# (sampler, samples, relative std allowance: 1.3–1.6 × the exact bias above, at least 1%)
GAUSSIAN_CASES = [
    case(SamplerConfig("ddpm"), 1000, 0.02, slow=True),
    case(SamplerConfig("ddpm", variance="beta"), 500, 0.01, slow=True),
    case(SamplerConfig("ddim", 50), 4000, 0.05),
    case(SamplerConfig("ddim", 100, eta=1.0), 1000, 0.055),
    case(SamplerConfig("dpmpp_2m", 20), 4000, 0.02),
    case(SamplerConfig("dpmpp_2m", 10), 4000, 0.035),
    case(SamplerConfig("dpmpp_2m_sde", 20), 4000, 0.05),  # measured +3.6% (3 seeds), +0.9% at 50
    case(SamplerConfig("euler", 50), 4000, 0.05),
    case(SamplerConfig("heun", 20), 4000, 0.02),
    case(SamplerConfig("langevin"), 1000, 0.025, slow=True),
]


@pytest.mark.parametrize(("cfg", "n", "std_allowance"), GAUSSIAN_CASES)
def test_gaussian_data_is_reproduced(cfg, n, std_allowance):
    data = gaussian_data(channels=D, s=0.3)
    den = Denoiser(gaussian_oracle(data, SCHEDULE), SCHEDULE, "eps", clip_x0=None)
    x = sample(den, (D, 1, 1), SampleNoise(0, range(n)), cfg).double().reshape(n, D)
    assert bool(torch.isfinite(x).all())

    mean_err = (x.mean(0) - data.m.reshape(D)).abs()
    assert float(mean_err.max()) <= Z_MAX * data.s / math.sqrt(n) + MEAN_ALLOWANCE

    rel_std = x.std(0) / data.s - 1
    # pooled over dimensions (all have the same s): the discretisation bias
    assert abs(float(rel_std.mean())) <= Z / math.sqrt(2 * n * D) + std_allowance
    # and no single dimension is off
    assert float(rel_std.abs().max()) <= Z_MAX / math.sqrt(2 * n) + std_allowance


COSINE = NoiseSchedule.cosine(1000)


@pytest.mark.parametrize(
    ("cfg", "std_allowance"),
    [
        (SamplerConfig("ddim", 50), 0.04),  # exact bias −2.85%
        (SamplerConfig("dpmpp_2m", 20), 0.04),  # +2.9%: the log-SNR grid bunches 7 of its 20
        # points into t = 993..999, where the clipped last β makes λ_{T−1} an outlier
        # Heun's first step is an Euler step: from t = T−1 σ̃ ≈ 2e4 on cosine, and a trapezoidal
        # correction over that jump inflated the std by ≈ +380% before (+0.8% now).
        (SamplerConfig("heun", 20), 0.04),
    ],
    ids=lambda v: f"{v.name}-{v.steps}" if isinstance(v, SamplerConfig) else None,
)
def test_gaussian_data_is_reproduced_on_cosine(cfg, std_allowance):
    n = 4000
    data = gaussian_data(channels=D, s=0.3)
    den = Denoiser(gaussian_oracle(data, COSINE), COSINE, "eps", clip_x0=None)
    x = sample(den, (D, 1, 1), SampleNoise(2, range(n)), cfg).double().reshape(n, D)
    mean_err = (x.mean(0) - data.m.reshape(D)).abs()
    assert float(mean_err.max()) <= Z_MAX * data.s / math.sqrt(n) + MEAN_ALLOWANCE
    rel_std = x.std(0) / data.s - 1
    assert abs(float(rel_std.mean())) <= Z / math.sqrt(2 * n * D) + std_allowance


# (sampler, samples, allowance on the share of +A when p ≠ ½: the ODE samplers move the
# decision boundary by their discretisation error; p = ½ is exact by symmetry)
MIXTURE_CASES = [
    case(SamplerConfig("ddpm"), 200, 0.01),
    case(SamplerConfig("ddim", 50), 2000, 0.01),
    case(SamplerConfig("ddim", 100, eta=1.0), 500, 0.01),
    case(SamplerConfig("dpmpp_2m", 20), 2000, 0.01),
    case(SamplerConfig("dpmpp_2m", 10), 2000, 0.02),
    case(SamplerConfig("dpmpp_2m_sde", 20), 1000, 0.02),
    case(SamplerConfig("euler", 50), 2000, 0.01),
    case(SamplerConfig("heun", 20), 2000, 0.01),
    case(SamplerConfig("langevin"), 200, 0.01),
]


@pytest.mark.parametrize("p_plus", [0.5, 0.75])
@pytest.mark.parametrize(("cfg", "n", "share_allowance"), MIXTURE_CASES)
def test_two_point_mixture_is_reproduced(cfg, n, share_allowance, p_plus):
    amplitude = 0.8
    den = Denoiser(two_point_oracle(amplitude, SCHEDULE, p_plus), SCHEDULE, "eps")
    x = sample(den, (D, 1, 1), SampleNoise(1, range(n)), cfg).double()
    # every value lands on one of the two points (x̂₀ at t = 0 saturates the tanh) ...
    off = ((x.abs() - amplitude).abs() > 0.01 * amplitude).double().mean().item()
    assert off <= 0.01
    # ... in the right proportions: a binomial share over n·D independent dimensions
    share = (x > 0).double().mean().item()
    allowance = 0.0 if p_plus == 0.5 else share_allowance
    assert abs(share - p_plus) <= Z * math.sqrt(p_plus * (1 - p_plus) / (n * D)) + allowance


# --- exact relations between samplers ---------------------------------------------------------


@pytest.mark.parametrize("spacing", SPACINGS)
def test_euler_is_ddim_with_eta_zero(spacing):
    """x̃ = x/α, dx̃/dσ̃ = ε̂: one Euler step gives x̃' = x̂₀ + σ̃' ε̂, i.e. DDIM's
    x' = α' x̂₀ + σ' ε̂. Run both in float64 from the same x_T."""
    data = gaussian_data(channels=4)
    den = Denoiser(gaussian_oracle(data, SCHEDULE), SCHEDULE, "eps")
    noise = SampleNoise(3, range(50), dtype=torch.float64)
    a = sample(den, (4, 2, 2), noise, SamplerConfig("euler", 25, spacing=spacing))
    b = sample(den, (4, 2, 2), noise, SamplerConfig("ddim", 25, spacing=spacing, eta=0.0))
    assert a.dtype == torch.float64
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpmpp_2m", "euler", "heun"])
def test_one_step_returns_the_first_x0_prediction(name):
    """With one grid point (t = T−1) every non-Langevin sampler jumps straight to x̂₀(x_T)."""
    data = gaussian_data(channels=4)
    den = Denoiser(gaussian_oracle(data, SCHEDULE), SCHEDULE, "eps")
    noise = SampleNoise(5, range(8), dtype=torch.float64)
    x_T = noise.initial((4, 1, 1))
    x0_pred, _ = den(x_T, torch.full((8,), SCHEDULE.T - 1))
    out = sample(den, (4, 1, 1), noise, SamplerConfig(name, 1))
    torch.testing.assert_close(out, x0_pred, rtol=1e-9, atol=1e-9)


def test_ddim_eta_one_is_ddpm_on_the_same_grid():
    """σ_t(η = 1)² = (1 − ᾱ_{t−1})/(1 − ᾱ_t) · (1 − ᾱ_t/ᾱ_{t−1}) = β̃_t of the respaced chain and
    the DDIM mean then equals μ̃_t(x_t, x̂₀); both draw their noise under the same step keys."""
    data = gaussian_data(channels=4)
    den = Denoiser(gaussian_oracle(data, SCHEDULE), SCHEDULE, "eps")
    noise = SampleNoise(4, range(16), dtype=torch.float64)
    a = sample(den, (4, 1, 1), noise, SamplerConfig("ddim", 30, eta=1.0, spacing="uniform"))
    b = sample(den, (4, 1, 1), noise, SamplerConfig("ddpm", 30, spacing="uniform"))
    torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-7)


# --- bookkeeping: NFE and callbacks -----------------------------------------------------------


SMALL_CONFIGS = [
    SamplerConfig("ddpm", 7),
    SamplerConfig("ddpm"),
    SamplerConfig("ddim", 9, eta=0.5),
    SamplerConfig("dpmpp_2m", 6),
    SamplerConfig("dpmpp_2m_sde", 6),
    SamplerConfig("euler", 5),
    SamplerConfig("heun", 6),
    SamplerConfig("langevin", 4, n_steps_each=3),
]


def small_schedule_denoiser(counter=None):
    schedule = NoiseSchedule.linear(100)
    model = gaussian_oracle(gaussian_data(channels=2), schedule)
    return Denoiser(counter(model) if counter else model, schedule, "eps")


@pytest.mark.parametrize("cfg", SMALL_CONFIGS, ids=lambda c: f"{c.name}-{c.steps}")
def test_network_evaluations_counts_calls(cfg):
    counter = None

    def wrap(model):
        nonlocal counter
        counter = CallCounter(model)
        return counter

    den = small_schedule_denoiser(wrap)
    steps = cfg.resolved_steps(den.schedule.T)
    sample(den, (2, 1, 1), SampleNoise(0, range(3)), cfg)
    assert counter.calls == network_evaluations(cfg.name, steps, **cfg.options())


def test_langevin_without_final_denoise_saves_one_call():
    assert network_evaluations("langevin", 4, n_steps_each=3, final_denoise=False) == 12
    assert network_evaluations("langevin", 4, n_steps_each=3) == 13
    assert network_evaluations("heun", 6) == 10  # Euler first and last steps


@pytest.mark.parametrize("cfg", SMALL_CONFIGS, ids=lambda c: f"{c.name}-{c.steps}")
def test_callback_once_per_grid_point(cfg):
    den = small_schedule_denoiser()
    steps = cfg.resolved_steps(den.schedule.T)
    spacing = cfg.options().get("spacing") or get_sampler(cfg.name).__kwdefaults__["spacing"]
    calls = []
    sample(
        den,
        (2, 1, 1),
        SampleNoise(0, range(3)),
        cfg,
        callback=lambda i, t, x, x0: calls.append((i, t, tuple(x.shape), tuple(x0.shape))),
    )
    grid = grid_timesteps(den.schedule, steps, spacing)
    assert [c[0] for c in calls] == list(reversed(range(steps)))
    assert [c[1] for c in calls] == list(reversed(grid))
    assert all(c[2] == c[3] == (3, 2, 1, 1) for c in calls)


# --- configuration ----------------------------------------------------------------------------


def test_sampler_config_validation():
    with pytest.raises(ValueError, match="sampler 'plms' is unknown; choose one of ddim, ddpm"):
        SamplerConfig("plms")
    with pytest.raises(ValueError, match="spacing 'cubic' is unknown"):
        SamplerConfig("ddim", spacing="cubic")
    with pytest.raises(ValueError, match="steps must be >= 1"):
        SamplerConfig("ddim", steps=0)
    with pytest.raises(ValueError, match="steps must be between 1 and T=100, got 101"):
        SamplerConfig("ddim", steps=101).resolved_steps(100)
    assert SamplerConfig("dpmpp_2m").resolved_steps(10) == 10  # default 20, capped at T
    assert SamplerConfig("ddpm").resolved_steps(321) == 321


def test_get_sampler_lists_valid_names():
    with pytest.raises(ValueError) as err:
        get_sampler("k_lms")
    for name in SAMPLERS:
        assert name in str(err.value)


def test_sampler_options_are_validated():
    den = small_schedule_denoiser()
    noise = SampleNoise(0, range(2))
    x = noise.initial((2, 1, 1))
    with pytest.raises(ValueError, match="variance must be"):
        get_sampler("ddpm")(den, x, noise, steps=5, variance="learned")
    with pytest.raises(ValueError, match="eta must be >= 0"):
        get_sampler("ddim")(den, x, noise, steps=5, eta=-0.1)
    with pytest.raises(ValueError, match="step_size"):
        get_sampler("langevin")(den, x, noise, steps=5, step_size=2.5)


# --- guidance and the denoiser ----------------------------------------------------------------


NULL = 9


def toy_conditional(xt, t, labels):
    """An output that depends on the label in a non-trivial way."""
    lab = labels.to(xt.dtype).reshape(-1, *([1] * (xt.ndim - 1)))
    return xt * (1 + 0.1 * lab) + torch.sin(lab) + 0.001 * t.to(xt.dtype).reshape_as(lab)


def test_classifier_free_guidance_is_linear_in_the_scale():
    g = torch.Generator().manual_seed(0)
    xt = torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 10, 50, 99, 3])
    labels = torch.tensor([0, 3, 7, 2, 1])
    cond = toy_conditional(xt, t, labels)
    uncond = toy_conditional(xt, t, torch.full_like(labels, NULL))
    assert not torch.allclose(cond, uncond)

    def guided(scale):
        return classifier_free_guidance(toy_conditional, scale, NULL)(xt, t, labels)

    torch.testing.assert_close(guided(1.0), cond, rtol=0, atol=0)
    torch.testing.assert_close(guided(0.0), uncond, rtol=1e-12, atol=1e-12)
    for w in (-0.5, 2.0, 7.5):
        torch.testing.assert_close(guided(w), uncond + w * (cond - uncond), rtol=1e-12, atol=1e-12)
    # rows already at the null class are unguided, and no labels means the plain model
    null_rows = torch.full_like(labels, NULL)
    out = classifier_free_guidance(toy_conditional, 3.0, NULL)(xt, t, null_rows)
    torch.testing.assert_close(out, uncond, rtol=1e-12, atol=1e-12)
    plain = classifier_free_guidance(lambda x, tt, lab: 2 * x, 3.0, NULL)(xt, t, None)
    torch.testing.assert_close(plain, 2 * xt)


def test_guided_sampling_runs_with_labels():
    schedule = NoiseSchedule.linear(100)
    guided = classifier_free_guidance(toy_conditional, 2.0, NULL)
    den = Denoiser(guided, schedule, "eps", labels=torch.tensor([1, 2, 3]))
    x = sample(den, (1, 2, 2), SampleNoise(0, range(3)), SamplerConfig("dpmpp_2m", 5))
    assert x.shape == (3, 1, 2, 2) and bool(torch.isfinite(x).all())
    assert float(x.abs().max()) <= 1.0  # clip_x0 = 1 by default


def test_denoiser_clips_x0_and_keeps_eps_consistent():
    schedule = NoiseSchedule.linear(1000)
    g = torch.Generator().manual_seed(1)
    xt = 3 * torch.randn(6, 1, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 10, 200, 500, 900, 999])
    abar = schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    model = lambda x, tt, lab: 2.5 * torch.tanh(x)  # noqa: E731  (x̂₀ beyond ±1)
    for clip in (1.0, 0.5):
        x0, eps = Denoiser(model, schedule, "x0", clip_x0=clip)(xt, t)
        assert float(x0.abs().max()) <= clip
        torch.testing.assert_close(x0, (2.5 * torch.tanh(xt)).clamp(-clip, clip))
        torch.testing.assert_close(alpha * x0 + sigma * eps, xt, rtol=1e-12, atol=1e-12)
    x0, _ = Denoiser(model, schedule, "x0", clip_x0=None)(xt, t)
    assert float(x0.abs().max()) > 1.0


def test_denoiser_is_the_same_in_every_parameterization():
    schedule = NoiseSchedule.cosine(200)
    g = torch.Generator().manual_seed(2)
    xt = torch.randn(4, 2, 2, 2, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 50, 150, 199])
    data = gaussian_data(channels=2)
    eps_model = gaussian_oracle(data, schedule)
    ref_x0, ref_eps = Denoiser(eps_model, schedule, "eps", clip_x0=None)(xt, t)
    for prediction in PREDICTIONS:
        out = target(prediction, ref_x0, ref_eps, t, schedule)
        x0, eps = Denoiser(lambda *a, out=out: out, schedule, prediction, clip_x0=None)(xt, t)
        torch.testing.assert_close(x0, ref_x0, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(eps, ref_eps, rtol=1e-9, atol=1e-9)


def test_dpmpp_2m_sde_with_eta_zero_is_the_ode_solver():
    den = small_schedule_denoiser()
    noise = SampleNoise(3, range(5))
    a = sample(den, (2, 1, 1), noise, SamplerConfig("dpmpp_2m_sde", 8, eta=0.0))
    b = sample(den, (2, 1, 1), noise, SamplerConfig("dpmpp_2m", 8))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="eta must be >= 0"):
        sample(den, (2, 1, 1), noise, SamplerConfig("dpmpp_2m_sde", 8, eta=-1.0))
