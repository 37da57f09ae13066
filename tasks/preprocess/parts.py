"""Decoding a listing on Ray Data into one run's part files, and removing them if not committed.

Ray Data maps the listing's work items through Pillow (:func:`tasks.decode.decode_batch`:
decode, mode conversion, EXIF orientation, center-crop, resize) and a
:class:`tasks.decode.VersionPartsDatasink` writes train/val part files named after the run and
returns per-part statistics. The part files stay invisible to readers until the driver commits
the manifest that lists them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from tasks.datasets import DataConfig
from tasks.decode import VersionPartsDatasink, decode_batch
from tasks.errors import StorageError
from tasks.preprocess.listing import Listing, _absolute
from tasks.runtime import RuntimeConfig
from tasks.storage import Location, call, storage_options


def write_parts(listing: Listing, cfg: DataConfig, runtime: RuntimeConfig, vdir: Location,
                run_id: str, *, echo: Callable[[str], None]) -> tuple[list[dict], float]:
    """Decode ``listing`` on Ray Data into part files under ``vdir``; (per-task results, seconds).

    On any failure the part files of this run are removed before the error propagates.
    """
    import ray

    options = storage_options(vdir.url, runtime)
    source_options = storage_options(cfg.source, runtime)
    sink = VersionPartsDatasink(vdir.url, options, run_id, cfg.channels)
    blocks = _num_blocks(len(listing.units), cfg, listing.kind)
    echo(f"decoding on Ray Data in {blocks} task(s) → {vdir.describe()}")
    t_work = time.perf_counter()
    # The plan is one fused operator (decode → write), so Ray Data's per-operator resource
    # reservation has nothing to share out; left on, it admits a single task until its first
    # cluster-resource refresh (~1 s, measured in benchmarks/results/preprocess.md). The
    # dataset copies the context when it is created, so the switch is scoped to this dataset.
    ctx = ray.data.DataContext.get_current()
    saved = ctx.op_resource_reservation_enabled
    ctx.op_resource_reservation_enabled = False
    try:
        ds = ray.data.from_items(listing.units, override_num_blocks=blocks)
    finally:
        ctx.op_resource_reservation_enabled = saved
    try:
        (
            ds
            .map_batches(
                decode_batch,
                batch_format="pyarrow",
                batch_size=None,
                fn_kwargs={
                    "resolution": cfg.resolution, "channels": cfg.channels,
                    "max_pixels": cfg.max_image_pixels, "val_fraction": cfg.val_fraction,
                    "test_fraction": cfg.test_fraction,
                    "max_file_bytes": cfg.max_file_bytes, "fetch_bytes": cfg.fetch_bytes,
                    "image_column": cfg.image_column, "label_column": cfg.label_column,
                    "key_column": cfg.key_column, "options": source_options,
                    "source": _absolute(cfg.source),
                },
            )
            .write_datasink(sink)
        )
    except BaseException:
        _discard_run(vdir, run_id)
        raise
    work_s = time.perf_counter() - t_work
    return sink.results, work_s


def _num_blocks(n_units: int, cfg: DataConfig, kind: str) -> int:
    if kind == "parquet":
        return n_units  # one row group per task
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    by_size = math.ceil(n_units / cfg.rows_per_file)
    # ≥ 4 blocks per CPU once there is enough work (≥ 64 inputs each), in whole waves
    blocks = max(by_size, min(4 * cpus, n_units // 64))
    if blocks > cpus:
        blocks = math.ceil(blocks / cpus) * cpus
    return max(1, min(n_units, blocks))


def _discard_run(vdir: Location, run_id: str) -> None:
    """Best-effort removal of the part files one run wrote (they were never visible)."""
    try:
        paths = call(vdir, vdir.fs.glob, f"{vdir.path}/*/part-{run_id}-*.parquet")
        if paths:
            call(vdir, vdir.fs.rm, paths)
    except (OSError, StorageError):
        pass
