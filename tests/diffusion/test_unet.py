from __future__ import annotations

import json

import pytest
import torch

from diffusion.unet import UNet, UNetConfig, timestep_embedding


def tiny(**kw) -> UNetConfig:
    base = dict(
        resolution=8,
        base_channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(4,),
        num_heads=2,
    )
    return UNetConfig(**(base | kw))


@pytest.mark.parametrize(
    ("resolution", "channels", "mult", "attn", "num_classes"),
    [
        (8, 1, (1, 2), (4,), None),
        (16, 3, (1, 2, 2), (8,), 10),
        (32, 3, (1, 2, 2), (16, 8), None),
        (64, 1, (1, 1, 2, 2), (8,), 3),
    ],
)
def test_output_shape(resolution, channels, mult, attn, num_classes):
    torch.manual_seed(0)
    cfg = tiny(
        resolution=resolution,
        in_channels=channels,
        channel_mult=mult,
        attention_resolutions=attn,
        num_classes=num_classes,
    )
    model = UNet(cfg)
    x = torch.randn(2, channels, resolution, resolution)
    labels = None if num_classes is None else torch.tensor([0, num_classes - 1])
    out = model(x, torch.tensor([0, 999]), labels)
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0  # zero-initialised output convolution


def test_out_channels_differs_from_input():
    model = UNet(tiny(in_channels=3, out_channels=1))
    assert model(torch.randn(2, 3, 8, 8), torch.tensor([1, 2])).shape == (2, 1, 8, 8)


def test_integer_and_float_timesteps_agree():
    torch.manual_seed(0)
    model = UNet(tiny())
    torch.nn.init.normal_(model.conv_out.weight)
    x = torch.randn(2, 1, 8, 8)
    a = model(x, torch.tensor([3, 500]))
    b = model(x, torch.tensor([3.0, 500.0]))
    torch.testing.assert_close(a, b)


def test_timestep_embedding_shape_and_values():
    emb = timestep_embedding(torch.tensor([0, 7]), 9)
    assert emb.shape == (2, 9)
    torch.testing.assert_close(emb[0, :4], torch.ones(4))  # cos(0) = 1
    torch.testing.assert_close(emb[0, 4:], torch.zeros(5))  # sin(0) = 0, then padding


def test_unconditional_model_rejects_labels():
    model = UNet(tiny())
    with pytest.raises(ValueError, match="unconditional"):
        model(torch.randn(2, 1, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 1]))


def test_missing_labels_mean_null_class():
    torch.manual_seed(0)
    model = UNet(tiny(num_classes=5))
    torch.nn.init.normal_(model.conv_out.weight)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([1, 50, 900])
    null = torch.full((3,), 5, dtype=torch.long)
    torch.testing.assert_close(model(x, t), model(x, t, null))
    assert not torch.allclose(model(x, t), model(x, t, torch.zeros(3, dtype=torch.long)))


def test_config_round_trip_through_json():
    cfg = UNetConfig(
        resolution=16,
        in_channels=3,
        channel_mult=(1, 2, 4),
        attention_resolutions=(8, 4),
        num_classes=10,
        dropout=0.1,
    )
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["channel_mult"] == [1, 2, 4]
    back = UNetConfig.from_dict(d)
    assert back == cfg
    assert isinstance(back.channel_mult, tuple)
    assert hash(back) == hash(cfg)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown keys \['chanel_mult', 'width'\]"):
        UNetConfig.from_dict({"chanel_mult": [1, 2], "width": 3})


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"resolution": 10, "channel_mult": (1, 2, 2)}, "resolution"),
        ({"in_channels": 5}, "in_channels"),
        ({"in_channels": 0}, "in_channels"),
        ({"out_channels": 7}, "out_channels"),
        ({"base_channels": 0}, "base_channels"),
        ({"channel_mult": ()}, "channel_mult"),
        ({"channel_mult": (1, 0)}, "channel_mult"),
        ({"num_res_blocks": 0}, "num_res_blocks"),
        ({"attention_resolutions": (2,)}, "attention_resolutions"),
        ({"num_heads": 3}, "num_heads"),
        ({"dropout": 1.0}, "dropout"),
        ({"num_classes": 0}, "num_classes"),
        ({"groups": 0}, "groups"),
        ({"resolution": 8.0}, "resolution"),
    ],
)
def test_invalid_config_names_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"UNetConfig\.{field}\b"):
        UNetConfig(**kwargs)


