"""Where a generation job's files lie, under ``generate.output`` (default
``ROOT/generations/<job id>``)::

    _job.json                    the job, written first (a different job here is refused)
    shards/shard-000000.parquet  samples [0, S), [S, 2S), ...: index, label, pixels (uint8 CHW)
    png/000000042.png            one file per sample when generate.format = parquet+png
    _manifest.json               committed last: the job, counts, the shard list
    grid.png                     a sample grid drawn from the first shard (write_grid)

Readers trust only a committed ``_manifest.json``, as for datasets.
"""

from __future__ import annotations

FORMAT = "diffusion-pipeline/generation"
MANIFEST = "_manifest.json"
JOB_FILE = "_job.json"
GRID_FILE = "grid.png"
SHARDS_DIR = "shards"


def shard_name(k: int) -> str:
    """Shard ``k``'s file name in ``shards/``."""
    return f"shard-{k:06d}.parquet"


def shard_path(k: int) -> str:
    """Shard ``k``'s path relative to the output (as the manifest lists it)."""
    return f"{SHARDS_DIR}/{shard_name(k)}"
