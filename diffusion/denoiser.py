"""The denoiser: a network plus its schedule and parameterization, seen as D(x_t, t) → (x̂₀, ε̂).

Samplers only ever talk to this interface, so they do not care whether the network predicts ε,
x₀ or v, nor whether it is conditional. The network never owns the schedule (STYLE.md §2).

A network is any callable ``model(x_t, t, labels) -> output`` where ``t`` are the training
timesteps (int64, 0..T−1). :func:`classifier_free_guidance` turns a conditional network into
another such callable.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from diffusion.parameterization import Prediction, check_prediction, eps_from_x0, to_x0_eps
from diffusion.schedules import NoiseSchedule

ModelFn = Callable[[Tensor, Tensor, Tensor | None], Tensor]


class Denoiser:
    """D(x_t, t) = (x̂₀, ε̂) for a network trained on ``schedule`` with ``prediction``.

    ``t`` is the index into the *training* schedule (a respaced sampler passes
    ``spaced.timesteps[i]``). ``labels`` condition every call (None: unconditional or the null
    class). ``clip_x0`` clamps x̂₀ to [−c, c] and recomputes ε̂ from it, as DDPM's sampler does for
    data scaled to [−1, 1]; None disables it.
    """

    def __init__(
        self,
        model: ModelFn,
        schedule: NoiseSchedule,
        prediction: Prediction = "eps",
        *,
        labels: Tensor | None = None,
        clip_x0: float | None = 1.0,
    ):
        check_prediction(prediction)
        self.model = model
        self.schedule = schedule
        self.prediction = prediction
        self.labels = labels
        self.clip_x0 = clip_x0

    def __call__(self, xt: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        output = self.model(xt, t, self.labels).to(xt.dtype)
        x0, eps = to_x0_eps(self.prediction, output, xt, t, self.schedule)
        if self.clip_x0 is not None:
            x0 = x0.clamp(-self.clip_x0, self.clip_x0)
            eps = eps_from_x0(xt, t, x0, self.schedule)
        return x0, eps


def classifier_free_guidance(model: ModelFn, scale: float, null_label: int) -> ModelFn:
    """Classifier-free guidance (Ho & Salimans 2022, Eq. 6) as a wrapper around the network:

        out = out(x_t, ∅) + w · (out(x_t, c) − out(x_t, ∅))

    ``w = scale``: 1 is the plain conditional model, 0 the unconditional one, >1 guides harder.
    The combination is done on the network output; since x̂₀, ε̂ and v̂ are affine in it for a
    fixed x_t, this is the same guidance whatever the parameterization. Both branches run as one
    batch. Rows whose label is already the null class are left unguided.
    """

    def guided(xt: Tensor, t: Tensor, labels: Tensor | None) -> Tensor:
        if labels is None or scale == 1.0:
            return model(xt, t, labels)
        null = torch.full_like(labels, null_label)
        out = model(torch.cat([xt, xt]), torch.cat([t, t]), torch.cat([labels, null]))
        cond, uncond = out.chunk(2)
        return uncond + scale * (cond - uncond)

    return guided
