"""Training a diffusion model: :func:`train_step`, one optimisation step (AdamW, linear warmup
then cosine decay, gradient clipping, label dropout for classifier-free guidance, EMA), and
:func:`train_loop`, the single-process loop around it on an in-memory dataset.

The demo and the benchmarks train with :func:`train_loop`; the Ray Train workers
(``tasks/train/worker.py``) call :func:`train_step` on their own batches, because they shard the
data, resume from checkpoints and stop together under DDP. The loop yields after every step, so
the caller's loop body logs, times or stops early (nanoGPT style)::

    ema = EMA(model, decay=cfg.ema_decay)
    g = torch.Generator().manual_seed(0)
    for out in train_loop(model, x, labels, schedule, cfg, batch_size=128, generator=g, ema=ema):
        if out["step"] % 100 == 0:
            print(out["step"], out["loss"])
    ema.copy_to(model)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from diffusion.ema import EMA
from diffusion.losses import LossConfig, training_loss
from diffusion.pixels import uint8_to_unit
from diffusion.schedules import NoiseSchedule

# Each scalar setting's valid range, checked one key at a time; the pipeline's ``train`` config
# section validates its keys of the same names with these same rules (one source of bounds).
OPTIM_BOUNDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "steps": (lambda v: v >= 1, ">= 1"),
    "lr": (lambda v: v > 0, "> 0"),
    "warmup_steps": (lambda v: v >= 0, "in 0..steps"),
    "min_lr_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "grad_clip": (lambda v: v is None or v > 0, "> 0 (or None: no clipping)"),
    "ema_decay": (lambda v: 0 < v < 1, "in (0, 1)"),
    "label_dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
}


def check_optim_value(name: str, value: Any) -> Any:
    """``value`` if it is a finite number in :data:`OPTIM_BOUNDS`' range for ``name``, else
    ValueError (``lr=inf`` would pass ``> 0``)."""
    ok, what = OPTIM_BOUNDS[name]
    if (value is not None and not math.isfinite(value)) or not ok(value):
        raise ValueError(f"{name} must be {what}, got {value}")
    return value


@dataclass(frozen=True)
class OptimConfig:
    steps: int = 3000
    lr: float = 2e-3
    warmup_steps: int = 200
    min_lr_ratio: float = 0.05  # cosine decays to lr · min_lr_ratio
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float | None = 1.0
    ema_decay: float = 0.999
    label_dropout: float = 0.1  # share of labels replaced by the null class (guidance training)
    loss: LossConfig = field(default_factory=LossConfig)

    def __post_init__(self) -> None:
        for name in OPTIM_BOUNDS:
            check_optim_value(name, getattr(self, name))
        if self.warmup_steps > self.steps:
            raise ValueError(
                f"warmup_steps must be in 0..steps ({self.steps}), got {self.warmup_steps}"
            )


def lr_factor(step: int, cfg: OptimConfig) -> float:
    """Multiplier of ``cfg.lr`` at ``step``: linear warmup, then cosine to ``min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay only on matrices/kernels, not on biases and norm gains."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def make_lr_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))


