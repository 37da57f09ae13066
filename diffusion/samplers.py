"""Samplers: plain functions with one shared shape.

    sampler(denoiser, x_T, noise, *, steps, callback=None, **options) -> x₀

``denoiser`` is a :class:`diffusion.denoiser.Denoiser` (it carries the training schedule),
``x_T`` the starting latent (``noise.initial(shape)`` for N(0, I)), ``noise`` the per-sample
:class:`diffusion.noise.SampleNoise` used by stochastic samplers (draw keyed by step, so sample i
is the same in any batch), ``steps`` the number of points of the time grid. ``callback(i, t, x,
x0_pred)`` is called after each step; samplers never log or print.

The time grid: ``steps`` training timesteps from T−1 (pure noise) down to 0, then clean data,
spaced by ``spacing`` (:func:`diffusion.schedules.grid_timesteps`: ``uniform`` in t,
``quadratic``, or uniform in log-SNR). Each sampler defaults to the spacing it is most accurate
on (measured on an exact Gaussian denoiser): DDPM uniform, DDIM / Euler / Heun quadratic,
DPM-Solver++ and Langevin log-SNR. The network is evaluated once per grid point (Heun twice on
the inner intervals).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from diffusion.denoiser import Denoiser
from diffusion.forward import q_posterior
from diffusion.noise import SampleNoise
from diffusion.schedules import SPACINGS, NoiseSchedule, Spacing

Callback = Callable[[int, int, Tensor, Tensor], None] | None


def _grid(denoiser: Denoiser, steps: int | None, spacing: Spacing) -> NoiseSchedule:
    """The training schedule respaced to ``steps`` grid points (all T when None)."""
    schedule = denoiser.schedule
    if steps is None or steps == schedule.T:
        return schedule
    return schedule.spaced(steps, spacing)


def _at(t: int, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), t, dtype=torch.int64, device=x.device)


def ddpm(
    denoiser: Denoiser,
    x: Tensor,
    noise: SampleNoise,
    *,
    steps: int | None = None,
    callback: Callback = None,
    spacing: Spacing = "uniform",
    variance: Literal["beta_tilde", "beta"] = "beta_tilde",
) -> Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2):

        x_{t−1} = μ̃_t(x_t, x̂₀) + σ_t z,   σ_t² = β̃_t ("beta_tilde") or β_t ("beta").

    With fewer ``steps`` than T it samples the respaced chain (Nichol & Dhariwal 2021, §4).
    """
    if variance not in ("beta_tilde", "beta"):
        raise ValueError(f"ddpm variance must be 'beta_tilde' or 'beta', got {variance!r}")
    grid = _grid(denoiser, steps, spacing)
    var_table = grid.posterior_variance if variance == "beta_tilde" else grid.betas
    for i in reversed(range(grid.T)):
        t = int(grid.timesteps[i])
        x0, _ = denoiser(x, _at(t, x))
        mean, _ = q_posterior(x0, x, _at(i, x), grid)
        # Ancestral step; at i = 0 the posterior mean is x̂₀ itself and no noise is added.
        x = mean + math.sqrt(var_table[i]) * noise.draw(i, x.shape[1:]) if i > 0 else mean
        if callback is not None:
            callback(i, t, x, x0)
    return x


