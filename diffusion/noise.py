"""Per-sample randomness: each random draw of generation is a function of (seed, index, step).

A batch generator seeded once would make sample i depend on the batch size and on which worker
or shard produced it. Here each sample owns a counter-based stream: the Gaussian it receives at a
given ``step`` comes from a generator seeded with a 64-bit hash of (seed, index, step). So
sample i is bit-identical whether it is generated alone, in a batch of 7 or 64, first or last,
on any number of workers (on the same device type and torch version).

Steps are small integers chosen by the sampler; :data:`INITIAL_STEP` is x_T's draw.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

INITIAL_STEP = -1  # the draw of x_T ~ N(0, I)
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """SplitMix64 finaliser (Steele et al. 2014): a bijective 64-bit mixer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def stream_seed(seed: int, index: int, step: int) -> int:
    """A 63-bit seed for the stream of sample ``index`` at ``step`` (distinct inputs collide only
    with probability ~2⁻⁶³)."""
    h = _splitmix64(seed & _MASK64)
    h = _splitmix64(h ^ (index & _MASK64))
    h = _splitmix64(h ^ (step & _MASK64))
    return h >> 1  # torch seeds are int64; keep it non-negative


class SampleNoise:
    """The noise source of one batch: ``indices`` are the global sample indices of its rows.

    ``draw(step, shape)`` returns a [B, *shape] standard normal tensor whose row b depends only on
    (seed, indices[b], step). Draws happen on ``device`` in float32, then are cast to ``dtype``.
    """

    def __init__(
        self,
        seed: int,
        indices: Sequence[int] | Tensor,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.seed = int(seed)
        self.indices = [int(i) for i in torch.as_tensor(indices).reshape(-1).tolist()]
        if any(i < 0 for i in self.indices):
            raise ValueError("sample indices must be non-negative")
        self.device = torch.device(device)
        self.dtype = dtype
        self._generator = torch.Generator(device=self.device)

    def __len__(self) -> int:
        return len(self.indices)

    def draw(self, step: int, shape: Sequence[int]) -> Tensor:
        rows = []
        for index in self.indices:
            self._generator.manual_seed(stream_seed(self.seed, index, step))
            rows.append(
                torch.randn(
                    tuple(shape), generator=self._generator, device=self.device, dtype=torch.float32
                )
            )
        return torch.stack(rows).to(self.dtype)

    def initial(self, shape: Sequence[int]) -> Tensor:
        """x_T ~ N(0, I) for every sample: the draw at :data:`INITIAL_STEP`."""
        return self.draw(INITIAL_STEP, shape)