def test_groups_reduced_to_divide_channels():
    model = UNet(tiny(base_channels=12, groups=8, num_heads=4))  # 12 and 24 channels
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert all(m.num_channels % m.num_groups == 0 for m in norms)
    assert model(torch.randn(1, 1, 8, 8), torch.tensor([5])).shape == (1, 1, 8, 8)


def test_cifar10_config_parameter_count():
    cfg = UNetConfig(
        resolution=32,
        in_channels=3,
        base_channels=128,
        channel_mult=(1, 2, 2, 2),
        num_res_blocks=2,
        attention_resolutions=(16,),
        dropout=0.1,
    )
    with torch.device("meta"):
        n = UNet(cfg).num_parameters()
    assert n == 38_307_203
    assert 30e6 <= n <= 40e6


def test_default_config_parameter_count():
    with torch.device("meta"):
        assert UNet(UNetConfig()).num_parameters() == 4_302_529


def test_gradient_reaches_every_parameter():
    torch.manual_seed(0)
    model = UNet(tiny(num_classes=3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, t, y = torch.randn(4, 1, 8, 8), torch.randint(0, 1000, (4,)), torch.tensor([0, 1, 2, 3])
    for _ in range(2):  # the zero-initialised output conv blocks gradients on the first step
        opt.zero_grad()
        (model(x, t, y) - x).square().mean().backward()
        opt.step()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


def test_bf16_autocast_forward_is_finite():
    torch.manual_seed(0)
    model = UNet(tiny(num_classes=2))
    torch.nn.init.normal_(model.conv_out.weight, std=0.1)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([1, 999])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, torch.tensor([0, 1]))
    assert out.shape == x.shape
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), model(x, t, torch.tensor([0, 1])), atol=0.1, rtol=0.1)


def test_channels_last_matches_contiguous():
    torch.manual_seed(0)
    model = UNet(
        tiny(in_channels=3, resolution=16, channel_mult=(1, 2, 2), attention_resolutions=(8, 4))
    )
    torch.nn.init.normal_(model.conv_out.weight, std=0.1)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 20])
    expected = model(x, t)
    model = model.to(memory_format=torch.channels_last)
    out = model(x.to(memory_format=torch.channels_last), t)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def test_bad_input_shape_is_explained():
    model = UNet(tiny())
    with pytest.raises(ValueError, match="x must be"):
        model(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="t must have shape"):
        model(torch.randn(2, 1, 8, 8), torch.tensor([1, 2, 3]))


def test_bf16_weights_forward():
    model = UNet(tiny(num_classes=2)).to(torch.bfloat16)
    out = model(torch.randn(2, 1, 8, 8, dtype=torch.bfloat16), torch.tensor([1, 2]))
    assert out.dtype == torch.bfloat16


def test_pydantic_accepts_config_as_field():
    pydantic = pytest.importorskip("pydantic")

    class Section(pydantic.BaseModel):
        unet: UNetConfig = UNetConfig()

    s = Section.model_validate({"unet": {"resolution": 16, "channel_mult": [1, 2, 2]}})
    assert s.unet.channel_mult == (1, 2, 2)
    assert Section.model_validate_json(s.model_dump_json()) == s
    with pytest.raises(pydantic.ValidationError, match=r"UNetConfig\.resolution"):
        Section.model_validate({"unet": {"resolution": 6, "channel_mult": [1, 2, 2]}})
    with pytest.raises(pydantic.ValidationError, match="chanel_mult"):
        Section.model_validate({"unet": {"chanel_mult": [1, 2]}})
