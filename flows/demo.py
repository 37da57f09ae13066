"""The laptop demo: train a small class-conditional diffusion model on the embedded digits with
the ``diffusion`` package alone, then write a PNG grid of samples (one row per class).

    diffusion-pipeline demo                      # ~4 minutes on 2 CPU cores
    diffusion-pipeline demo --steps 300 --out /tmp/quick

It is the pipeline's train → evaluate → generate path in one process, without Ray, Prefect or
MLflow; the full orchestrated pipeline reuses the same pieces (``diffusion.training.train_step``,
which the demo's ``train_loop`` calls, ``diffusion.pipeline.sample_images``,
``diffusion.serialization``). The model is saved in the pipeline's own layout (``config.json``
with ``unet``, ``diffusion`` and ``class_names``), so ``diffusion-pipeline evaluate`` and
``register`` accept ``OUT/model`` like a training checkpoint.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from diffusion import (
    EMA,
    Denoiser,
    OptimConfig,
    SampleNoise,
    SamplerConfig,
    UNet,
    UNetConfig,
    nll_bits_per_dim,
    save_model,
)
from diffusion.pipeline import DiffusionConfig, sample_images
from diffusion.pixels import uint8_to_unit
from diffusion.training import train_loop
from tasks.digits import CLASS_NAMES, DIGITS_DIFFUSION, DIGITS_UNET, digits_splits
from tasks.images import save_grid_png


@dataclass(frozen=True)
class DemoConfig:
    steps: int = 1500
    batch_size: int = 128
    seed: int = 0
    unet: UNetConfig = DIGITS_UNET
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(steps=1500, warmup_steps=100))
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig("dpmpp_2m", steps=20))
    diffusion: DiffusionConfig = DIGITS_DIFFUSION
    guidance_scale: float = 1.5
    samples_per_class: int = 10
    nll_images: int = 64  # val images for the bits/dim estimate (T network calls per batch)


def run_demo(out: Path, config: DemoConfig = DemoConfig(), log=print) -> dict:
    """Train, evaluate, sample; returns a summary dict (also written to ``out/summary.json``)."""
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    splits = digits_splits()
    train_x = uint8_to_unit(torch.from_numpy(splits["train"][0]))
    train_y = torch.from_numpy(splits["train"][1])
    val_x = torch.from_numpy(splits["val"][0])
    log(f"digits: {len(train_x)} train / {len(val_x)} val images, 8x8, 10 classes")

    torch.manual_seed(config.seed)
    model = UNet(config.unet)
    schedule = config.diffusion.build_schedule()
    trained = _train(model, schedule, train_x, train_y, config, log)

    model.eval()
    denoiser = Denoiser(model, schedule, config.diffusion.prediction)
    nll_x = val_x[: config.nll_images]
    nll = nll_bits_per_dim(denoiser, nll_x, generator=torch.Generator().manual_seed(1))
    bpd, bpd_se = nll.mean_and_stderr()
    log(f"val NLL: {bpd:.3f} ± {bpd_se:.3f} bits/dim ({len(nll_x)} images, T=1000 bound)")

    t1 = time.perf_counter()
    images = _sample(model, schedule, config)
    sample_seconds = time.perf_counter() - t1
    grid_path = save_grid_png(images, out / "samples.png", nrow=config.samples_per_class, scale=6)
    model_dir = save_model(out / "model", model.state_dict(), {
        "unet": config.unet.to_dict(),
        "diffusion": config.diffusion.to_dict(),
        "class_names": CLASS_NAMES,
    })
    summary = trained | {
        "val_nll_bits_per_dim": round(bpd, 4),
        "val_nll_stderr": round(bpd_se, 4),
        "sampler": asdict(config.sampler),
        "guidance_scale": config.guidance_scale,
        "sample_seconds": round(sample_seconds, 2),
        "grid": str(grid_path),
        "model": str(model_dir),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log(
        f"samples: {len(images)} with {config.sampler.name} ({config.sampler.steps} steps, "
        f"guidance {config.guidance_scale}) in {sample_seconds:.1f}s — one row per class 0..9"
    )
    log(f"wrote {grid_path}")
    log(f"wrote {model_dir}/ (model.safetensors + config.json)")
    return summary


def _train(model: UNet, schedule, train_x, train_y, config: DemoConfig, log) -> dict:
    """``config.steps`` optimiser steps on uniformly drawn batches (``diffusion.training.
    train_loop``, one generator seeded by ``config.seed``), then the EMA weights are copied into
    ``model``. Returns the training part of the summary."""
    optim = replace(
        config.optim,
        steps=config.steps,
        warmup_steps=min(config.optim.warmup_steps, config.steps),
        loss=config.diffusion.loss_config(),
    )
    ema = EMA(model, decay=optim.ema_decay)
    g = torch.Generator().manual_seed(config.seed)
    log(
        f"model: UNet {model.num_parameters() / 1e6:.2f}M parameters; {config.steps} steps "
        f"of batch {config.batch_size}"
    )
    t0, seen, last = time.perf_counter(), 0, 0.0
    every = max(1, config.steps // 10)
    for out in train_loop(model, train_x, train_y, schedule, optim, batch_size=config.batch_size,
                          generator=g, ema=ema, null_class=config.unet.num_classes):
        seen += config.batch_size
        last = out["loss"]
        if out["step"] % every == 0 or out["step"] == config.steps:
            elapsed = time.perf_counter() - t0
            log(
                f"  step {out['step']:>5}/{config.steps}  loss {last:.4f}  "
                f"{seen / elapsed:,.0f} img/s  {elapsed:,.0f}s"
            )
    seconds = time.perf_counter() - t0
    ema.copy_to(model)
    return {
        "train_steps": config.steps,
        "train_seconds": round(seconds, 1),
        "train_images_per_second": round(seen / seconds, 1),
        "final_loss": round(last, 4),
    }


def _sample(model: UNet, schedule, config: DemoConfig):
    """``samples_per_class`` guided samples of every class through the sampling pipeline:
    uint8 [N, C, H, W], one class after another."""
    n_classes = config.unet.num_classes
    labels = torch.arange(n_classes).repeat_interleave(config.samples_per_class)
    return sample_images(
        model,
        schedule,
        (config.unet.in_channels, config.unet.resolution, config.unet.resolution),
        SampleNoise(config.seed, range(len(labels))),
        config.sampler,
        prediction=config.diffusion.prediction,
        labels=labels,
        guidance_scale=config.guidance_scale,
        null_label=n_classes,
    ).numpy()
