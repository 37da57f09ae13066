"""Exponential moving average of a model's weights (Polyak averaging), as used to sample from
DDPM (Ho et al. 2020, Appendix B: decay 0.9999).

After update n the shadow weights are

    θ̄ ← d_n · θ̄ + (1 − d_n) · θ,    d_n = min(decay, (1 + n) / (10 + n))   (with warmup)

so early, poorly-trained weights are forgotten quickly. Shadow parameters are kept in float32
whatever the model's dtype; buffers (e.g. normalisation statistics) are copied, not averaged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["EMA"]


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        for attr in ("module", "_orig_mod"):
            inner = getattr(model, attr, None)
            if isinstance(inner, nn.Module):
                model = inner
                break
        else:
            return model


def _float32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32) if t.is_floating_point() else t.detach()


class EMA:
    """Shadow copy θ̄ of a model's parameters, updated with :meth:`update` after each step."""

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        model = unwrap(model)
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.params = {n: _float32(p).clone() for n, p in model.named_parameters()}
        self.buffers = {n: _float32(b).clone() for n, b in model.named_buffers()}

    def current_decay(self) -> float:
        """d_n used by the next :meth:`update`, n = number of updates so far."""
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    def _check_names(self, model: nn.Module) -> None:
        names = {n for n, _ in model.named_parameters()}
        if names != set(self.params):
            missing, extra = sorted(set(self.params) - names), sorted(names - set(self.params))
            raise ValueError(
                f"model does not match the EMA: parameters missing from the model {missing[:5]}, "
                f"unknown to the EMA {extra[:5]}; build the EMA from this model's architecture"
            )

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """θ̄ ← d·θ̄ + (1 − d)·θ, then copy the buffers."""
        model = unwrap(model)
        self._check_names(model)
        d = self.current_decay()
        for n, p in model.named_parameters():
            shadow = self.params[n]
            shadow.lerp_(p.detach().to(shadow.device, torch.float32), 1.0 - d)
        for n, b in model.named_buffers():
            if n in self.buffers:
                self.buffers[n].copy_(b.detach())
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load θ̄ (cast to each parameter's dtype and device) and the buffers into ``model``."""
        model = unwrap(model)
        self._check_names(model)
        for n, p in model.named_parameters():
            p.copy_(self.params[n])
        for n, b in model.named_buffers():
            if n in self.buffers:
                b.copy_(self.buffers[n])

    @contextmanager
    def swapped(self, model: nn.Module) -> Iterator[nn.Module]:
        """Within the block ``model`` holds the EMA weights; its own are restored on exit."""
        inner = unwrap(model)
        backup = {n: t.detach().clone() for n, t in inner.state_dict(keep_vars=True).items()}
        self.copy_to(inner)
        try:
            yield model
        finally:
            with torch.no_grad():
                for n, t in inner.state_dict(keep_vars=True).items():
                    t.copy_(backup[n])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat name → tensor dict (storable with safetensors): ``params.<name>``,
        ``buffers.<name>`` and ``num_updates`` (a 0-dim int64 tensor)."""
        out = {f"params.{n}": t.clone() for n, t in self.params.items()}
        out |= {f"buffers.{n}": t.clone() for n, t in self.buffers.items()}
        out["num_updates"] = torch.tensor(self.num_updates, dtype=torch.int64)
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = {f"params.{n}" for n in self.params} | {f"buffers.{n}" for n in self.buffers}
        expected.add("num_updates")
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ValueError(
                f"EMA state does not match this model: missing {missing[:5]}, unexpected "
                f"{extra[:5]}; was it saved from a model with a different UNetConfig?"
            )
        with torch.no_grad():
            for n, t in self.params.items():
                t.copy_(state[f"params.{n}"])
            for n, t in self.buffers.items():
                t.copy_(state[f"buffers.{n}"])
        self.num_updates = int(state["num_updates"])
