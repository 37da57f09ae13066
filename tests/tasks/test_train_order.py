"""What a training step sees is a function of (seed, step, rank): its random numbers and its
rows (tasks/train/order.py, tasks/train/data.py's batches). Resuming at step n gives what the
uninterrupted run gives from step n, and ranks differ. The run-level check (a killed and
resumed run ends with the weights of an uninterrupted one): tests/tasks/test_train.py."""

from __future__ import annotations

import itertools

import pytest
import torch

from tasks.train.data import _batches
from tasks.train.order import EpochOrder, mix, seed_step, shuffle_seed


def draws(seed: int, rank: int, step: int, history: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator()
    for _ in range(history):  # whatever was drawn before does not matter
        torch.randn(7, generator=gen)
        torch.rand(3)
    seed_step(gen, seed, rank, step)
    return torch.randn(4, generator=gen), torch.rand(4)  # the generator's and the global RNG's


def test_a_step_draws_the_same_numbers_whatever_came_before_and_ranks_differ():
    a, b = draws(0, 0, 5), draws(0, 0, 5, history=3)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    for other in (draws(0, 1, 5), draws(0, 0, 6), draws(1, 0, 5)):
        assert not any(torch.equal(x, y) for x, y in zip(a, other, strict=True))
    assert mix(1, 2, 3) == mix(1, 2, 3) != mix(1, 2, 4) and 0 <= mix(9) < 2**63
    assert shuffle_seed(0, 1) != shuffle_seed(0, 2) and 0 <= shuffle_seed(5, 7) < 2**31


def test_epoch_order_deals_each_epoch_once_across_ranks_and_resumes_anywhere():
    rows, world, per_worker = 103, 3, 5  # 34 rows per rank: 6 batches, 4 rows left out
    orders = [EpochOrder(rows, seed=3, rank=r, world=world, per_worker=per_worker)
              for r in range(world)]
    assert orders[0].batches_per_epoch == 6
    for epoch in range(3):
        steps = range(epoch * 6, epoch * 6 + 6)
        seen = [torch.cat([o.indices(s) for s in steps]) for o in orders]
        everything = torch.cat(seen)
        assert len(everything) == len(set(everything.tolist())) == 90  # no row twice
        assert all(len(set(s.tolist())) == 30 for s in seen)
    first, second = (torch.cat([orders[0].indices(s) for s in range(e * 6, e * 6 + 6)])
                     for e in (0, 1))
    assert not torch.equal(first, second)  # a new permutation every epoch
    # a fresh order (a resumed worker) jumping straight to step 13 gives the same rows
    fresh = EpochOrder(rows, seed=3, rank=1, world=world, per_worker=per_worker)
    assert torch.equal(fresh.indices(13), orders[1].indices(13))
    assert orders[1].position(13) == (2, 1)
    with pytest.raises(RuntimeError, match=r"8 rows over 2 worker\(s\) give no batch of 5 per "
                                         r"worker; lower train.batch_size"):
        EpochOrder(8, seed=0, rank=0, world=2, per_worker=5)


class Shard:
    """A stand-in for Ray Train's dataset shard: ``blocks`` (dicts of tensors), handed over
    in a scrambled block order when whole blocks are asked for (as Ray Data may), else
    re-batched in order with a deterministic local shuffle per seed."""

    def __init__(self, n: int):
        x = torch.arange(n, dtype=torch.uint8).reshape(n, 1, 1, 1)
        self.blocks = [{"x": x[i:i + 10], "label": torch.arange(i, min(i + 10, n)),
                        "row": torch.arange(i, min(i + 10, n))} for i in range(0, n, 10)]

    def iter_torch_batches(self, batch_size=None, drop_last=False, local_shuffle_buffer_size=None,
                           local_shuffle_seed=None):
        if batch_size is None:
            yield from self.blocks[1::2] + self.blocks[0::2]
            return
        label = torch.cat([b["label"] for b in self.blocks])
        perm = torch.randperm(len(label), generator=torch.Generator().manual_seed(
            local_shuffle_seed))
        for i in range(0, len(label) - batch_size + 1 if drop_last else len(label), batch_size):
            yield {"label": label[perm[i:i + batch_size]]}


@pytest.mark.parametrize("in_memory", [True, False])
def test_batches_resumed_at_step_n_are_those_of_the_uninterrupted_run(in_memory):
    def run(start: int, count: int, rank: int = 0, world: int = 1) -> list[list[int]]:
        it = _batches(Shard(47), 4, seed=11, start=start, rank=rank, world=world,
                      in_memory=in_memory, rows=47)
        return [b["label"].tolist() for b in itertools.islice(it, count)]

    whole = run(0, 30)  # 11 batches per epoch: almost three epochs
    for start in (1, 10, 11, 12, 25):
        assert run(start, 30 - start) == whole[start:], start
    epoch = [row for batch in whole[:11] for row in batch]
    assert len(epoch) == len(set(epoch))  # an epoch: no row twice
    if in_memory:  # two ranks: different rows at every step, and they too resume exactly
        r0, r1 = run(0, 8, 0, 2), run(0, 8, 1, 2)
        assert all(not set(a) & set(b) for a, b in zip(r0, r1, strict=True))
        assert run(5, 3, 1, 2) == r1[5:]
        # the rows are each row's own: labels equal the row index here
        it = _batches(Shard(47), 4, seed=11, start=0, rank=0, world=1, in_memory=True, rows=47)
        b = next(it)
        assert b["x"].flatten().tolist() == b["label"].tolist()


def test_a_streamed_epoch_resumed_on_two_workers_neither_repeats_nor_skips_a_row(ray_local):
    """The streamed path through Ray Data's real split (the trainer's DataConfig): each pass
    deals every rank the same rows in the same order, whichever worker asks first and however
    the read tasks' finishing order varies, so a pass resumed at step n on two workers goes on
    with exactly the rows the uninterrupted run trained on from step n."""
    import random
    import threading
    import time

    import numpy as np
    import ray

    from tasks.train.data import _blocks
    from tasks.train.driver import _data_config

    n, per_worker = 400, 8  # 200 rows per rank: 25 batches per epoch
    x = (np.arange(n) % 251).astype(np.uint8).reshape(n, 1, 1, 1)

    def jitter(batch):  # the map tasks finish in a different order on every pass
        time.sleep(random.random() * 0.03)
        return batch

    ds = ray.data.from_arrow(_blocks(x, np.arange(n), rows_per_block=29)).map_batches(
        jitter, batch_format="pyarrow")

    def deal(start: int, count: int, delays: tuple[float, float]) -> list[list[list[int]]]:
        shards = [s["train"] for s in _data_config(False).configure(
            {"train": ds}, world_size=2, worker_handles=None, worker_node_ids=None)]
        out: list = [None, None]

        def work(rank: int) -> None:
            it = _batches(shards[rank], per_worker, seed=5, start=start, rank=rank, world=2,
                          in_memory=False, rows=n)
            got = []
            for b in itertools.islice(it, count):
                time.sleep(delays[rank])  # one worker slower than the other
                got.append(b["label"].tolist())
            out[rank] = got

        threads = [threading.Thread(target=work, args=(r,)) for r in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert all(o is not None for o in out), "a worker did not finish"
        return out

    whole = deal(0, 30, (0.0, 0.002))  # into the second epoch
    epoch = [row for rank in whole for batch in rank[:25] for row in batch]
    assert len(epoch) == len(set(epoch)) == n  # no row twice in an epoch, none left out
    for start in (11, 27):  # mid-epoch in the first epoch and in the second, other worker first
        assert deal(start, 30 - start, (0.002, 0.0)) == [r[start:] for r in whole], start
