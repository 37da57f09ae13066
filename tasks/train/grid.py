"""The sample grid rank 0 logs to the MLflow run every ``train.sample_every`` steps."""

from __future__ import annotations

import os
import tempfile


def log_sample_grid(model, ema, model_cfg, schedule, prediction, step, tracker) -> None:
    """A grid of EMA samples (DDIM 20; one row per class for conditional models)."""
    import torch

    from diffusion import SampleNoise, SamplerConfig
    from diffusion.pipeline import sample_images
    from tasks.images import save_grid_png

    inner = getattr(model, "module", model)
    n_cls = model_cfg.num_classes
    labels = torch.arange(n_cls).repeat_interleave(8) if n_cls else None
    n = len(labels) if labels is not None else 64
    with ema.swapped(inner) as m:
        m.eval()
        dev = next(m.parameters()).device
        images = sample_images(
            m, schedule, (model_cfg.in_channels, model_cfg.resolution, model_cfg.resolution),
            SampleNoise(0, range(n), device=dev), SamplerConfig("ddim", steps=20),
            prediction=prediction, labels=labels, null_label=n_cls)
        m.train()
    with tempfile.TemporaryDirectory() as d:
        path = save_grid_png(images.numpy(), os.path.join(d, f"step{step:07d}.png"), nrow=8,
                             scale=4)
        tracker.artifact(str(path), "samples")
