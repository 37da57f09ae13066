"""Parquet rows of (label, pixels) ↔ uint8 arrays: the layout that dataset splits and generated
shards share (``pixels``: fixed-size binary, C·H·W bytes; ``label``: int, null = none)."""

from __future__ import annotations

import numpy as np

from tasks.datasets import part_files
from tasks.storage import Location


def to_arrays(batch, shape: list[int]) -> dict[str, np.ndarray]:
    """A pyarrow batch of (label, pixels) → {"x": uint8 [B, C, H, W], "label": int64, -1 = none}."""
    import pyarrow as pa
    import pyarrow.compute as pc

    px = batch.column("pixels")
    px = px.combine_chunks() if isinstance(px, pa.ChunkedArray) else px
    n, width = len(px), px.type.byte_width
    data = np.frombuffer(px.buffers()[1], np.uint8)[px.offset * width:(px.offset + n) * width]
    labels = pc.fill_null(batch.column("label"), -1).to_numpy(zero_copy_only=False)
    return {"x": data.reshape(n, *shape).copy(), "label": labels.astype(np.int64)}


def read_pixel_files(fs, paths: list[str], shape: list[int],
                     limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rows of (label, pixels) Parquet files in order, up to ``limit``: (uint8 [N, C, H, W],
    int64 labels, −1 = none). Dataset parts and generated shards share this layout."""
    import pyarrow.parquet as pq

    xs, ys, n = [], [], 0
    for path in paths:
        if limit is not None and n >= limit:
            break
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=["label", "pixels"])
        for batch in table.to_batches():
            arrays = to_arrays(batch, shape)
            xs.append(arrays["x"])
            ys.append(arrays["label"])
            n += len(arrays["x"])
    if not xs:
        return np.zeros((0, *shape), np.uint8), np.zeros(0, np.int64)
    return np.concatenate(xs)[:limit], np.concatenate(ys)[:limit]


def read_split(root: Location, manifest: dict, split: str,
               limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``limit`` (default: all) rows of one split in manifest order (see
    :func:`read_pixel_files`)."""
    return read_pixel_files(root.fs, part_files(root, manifest, split), manifest["shape"], limit)
