"""Noise schedules β_1..β_T and every table derived from them.

Time convention (the only one in this package): an integer ``t`` in ``0..T-1`` indexes the
tables, and ``t = 0`` is the *first* noising step. So ``alphas_cumprod[t]`` is ᾱ after t+1 steps,
i.e. the paper's ᾱ_{t+1} (Ho et al. 2020 count from 1). ``alphas_cumprod_prev[0] = 1``: the
step before the first one is clean data.

All tables are computed and stored in float64; :func:`extract` casts to the dtype of the tensor
they multiply, at lookup.

A *respaced* schedule (Nichol & Dhariwal 2021, §4) keeps a subset ``timesteps`` of the original
steps and recomputes β so that ᾱ at the kept steps is unchanged:
β'_i = 1 − ᾱ_{τ_i} / ᾱ_{τ_{i−1}}. ``timesteps[i]`` is the original index the network was trained
on, and it is what a sampler passes to the network.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

ScheduleKind = Literal["linear", "cosine", "sigmoid"]
Spacing = Literal["uniform", "quadratic", "logsnr"]
SPACINGS: tuple[str, ...] = ("uniform", "quadratic", "logsnr")


@dataclass(frozen=True)
class ScheduleConfig:
    """What defines a schedule; ``build()`` turns it into a :class:`NoiseSchedule`."""

    kind: ScheduleKind = "linear"
    T: int = 1000
    beta_start: float = 1e-4  # linear and sigmoid
    beta_end: float = 0.02  # linear and sigmoid
    s: float = 0.008  # cosine offset
    max_beta: float = 0.999  # cosine clipping

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "cosine", "sigmoid"):
            raise ValueError(
                f"schedule kind {self.kind!r} is unknown; use 'linear', 'cosine' or 'sigmoid'"
            )
        if self.T < 1:
            raise ValueError(f"schedule T must be >= 1, got {self.T}")
        if not 0 < self.beta_start <= self.beta_end < 1:
            raise ValueError(
                f"schedule needs 0 < beta_start <= beta_end < 1, got "
                f"beta_start={self.beta_start}, beta_end={self.beta_end}"
            )

    def build(self) -> NoiseSchedule:
        if self.kind == "linear":
            return NoiseSchedule.linear(self.T, self.beta_start, self.beta_end)
        if self.kind == "cosine":
            return NoiseSchedule.cosine(self.T, self.s, self.max_beta)
        return NoiseSchedule.sigmoid(self.T, self.beta_start, self.beta_end)


class NoiseSchedule:
    """A discrete variance schedule and its derived tables (1-D float64 tensors of length T).

    ``betas``                       β_t
    ``alphas``                      α_t = 1 − β_t
    ``alphas_cumprod``              ᾱ_t = ∏_{s≤t} α_s
    ``alphas_cumprod_prev``         ᾱ_{t−1} (1 at t = 0)
    ``posterior_variance``          β̃_t = β_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t)        (Ho et al. Eq. 7)
    ``posterior_log_variance_clipped``  log β̃_t with β̃_0 (= 0) replaced by β̃_1
    ``posterior_mean_coef1``        β_t √ᾱ_{t−1} / (1 − ᾱ_t)     multiplies x₀  (Eq. 7)
    ``posterior_mean_coef2``        (1 − ᾱ_{t−1}) √α_t / (1 − ᾱ_t)  multiplies x_t
    ``snr``                         ᾱ_t / (1 − ᾱ_t)
    ``timesteps``                   original step of each entry (int64; arange(T) unless respaced)
    """

    def __init__(self, betas: Tensor | Sequence[float], timesteps: Tensor | None = None):
        betas = torch.as_tensor(betas, dtype=torch.float64).clone()
        if betas.ndim != 1 or betas.numel() == 0:
            raise ValueError("betas must be a non-empty 1-D sequence")
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("every beta must lie in (0, 1]")
        T = betas.numel()
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, 0)
        self.alphas_cumprod_prev = torch.cat([betas.new_ones(1), self.alphas_cumprod[:-1]])
        one_minus = 1.0 - self.alphas_cumprod
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / one_minus
        # β̃_0 = 0; the log is clipped to β̃_1 as improved-diffusion does (only used at t = 0,
        # where the decoder L₀ replaces the Gaussian KL anyway).
        first = self.posterior_variance[1] if T > 1 else betas[0]
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([first.reshape(1), self.posterior_variance[1:]])
        )
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / one_minus
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * self.alphas.sqrt() / one_minus
        )
        self.snr = self.alphas_cumprod / one_minus
        if timesteps is None:
            timesteps = torch.arange(T, dtype=torch.int64)
        self.timesteps = torch.as_tensor(timesteps, dtype=torch.int64).clone()
        if self.timesteps.shape != (T,):
            raise ValueError(f"timesteps must have length {T}, got {tuple(self.timesteps.shape)}")

    # --- constructors -----------------------------------------------------------------------

    @classmethod
    def linear(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        """β linear in t from ``beta_start`` to ``beta_end`` (Ho et al. 2020, §4).

        The endpoints are scaled by 1000/T (as improved-diffusion does), so T = 1000 gives exactly
        1e-4..0.02 and other T ≳ 100 give roughly the same curve of ᾱ; for small T, β_end·1000/T
        is clipped at 0.999 and ᾱ_{T−1} differs.
        """
        _check_T(T)
        scale = 1000.0 / T
        lo, hi = beta_start * scale, min(beta_end * scale, 0.999)
        return cls(torch.linspace(lo, hi, T, dtype=torch.float64))

    @classmethod
    def cosine(cls, T: int = 1000, s: float = 0.008, max_beta: float = 0.999):
        """ᾱ(t) = f(t)/f(0), f(t) = cos²((t/T + s)/(1 + s) · π/2) (Nichol & Dhariwal 2021, Eq. 17).

        β_t = 1 − ᾱ(t+1)/ᾱ(t), clipped at ``max_beta`` to avoid the singularity at t = T.
        """
        _check_T(T)
        steps = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        abar = f / f[0]
        betas = (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)
        return cls(betas)

    @classmethod
    def sigmoid(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        """β_t = beta_start + (beta_end − beta_start) · sigmoid(u_t), u_t linear in [−6, 6]
        (the sigmoid schedule of GeoDiff, Xu et al. 2022), scaled by 1000/T like ``linear``."""
        _check_T(T)
        scale = 1000.0 / T
        lo, hi = beta_start * scale, min(beta_end * scale, 0.999)
        u = torch.linspace(-6, 6, T, dtype=torch.float64)
        return cls(lo + (hi - lo) * torch.sigmoid(u))

    # --- derived -----------------------------------------------------------------------------

    @property
    def T(self) -> int:
        return self.betas.numel()

    def respace(self, timesteps: Sequence[int] | Tensor) -> NoiseSchedule:
        """The schedule restricted to ``timesteps`` (increasing indices into *this* schedule).

        ᾱ at the kept steps is unchanged; β is recomputed so the Markov chain jumps directly
        between them (Nichol & Dhariwal 2021, §4). ``timesteps`` of the result are the original
        indices, composed through any earlier respacing.
        """
        idx = torch.as_tensor(timesteps, dtype=torch.int64)
        if idx.ndim != 1 or idx.numel() == 0:
            raise ValueError("respace needs a non-empty 1-D list of timesteps")
        if bool((idx[1:] <= idx[:-1]).any()) or idx[0] < 0 or idx[-1] >= self.T:
            raise ValueError(
                f"respace timesteps must be strictly increasing within 0..{self.T - 1}"
            )
        abar = self.alphas_cumprod[idx]
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        return NoiseSchedule(1.0 - abar / abar_prev, timesteps=self.timesteps[idx])

    def spaced(self, steps: int, spacing: Spacing = "uniform") -> NoiseSchedule:
        """Respaced to a grid of ``steps`` timesteps (:func:`grid_timesteps`)."""
        return self.respace(grid_timesteps(self, steps, spacing))

    def to_dict(self) -> dict:
        """JSON-safe description; ``NoiseSchedule.from_dict`` rebuilds it exactly."""
        return {"betas": self.betas.tolist(), "timesteps": self.timesteps.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> NoiseSchedule:
        return cls(d["betas"], timesteps=torch.tensor(d["timesteps"]))

    def __repr__(self) -> str:
        return (
            f"NoiseSchedule(T={self.T}, beta=[{self.betas[0]:.3g}..{self.betas[-1]:.3g}], "
            f"alphas_cumprod[-1]={self.alphas_cumprod[-1]:.3g})"
        )


def spaced_timesteps(T: int, steps: int) -> list[int]:
    """``steps`` integer timesteps in 0..T−1, evenly spaced and including both ends: the first
    sampling step starts from pure noise (t = T−1, as Lin et al. 2024 recommend) and the last
    network evaluation is at t = 0, where x̂₀ is nearly exact. One step means t = T−1 only."""
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be between 1 and T={T}, got {steps}")
    if steps == 1:
        return [T - 1]
    spacing = (T - 1) / (steps - 1)  # >= 1, so the rounded values are distinct
    return [round(i * spacing) for i in range(steps)]


def grid_timesteps(schedule: NoiseSchedule, steps: int, spacing: Spacing = "uniform") -> list[int]:
    """A sampling grid of ``steps`` distinct timesteps from 0 to T−1 (increasing).

    ``uniform``    evenly spaced in t (:func:`spaced_timesteps`);
    ``quadratic``  t_i = (T−1)(i/(S−1))², denser near the data (Song et al. 2021, DDIM §D.2);
    ``logsnr``     evenly spaced in λ = log(α/σ), the half log-SNR, nearest integer t
                   (Lu et al. 2022, DPM-Solver, §3.3 — the grid its error analysis assumes).
    Collisions after rounding are pushed apart so the grid stays strictly increasing.
    """
    T = schedule.T
    if spacing == "uniform":
        return spaced_timesteps(T, steps)
    if spacing not in SPACINGS:
        raise ValueError(f"spacing {spacing!r} is unknown; use one of {', '.join(SPACINGS)}")
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be between 1 and T={T}, got {steps}")
    if steps == 1:
        return [T - 1]
    u = torch.linspace(0, 1, steps, dtype=torch.float64)
    if spacing == "quadratic":
        raw = ((T - 1) * u**2).round().long().tolist()
    else:
        lam = 0.5 * torch.log(schedule.snr)  # decreasing in t
        targets = lam[0] + (lam[-1] - lam[0]) * u
        raw = [int(torch.argmin((lam - v).abs())) for v in targets]
    ts = [0] * steps
    for i, t in enumerate(raw):  # strictly increasing from the start ...
        ts[i] = max(t, ts[i - 1] + 1) if i else 0
    ts[-1] = T - 1
    for i in range(steps - 2, -1, -1):  # ... and fitting below T−1 at the end
        ts[i] = min(ts[i], ts[i + 1] - 1)
    return ts


def extract(table: Tensor, t: Tensor, x: Tensor) -> Tensor:
    """``table[t]`` shaped to broadcast against ``x`` ([B, 1, 1, ...]) in ``x``'s dtype/device."""
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(
            f"t must be 1-D with one entry per batch element ({x.shape[0]}), got {tuple(t.shape)}"
        )
    out = table.to(t.device)[t.long()]
    return out.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def _check_T(T: int) -> None:
    if not isinstance(T, int) or T < 1:
        raise ValueError(f"T must be a positive integer, got {T!r}")
