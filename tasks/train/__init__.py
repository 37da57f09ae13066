"""The training stage: Ray Train's TorchTrainer on a committed dataset version.

The driver opens the dataset through its manifest, validates the config against it (before any
worker starts), builds a Ray Data pipeline over the train split (uint8 pixels → [B, C, H, W]
tensors), and runs :func:`train_loop_per_worker` on ``train.num_workers`` workers with DDP.

    config.py   the ``train`` section, its checks, the run's identity and default name
    data.py     the train split: the driver's Ray Data pipeline, each worker's batches
    runs.py     a run on storage: the status file, finished runs
    driver.py   run_training: validate, take the run's lease, fit the TorchTrainer
    worker.py   train_loop_per_worker: Ray Train's loop on every worker
    window.py   the loop's logging window (metrics per ``train.log_every`` steps)
    restore.py  the newest checkpoint of a run that passes verification
    grid.py     the sample grid logged to MLflow

The names below are importable from ``tasks.train`` as before the split. They load on first
use: TorchTrainer ships the loop to each worker by reference, and a worker that imports
:mod:`tasks.train.worker` (and so this package) must not load the driver and what it needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# name → the module of this package that defines it
_HOMES = {
    "TrainConfig": "config", "optim_config": "config", "check_config": "config",
    "validate": "config", "EXECUTION_KEYS": "config", "default_run_name": "config",
    "run_identity": "config",
    "build_dataset": "data", "_batches": "data",
    "STATUS_FILE": "runs", "finished_run": "runs",
    "TrainResult": "driver", "run_training": "driver", "plan_run": "driver",
    "train_loop_per_worker": "worker",
    "_restore": "restore",
}
__all__ = [
    "EXECUTION_KEYS", "STATUS_FILE", "TrainConfig", "TrainResult", "build_dataset",
    "check_config", "default_run_name", "finished_run", "optim_config", "plan_run",
    "run_identity",
    "run_training", "train_loop_per_worker", "validate",
]


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})


if TYPE_CHECKING:
    from tasks.train.config import (
        EXECUTION_KEYS,
        TrainConfig,
        check_config,
        default_run_name,
        optim_config,
        run_identity,
        validate,
    )
    from tasks.train.data import _batches as _batches
    from tasks.train.data import build_dataset
    from tasks.train.driver import TrainResult, plan_run, run_training
    from tasks.train.restore import _restore as _restore
    from tasks.train.runs import STATUS_FILE, finished_run
    from tasks.train.worker import train_loop_per_worker
