"""The sampling pipeline (diffusion.pipeline): one path from a model to uint8 images."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from diffusion.denoiser import Denoiser, classifier_free_guidance
from diffusion.noise import SampleNoise
from diffusion.pipeline import DiffusionConfig, sample_images
from diffusion.pixels import unit_to_uint8
from diffusion.samplers import SamplerConfig, sample
from diffusion.schedules import NoiseSchedule
from diffusion.serialization import save_model_bytes, unet_from_bytes
from diffusion.unet import UNet, UNetConfig

SHAPE = (1, 8, 8)
TINY = UNetConfig(in_channels=1, resolution=8, base_channels=8, channel_mult=(1,),
                  num_res_blocks=1, attention_resolutions=(), num_classes=3)


def tiny_unet(num_classes: int | None = 3) -> UNet:
    torch.manual_seed(0)
    return UNet(dataclasses.replace(TINY, num_classes=num_classes)).eval()


SCHEDULE = DiffusionConfig(T=50).build_schedule()
SAMPLER = SamplerConfig("ddpm", steps=5)  # stochastic: a batch-dependent draw would show


def test_sample_i_is_the_same_in_any_batch_size():
    model = tiny_unet()
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    kw = dict(labels=labels, guidance_scale=2.0, null_label=3)
    whole = sample_images(model, SCHEDULE, SHAPE, SampleNoise(7, range(7)), SAMPLER, **kw)
    for batch in (1, 3, 4):
        parts = sample_images(model, SCHEDULE, SHAPE, SampleNoise(7, range(7)), SAMPLER,
                              batch_size=batch, **kw)
        assert torch.equal(parts, whole)
    assert whole.dtype == torch.uint8 and whole.shape == (7, *SHAPE)


def test_it_is_the_sampler_on_the_guided_denoiser():
    """The pipeline adds nothing: it equals the loop written by hand."""
    model = tiny_unet()
    labels = torch.tensor([2, 0, 1])
    guided = classifier_free_guidance(model, 1.5, null_label=3)
    by_hand = unit_to_uint8(sample(Denoiser(guided, SCHEDULE, "v", labels=labels), SHAPE,
                                   SampleNoise(3, range(3)), SAMPLER))
    out = sample_images(model, SCHEDULE, SHAPE, SampleNoise(3, range(3)), SAMPLER,
                        prediction="v", labels=labels, guidance_scale=1.5, null_label=3)
    assert torch.equal(out, by_hand)


def test_without_labels_a_conditional_model_gets_the_null_class_unguided():
    model = tiny_unet()
    null = torch.full((4,), 3)
    by_hand = unit_to_uint8(sample(Denoiser(model, SCHEDULE, "eps", labels=null), SHAPE,
                                   SampleNoise(1, range(4)), SAMPLER))
    out = sample_images(model, SCHEDULE, SHAPE, SampleNoise(1, range(4)), SAMPLER,
                        guidance_scale=4.0, null_label=3)
    assert torch.equal(out, by_hand)


def test_an_unconditional_model_takes_no_labels():
    model = tiny_unet(num_classes=None)
    out = sample_images(model, SCHEDULE, SHAPE, SampleNoise(1, range(2)), SAMPLER)
    assert out.shape == (2, *SHAPE)
    with pytest.raises(ValueError, match="unconditional network"):
        sample_images(model, SCHEDULE, SHAPE, SampleNoise(1, range(2)), SAMPLER,
                      labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="one class per sample"):
        sample_images(tiny_unet(), SCHEDULE, SHAPE, SampleNoise(1, range(2)), SAMPLER,
                      labels=torch.tensor([0]), null_label=3)


def test_per_row_seeds_equal_each_rows_own_job():
    """A table of requests (seed_b, index_b) gives row b what job seed_b gives its sample."""
    model = tiny_unet()
    seeds, indices = [5, 9, 5], [2, 0, 7]
    table = sample_images(model, SCHEDULE, SHAPE, SampleNoise(seeds, indices), SAMPLER,
                          null_label=3)
    for row, (seed, index) in enumerate(zip(seeds, indices, strict=True)):
        alone = sample_images(model, SCHEDULE, SHAPE, SampleNoise(seed, [index]), SAMPLER,
                              null_label=3)
        assert torch.equal(table[row], alone[0])


def test_noise_slices_are_the_rows_of_the_whole():
    noise = SampleNoise([1, 2, 3, 4], [0, 5, 6, 7])
    assert torch.equal(noise[1:3].draw(4, (2, 2)), noise.draw(4, (2, 2))[1:3])
    with pytest.raises(ValueError, match="one seed, or one per index"):
        SampleNoise([1, 2], [0, 1, 2])
    with pytest.raises(TypeError, match="slice"):
        noise[0]


def test_diffusion_config_round_trips_and_builds_the_schedule():
    cfg = DiffusionConfig(schedule="cosine", T=200, prediction="v", min_snr_gamma=5.0)
    again = DiffusionConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    ref = NoiseSchedule.cosine(200)
    assert torch.equal(cfg.build_schedule().alphas_cumprod, ref.alphas_cumprod)
    assert cfg.loss_config().prediction == "v" and cfg.loss_config().min_snr_gamma == 5.0


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"T": 0}, "diffusion.T must be in"),
    ({"schedule": "quadratic"}, "schedule kind 'quadratic' is unknown"),
    ({"beta_start": 0.1, "beta_end": 0.01}, "beta_start <= beta_end"),
    ({"prediction": "score"}, "prediction"),
    ({"min_snr_gamma": 0.0}, "min_snr_gamma"),
])
def test_diffusion_config_checks_are_the_schedules_and_the_losss(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DiffusionConfig(**kwargs)


def test_diffusion_config_from_dict_names_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown diffusion config keys \['steps'\]"):
        DiffusionConfig.from_dict({"T": 10, "steps": 3})


def test_unet_from_bytes_checks_digest_and_sections():
    model = tiny_unet()
    weights, config = save_model_bytes(model.state_dict(), {"unet": TINY.to_dict()})
    loaded, cfg = unet_from_bytes(weights, config)
    assert cfg == {"unet": TINY.to_dict()}
    x, t = torch.zeros(1, *SHAPE), torch.tensor([3])
    assert torch.equal(loaded(x, t, torch.tensor([1])), model(x, t, torch.tensor([1])))
    with pytest.raises(ValueError, match="lacks diffusion"):
        unet_from_bytes(weights, config, require=("unet", "diffusion"))
