"""The FID Inception-v3: the pytorch-fid checkpoint's names and shapes, the input convention, and
weights that go through safetensors only (no real weights offline: random ones stand in).

Checked once by hand against pytorch-fid 0.3.0 (its fid_inception_v3 on torchvision 0.29.1's
Inception3, fed this module's random state dict): the same 566 keys in the same order, loaded with
strict=True, and pool3 features equal within 1.5e-6 (activations of scale 0.6) for 32×32,
1-channel 64×48, 299×299 and 400×300 inputs, while torchvision's unpatched network differs by 1.6.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from diffusion.inception import (
    FEATURE_DIM,
    NUM_CLASSES,
    FIDInceptionV3,
    _pool3x3_same,
    load_fid_inception,
    main,
)
from diffusion.serialization import WeightsIntegrityError, read_metadata, sha256_hex

# torchvision documents inception_v3 (Inception_V3_Weights.IMAGENET1K_V1) as 27,161,264
# parameters, 1000 classes, auxiliary classifier included. The FID network has no auxiliary
# classifier (AuxLogits: 1×1 conv 768→128 + BN = 98,560; 5×5 conv 128→768 + BN = 2,459,136;
# fc 768→1000 = 769,000; together 3,326,696) and a 2048→1008 fc (+8 × 2049 = 16,392):
# 27,161,264 − 3,326,696 + 16,392 = 23,850,960, i.e. 95.4 MB of float32, the size of
# pt_inception-2015-12-05-6726825d.pth.
FID_INCEPTION_PARAMETERS = 23_850_960

# Conv+BN units: stem 5, Mixed_5b–d 3 × 7, Mixed_6a 4, Mixed_6b–e 4 × 10, Mixed_7a 6,
# Mixed_7b–c 2 × 9 = 94; each has conv.weight and bn.{weight, bias, running_mean, running_var,
# num_batches_tracked} (the pytorch-fid file holds num_batches_tracked: loading it under
# torch 0.4.0 failed on exactly those keys, pytorch-fid issue #34), plus fc.weight and fc.bias.
CONV_UNITS = 94
STATE_DICT_KEYS = 6 * CONV_UNITS + 2

# A representative sample of pytorch-fid's keys and shapes, one or more per block kind.
REFERENCE_SHAPES = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_1a_3x3.bn.weight": (32,),
    "Conv2d_1a_3x3.bn.bias": (32,),
    "Conv2d_1a_3x3.bn.running_mean": (32,),
    "Conv2d_1a_3x3.bn.running_var": (32,),
    "Conv2d_1a_3x3.bn.num_batches_tracked": (),
    "Conv2d_2a_3x3.conv.weight": (32, 32, 3, 3),
    "Conv2d_2b_3x3.conv.weight": (64, 32, 3, 3),
    "Conv2d_3b_1x1.conv.weight": (80, 64, 1, 1),
    "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
    "Mixed_5b.branch1x1.conv.weight": (64, 192, 1, 1),
    "Mixed_5b.branch5x5_1.conv.weight": (48, 192, 1, 1),
    "Mixed_5b.branch5x5_2.conv.weight": (64, 48, 5, 5),
    "Mixed_5b.branch3x3dbl_3.conv.weight": (96, 96, 3, 3),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_5c.branch_pool.conv.weight": (64, 256, 1, 1),
    "Mixed_5d.branch1x1.conv.weight": (64, 288, 1, 1),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6a.branch3x3dbl_3.conv.weight": (96, 96, 3, 3),
    "Mixed_6b.branch7x7_1.conv.weight": (128, 768, 1, 1),
    "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
    "Mixed_6b.branch7x7_3.conv.weight": (192, 128, 7, 1),
    "Mixed_6b.branch7x7dbl_2.conv.weight": (128, 128, 7, 1),
    "Mixed_6b.branch7x7dbl_5.conv.weight": (192, 128, 1, 7),
    "Mixed_6c.branch7x7_1.conv.weight": (160, 768, 1, 1),
    "Mixed_6d.branch7x7dbl_4.bn.running_mean": (160,),
    "Mixed_6e.branch7x7dbl_1.conv.weight": (192, 768, 1, 1),
    "Mixed_6e.branch_pool.conv.weight": (192, 768, 1, 1),
    "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
    "Mixed_7a.branch7x7x3_2.conv.weight": (192, 192, 1, 7),
    "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
    "Mixed_7b.branch1x1.conv.weight": (320, 1280, 1, 1),
    "Mixed_7b.branch3x3_2a.conv.weight": (384, 384, 1, 3),
    "Mixed_7b.branch3x3_2b.conv.weight": (384, 384, 3, 1),
    "Mixed_7b.branch3x3dbl_1.conv.weight": (448, 1280, 1, 1),
    "Mixed_7b.branch3x3dbl_2.conv.weight": (384, 448, 3, 3),
    "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
    "Mixed_7c.branch_pool.bn.running_var": (192,),
    "fc.weight": (1008, 2048),
    "fc.bias": (1008,),
}
CONV_UNIT_SUFFIXES = (
    "conv.weight",
    "bn.weight",
    "bn.bias",
    "bn.running_mean",
    "bn.running_var",
    "bn.num_batches_tracked",
)


def random_fid_inception(seed: int) -> FIDInceptionV3:
    """Random weights that keep the activations' scale (He init), and random BatchNorm statistics
    and offsets, so that the features depend visibly on the image and eval mode matters."""
    g = torch.Generator().manual_seed(seed)
    model = FIDInceptionV3()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu", generator=g)
            elif isinstance(module, torch.nn.BatchNorm2d):
                module.bias.normal_(0.0, 0.5, generator=g)
                module.running_mean.normal_(0.0, 0.1, generator=g)
                module.running_var.uniform_(0.5, 2.0, generator=g)
                module.num_batches_tracked.fill_(1)
        torch.nn.init.normal_(model.fc.weight, std=FEATURE_DIM**-0.5, generator=g)
        model.fc.bias.zero_()
    return model


@pytest.fixture(scope="module")
def model() -> FIDInceptionV3:
    return random_fid_inception(0)


@pytest.fixture(scope="module")
def pth_file(model, tmp_path_factory):
    """The stand-in for pytorch-fid's checkpoint: a plain state dict saved with torch.save."""
    path = tmp_path_factory.mktemp("weights") / "pt_inception-random.pth"
    torch.save(model.state_dict(), path)
    return path


