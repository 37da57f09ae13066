"""Resuming a run on a worker: the newest of its checkpoints that passes verification."""

from __future__ import annotations

import json
from typing import Any

from tasks.errors import CheckpointError
from tasks.train.data import pyarrow_fs


def _restore(checkpoint, run_dir: str, options: dict, echo) -> Any:
    """The newest checkpoint of this run that passes verification, or None.

    Candidates are Ray's latest reported checkpoint and every ``checkpoint_*`` directory in the
    run's storage folder: Ray's controller collects reports every ~2 s, so a checkpoint written
    just before a crash can be on storage yet unknown to Ray. A damaged candidate is refused
    (with the reason) and the next older one is tried.
    """
    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    from tasks.checkpoints import STATE_FILE, load_training_checkpoint
    from tasks.storage import Location

    loc = Location.of(run_dir, options)
    fs = pyarrow_fs(loc) or pafs.LocalFileSystem()
    try:
        infos = fs.get_file_info(pafs.FileSelector(loc.path, allow_not_found=True))
    except OSError:
        infos = []
    candidates = {i.path for i in infos
                  if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")}
    if checkpoint is not None and isinstance(fs, pafs.LocalFileSystem) == (
            checkpoint.filesystem is None or isinstance(checkpoint.filesystem,
                                                         pafs.LocalFileSystem)):
        candidates.add(checkpoint.path)

    def step_of(path: str) -> int:
        try:
            with fs.open_input_stream(f"{path}/{STATE_FILE}") as f:
                return int(json.loads(f.read())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            return -1

    ordered = sorted(candidates, key=lambda p: (step_of(p), p), reverse=True)
    for p in ordered:
        try:
            with Checkpoint(p, filesystem=fs).as_directory() as d:
                ck = load_training_checkpoint(d)
        except (CheckpointError, OSError) as e:
            echo(f"refusing checkpoint {p}: {e}")
            continue
        echo(f"restoring checkpoint {p} (step {ck.step})")
        return ck
    if ordered:
        echo("no usable checkpoint; starting from step 0")
    return None