def ddim(
    denoiser: Denoiser,
    x: Tensor,
    noise: SampleNoise,
    *,
    steps: int | None = 50,
    callback: Callback = None,
    spacing: Spacing = "quadratic",
    eta: float = 0.0,
) -> Tensor:
    """DDIM (Song, Meng & Ermon 2021, Eq. 12):

        x_{t−1} = √ᾱ_{t−1} x̂₀ + √(1 − ᾱ_{t−1} − σ_t²) ε̂ + σ_t z,
        σ_t = η √((1 − ᾱ_{t−1}) / (1 − ᾱ_t)) √(1 − ᾱ_t / ᾱ_{t−1}).

    η = 0 is deterministic; η = 1 is DDPM's ancestral sampler on the same grid.
    """
    if eta < 0:
        raise ValueError(f"ddim eta must be >= 0, got {eta}")
    grid = _grid(denoiser, steps, spacing)
    for i in reversed(range(grid.T)):
        t = int(grid.timesteps[i])
        x0, eps = denoiser(x, _at(t, x))
        abar, abar_prev = float(grid.alphas_cumprod[i]), float(grid.alphas_cumprod_prev[i])
        sigma = eta * math.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
        x = math.sqrt(abar_prev) * x0 + math.sqrt(max(1 - abar_prev - sigma**2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * noise.draw(i, x.shape[1:])
        if callback is not None:
            callback(i, t, x, x0)
    return x


def dpm_solver_pp_2m(
    denoiser: Denoiser,
    x: Tensor,
    noise: SampleNoise,
    *,
    steps: int | None = 20,
    callback: Callback = None,
    spacing: Spacing = "logsnr",
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2), data prediction.

    With α = √ᾱ, σ = √(1 − ᾱ), λ = log(α/σ) and h_i = λ_{t_i} − λ_{t_{i−1}}:
        D_i = x̂₀_{i−1} + (x̂₀_{i−1} − x̂₀_{i−2}) / (2 r_i),  r_i = h_{i−1}/h_i  (first step: D = x̂₀)
        x_{t_i} = (σ_{t_i}/σ_{t_{i−1}}) x_{t_{i−1}} − α_{t_i} (e^{−h_i} − 1) D_i
    The final step, to σ = 0, is first order: x = x̂₀ at the last grid point. The default grid
    is uniform in λ, the one the solver's error analysis assumes. Deterministic.
    """
    return _dpm_solver_pp_2m(denoiser, x, noise, steps, callback, spacing, eta=0.0)


def dpm_solver_pp_2m_sde(
    denoiser: Denoiser,
    x: Tensor,
    noise: SampleNoise,
    *,
    steps: int | None = 20,
    callback: Callback = None,
    spacing: Spacing = "logsnr",
    eta: float = 1.0,
) -> Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, §5 and Appendix; the stochastic twin of
    :func:`dpm_solver_pp_2m`): the same data-prediction multistep on the reverse SDE,

        x_{t_i} = (σ_{t_i}/σ_{t_{i−1}}) e^{−ηh} x_{t_{i−1}} + α_{t_i} (1 − e^{−(1+η)h}) D_i
                  + σ_{t_i} √(1 − e^{−2ηh}) z.

    η = 1 is the SDE; η = 0 reduces to the ODE solver. Fresh noise at every step corrects the
    errors of an imperfect denoiser the way DDPM's ancestral steps do, at a tenth of the steps.
    """
    if eta < 0:
        raise ValueError(f"dpmpp_2m_sde eta must be >= 0, got {eta}")
    return _dpm_solver_pp_2m(denoiser, x, noise, steps, callback, spacing, eta=eta)


def _dpm_solver_pp_2m(
    denoiser: Denoiser,
    x: Tensor,
    noise: SampleNoise,
    steps: int | None,
    callback: Callback,
    spacing: Spacing,
    eta: float,
) -> Tensor:
    grid = _grid(denoiser, steps, spacing)
    abar = grid.alphas_cumprod
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    lam = torch.log(alpha) - torch.log(sigma)
    x0_prev: Tensor | None = None
    h_prev = 0.0
    for i in reversed(range(grid.T)):
        t = int(grid.timesteps[i])
        x0, _ = denoiser(x, _at(t, x))
        if i == 0:
            x = x0  # σ → 0: e^{−h} → 0 and x = D = x̂₀ (first order, "lower order final")
        else:
            h = float(lam[i - 1] - lam[i])
            d = x0 if x0_prev is None else x0 + (x0 - x0_prev) * (h / (2 * h_prev))
            decay = float(sigma[i - 1] / sigma[i]) * math.exp(-eta * h)
            x = decay * x - float(alpha[i - 1]) * math.expm1(-(1 + eta) * h) * d
            if eta > 0:
                z = noise.draw(i, x.shape[1:])
                x = x + float(sigma[i - 1]) * math.sqrt(-math.expm1(-2 * eta * h)) * z
            x0_prev, h_prev = x0, h
        if callback is not None:
            callback(i, t, x, x0)
    return x


def _ode_sigmas(grid: NoiseSchedule) -> Tensor:
    """σ̃ = σ/α = √((1 − ᾱ)/ᾱ) at each grid point: the probability-flow ODE in the variance-
    exploding form x̃ = x/α, where dx̃/dσ̃ = ε̂(α x̃, t)
    (Song et al. 2021; Karras et al. 2022, Eq. 4)."""
    return ((1 - grid.alphas_cumprod) / grid.alphas_cumprod).sqrt()


def _ode(
    denoiser: Denoiser,
    x: Tensor,
    steps: int | None,
    callback: Callback,
    spacing: Spacing,
    heun: bool,
) -> Tensor:
    grid = _grid(denoiser, steps, spacing)
    sig = _ode_sigmas(grid)
    x_tilde = x * math.sqrt(1 + float(sig[-1]) ** 2)  # x̃ = x/α, 1/α = √(1 + σ̃²)
    for i in reversed(range(grid.T)):
        t = int(grid.timesteps[i])
        s_cur = float(sig[i])
        s_next = float(sig[i - 1]) if i > 0 else 0.0
        x0, eps = denoiser(x_tilde / math.sqrt(1 + s_cur**2), _at(t, x))
        x_next = x_tilde + (s_next - s_cur) * eps  # Euler step
        # 2nd order correction, except on the last step (to σ̃ = 0) and on the first one: from
        # pure noise σ̃ is huge (160 for linear, 2·10⁴ for cosine) and averaging the slopes at
        # both ends of that jump is meaningless, while the Euler step is exact there (x̂₀ ≈ E[x₀]).
        if heun and 0 < i < grid.T - 1:
            # 2nd order correction (Karras et al. 2022, Algorithm 1, lines 7–8)
            t_next = int(grid.timesteps[i - 1])
            _, eps_next = denoiser(x_next / math.sqrt(1 + s_next**2), _at(t_next, x))
            x_next = x_tilde + (s_next - s_cur) * 0.5 * (eps + eps_next)
        x_tilde = x_next
        if callback is not None:
            callback(i, t, x_tilde / math.sqrt(1 + s_next**2), x0)  # report x, not x̃
    return x_tilde  # σ̃ = 0: α = 1, x̃ = x


def euler(
    denoiser: Denoiser,
    x: Tensor,
    noise: SampleNoise,
    *,
    steps: int | None = 50,
    callback: Callback = None,
    spacing: Spacing = "quadratic",
) -> Tensor:
    """Euler's method on the probability-flow ODE dx̃/dσ̃ = ε̂ (deterministic; ``noise`` unused).
    On the same grid it takes exactly DDIM's (η = 0) steps."""
    return _ode(denoiser, x, steps, callback, spacing, heun=False)


def heun(
    denoiser: Denoiser,
    x: Tensor,
    noise: SampleNoise,
    *,
    steps: int | None = 20,
    callback: Callback = None,
    spacing: Spacing = "quadratic",
) -> Tensor:
    """Heun's 2nd-order method on the probability-flow ODE (Karras et al. 2022, Algorithm 1);
    the first and last steps are Euler steps, so 2·steps − 2 network evaluations (steps ≥ 2)."""
    return _ode(denoiser, x, steps, callback, spacing, heun=True)


def annealed_langevin(
    denoiser: Denoiser,
    x: Tensor,
    noise: SampleNoise,
    *,
    steps: int | None = 100,
    callback: Callback = None,
    spacing: Spacing = "logsnr",
    n_steps_each: int = 10,
    step_size: float = 0.5,
    final_denoise: bool = True,
) -> Tensor:
    """Annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1) at ``steps`` noise levels.

    The score of the noisy marginal q(x_t) is s = −ε̂/σ_t (σ_t = √(1 − ᾱ_t)). At each level,
    from the noisiest down, ``n_steps_each`` updates
        x ← x + (η_i/2) s(x, t_i) + √η_i z,   η_i = step_size · σ_{t_i}²,
    which is the paper's α_i = ε σ_i²/σ_L² with ε = step_size · σ_L²: the step shrinks with the
    noise level, and ``step_size`` is the step at unit noise. ``final_denoise`` returns x̂₀ at the
    last level (Song & Ermon 2020; Jolicoeur-Martineau et al. 2021), removing the residual σ_{t_L}.
    """
    if n_steps_each < 1 or not 0 < step_size < 2:
        raise ValueError("annealed_langevin needs n_steps_each >= 1 and 0 < step_size < 2")
    grid = _grid(denoiser, steps, spacing)
    sigmas = (1 - grid.alphas_cumprod).sqrt()
    x0 = x
    for i in reversed(range(grid.T)):
        t = int(grid.timesteps[i])
        s = float(sigmas[i])
        eta = step_size * s**2
        for k in range(n_steps_each):
            x0, eps = denoiser(x, _at(t, x))
            score = -eps / s
            z = noise.draw(i * n_steps_each + k, x.shape[1:])
            x = x + 0.5 * eta * score + math.sqrt(eta) * z  # Langevin step
        if callback is not None:
            callback(i, t, x, x0)
    if final_denoise:
        x0, _ = denoiser(x, _at(int(grid.timesteps[0]), x))
        return x0
    return x


SamplerFn = Callable[..., Tensor]
SAMPLERS: dict[str, SamplerFn] = {
    "ddpm": ddpm,
    "ddim": ddim,
    "dpmpp_2m": dpm_solver_pp_2m,
    "dpmpp_2m_sde": dpm_solver_pp_2m_sde,
    "euler": euler,
    "heun": heun,
    "langevin": annealed_langevin,
}
DEFAULT_STEPS = {
    "ddpm": None,
    "ddim": 50,
    "dpmpp_2m": 20,
    "dpmpp_2m_sde": 20,
    "euler": 50,
    "heun": 20,
    "langevin": 100,
}


def get_sampler(name: str) -> SamplerFn:
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(
            f"sampler {name!r} is unknown; choose one of {', '.join(sorted(SAMPLERS))}"
        ) from None


def network_evaluations(name: str, steps: int, **options) -> int:
    """How many network calls (NFE) a sampler makes for ``steps`` grid points (one batch)."""
    get_sampler(name)
    if name == "heun":
        return max(1, 2 * steps - 2)
    if name == "langevin":
        return steps * options.get("n_steps_each", 10) + int(options.get("final_denoise", True))
    return steps


@dataclass(frozen=True)
class SamplerConfig:
    """A sampler setting as data: name, grid size and its options (all JSON-safe)."""

    name: str = "dpmpp_2m"
    steps: int | None = None  # None: the sampler's default (ddpm: all T)
    spacing: str | None = None  # None: the sampler's default grid
    eta: float | None = None  # ddim (default 0) and dpmpp_2m_sde (default 1)
    variance: str = "beta_tilde"  # ddpm
    n_steps_each: int = 10  # langevin
    step_size: float = 0.5  # langevin

    def __post_init__(self) -> None:
        get_sampler(self.name)
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"sampler steps must be >= 1, got {self.steps}")
        if self.spacing is not None and self.spacing not in SPACINGS:
            raise ValueError(
                f"sampler spacing {self.spacing!r} is unknown; use one of {', '.join(SPACINGS)}"
            )

    def options(self) -> dict:
        """Keyword options for the sampler function."""
        opts = {
            "ddpm": {"variance": self.variance},
            "langevin": {"n_steps_each": self.n_steps_each, "step_size": self.step_size},
        }.get(self.name, {})
        if self.eta is not None and self.name in ("ddim", "dpmpp_2m_sde"):
            opts["eta"] = self.eta
        if self.spacing is not None:
            opts["spacing"] = self.spacing
        return opts

    def resolved_steps(self, T: int) -> int:
        if self.steps is None:  # the sampler's default, at most T
            default = DEFAULT_STEPS[self.name]
            return T if default is None else min(default, T)
        steps = self.steps
        if not 1 <= steps <= T:
            raise ValueError(f"sampler steps must be between 1 and T={T}, got {steps}")
        return steps


@torch.no_grad()
def sample(
    denoiser: Denoiser,
    shape: tuple[int, ...],
    noise: SampleNoise,
    config: SamplerConfig | None = None,
    *,
    callback: Callback = None,
) -> Tensor:
    """Draw ``len(noise)`` samples of per-sample ``shape`` ([C, H, W]) with the configured sampler:
    x_T from ``noise.initial`` then the sampler. Sample i depends only on (seed, i, config)."""
    config = config or SamplerConfig()
    x = noise.initial(shape)
    fn = get_sampler(config.name)
    steps = config.resolved_steps(denoiser.schedule.T)
    return fn(denoiser, x, noise, steps=steps, callback=callback, **config.options())