def test_parameter_count_is_the_fid_networks():
    with torch.device("meta"):  # shapes only, no initialisation cost
        meta = FIDInceptionV3()
    assert sum(p.numel() for p in meta.parameters()) == FID_INCEPTION_PARAMETERS


def test_state_dict_names_and_shapes_match_pytorch_fid():
    with torch.device("meta"):
        state = FIDInceptionV3().state_dict()
    for key, shape in REFERENCE_SHAPES.items():
        assert key in state, key
        assert tuple(state[key].shape) == shape, key
    assert len(state) == STATE_DICT_KEYS
    assert sum(k.endswith(".conv.weight") for k in state) == CONV_UNITS
    assert all(k in ("fc.weight", "fc.bias") or k.endswith(CONV_UNIT_SUFFIXES) for k in state)
    assert not any(k.startswith("AuxLogits") for k in state)
    assert state["fc.weight"].shape == (NUM_CLASSES, FEATURE_DIM)


def test_tensorflow_pooling_in_the_mixed_blocks(model):
    # TF's "SAME" average pool ignores the padding: a constant image stays constant at the borders.
    ones = torch.ones(1, 2, 5, 5)
    assert torch.equal(_pool3x3_same(ones, "avg"), ones)
    assert torch.equal(_pool3x3_same(-ones, "max"), -ones)
    pools = {name: model.get_submodule(name).pool for name in ("Mixed_7b", "Mixed_7c")}
    assert pools == {"Mixed_7b": "avg", "Mixed_7c": "max"}


