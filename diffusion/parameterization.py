"""What the network predicts: ε, x₀ or v, and exact conversions between them.

With x_t = α x₀ + σ ε, α = √ᾱ_t, σ = √(1 − ᾱ_t) (so α² + σ² = 1):

    ε  = (x_t − α x₀) / σ                                (Ho et al. 2020)
    x₀ = (x_t − σ ε) / α
    v  = α ε − σ x₀                                      (Salimans & Ho 2022, §4)
    x₀ = α x_t − σ v,   ε = σ x_t + α v

All three are linear in the network output given x_t, which is why classifier-free guidance
(a linear combination of two outputs) means the same thing whichever is predicted.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from diffusion.schedules import NoiseSchedule, extract

Prediction = Literal["eps", "x0", "v"]
PREDICTIONS: tuple[str, ...] = ("eps", "x0", "v")


def check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(
            f"prediction {prediction!r} is unknown; use one of {', '.join(PREDICTIONS)}"
        )


def _alpha_sigma(t: Tensor, xt: Tensor, schedule: NoiseSchedule) -> tuple[Tensor, Tensor]:
    abar = extract(schedule.alphas_cumprod, t, xt)
    return abar.sqrt(), (1 - abar).sqrt()


def eps_from_x0(xt: Tensor, t: Tensor, x0: Tensor, schedule: NoiseSchedule) -> Tensor:
    alpha, sigma = _alpha_sigma(t, xt, schedule)
    return (xt - alpha * x0) / sigma


def x0_from_eps(xt: Tensor, t: Tensor, eps: Tensor, schedule: NoiseSchedule) -> Tensor:
    alpha, sigma = _alpha_sigma(t, xt, schedule)
    return (xt - sigma * eps) / alpha


def v_from(x0: Tensor, eps: Tensor, t: Tensor, schedule: NoiseSchedule) -> Tensor:
    """v = √ᾱ_t ε − √(1 − ᾱ_t) x₀."""
    alpha, sigma = _alpha_sigma(t, x0, schedule)
    return alpha * eps - sigma * x0


def target(prediction: Prediction, x0: Tensor, eps: Tensor, t: Tensor, schedule) -> Tensor:
    """The regression target for the chosen parameterization."""
    check_prediction(prediction)
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    return v_from(x0, eps, t, schedule)


def to_x0_eps(
    prediction: Prediction, output: Tensor, xt: Tensor, t: Tensor, schedule: NoiseSchedule
) -> tuple[Tensor, Tensor]:
    """(x̂₀, ε̂) from a network output in any parameterization; exact inverses of :func:`target`."""
    check_prediction(prediction)
    if prediction == "eps":
        return x0_from_eps(xt, t, output, schedule), output
    if prediction == "x0":
        return output, eps_from_x0(xt, t, output, schedule)
    alpha, sigma = _alpha_sigma(t, xt, schedule)
    return alpha * xt - sigma * output, sigma * xt + alpha * output
