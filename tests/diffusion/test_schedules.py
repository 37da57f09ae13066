"""Noise schedules: the published formulas, the derived tables' definitions, respacing."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from diffusion.schedules import (
    SPACINGS,
    NoiseSchedule,
    ScheduleConfig,
    extract,
    grid_timesteps,
    spaced_timesteps,
)

KINDS = ("linear", "cosine", "sigmoid")
TABLES = (
    "betas",
    "alphas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "snr",
)


def build(kind: str, T: int) -> NoiseSchedule:
    return ScheduleConfig(kind=kind, T=T).build()


# --- the published schedules ------------------------------------------------------------------


def test_linear_defaults_are_ho_et_al():
    s = NoiseSchedule.linear(1000)
    assert s.betas.dtype == torch.float64
    assert s.betas[0].item() == pytest.approx(1e-4, rel=1e-12)
    assert s.betas[-1].item() == pytest.approx(0.02, rel=1e-12)
    steps = s.betas.diff()
    step = (0.02 - 1e-4) / 999
    torch.testing.assert_close(steps, torch.full_like(steps, step), rtol=1e-9, atol=0)


def test_linear_ends_near_pure_noise():
    # ᾱ_{T−1} = ∏(1 − β_t) ≈ exp(−Σβ) ≈ exp(−10.05) ≈ 4e-5: x_{T−1} is N(0, I) to 4 decimals.
    abar = NoiseSchedule.linear(1000).alphas_cumprod[-1].item()
    assert abar < 1e-4
    betas = (1e-4 + i * (0.02 - 1e-4) / 999 for i in range(1000))
    assert abar == pytest.approx(math.prod(1 - b for b in betas))


@pytest.mark.parametrize("T", [10, 1000, 4000])
def test_cosine_matches_nichol_dhariwal(T):
    s_off = 0.008

    def f(t: float) -> float:
        return math.cos((t / T + s_off) / (1 + s_off) * math.pi / 2) ** 2

    sched = NoiseSchedule.cosine(T)
    # The table index t is the paper's t + 1 (t = 0 is the first noising step): ᾱ_t = f(t+1)/f(0),
    # exactly until the clipping of β at 0.999 kicks in.
    unclipped = [t for t in range(T) if 1 - f(t + 1) / f(t) < 0.999]
    expected = torch.tensor([f(t + 1) / f(0) for t in unclipped], dtype=torch.float64)
    torch.testing.assert_close(sched.alphas_cumprod[unclipped], expected, rtol=1e-10, atol=0)
    assert len(unclipped) >= T - 1
    assert sched.betas.max().item() <= 0.999


@pytest.mark.parametrize("T", [10, 1000])
def test_sigmoid_is_monotone_between_its_ends(T):
    s = NoiseSchedule.sigmoid(T)
    assert bool((s.betas.diff() > 0).all())
    scale = 1000 / T
    assert 1e-4 * scale < s.betas[0].item() < s.betas[-1].item() < min(0.02 * scale, 0.999)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", [1, 2, 10, 4000])
def test_any_T_gives_full_tables(kind, T):
    s = build(kind, T)
    assert s.T == T
    for name in TABLES:
        table = getattr(s, name)
        assert table.shape == (T,), name
        assert table.dtype == torch.float64, name
        assert bool(torch.isfinite(table).all()), name
    assert torch.equal(s.timesteps, torch.arange(T))
    # ᾱ strictly decreasing inside (0, 1): every step adds noise
    assert bool((s.alphas_cumprod > 0).all()) and bool((s.alphas_cumprod < 1).all())
    assert bool((s.alphas_cumprod.diff() < 0).all())


# --- derived tables equal their definitions ---------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_derived_tables_match_definitions(kind):
    T = 50
    s = build(kind, T)
    beta = s.betas.tolist()
    abar, prev = [], []
    running = 1.0
    for b in beta:
        prev.append(running)
        running *= 1 - b
        abar.append(running)

    def close(name, values):
        torch.testing.assert_close(
            getattr(s, name),
            torch.tensor(values, dtype=torch.float64),
            rtol=1e-9,
            atol=1e-15,
            msg=name,
        )

    close("alphas", [1 - b for b in beta])
    close("alphas_cumprod", abar)
    close("alphas_cumprod_prev", prev)
    close("snr", [a / (1 - a) for a in abar])
    tilde = [b * (1 - p) / (1 - a) for b, p, a in zip(beta, prev, abar, strict=True)]
    close("posterior_variance", tilde)
    close("posterior_log_variance_clipped", [math.log(tilde[1])] + [math.log(v) for v in tilde[1:]])
    close(
        "posterior_mean_coef1",
        [b * math.sqrt(p) / (1 - a) for b, p, a in zip(beta, prev, abar, strict=True)],
    )
    close(
        "posterior_mean_coef2",
        [(1 - p) * math.sqrt(1 - b) / (1 - a) for b, p, a in zip(beta, prev, abar, strict=True)],
    )
    # t = 0: the previous latent is the data itself
    assert s.alphas_cumprod_prev[0].item() == 1.0
    assert s.posterior_variance[0].item() == 0.0
    assert s.posterior_mean_coef1[0].item() == pytest.approx(1.0, abs=1e-12)
    assert s.posterior_mean_coef2[0].item() == 0.0


def test_posterior_variance_lies_between_zero_and_beta():
    # β̃_t = β_t (1 − ᾱ_{t−1})/(1 − ᾱ_t) < β_t since ᾱ_t < ᾱ_{t−1}
    s = NoiseSchedule.linear(1000)
    assert bool((s.posterior_variance[1:] > 0).all())
    assert bool((s.posterior_variance < s.betas).all())


# --- respacing --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_respace_keeps_alphas_cumprod_at_kept_steps(kind):
    s = build(kind, 1000)
    kept = [0, 3, 10, 250, 251, 700, 999]
    r = s.respace(kept)
    assert len(kept) == r.T
    assert torch.equal(r.timesteps, torch.tensor(kept))
    # β' = 1 − ᾱ_τ/ᾱ_τ' is stored, so 1 − β' carries an absolute float64 error of ~1e-16: near
    # ᾱ ≈ 0 (cosine, t = T−1: ᾱ ≈ 2e-9) the error is absolute, not relative.
    torch.testing.assert_close(r.alphas_cumprod, s.alphas_cumprod[kept], rtol=1e-12, atol=1e-16)
    torch.testing.assert_close(r.snr, s.snr[kept], rtol=1e-12, atol=1e-16)


def test_respace_composes():
    s = NoiseSchedule.linear(1000)
    first = torch.tensor([0, 5, 17, 100, 300, 301, 640, 900, 999])
    second = torch.tensor([1, 2, 4, 6, 8])
    twice = s.respace(first).respace(second)
    once = s.respace(first[second])
    assert torch.equal(twice.timesteps, once.timesteps)
    assert torch.equal(twice.timesteps, first[second])
    for name in TABLES:
        torch.testing.assert_close(
            getattr(twice, name), getattr(once, name), rtol=1e-10, atol=1e-15, msg=name
        )


def test_respace_everything_is_identity():
    s = NoiseSchedule.cosine(100)
    r = s.respace(range(100))
    torch.testing.assert_close(r.betas, s.betas, rtol=1e-10, atol=0)
    assert torch.equal(r.timesteps, s.timesteps)


@pytest.mark.parametrize("bad", [[3, 3, 5], [5, 2], [-1, 4], [0, 1000], []])
def test_respace_rejects_bad_indices(bad):
    with pytest.raises(ValueError, match="respace"):
        NoiseSchedule.linear(1000).respace(bad)


# --- sampling grids ---------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", [10, 1000])
def test_grid_timesteps_are_a_valid_grid(spacing, kind, T):
    s = build(kind, T)
    for steps in sorted({1, 2, 3, 10, T}):
        ts = grid_timesteps(s, steps, spacing)
        assert len(ts) == steps
        assert ts[-1] == T - 1
        if steps > 1:
            assert ts[0] == 0
            assert all(b > a for a, b in itertools.pairwise(ts))
        if steps == T:
            assert ts == list(range(T))


@pytest.mark.parametrize(("T", "steps"), [(1000, 4), (1000, 7), (1000, 50), (37, 5), (10, 9)])
def test_uniform_grid_is_the_nearest_integer_to_even_spacing(T, steps):
    ts = spaced_timesteps(T, steps)
    ideal = [i * (T - 1) / (steps - 1) for i in range(steps)]
    assert all(abs(a - b) <= 0.5 for a, b in zip(ts, ideal, strict=True))
    assert ts == grid_timesteps(NoiseSchedule.linear(T), steps, "uniform")


def test_logsnr_grid_is_even_in_lambda():
    s = NoiseSchedule.linear(1000)
    ts = grid_timesteps(s, 20, "logsnr")
    lam = 0.5 * torch.log(s.snr[ts])
    gaps = -lam.diff()
    # nearest-integer t: each λ is within half a step of λ on its side of the ideal grid
    local = (0.5 * torch.log(s.snr)).diff().abs().max()
    assert float((gaps - gaps.mean()).abs().max()) < float(local)


@pytest.mark.parametrize("spacing", SPACINGS)
def test_grid_rejects_too_many_steps(spacing):
    s = NoiseSchedule.linear(10)
    with pytest.raises(ValueError, match="steps must be between 1 and T=10"):
        grid_timesteps(s, 11, spacing)
    with pytest.raises(ValueError, match="steps"):
        grid_timesteps(s, 0, spacing)


def test_grid_rejects_unknown_spacing():
    with pytest.raises(ValueError, match="spacing 'cubic' is unknown"):
        grid_timesteps(NoiseSchedule.linear(10), 3, "cubic")


def test_spaced_maps_to_training_timesteps():
    s = NoiseSchedule.linear(1000)
    r = s.spaced(10, "quadratic")
    assert r.timesteps.tolist() == grid_timesteps(s, 10, "quadratic")


# --- serialisation and validation -------------------------------------------------------------


@pytest.mark.parametrize(
    "schedule", [NoiseSchedule.cosine(37), NoiseSchedule.linear(1000).spaced(7)]
)
def test_dict_round_trip_is_exact(schedule):
    back = NoiseSchedule.from_dict(json.loads(json.dumps(schedule.to_dict())))
    for name in (*TABLES, "timesteps"):
        assert torch.equal(getattr(back, name), getattr(schedule, name)), name


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="T must be"):
        ScheduleConfig(T=0)
    with pytest.raises(ValueError, match="T must be a positive integer"):
        NoiseSchedule.linear(0)
    with pytest.raises(ValueError, match="T must be a positive integer"):
        NoiseSchedule.cosine(-3)
    with pytest.raises(ValueError, match="kind 'quadratic' is unknown"):
        ScheduleConfig(kind="quadratic")
    with pytest.raises(ValueError, match="beta_start"):
        ScheduleConfig(beta_start=0.1, beta_end=0.01)
    with pytest.raises(ValueError, match="beta must lie in"):
        NoiseSchedule([0.1, 0.0])
    with pytest.raises(ValueError, match="non-empty"):
        NoiseSchedule([])
    with pytest.raises(ValueError, match="timesteps must have length 2"):
        NoiseSchedule([0.1, 0.2], timesteps=torch.tensor([0, 1, 2]))


# --- extract ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_extract_broadcasts_and_casts(dtype):
    s = NoiseSchedule.linear(1000)
    x = torch.zeros(3, 2, 4, 5, dtype=dtype)
    t = torch.tensor([0, 500, 999])
    out = extract(s.alphas_cumprod, t, x)
    assert out.shape == (3, 1, 1, 1)
    assert out.dtype == dtype
    assert torch.equal(out.flatten(), s.alphas_cumprod[t].to(dtype))
    assert (x + out).shape == x.shape


def test_extract_rejects_mismatched_t():
    s = NoiseSchedule.linear(10)
    with pytest.raises(ValueError, match="one entry per batch element"):
        extract(s.betas, torch.tensor([0, 1]), torch.zeros(3, 1))
