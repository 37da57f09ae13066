from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from diffusion import serialization
from diffusion.ema import EMA
from diffusion.serialization import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    WeightsIntegrityError,
    build_unet,
    load_model,
    load_model_bytes,
    read_metadata,
    save_model,
    save_model_bytes,
)
from diffusion.unet import UNet, UNetConfig

CFG = UNetConfig(
    resolution=8,
    base_channels=16,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(4,),
    num_heads=2,
    num_classes=3,
)


@pytest.fixture
def model() -> UNet:
    torch.manual_seed(0)
    m = UNet(CFG)
    torch.nn.init.normal_(m.conv_out.weight, std=0.1)  # make the output depend on everything
    return m.eval()


def save(model: UNet, directory) -> None:
    save_model(directory, model.state_dict(), {"unet": CFG.to_dict(), "step": 7})


def test_round_trip_gives_identical_outputs(model, tmp_path):
    save(model, tmp_path)
    loaded = build_unet(tmp_path)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 700]), torch.tensor([0, 2])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), model(x, t, y))
    _, config = load_model(tmp_path)
    assert config == {"unet": CFG.to_dict(), "step": 7}


def test_bytes_round_trip_and_metadata(model):
    weights, config_bytes = save_model_bytes(model.state_dict(), {"a": 1}, {"run": "r1"})
    digest = json.loads(config_bytes)["weights_sha256"]
    state, config = load_model_bytes(weights, config_bytes, expected_sha256=digest)
    assert config == {"a": 1}
    assert state.keys() == model.state_dict().keys()
    assert read_metadata(weights) == {"format": "pt", "run": "r1"}
    with pytest.raises(WeightsIntegrityError, match="expected 00"):
        load_model_bytes(weights, config_bytes, expected_sha256="00" * 32)


def test_shared_and_non_contiguous_tensors():
    base = torch.arange(12.0).reshape(3, 4)
    state = {
        "w": base,
        "tied": base,
        "t": base.t(),
        "cl": torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last),
    }
    weights, config_bytes = save_model_bytes(state, {})
    loaded, _ = load_model_bytes(weights, config_bytes)
    for k, v in state.items():
        assert torch.equal(loaded[k], v)


def test_ema_state_dict_is_storable(model):
    ema = EMA(model)
    ema.update(model)
    weights, config_bytes = save_model_bytes(ema.state_dict(), {})
    state, _ = load_model_bytes(weights, config_bytes)
    other = EMA(UNet(CFG))
    other.load_state_dict(state)
    assert other.num_updates == 1


def test_tampered_byte_raises(model, tmp_path):
    save(model, tmp_path)
    path = tmp_path / WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsIntegrityError, match="re-download or re-export") as info:
        load_model(tmp_path)
    assert str(path) in str(info.value)
    assert "expected" in str(info.value) and "actual" in str(info.value)


@pytest.mark.parametrize("keep", [0, 5, 100, -10])
def test_truncated_file_raises(model, tmp_path, keep):
    save(model, tmp_path)
    path = tmp_path / WEIGHTS_FILE
    path.write_bytes(path.read_bytes()[:keep])
    with pytest.raises(WeightsIntegrityError):
        load_model(tmp_path)


def test_corrupt_file_without_digest_raises_integrity_error(model):
    weights, _ = save_model_bytes(model.state_dict(), {})
    with pytest.raises(WeightsIntegrityError, match="not a readable safetensors"):
        load_model_bytes(weights[:-10], b"{}")


def test_loading_never_unpickles(model, tmp_path, monkeypatch):
    save(model, tmp_path)

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle was used")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    assert isinstance(build_unet(tmp_path), UNet)


def test_config_json_written_last(model, tmp_path, monkeypatch):
    replaced = []
    real_replace = os.replace

    def recording_replace(src, dst):
        replaced.append(os.path.basename(dst))
        real_replace(src, dst)

    monkeypatch.setattr(serialization.os, "replace", recording_replace)
    save(model, tmp_path)
    assert replaced == [WEIGHTS_FILE, CONFIG_FILE]
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]


def test_interrupted_save_leaves_no_config(model, tmp_path, monkeypatch):
    save(model, tmp_path)  # an older complete save in the same directory

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(serialization.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        save(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [WEIGHTS_FILE]  # no temp files
    with pytest.raises(FileNotFoundError, match="written last"):
        load_model(tmp_path)


def test_non_json_config_is_explained(model):
    with pytest.raises(TypeError, match="to_dict"):
        save_model_bytes(model.state_dict(), {"unet": CFG})


def test_build_unet_requires_unet_section(model, tmp_path):
    save_model(tmp_path, model.state_dict(), {"step": 1})
    with pytest.raises(KeyError, match="unet"):
        build_unet(tmp_path)
