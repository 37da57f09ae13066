import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from diffusion import SamplerConfig, UNetConfig
from diffusion.pipeline import DiffusionConfig
from diffusion.serialization import build_unet
from flows.cli import app
from flows.demo import DemoConfig, run_demo

# A tiny class-conditional UNet and a 100-step schedule: the demo's path end to end (its NLL
# bound takes T network calls), not its default model, which `make demo` and benchmarks/ run.
TINY_UNET = UNetConfig(resolution=8, in_channels=1, base_channels=8, channel_mult=(1,),
                       num_res_blocks=1, attention_resolutions=(), num_classes=10)


@pytest.mark.slow
def test_demo_trains_samples_and_writes_grid_and_weights(tmp_path):
    cfg = replace(
        DemoConfig(steps=12, batch_size=32, samples_per_class=2, nll_images=2),
        sampler=SamplerConfig("ddim", steps=5), unet=TINY_UNET, diffusion=DiffusionConfig(T=100),
    )
    lines = []
    summary = run_demo(tmp_path, cfg, log=lines.append)
    assert (tmp_path / "samples.png").is_file()
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert np.isfinite(summary["val_nll_bits_per_dim"]) and summary["val_nll_bits_per_dim"] > 0
    assert any("step    12/12" in line for line in lines)
    model = build_unet(tmp_path / "model")  # safetensors + JSON, digest checked
    assert model.config.num_classes == 10
    out = model(torch.zeros(2, 1, 8, 8), torch.tensor([0, 999]), torch.tensor([3, 10]))
    assert out.shape == (2, 1, 8, 8)
    from PIL import Image

    with Image.open(tmp_path / "samples.png") as im:
        assert im.mode == "L" and im.width > 2 * 8 * 6 and im.height > 10 * 8 * 6
    # the pipeline's model layout: evaluation's and registration's reader takes it
    from tasks.models import load_model_ref
    from tasks.runtime import RuntimeConfig

    loaded = load_model_ref(str(tmp_path / "model"), RuntimeConfig(root=str(tmp_path)))
    assert set(loaded.config) >= {"unet", "diffusion", "class_names"}
    assert loaded.config["diffusion"] == cfg.diffusion.to_dict()

def test_demo_trains_with_the_shared_loop(monkeypatch):
    """The demo's training is ``diffusion.training.train_loop`` (the one single-process loop),
    with its steps, batch, seed and the EMA's weights copied into the model at the end."""
    import flows.demo as demo
    from diffusion.training import train_loop

    calls = []

    def spy(model, x, labels, schedule, cfg, **kw):
        calls.append((cfg.steps, kw["batch_size"], kw["null_class"]))
        yield from train_loop(model, x, labels, schedule, cfg, **kw)

    monkeypatch.setattr(demo, "train_loop", spy)
    cfg = replace(DemoConfig(steps=3, batch_size=8), unet=TINY_UNET,
                  diffusion=DiffusionConfig(T=100))
    x, y = torch.rand(20, 1, 8, 8) * 2 - 1, torch.arange(20) % 10
    torch.manual_seed(0)
    model = demo.UNet(TINY_UNET)
    lines = []
    out = demo._train(model, cfg.diffusion.build_schedule(), x, y, cfg, lines.append)
    assert calls == [(3, 8, 10)]
    assert out["train_steps"] == 3 and any("step     3/3" in line for line in lines)


def test_cli_help_lists_demo():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0 and "demo" in result.output


def test_cli_rejects_bad_steps():
    result = CliRunner().invoke(app, ["demo", "--steps", "0"])
    assert result.exit_code != 0 and "steps" in result.output
