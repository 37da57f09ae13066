"""Denoising diffusion models as the papers write them, in pure PyTorch.

Imports torch, numpy, safetensors and the standard library only — never the pipeline's
orchestration stack (prefect, ray, mlflow, pyarrow, fsspec, PIL) — so it works on its own in a
notebook or another trainer.

Glossary (one name per symbol, used everywhere)
------------------------------------------------
T                       number of diffusion steps
t                       integer timestep 0..T−1; t = 0 is the first noising step (tables index by t)
β_t   ``betas``         variance of step t:  q(x_t | x_{t−1}) = N(√(1−β_t) x_{t−1}, β_t I)
α_t   ``alphas``        1 − β_t
ᾱ_t   ``alphas_cumprod``  ∏_{s≤t} α_s;  q(x_t | x₀) = N(√ᾱ_t x₀, (1−ᾱ_t) I)
ᾱ_{t−1} ``alphas_cumprod_prev``  (1 at t = 0)
β̃_t   ``posterior_variance``  variance of q(x_{t−1} | x_t, x₀)
SNR_t ``snr``           ᾱ_t / (1 − ᾱ_t);  λ_t = ½ log SNR_t
σ_t                     √(1 − ᾱ_t), the noise level of x_t (σ̃_t = σ_t/√ᾱ_t in the ODE's VE form)
x₀    ``x0``            data, scaled to [−1, 1];  x_t ``xt`` a noisy latent
ε     ``eps``           the Gaussian noise in x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε
ε_θ   ``eps_pred``      predicted noise;  x̂₀ ``x0_pred`` predicted data;  v = √ᾱ_t ε − √(1−ᾱ_t) x₀

Tables are float64 and cast to the input's dtype at lookup. Every random draw comes from an
explicit generator, or for generation from (seed, sample index, step) — see ``diffusion.noise``.

Modules: ``schedules`` · ``forward`` · ``parameterization`` · ``losses`` · ``likelihood`` ·
``denoiser`` (network + schedule → D(x_t, t), classifier-free guidance) · ``samplers`` ·
``noise`` · ``unet`` · ``ema`` · ``training`` · ``metrics`` · ``serialization``.
"""

from diffusion.denoiser import Denoiser, classifier_free_guidance
from diffusion.ema import EMA
from diffusion.forward import q_posterior, q_sample, q_step
from diffusion.likelihood import NLLResult, nll_bits_per_dim
from diffusion.losses import LossConfig, training_loss
from diffusion.noise import SampleNoise
from diffusion.parameterization import eps_from_x0, target, to_x0_eps, v_from, x0_from_eps
from diffusion.samplers import (
    SAMPLERS,
    SamplerConfig,
    annealed_langevin,
    ddim,
    ddpm,
    dpm_solver_pp_2m,
    euler,
    heun,
    sample,
)
from diffusion.schedules import NoiseSchedule, ScheduleConfig
from diffusion.serialization import WeightsIntegrityError, load_model, save_model
from diffusion.training import OptimConfig, train_loop, train_step
from diffusion.unet import UNet, UNetConfig

__all__ = [
    "EMA",
    "SAMPLERS",
    "Denoiser",
    "LossConfig",
    "NLLResult",
    "NoiseSchedule",
    "OptimConfig",
    "SampleNoise",
    "SamplerConfig",
    "ScheduleConfig",
    "UNet",
    "UNetConfig",
    "WeightsIntegrityError",
    "annealed_langevin",
    "classifier_free_guidance",
    "ddim",
    "ddpm",
    "dpm_solver_pp_2m",
    "eps_from_x0",
    "euler",
    "heun",
    "load_model",
    "nll_bits_per_dim",
    "q_posterior",
    "q_sample",
    "q_step",
    "sample",
    "save_model",
    "target",
    "to_x0_eps",
    "train_loop",
    "train_step",
    "training_loss",
    "v_from",
    "x0_from_eps",
]
