"""Where the pipeline runs and stores things: the ``runtime.*`` config section and Ray start-up.

On a laptop everything is embedded: a local Ray started on demand, files under
``./pipeline-data``. On a cluster the same code connects to ``RAY_ADDRESS`` (or
``runtime.ray_address``) and stores under an ``s3://`` root.
"""

from __future__ import annotations

import logging
import os
import time

from pydantic import Field, field_validator

from tasks.storage import Location, StorageConfig, storage_options

log = logging.getLogger(__name__)

# Seconds the last ensure_ray() of this process spent starting or joining Ray (None: it did
# not); the retrain flow reports it as fixed overhead.
ray_start_seconds: float | None = None


class RuntimeConfig(StorageConfig):
    """The ``runtime`` section of the pipeline config."""

    root: str = Field("./pipeline-data", description="Storage root: a local path or s3://...")
    ray_address: str | None = Field(
        None, description="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)."
    )
    ray_num_cpus: int | None = Field(
        None, ge=1, description="CPUs for a local Ray (default: all); ignored on a cluster."
    )
    mlflow_uri: str | None = Field(
        None, description="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else SQLite "
        "under the root)."
    )

    @field_validator("root")
    @classmethod
    def _root_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("runtime.root must be a local path or a URL such as s3://bucket/p")
        return v.strip()

    def root_location(self) -> Location:
        """The storage root (local paths made absolute, so Ray workers agree on them)."""
        root = self.root
        if "://" not in root:
            root = os.path.abspath(os.path.expanduser(root))
        return Location.of(root, storage_options(root, self))


def ensure_ray(cfg: RuntimeConfig, *, echo=None) -> float:
    """Connect to (or start) Ray unless this process already did. Returns the seconds it took."""
    global ray_start_seconds
    import ray

    if ray.is_initialized():
        return 0.0
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
    t0 = time.perf_counter()
    kwargs: dict = {"include_dashboard": False, "logging_level": logging.WARNING}
    if address:
        if echo:
            echo(f"connecting to Ray at {address}")
        ray.init(address=address, **kwargs)
    else:
        if echo:
            echo("starting a local Ray (set RAY_ADDRESS or runtime.ray_address for a cluster)")
        # address="local": always a new single-node Ray, never one that happens to run on this
        # machine already (a bare ray.init() would join it).
        ray.init(address="local", num_cpus=cfg.ray_num_cpus, **kwargs)
    ray_start_seconds = time.perf_counter() - t0
    return ray_start_seconds