def test_features_of_small_grey_images(model):
    g = torch.Generator().manual_seed(1)
    grey = torch.rand(2, 1, 8, 8, generator=g) * 2 - 1
    with torch.no_grad():
        f = model.features(grey)
        rgb = model.features(grey.repeat(1, 3, 1, 1))
    assert f.shape == (2, FEATURE_DIM) and f.dtype == torch.float32
    assert torch.isfinite(f).all() and f.std() > 0
    assert not torch.equal(f[0], f[1])  # the features see the image
    torch.testing.assert_close(f, rgb, rtol=1e-5, atol=1e-6)  # grey = the same RGB image


def test_features_input_checks(model):
    with pytest.raises(ValueError, match="1 or 3"):
        model.features(torch.zeros(1, 4, 8, 8))
    with pytest.raises(TypeError, match=r"127\.5"):
        model.features(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


def test_convert_then_load_round_trip(model, pth_file, tmp_path, monkeypatch, capsys):
    dst = tmp_path / "fid_inception.safetensors"
    assert main(["convert", str(pth_file), str(dst)]) == 0
    out = capsys.readouterr().out
    src_sha, dst_sha = sha256_hex(pth_file.read_bytes()), sha256_hex(dst.read_bytes())
    assert f"sha256 {src_sha}" in out and f"sha256 {dst_sha}" in out
    assert "note: this is not pytorch-fid's" in out  # random weights are not the FID weights
    metadata = read_metadata(dst.read_bytes())
    assert metadata["source_sha256"] == src_sha

    def no_pickle(*args, **kwargs):
        raise AssertionError("load_fid_inception must not unpickle")

    monkeypatch.setattr(torch, "load", no_pickle)
    loaded = load_fid_inception(dst, expected_sha256=dst_sha)
    assert not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)

    with pytest.raises(WeightsIntegrityError, match="SHA-256 mismatch"):
        load_fid_inception(dst, expected_sha256="0" * 64)


def test_pth_is_refused_with_the_conversion_command(pth_file, tmp_path):
    with pytest.raises(ValueError, match=r"python -m diffusion\.inception convert .*\.pth"):
        load_fid_inception(pth_file)
    disguised = tmp_path / "renamed.safetensors"  # a pickle under a safetensors name
    disguised.write_bytes(pth_file.read_bytes()[:4096])
    with pytest.raises(ValueError, match=r"pickle.*python -m diffusion\.inception convert"):
        load_fid_inception(disguised)
    with pytest.raises(FileNotFoundError, match=r"python -m diffusion\.inception convert"):
        load_fid_inception(tmp_path / "missing.safetensors")


def test_convert_refuses_other_state_dicts(tmp_path, capsys):
    wrong = tmp_path / "wrong.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 5, 5)}, wrong)
    assert main(["convert", str(wrong), str(tmp_path / "out.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "missing" in err and "reshaped" in err and "Conv2d_1a_3x3.conv.weight" in err
    assert not (tmp_path / "out.safetensors").exists()


def test_module_entry_point(tmp_path):
    # The documented command, in a fresh interpreter (no weights: it reports a missing file).
    result = subprocess.run(
        [sys.executable, "-m", "diffusion.inception", "convert", str(tmp_path / "x.pth"), "y"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    assert "must end in .safetensors" in result.stderr
    assert "Warning" not in result.stderr  # e.g. runpy's, were diffusion/__init__ to import it


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_features_on_cuda_match_cpu(model):
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    cuda = random_fid_inception(0).cuda()
    with torch.no_grad():
        on_cpu, on_gpu = model.features(x), cuda.features(x)  # x moves to the model's device
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.float32
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=1e-2, atol=1e-3)  # TF32 convolutions
