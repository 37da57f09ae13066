from __future__ import annotations

import pytest
import torch
from torch import nn

from diffusion.ema import EMA


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def test_warmup_decay_values():
    ema = EMA(small_model(), decay=0.999)
    seen = []
    model = small_model()
    for _ in range(3):
        seen.append(ema.current_decay())
        ema.update(model)
    assert seen == pytest.approx([1 / 10, 2 / 11, 3 / 12])
    ema.num_updates = 10_000
    assert ema.current_decay() == 0.999
    assert EMA(small_model(), decay=0.9, warmup=False).current_decay() == 0.9


def test_first_update_with_warmup_is_mostly_the_model():
    model = small_model()
    ema = EMA(model)
    start = ema.params["0.weight"].clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.params["0.weight"], 0.1 * start + 0.9 * model[0].weight)


def test_converges_to_constant_weights():
    model = small_model()
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(2.0)
    for _ in range(300):
        ema.update(model)
    for t in ema.params.values():
        torch.testing.assert_close(t, torch.full_like(t, 2.0))


def test_swapped_loads_ema_then_restores():
    model = small_model()
    ema = EMA(model)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(5.0)
    model[1].running_mean.fill_(3.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.swapped(model) as m:
        assert m is model
        torch.testing.assert_close(model[0].weight, ema.params["0.weight"])
        torch.testing.assert_close(model[1].running_mean, torch.zeros(4))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_swapped_restores_after_exception():
    model = small_model()
    ema = EMA(model)
    with torch.no_grad():
        model[0].weight.fill_(7.0)
    with pytest.raises(RuntimeError), ema.swapped(model):
        raise RuntimeError("boom")
    assert torch.all(model[0].weight == 7.0)


def test_state_dict_round_trip():
    model = small_model()
    ema = EMA(model)
    for _ in range(4):
        with torch.no_grad():
            model[0].weight.add_(0.5)
        ema.update(model)
    state = ema.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    other = EMA(small_model())
    other.load_state_dict(state)
    assert other.num_updates == 4
    for k, v in ema.state_dict().items():
        torch.testing.assert_close(other.state_dict()[k], v)


def test_load_state_dict_rejects_other_architecture():
    state = EMA(small_model()).state_dict()
    other = EMA(nn.Linear(3, 4))
    with pytest.raises(ValueError, match="missing"):
        other.load_state_dict(state)


def test_float32_shadow_for_bf16_model_and_wrapped_model():
    model = small_model().to(torch.bfloat16)
    ema = EMA(nn.DataParallel(model))  # DDP-style wrapper exposing .module
    assert all(t.dtype == torch.float32 for t in ema.params.values())
    ema.update(nn.DataParallel(model))
    ema.copy_to(model)
    assert model[0].weight.dtype == torch.bfloat16
