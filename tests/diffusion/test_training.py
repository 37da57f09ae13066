"""One training step: the LR schedule, label dropout, a loss that goes down, a NaN guard; and the
single-process loop around it: its documented batch draw, determinism, a loss that goes down."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from diffusion.ema import EMA
from diffusion.losses import LossConfig, training_loss
from diffusion.schedules import NoiseSchedule
from diffusion.training import (
    OptimConfig,
    drop_labels,
    lr_factor,
    make_lr_scheduler,
    make_optimizer,
    train_loop,
    train_step,
)
from diffusion.unet import UNet, UNetConfig

# --- learning-rate schedule -------------------------------------------------------------------


def test_warmup_is_linear_then_cosine_to_min_ratio():
    cfg = OptimConfig(steps=1000, warmup_steps=100, min_lr_ratio=0.05)
    warm = [lr_factor(s, cfg) for s in range(100)]
    assert warm[0] == pytest.approx(1 / 100)
    assert warm[-1] == pytest.approx(1.0)
    assert all(b - a == pytest.approx(1 / 100) for a, b in itertools.pairwise(warm))
    decay = [lr_factor(s, cfg) for s in range(100, 1001)]
    assert decay[0] == pytest.approx(1.0)
    assert all(b <= a for a, b in itertools.pairwise(decay))
    assert lr_factor(1000, cfg) == pytest.approx(0.05)
    assert lr_factor(5000, cfg) == pytest.approx(0.05)  # stays at the floor past the end
    # halfway through the decay, cosine is at the mean of its ends
    assert lr_factor(550, cfg) == pytest.approx(0.05 + 0.95 * 0.5)


def test_no_warmup_starts_at_full_rate():
    cfg = OptimConfig(steps=10, warmup_steps=0, min_lr_ratio=0.0)
    assert lr_factor(0, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(0.0, abs=1e-12)


def test_lr_scheduler_applies_the_factor():
    model = nn.Linear(2, 2)
    cfg = OptimConfig(steps=20, lr=1e-2, warmup_steps=4)
    opt = make_optimizer(model, cfg)
    sched = make_lr_scheduler(opt, cfg)
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([1e-2 * lr_factor(s, cfg) for s in range(6)])


def test_weight_decay_skips_biases_and_gains():
    model = nn.Sequential(nn.Linear(3, 4), nn.GroupNorm(2, 4))
    opt = make_optimizer(model, OptimConfig(weight_decay=0.1))
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert [p.ndim for p in decayed["params"]] == [2]
    assert all(p.ndim == 1 for p in plain["params"])


# --- label dropout ----------------------------------------------------------------------------


def test_drop_labels_identity_cases():
    labels = torch.arange(10)
    assert drop_labels(labels, 0.0, 10) is labels
    assert drop_labels(labels, 0.5, None) is labels
    assert drop_labels(None, 0.5, 10) is None


def test_drop_labels_drops_the_right_share():
    """Each label is dropped independently with probability p: the dropped share of n labels
    is binomial, standard error √(p(1 − p)/n)."""
    n, p, null = 20000, 0.5, 10
    labels = torch.arange(n) % 10
    out = drop_labels(labels, p, null, torch.Generator().manual_seed(0))
    dropped = out == null
    assert torch.equal(out[~dropped], labels[~dropped])  # the rest is untouched
    assert abs(dropped.double().mean().item() - p) <= 4 * math.sqrt(p * (1 - p) / n)
    again = drop_labels(labels, p, null, torch.Generator().manual_seed(0))
    other = drop_labels(labels, p, null, torch.Generator().manual_seed(1))
    assert torch.equal(out, again)
    assert not torch.equal(out, other)


# --- the step ---------------------------------------------------------------------------------


def tiny_unet(num_classes: int | None = None) -> UNet:
    torch.manual_seed(0)
    return UNet(
        UNetConfig(
            resolution=8,
            in_channels=1,
            base_channels=16,
            channel_mult=(1, 2),
            num_res_blocks=1,
            attention_resolutions=(4,),
            num_heads=2,
            groups=8,
            num_classes=num_classes,
        )
    )


def toy_images(n: int = 16) -> torch.Tensor:
    """Fixed images in [−1, 1]: a bright square on a dark background, at a few positions."""
    x = torch.full((n, 1, 8, 8), -1.0)
    for i in range(n):
        r, c = i % 4, (i // 4) % 4
        x[i, 0, r : r + 4, c : c + 4] = 1.0
    return x


def eval_loss(model: nn.Module, x0: torch.Tensor, schedule: NoiseSchedule) -> float:
    """The loss on a fixed set of (t, ε) draws, so before/after differ only by the weights."""
    g = torch.Generator().manual_seed(123)
    reps = 8
    x = x0.repeat(reps, 1, 1, 1)
    t = torch.randint(0, schedule.T, (x.shape[0],), generator=g)
    eps = torch.randn(x.shape, generator=g)
    model.eval()
    with torch.no_grad():
        return training_loss(model, x, schedule, t=t, eps=eps).mean().item()


def test_train_step_reduces_the_loss():
    schedule = NoiseSchedule.linear(100)
    model = tiny_unet(num_classes=4)
    x0 = toy_images()
    labels = torch.arange(16) % 4
    cfg = OptimConfig(steps=30, lr=2e-3, warmup_steps=3, label_dropout=0.2)
    opt = make_optimizer(model, cfg)
    sched = make_lr_scheduler(opt, cfg)
    ema = EMA(model, decay=0.9)
    g = torch.Generator().manual_seed(0)
    # the output convolution starts at zero, so the initial loss is E‖ε‖²/D ≈ 1
    before = eval_loss(model, x0, schedule)
    assert before == pytest.approx(1.0, abs=4 * math.sqrt(2 / (128 * 64)))
    for _ in range(cfg.steps):
        stats = train_step(
            model, opt, sched, x0, labels, schedule, cfg, ema=ema, null_class=4, generator=g
        )
        assert math.isfinite(stats["loss"]) and math.isfinite(stats["grad_norm"])
        assert stats["per_sample"].shape == stats["t"].shape == (16,)
    after = eval_loss(model, x0, schedule)
    assert after < 0.6 * before
    assert ema.num_updates == cfg.steps
    assert opt.param_groups[0]["lr"] == pytest.approx(cfg.lr * lr_factor(cfg.steps, cfg))


class NaNModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, xt, t, labels=None):
        return xt * self.scale * float("nan")


def test_non_finite_loss_raises_and_leaves_weights_unchanged():
    model = NaNModel()
    cfg = OptimConfig(steps=5, warmup_steps=0)
    opt = make_optimizer(model, cfg)
    sched = make_lr_scheduler(opt, cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FloatingPointError, match="loss is nan"):
        train_step(
            model,
            opt,
            sched,
            torch.zeros(2, 1, 2, 2),
            None,
            NoiseSchedule.linear(10),
            cfg,
            generator=torch.Generator().manual_seed(0),
        )
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert model.scale.grad is None
    assert not opt.state  # Adam moments never touched


def test_train_step_is_reproducible_with_a_generator():
    schedule = NoiseSchedule.linear(50)
    x0 = toy_images(4)
    results = []
    for _ in range(2):
        model = tiny_unet()
        cfg = OptimConfig(steps=3, warmup_steps=1, loss=LossConfig("v", min_snr_gamma=5.0))
        opt = make_optimizer(model, cfg)
        sched = make_lr_scheduler(opt, cfg)
        g = torch.Generator().manual_seed(7)
        stats = [
            train_step(model, opt, sched, x0, None, schedule, cfg, generator=g) for _ in range(2)
        ]
        weights = [p.detach().clone() for p in model.parameters()]
        results.append(([s["loss"] for s in stats], weights))
    assert results[0][0] == results[1][0]
    for p, q in zip(results[0][1], results[1][1], strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": 0}, "steps must be >= 1"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"steps": 10, "warmup_steps": 11}, "warmup_steps must be in 0..steps"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"label_dropout": 1.0}, "label_dropout must be in"),
        ({"label_dropout": -0.1}, "label_dropout"),
        ({"ema_decay": 1.0}, "ema_decay must be in"),
        ({"ema_decay": 0.0}, "ema_decay"),
    ],
)
def test_optim_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OptimConfig(**kwargs)


@pytest.mark.parametrize("name", ["lr", "min_lr_ratio", "weight_decay", "grad_clip", "ema_decay",
                                  "label_dropout"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_optimiser_values_must_be_finite(name, bad):
    """``lr=inf`` (or an infinite weight decay or clipping norm) passed ``> 0``: every
    optimiser value is a finite number."""
    with pytest.raises(ValueError, match=name):
        OptimConfig(**{name: bad})


# --- the single-process loop ------------------------------------------------------------------


def loop_weights(x, labels, **kw) -> tuple[list[float], list[torch.Tensor]]:
    model = tiny_unet(num_classes=None if labels is None else 4)
    cfg = OptimConfig(steps=3, warmup_steps=1)
    g = torch.Generator().manual_seed(5)
    ema = EMA(model, decay=0.9)
    losses = [out["loss"] for out in train_loop(model, x, labels, NoiseSchedule.linear(50), cfg,
                                                generator=g, ema=ema, **kw)]
    ema.copy_to(model)
    return losses, [p.detach().clone() for p in model.parameters()]


def test_train_loop_is_its_documented_draw_then_train_step():
    """The uniform draw is ``randint`` from the loop's generator, then :func:`train_step` on
    those rows with the same generator: a hand-written loop gives the same weights, bit for bit
    (the demo's and the benchmarks' numbers from before the loop was shared stay valid)."""
    x, labels = toy_images(), torch.arange(16) % 4
    losses, weights = loop_weights(x, labels, batch_size=4, null_class=4)
    assert losses == loop_weights(x, labels, batch_size=4, null_class=4)[0]  # deterministic
    model, cfg = tiny_unet(num_classes=4), OptimConfig(steps=3, warmup_steps=1)
    opt = make_optimizer(model, cfg)
    sched = make_lr_scheduler(opt, cfg)
    ema, g = EMA(model, decay=0.9), torch.Generator().manual_seed(5)
    by_hand = []
    for _ in range(cfg.steps):
        idx = torch.randint(0, 16, (4,), generator=g)
        by_hand.append(train_step(model, opt, sched, x[idx], labels[idx], NoiseSchedule.linear(50),
                                  cfg, ema=ema, null_class=4, generator=g)["loss"])
    ema.copy_to(model)
    assert losses == by_hand
    for p, q in zip(weights, model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_train_loop_scales_uint8_pixels_as_the_unit_images():
    u8 = ((toy_images() + 1) * 127.5).round().to(torch.uint8)
    as_float = loop_weights(u8.float() / 127.5 - 1.0, None, batch_size=4)
    as_u8 = loop_weights(u8, None, batch_size=4)
    assert as_float[0] == as_u8[0]
    assert all(torch.equal(p, q) for p, q in zip(as_float[1], as_u8[1], strict=True))


def test_train_loop_epochs_deal_each_row_once_per_epoch(monkeypatch):
    import diffusion.training as dtr

    seen: list[torch.Tensor] = []
    real = dtr.train_step
    monkeypatch.setattr(dtr, "train_step",
                        lambda m, o, s, x0, *a, **k: seen.append(x0[:, 0, 0, 0]) or real(
                            m, o, s, x0, *a, **k))
    x = torch.arange(10.0).view(10, 1, 1, 1).expand(10, 1, 8, 8).contiguous()
    model = tiny_unet()
    cfg = OptimConfig(steps=6, warmup_steps=0)
    outs = list(train_loop(model, x, None, NoiseSchedule.linear(50), cfg, batch_size=3,
                           generator=torch.Generator().manual_seed(0), draw="epochs"))
    assert [o["step"] for o in outs] == [1, 2, 3, 4, 5, 6]
    for epoch in (seen[:3], seen[3:]):  # 3 batches of 3 from each permutation of 10 rows
        rows = torch.cat(epoch)
        assert len(set(rows.tolist())) == 9


def test_train_loop_reduces_the_loss_and_stops_at_cfg_steps():
    schedule = NoiseSchedule.linear(100)
    model = tiny_unet(num_classes=4)
    x0, labels = toy_images(), torch.arange(16) % 4
    cfg = OptimConfig(steps=30, lr=2e-3, warmup_steps=3, label_dropout=0.2)
    before = eval_loss(model, x0, schedule)
    outs = list(train_loop(model, x0, labels, schedule, cfg, batch_size=16, null_class=4,
                           generator=torch.Generator().manual_seed(0)))
    assert len(outs) == cfg.steps and outs[-1]["step"] == cfg.steps
    assert eval_loss(model, x0, schedule) < 0.6 * before


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"draw": "shuffle"}, "draw must be one of uniform, epochs"),
        ({"draw": "epochs", "batch_size": 17}, "batch_size 17 exceeds the 16 images"),
        ({"labels": torch.zeros(3, dtype=torch.long)}, "labels has 3 rows, x has 16"),
        ({"x": torch.zeros(0, 1, 8, 8)}, "x holds no images"),
        ({"x": torch.zeros(16, 8, 8)}, r"x must be \[N, C, H, W\]"),
    ],
)
def test_train_loop_rejects_bad_arguments(kwargs, message):
    args = {"x": toy_images(), "labels": None, "batch_size": 4} | kwargs
    x, labels = args.pop("x"), args.pop("labels")
    with pytest.raises(ValueError, match=message):
        next(train_loop(tiny_unet(), x, labels, NoiseSchedule.linear(10), OptimConfig(steps=2,
             warmup_steps=0), generator=torch.Generator(), **args))