def drop_labels(labels: Tensor | None, p: float, null_class: int | None, generator=None):
    """Replace each label by the null class with probability ``p`` (Ho & Salimans 2022, Alg. 1)."""
    if labels is None or null_class is None or p == 0:
        return labels
    device = generator.device if generator is not None else labels.device
    drop = torch.rand(labels.shape, generator=generator, device=device).to(labels.device) < p
    return torch.where(drop, torch.full_like(labels, null_class), labels)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    x0: Tensor,
    labels: Tensor | None,
    schedule: NoiseSchedule,
    cfg: OptimConfig,
    *,
    ema: EMA | None = None,
    null_class: int | None = None,
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float | Tensor]:
    """Loss → backward → clip → AdamW step → LR step → EMA update.

    Returns ``loss`` (float), ``grad_norm`` (float) and ``per_sample`` losses with their ``t``
    (tensors, for loss-by-timestep metrics). Raises FloatingPointError on a non-finite loss or
    gradient norm *before* the optimizer step, so the weights are never poisoned.
    """
    model.train()
    labels = drop_labels(labels, cfg.label_dropout, null_class, generator)
    device = generator.device if generator is not None else x0.device
    t = torch.randint(0, schedule.T, (x0.shape[0],), generator=generator, device=device)
    t = t.to(x0.device)
    with torch.autocast(x0.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        per_sample = training_loss(
            model, x0, schedule, cfg.loss, t=t, labels=labels, generator=generator
        )
    loss = per_sample.mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    max_norm = cfg.grad_clip if cfg.grad_clip is not None else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    # Checked after backward: under DDP the gradients (and so their norm) are all-reduced, so
    # every rank sees the same non-finite norm and stops at the same step instead of one rank
    # raising while the others wait in the all-reduce.
    if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        raise FloatingPointError(
            f"loss is {float(loss.detach())}, gradient norm is {float(grad_norm)}"
        )
    optimizer.step()
    lr_scheduler.step()
    if ema is not None:
        ema.update(model)
    return {
        "loss": float(loss.detach()),
        "grad_norm": float(grad_norm),
        "per_sample": per_sample.detach(),
        "t": t,
    }


DRAWS = ("uniform", "epochs")


def train_loop(
    model: nn.Module,
    x: Tensor,
    labels: Tensor | None,
    schedule: NoiseSchedule,
    cfg: OptimConfig,
    *,
    batch_size: int,
    generator: torch.Generator,
    ema: EMA | None = None,
    null_class: int | None = None,
    draw: str = "uniform",
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> Iterator[dict[str, float | int | Tensor]]:
    """Train ``model`` for ``cfg.steps`` steps of :func:`train_step` on batches drawn from the
    in-memory images ``x`` [N, C, H, W] (float in [-1, 1], or uint8 pixels scaled batch by
    batch, as the pipeline's workers do) and their ``labels`` [N] (None: unconditional).

    Owns the optimizer (:func:`make_optimizer`) and the LR schedule (:func:`make_lr_scheduler`);
    updates ``ema`` after every step (the caller keeps it, e.g. for ``ema.copy_to(model)``).
    ``generator`` is the one source of randomness: each step first draws its batch's row
    indices, then :func:`train_step` draws label dropout, t and ε from it. The draw:

    - ``"uniform"``: ``batch_size`` rows uniformly with replacement (``torch.randint``);
    - ``"epochs"``: a permutation of the rows (``torch.randperm``) dealt in consecutive batches,
      a fresh one when fewer than ``batch_size`` rows are left (those are skipped), as the
      pipeline's training stage deals its epochs.

    Yields after each step :func:`train_step`'s stats with ``step`` (steps done, from 1); the
    caller may stop early by leaving its loop. ``channels_last`` converts each batch to that
    memory format (for a model converted to it).
    """
    n = len(x)
    if n == 0:
        raise ValueError("x holds no images: the loop needs at least one training image")
    if x.ndim != 4:
        raise ValueError(f"x must be [N, C, H, W], got shape {tuple(x.shape)}")
    if labels is not None and len(labels) != n:
        raise ValueError(f"labels has {len(labels)} rows, x has {n}: one label per image")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if draw not in DRAWS:
        raise ValueError(f"draw must be one of {', '.join(DRAWS)}, got {draw!r}")
    if draw == "epochs" and batch_size > n:
        raise ValueError(f"batch_size {batch_size} exceeds the {n} images: an epochs draw "
                         "deals whole batches from one permutation (use draw='uniform')")
    optimizer = make_optimizer(model, cfg)
    lr_scheduler = make_lr_scheduler(optimizer, cfg)
    device = generator.device
    order, pos = None, 0
    if draw == "epochs":
        order = torch.randperm(n, generator=generator, device=device)
    for step in range(cfg.steps):
        if order is None:
            idx = torch.randint(0, n, (batch_size,), generator=generator, device=device)
        else:
            if pos + batch_size > n:  # a new epoch
                order, pos = torch.randperm(n, generator=generator, device=device), 0
            idx = order[pos:pos + batch_size]
            pos += batch_size
        idx = idx.to(x.device)
        x0 = x[idx]
        if x0.dtype == torch.uint8:
            x0 = uint8_to_unit(x0)
        if channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        out = train_step(model, optimizer, lr_scheduler, x0,
                         None if labels is None else labels[idx], schedule, cfg, ema=ema,
                         null_class=null_class, generator=generator, autocast_dtype=autocast_dtype)
        yield {"step": step + 1, **out}
