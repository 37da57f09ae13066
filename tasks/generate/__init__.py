"""The batch generation stage: N samples from a model, on Ray Data, deterministic and resumable.

Sample i depends on the job and i alone (not on batching, actors or shards), and a job killed
part-way finishes where it stopped. The package, in the order a job runs:

    config.py   GenerateConfig, the ``generate`` section of the pipeline config
    resolve.py  resolve_job: settings + model → Job, every setting checked against the model
    job.py      Job (its id, shape, shards) and labels_for: what sample i depends on
    layout.py   the output's files: _job.json, shards/, png/, _manifest.json, grid.png
    driver.py   generate: the Ray Data job, resume from complete shards, the manifest commit
    worker.py   Sampler, the Ray Data actor, and the shard and PNG bytes it writes
    samples.py  read_samples, grid_images, write_grid: a complete job read back

The names below are importable from ``tasks.generate`` as before. They load on first use: Ray
imports ``tasks.generate.worker`` in every sampler actor, which runs this file first, and the
actor must not load the driver (model references, the MLflow registry) with it.
"""

from __future__ import annotations

import importlib

_HOMES = {  # public name → the module of this package that defines it
    "GenerateConfig": "config",
    "resolve_job": "resolve",
    "Job": "job", "labels_for": "job", "LABEL_STEP": "job",
    "FORMAT": "layout", "MANIFEST": "layout", "JOB_FILE": "layout", "GRID_FILE": "layout",
    "generate": "driver", "GenerateResult": "driver", "auto_actors": "driver",
    "Sampler": "worker", "sample_indices": "worker", "shard_bytes": "worker",
    "png_bytes": "worker",
    "read_samples": "samples", "grid_images": "samples", "write_grid": "samples",
}

__all__ = list(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})
