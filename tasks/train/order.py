"""What training step ``n`` on rank ``r`` sees, as pure functions of (``train.seed``, ``n``,
``r``): the seeds of its random numbers and, for a train split held in memory, its rows.

Nothing of the data order or of the RNG is carried from step to step, so nothing of them needs
saving: a run resumed from the checkpoint of step ``n`` recomputes exactly what step ``n + 1``
would have seen, on every rank. A run killed and resumed therefore trains on the same rows with
the same noise as the same run never interrupted, and every rank draws its own noise after a
resume (before, rank 0's generator state was saved and restored onto every rank, and the data
order restarted from a seed derived from the step). The same idea as a counter-based RNG
(JAX's ``fold_in``, Philox): the state is the counter.

Each function here is cheap: re-seeding costs microseconds per step, and an epoch's
permutation is computed once per epoch.
"""

from __future__ import annotations

import hashlib
from typing import Any

# What a seed is for: the parts of step n's randomness drawn from different streams.
_NOISE, _GLOBAL, _EPOCH, _SHUFFLE = 1, 2, 3, 4


def mix(*parts: int) -> int:
    """A 63-bit seed from integers, the same in every process and Python version (Python's
    ``hash`` of a tuple is neither)."""
    h = hashlib.blake2b(b",".join(str(int(p)).encode() for p in parts), digest_size=8)
    return int.from_bytes(h.digest(), "little") >> 1


def seed_step(generator: Any, seed: int, rank: int, step: int) -> None:
    """Seed step ``step`` (0-based) on ``rank``: ``generator`` (noise, timesteps, label
    dropout, flips) and torch's global RNG (the model's dropout) start from seeds of
    (``seed``, ``rank``, ``step``) alone."""
    import torch

    generator.manual_seed(mix(seed, _NOISE, rank, step))
    torch.manual_seed(mix(seed, _GLOBAL, rank, step))


def shuffle_seed(seed: int, epoch: int) -> int:
    """The local shuffle seed of a streamed epoch (Ray Data's ``local_shuffle_seed``)."""
    return mix(seed, _SHUFFLE, epoch) % 2**31


class EpochOrder:
    """The rows of each step for a split of ``rows`` rows held in memory, as
    ``torch.utils.data.DistributedSampler`` orders them: epoch ``e`` is a permutation of all
    rows seeded by (``seed``, ``e``); rank ``r`` of ``world`` takes every ``world``-th row of it
    from position ``r``, cut to the same count on every rank, in batches of ``per_worker``.
    Every epoch uses each row at most once; the rows beyond the last whole batch differ from
    epoch to epoch, so every row is used."""

    def __init__(self, rows: int, *, seed: int, rank: int, world: int, per_worker: int):
        self.rows, self.seed, self.rank, self.world = rows, seed, rank, world
        self.per_worker = per_worker
        self.per_rank = rows // world
        self.batches_per_epoch = self.per_rank // per_worker
        if self.batches_per_epoch == 0:
            raise RuntimeError(
                f"the train split's {rows} rows over {world} worker(s) give no batch of "
                f"{per_worker} per worker; lower train.batch_size")
        self._epoch: int | None = None
        self._mine: Any = None

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) of step ``step`` (0-based)."""
        return divmod(step, self.batches_per_epoch)

    def indices(self, step: int):
        """Row indices (int64 tensor of ``per_worker``) of step ``step`` on this rank."""
        import torch

        epoch, i = self.position(step)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(mix(self.seed, _EPOCH, epoch))
            order = torch.randperm(self.rows, generator=g)
            self._mine = order[self.rank::self.world][:self.per_rank]
            self._epoch = epoch
        return self._mine[i * self.per_worker:(i + 1) * self.per_worker]
