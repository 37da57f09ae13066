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
    layout that ``map_batches(to_arrays)`` produces (an Arrow tensor column ``x``)."""
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    step = rows_per_block or max(1, (16 * 2**20) // max(1, x.strides[0]))  # bytes per row
    return [pa.table({"x": ArrowTensorArray.from_numpy(x[i:i + step]),
                      "label": pa.array(labels[i:i + step])})
            for i in range(0, max(len(x), 1), step)]  # an empty split: one empty block


# --------------------------------------------------------------------------------------------
# Worker: batches from this worker's shard
# --------------------------------------------------------------------------------------------


def _batches(shard, per_worker: int, seed: int, in_memory: bool = False):
    """Endless batches of ``per_worker`` rows from this worker's shard.

    Streaming (large datasets): every epoch is a new pass of Ray Data with a local shuffle
    buffer. ``in_memory`` (the dataset was materialized because it is small): the first epoch
    streams as usual and keeps the rows; later epochs are random permutations of them, without
    restarting Ray Data's execution (a 40-55 ms stall per epoch, see
    benchmarks/results/train_throughput.md) and with a full rather than a buffer-local shuffle.
    """
    import torch

    epoch, kept = 0, []
    while True:
        n = 0
        for b in shard.iter_torch_batches(batch_size=per_worker, drop_last=not in_memory,
                                          local_shuffle_buffer_size=max(4 * per_worker, 256),
                                          local_shuffle_seed=seed + epoch):
            if in_memory:
                kept.append(b)
                if len(b["x"]) < per_worker:  # the shard's tail: kept for later epochs only
                    continue
            n += 1
            yield b
        if n == 0:
            raise RuntimeError(
                f"this worker's shard yields no batch of {per_worker}; lower train.batch_size")
        epoch += 1
        if in_memory:
            break
    data = {k: torch.cat([b[k] for b in kept]) for k in kept[0]}
    del kept
    rows = len(data["x"])
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(rows, generator=gen)
        for i in range(0, rows - per_worker + 1, per_worker):
            idx = order[i:i + per_worker]
            yield {k: v[idx] for k, v in data.items()}
