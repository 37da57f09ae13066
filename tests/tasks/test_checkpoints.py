"""Training checkpoints: exact round trip, integrity checks, fallback to an older good one."""

from __future__ import annotations

import json

import pytest
import torch

from diffusion import NoiseSchedule, UNet, UNetConfig
from diffusion.ema import EMA
from diffusion.serialization import build_unet
from diffusion.training import OptimConfig, make_lr_scheduler, make_optimizer, train_step
from tasks.checkpoints import load_training_checkpoint, save_training_checkpoint
from tasks.errors import CheckpointError

CFG = UNetConfig(resolution=8, in_channels=1, base_channels=8, channel_mult=(1,),
                 num_res_blocks=1, attention_resolutions=(), num_classes=3)
OPT = OptimConfig(steps=10, lr=1e-3, warmup_steps=2)


def make(seed=0):
    torch.manual_seed(seed)
    model = UNet(CFG)
    opt = make_optimizer(model, OPT)
    sched = make_lr_scheduler(opt, OPT)
    return model, EMA(model, 0.9), opt, sched, torch.Generator().manual_seed(seed)


def step(parts, seed):
    model, ema, opt, sched, gen = parts
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    return train_step(model, opt, sched, x, torch.tensor([0, 1, 2, 3]), NoiseSchedule.linear(50),
                      OPT, ema=ema, null_class=3, generator=gen)["loss"]


def save(parts, d, at):
    model, ema, opt, sched, gen = parts
    return save_training_checkpoint(d, model=model, ema=ema, optimizer=opt, lr_scheduler=sched,
                                    generator=gen, step=at,
                                    model_config={"unet": CFG.to_dict()}, extra={"run": "x"})


def test_round_trip_continues_identically(tmp_path):
    a = make()
    for i in range(3):
        step(a, i)
    save(a, tmp_path / "ck", 3)
    ema_at_save = {n: t.clone() for n, t in a[1].params.items()}
    b = make(seed=123)
    ck = load_training_checkpoint(tmp_path / "ck")
    assert ck.step == 3 and ck.state["run"] == "x"
    model, ema, opt, sched, gen = b
    ck.restore(model=model, ema=ema, optimizer=opt, lr_scheduler=sched, generator=gen)
    for i in range(3, 6):
        assert step(a, i) == step(b, i)
    for (n, p), (_, q) in zip(a[0].state_dict().items(), b[0].state_dict().items(), strict=True):
        assert torch.equal(p, q), n
    assert sched.get_last_lr() == a[3].get_last_lr()
    # the model/ folder holds the EMA weights, loadable on their own
    ema_model = build_unet(tmp_path / "ck" / "model")
    assert ema_model.config == CFG
    for n, p in ema_model.named_parameters():
        assert torch.equal(p, ema_at_save[n]), n


@pytest.mark.parametrize("damage", ["truncate", "tamper", "no_state", "bad_json"])
def test_damaged_checkpoints_are_refused(tmp_path, damage):
    d = save(make(), tmp_path / "ck", 1)
    if damage == "truncate":
        f = d / "training.safetensors"
        f.write_bytes(f.read_bytes()[:100])
    elif damage == "tamper":
        f = d / "model" / "model.safetensors"
        data = bytearray(f.read_bytes())
        data[-1] ^= 1
        f.write_bytes(bytes(data))
    elif damage == "no_state":
        (d / "state.json").unlink()
    else:
        (d / "state.json").write_text("{not json")
    with pytest.raises(CheckpointError):
        load_training_checkpoint(d)


def test_restore_falls_back_to_the_newest_good_checkpoint(tmp_path):
    from tasks.train import _restore

    parts = make()
    run = tmp_path / "run"
    for at in (4, 8, 12):
        step(parts, at)
        save(parts, run / f"checkpoint_{at:03d}", at)
    f = run / "checkpoint_012" / "training.safetensors"
    f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    lines = []
    ck = _restore(None, str(run), {}, lines.append)
    assert ck.step == 8
    assert any("refusing" in s and "checkpoint_012" in s for s in lines)
    state = json.loads((run / "checkpoint_008" / "state.json").read_text())
    assert state["step"] == 8
    assert _restore(None, str(tmp_path / "nothing"), {}, lines.append) is None
