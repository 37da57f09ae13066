"""Per-sample randomness: sample i depends on (seed, i, step) only, never on its batch."""

from __future__ import annotations

import pytest
import torch
from oracle import gaussian_data, gaussian_oracle

from diffusion.denoiser import Denoiser
from diffusion.noise import INITIAL_STEP, SampleNoise, stream_seed
from diffusion.samplers import SamplerConfig, sample
from diffusion.schedules import NoiseSchedule

SCHEDULE = NoiseSchedule.linear(1000)
SHAPE = (3, 2, 2)
N = 64


def denoiser() -> Denoiser:
    return Denoiser(gaussian_oracle(gaussian_data(channels=3), SCHEDULE), SCHEDULE, "eps")


def chunks(size: int, reverse: bool = False) -> list[range]:
    parts = [range(i, min(i + size, N)) for i in range(0, N, size)]
    return parts[::-1] if reverse else parts


def generate(cfg: SamplerConfig, parts: list[range], seed: int = 0) -> torch.Tensor:
    den = denoiser()
    out: dict[int, torch.Tensor] = {}
    for part in parts:
        x = sample(den, SHAPE, SampleNoise(seed, part), cfg)
        out.update(zip(part, x, strict=True))
    return torch.stack([out[i] for i in range(N)])


# Stochastic samplers: noise is drawn at every step, so a batch-dependent draw would show.
STOCHASTIC = [
    SamplerConfig("ddpm", 20),
    SamplerConfig("ddim", 20, eta=1.0),
    SamplerConfig("dpmpp_2m_sde", 20),
    SamplerConfig("langevin", 5, n_steps_each=2),
]


@pytest.mark.parametrize("cfg", STOCHASTIC, ids=lambda c: c.name)
def test_samples_do_not_depend_on_batching(cfg):
    whole = generate(cfg, chunks(N))
    for parts in (chunks(1), chunks(7), chunks(7, reverse=True), chunks(1, reverse=True)):
        assert torch.equal(generate(cfg, parts), whole)
    # a scattered subset, out of order, gets the same rows too
    den = denoiser()
    picked = [63, 5, 17, 0]
    assert torch.equal(sample(den, SHAPE, SampleNoise(0, picked), cfg), whole[picked])


def test_different_seeds_and_indices_differ():
    cfg = SamplerConfig("ddpm", 20)
    a = generate(cfg, chunks(N), seed=0)
    b = generate(cfg, chunks(N), seed=1)
    assert not torch.isclose(a, b).any(dim=(1, 2, 3)).any()  # every sample differs, everywhere
    rows = a.reshape(N, -1)
    assert torch.unique(rows, dim=0).shape[0] == N


def test_stream_seeds_are_distinct_for_neighbours():
    seeds = {
        stream_seed(seed, index, step)
        for seed in range(4)
        for index in range(16)
        for step in range(INITIAL_STEP, 16)
    }
    assert len(seeds) == 4 * 16 * 17
    assert all(0 <= s < 2**63 for s in seeds)  # a valid torch seed
    # swapping the roles of the arguments gives a different stream
    assert stream_seed(1, 2, 3) != stream_seed(2, 1, 3) != stream_seed(3, 2, 1)


def test_draw_is_keyed_by_step_and_index():
    noise = SampleNoise(7, [4, 9, 4])
    a = noise.draw(3, (2, 5))
    assert a.shape == (3, 2, 5) and a.dtype == torch.float32
    assert torch.equal(a[0], a[2])  # same index, same step: same draw
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(noise.draw(4, (2, 5))[0], a[0])
    assert torch.equal(noise.draw(3, (2, 5)), a)  # reproducible
    assert torch.equal(noise.initial((2, 5)), noise.draw(INITIAL_STEP, (2, 5)))
    assert len(noise) == 3


def test_draw_dtype_is_a_cast_of_the_float32_draw():
    a = SampleNoise(0, range(4)).draw(0, (8,))
    b = SampleNoise(0, range(4), dtype=torch.float64).draw(0, (8,))
    c = SampleNoise(0, range(4), dtype=torch.bfloat16).draw(0, (8,))
    assert b.dtype == torch.float64 and c.dtype == torch.bfloat16
    assert torch.equal(b, a.double())
    assert torch.equal(c, a.bfloat16())


def test_draws_look_standard_normal():
    """20 000 draws: mean within 4.5/√n of 0, variance within 4.5·√(2/n) of 1."""
    x = SampleNoise(11, range(2000)).draw(0, (10,)).double()
    n = x.numel()
    assert abs(x.mean().item()) <= 4.5 / n**0.5
    assert abs(x.var().item() - 1) <= 4.5 * (2 / n) ** 0.5


def test_negative_index_is_rejected():
    with pytest.raises(ValueError, match="non-negative"):
        SampleNoise(0, [0, -1])
