"""The train split as batches: the driver's Ray Data pipeline (uint8 pixels → [B, C, H, W]
tensors) and each worker's endless batch iterator over its shard."""

from __future__ import annotations

from tasks.datasets import part_files
from tasks.pixels import read_split, to_arrays
from tasks.storage import call


def pyarrow_fs(root):
    """``root``'s filesystem for pyarrow (Ray Data, Ray Train storage); None for local paths."""
    if root.is_local:
        return None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(root.fs))


# --------------------------------------------------------------------------------------------
# Driver: the train split as uint8 arrays for iter_torch_batches
# --------------------------------------------------------------------------------------------


def build_dataset(root, manifest: dict, *, materialize_below_bytes: int = 512 * 2**20):
    import ray

    # Our loop prints one progress line per logging interval; Ray Data's bars would repeat
    # per epoch. The dataset copies the context when it is created.
    ctx = ray.data.DataContext.get_current()
    saved = ctx.enable_progress_bars
    ctx.enable_progress_bars = False
    try:
        return _build_dataset(root, manifest, materialize_below_bytes)
    finally:
        ctx.enable_progress_bars = saved


def _build_dataset(root, manifest: dict, materialize_below_bytes: int):
    import ray

    size = sum(f["bytes"] for f in manifest["splits"]["train"]["files"])
    if size * 4 < materialize_below_bytes:
        # Small (the decoded rows fit the object store many times over): read and decode on the
        # driver and hand Ray Data the arrays. A Ray Data read would run file listing and read
        # tasks, each starting a worker process on a cluster node that then opens the storage:
        # 40-50 s before the first step on the testbed, for a split of a few MB.
        x, labels = call(root, read_split, root, manifest, "train")
        return ray.data.from_arrow(_blocks(x, labels))
    paths = part_files(root, manifest, "train")
    ds = ray.data.read_parquet(paths, filesystem=pyarrow_fs(root)).select_columns(
        ["label", "pixels"])
    return ds.map_batches(to_arrays, batch_format="pyarrow",
                          fn_kwargs={"shape": manifest["shape"]})


def _blocks(x, labels, rows_per_block: int | None = None) -> list:
    """(uint8 [N, C, H, W], int64 [N]) as Arrow tables of about 16 MB each, in row order: the
    layout that ``map_batches(to_arrays)`` produces (an Arrow tensor column ``x``), plus each
    row's index in the split (``row``), by which a worker puts the rows back in split order."""
    import numpy as np
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    step = rows_per_block or max(1, (16 * 2**20) // max(1, x.strides[0]))  # bytes per row
    return [pa.table({"x": ArrowTensorArray.from_numpy(x[i:i + step]),
                      "label": pa.array(labels[i:i + step]),
                      "row": pa.array(np.arange(i, min(i + step, len(x)), dtype=np.int64))})
            for i in range(0, max(len(x), 1), step)]  # an empty split: one empty block


# --------------------------------------------------------------------------------------------
# Worker: batches from this worker's shard
# --------------------------------------------------------------------------------------------


def _batches(shard, per_worker: int, *, seed: int, start: int, rank: int, world: int,
             in_memory: bool, rows: int):
    """Endless batches of ``per_worker`` rows for steps ``start``, ``start + 1``, ... on this
    rank (:mod:`tasks.train.order`).

    ``in_memory`` (the split is small and every worker was handed all of it): the rows are
    read once, put back in split order, and each step takes the rows
    :class:`~tasks.train.order.EpochOrder` gives it: a resumed run sees exactly what the
    uninterrupted run would have, on any number of workers.

    Streamed (large splits; Ray Data splits each epoch's pass between the workers, equal row
    counts): every epoch is a new pass with a local shuffle buffer seeded by the epoch. The
    split is ordered (``preserve_order``, :func:`tasks.train.driver._data_config`), so each
    pass deals every rank the same rows in the same order: Ray Data hands each block, in read
    order, to the rank with the fewest rows so far, whichever worker asks first. A run resumed
    mid-epoch starts that epoch's pass again and skips the batches the checkpoint's step had
    already taken: on every rank, exactly those trained on, so no row of the resumed epoch is
    repeated or left out (docs/stages.md, "Reproducible, exact resume").
    """
    from tasks.train.order import EpochOrder, shuffle_seed

    if in_memory:
        data = _all_rows(shard)
        order = EpochOrder(len(data["x"]), seed=seed, rank=rank, world=world,
                           per_worker=per_worker)
        step = start
        while True:
            idx = order.indices(step)
            step += 1
            yield {"x": data["x"][idx], "label": data["label"][idx]}
    per_epoch = rows // world // per_worker
    if per_epoch == 0:
        raise RuntimeError(
            f"the train split's {rows} rows over {world} worker(s) give no batch of "
            f"{per_worker} per worker; lower train.batch_size")
    epoch, skip = divmod(start, per_epoch)
    while True:
        n = 0
        for b in shard.iter_torch_batches(batch_size=per_worker, drop_last=True,
                                          local_shuffle_buffer_size=max(4 * per_worker, 256),
                                          local_shuffle_seed=shuffle_seed(seed, epoch)):
            n += 1
            if n <= skip:
                continue
            yield b
        if n == 0:
            raise RuntimeError(
                f"this worker's shard yields no batch of {per_worker}; lower train.batch_size")
        epoch, skip = epoch + 1, 0


def _all_rows(shard) -> dict:
    """Every row of an unsplit, materialized train split, in split order (by ``row``: Ray Data
    may hand blocks over in any order)."""
    import torch

    parts = list(shard.iter_torch_batches(batch_size=None))
    data = {k: torch.cat([p[k] for p in parts]) for k in ("x", "label", "row")}
    order = torch.argsort(data.pop("row"))
    return {k: v[order] for k, v in data.items()}
