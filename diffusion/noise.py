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
    (seed, indices[b], step). ``seed`` is one seed for every row (a generation job), or one per
    row (a table of requests, each row its own (seed, index)), so each row is independent of its
    batch. ``noise[a:b]`` is the source of rows a..b−1. Draws happen on ``device`` in float32,
    then are cast to ``dtype``.
    """

    def __init__(
        self,
        seed: int | Sequence[int],
        indices: Sequence[int] | Tensor,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.indices = [int(i) for i in torch.as_tensor(indices).reshape(-1).tolist()]
        if any(i < 0 for i in self.indices):
            raise ValueError("sample indices must be non-negative")
        if isinstance(seed, Sequence | Tensor):
            self.seeds = [int(s) for s in torch.as_tensor(seed).reshape(-1).tolist()]
            if len(self.seeds) != len(self.indices):
                raise ValueError(f"{len(self.seeds)} seeds for {len(self.indices)} indices; give "
                                 "one seed, or one per index")
        else:
            self.seeds = [int(seed)] * len(self.indices)
        self.device = torch.device(device)
        self.dtype = dtype
        self._generator = torch.Generator(device=self.device)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, rows: slice) -> SampleNoise:
        """The noise source of a slice of the rows (a batch of a larger job)."""
        if not isinstance(rows, slice):
            raise TypeError(f"SampleNoise takes a slice of rows, got {type(rows).__name__}")
        return SampleNoise(self.seeds[rows], self.indices[rows], self.device, self.dtype)

    def draw(self, step: int, shape: Sequence[int]) -> Tensor:
        rows = []
        for seed, index in zip(self.seeds, self.indices, strict=True):
            self._generator.manual_seed(stream_seed(seed, index, step))
            rows.append(
                torch.randn(
                    tuple(shape), generator=self._generator, device=self.device, dtype=torch.float32
                )
            )
        return torch.stack(rows).to(self.dtype)

    def initial(self, shape: Sequence[int]) -> Tensor:
        """x_T ~ N(0, I) for every sample: the draw at :data:`INITIAL_STEP`."""
        return self.draw(INITIAL_STEP, shape)
