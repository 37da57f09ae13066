"""Where the pipeline runs and stores things: the ``runtime.*`` config section and Ray start-up.

On a laptop everything is embedded: a local Ray started on demand, files under
``./pipeline-data``. On a cluster the same code reaches the cluster at ``RAY_ADDRESS`` (or
``runtime.ray_address``) and stores under an ``s3://`` root:

- ``http(s)://<head>:8265`` (the Ray Jobs API): each Ray stage runs inside the cluster as a Ray
  Job (:mod:`tasks.jobs`); the flow run only submits, follows and reads back. The way to run
  long or scheduled work.
- ``ray://<head>:10001`` (Ray Client): this process drives the cluster over one connection,
  which Ray ends when it is lost for more than 30 s. Kept for interactive use.
- ``<head>:6379`` or ``auto``: this process joins the cluster as a driver (on a cluster node,
  e.g. inside a Ray Job).
"""

from __future__ import annotations

import logging
import os
import time

from pydantic import BaseModel, Field, field_validator

from tasks.bounds import SECTION, Seconds
from tasks.errors import ConfigError
from tasks.storage import Location, StorageConfig, credentials_to_mlflow, storage_options

log = logging.getLogger(__name__)

# Seconds the last ensure_ray() of this process spent starting or joining Ray (None: it did
# not); the retrain flow reports it as fixed overhead.
ray_start_seconds: float | None = None


class StageTimeouts(BaseModel):
    """Seconds each Ray stage may run before it is stopped and the run fails naming it (the
    ``runtime.stage_timeouts`` keys). A hung stage then fails this run instead of blocking
    every later scheduled one."""

    model_config = SECTION

    preprocess: Seconds = Field(6 * 3600, description="Seconds for preprocessing.")
    train: Seconds = Field(72 * 3600, description="Seconds for one training run.")
    evaluate: Seconds = Field(6 * 3600, description="Seconds for one evaluation.")
    generate: Seconds = Field(24 * 3600, description="Seconds for one generation job.")


class RuntimeConfig(StorageConfig):
    """The ``runtime`` section of the pipeline config."""

    root: str = Field("./pipeline-data", description="Storage root: a local path or s3://...")
    ray_address: str | None = Field(
        None, description="Ray cluster: http(s)://head:8265 runs each Ray stage as a Ray Job "
        "(recommended); ray://head:10001 drives it over Ray Client. Default: RAY_ADDRESS, "
        "else a local Ray."
    )
    stage_timeouts: StageTimeouts = Field(
        default_factory=StageTimeouts, description="Seconds each Ray stage may run.")
    ray_jobs_unreachable_s: Seconds = Field(
        600.0, description="Seconds a flow run keeps polling a Ray Jobs API that does not "
        "answer before it fails (the job runs on; a rerun re-attaches).")
    ray_jobs_resubmits: int = Field(
        2, ge=0, le=20, description="Times a stage's Ray Job is resubmitted when the cluster "
        "loses it (its head restarted, or Ray ended it because its supervisor died); the stage "
        "resumes from what it stored.")
    ray_num_cpus: int | None = Field(
        None, ge=1, description="CPUs for a local Ray (default: all); ignored on a cluster."
    )
    mlflow_uri: str | None = Field(
        None, description="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else SQLite "
        "under the root). A user:password@ in it (percent-encoded; everything from :// to the "
        "last @ counts) is removed from the URI: for a server it is handed to MLflow as "
        "MLFLOW_TRACKING_USERNAME/PASSWORD, for a database (postgresql://, mysql://, mssql://) "
        "the whole URI is kept in MLFLOW_TRACKING_URI for MLflow's clients only."
    )

    @field_validator("mlflow_uri")
    @classmethod
    def _credentials_to_mlflow(cls, v: str | None) -> str | None:
        """Credentials in the URI go where MLflow reads them (MLFLOW_TRACKING_USERNAME and
        MLFLOW_TRACKING_PASSWORD of this process for a server, the whole URI in its
        MLFLOW_TRACKING_URI for a database store; every MLflow client here and the local Ray it
        starts inherit them); the config keeps the URI without them. So no config that is
        printed, stored with a checkpoint, logged to MLflow or recorded by Prefect as a flow
        run's parameters carries the password."""
        return None if v is None else credentials_to_mlflow(v)

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


def ray_address(cfg: RuntimeConfig) -> str | None:
    """The configured Ray address (``runtime.ray_address``, else ``RAY_ADDRESS``), or None."""
    return cfg.ray_address or os.environ.get("RAY_ADDRESS") or None


def jobs_address(cfg: RuntimeConfig) -> str | None:
    """The Ray Jobs API address when the stages run as Ray Jobs, else None."""
    from tasks.jobs import is_jobs_address

    address = ray_address(cfg)
    return address if is_jobs_address(address) else None


# Ray-internal loggers whose records a *local* Ray keeps off the console, set in every worker
# process of the job (``worker_process_setup_hook``). A local Ray is started without the
# dashboard, so without the State API; Ray Train's detached placement-group cleaner polls that
# API every second and logged "Failed to query Ray Train Controller actor state. State API may
# be temporarily unavailable" at WARNING each time, hundreds of lines per run. Its job (removing
# a dead controller's placement group) is moot there: a local Ray ends with its driver. On a
# cluster (its dashboard serves the State API) nothing is changed.
# Ray Train's worker context logs "Reporting training result N: TrainingReport(...)" at INFO
# under a logger named after its file (``getLogger(__file__)``), so outside ``ray.train`` and
# past RunConfig's LoggingConfig: one long line per report, every log_every steps. botocore and
# aiobotocore (s3fs) say "Found credentials in environment variables." at INFO each time a
# worker opens S3.
WORKER_QUIET_LOGGERS: dict[str, int] = {
    "ray/train/v2/_internal/execution/context.py": logging.WARNING,  # a path below ray/
    "botocore.credentials": logging.WARNING,
    "aiobotocore.credentials": logging.WARNING,
}
QUIET_RAY_LOGGERS: dict[str, int] = {
    "ray.train.v2._internal.execution.controller.placement_group_cleaner": logging.ERROR,
    **WORKER_QUIET_LOGGERS,
}


def quiet_loggers(levels: dict[str, int]) -> None:
    """Raise these loggers' levels in this process (a name ending in ``.py`` is a path below
    the directory holding the ``ray`` package: Ray names some loggers by their file)."""
    import ray

    for name, level in levels.items():
        if name.endswith(".py"):
            name = os.path.join(os.path.dirname(os.path.dirname(ray.__file__)), name)
        logging.getLogger(name).setLevel(level)


def local_ray_worker_setup() -> None:
    """The local Ray's ``worker_process_setup_hook``, run in each of its worker processes once
    connected: raise :data:`QUIET_RAY_LOGGERS`' levels, and point ``RAY_ADDRESS`` at this Ray
    (unless set). Without it the State API client in a worker (the placement-group cleaner's)
    guesses the cluster and, with another Ray running on the machine, fails with "Found
    multiple active Ray instances", an uncaught ConnectionError that printed a traceback."""
    import ray

    quiet_loggers(QUIET_RAY_LOGGERS)
    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)


def cluster_worker_setup() -> None:
    """A cluster's ``worker_process_setup_hook`` (this process joined a cluster, e.g. inside a
    Ray Job): point ``RAY_ADDRESS`` at the cluster (unless set) so a worker's State API client
    never guesses among the Ray instances its machine runs, and keep
    :data:`WORKER_QUIET_LOGGERS` off the driver's log. The cleaner's warnings stay: with a
    dashboard they mean something. (Ray Train's workers also apply
    :data:`WORKER_QUIET_LOGGERS` themselves: on the testbed, a Ray Job's train workers were seen
    without this hook's effect.)"""
    import ray

    quiet_loggers(WORKER_QUIET_LOGGERS)
    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)


def _job_runtime_env() -> dict | None:
    """The runtime_env this process's Ray Job was submitted with, if it is one and has one."""
    import json

    text = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    try:
        return (json.loads(text).get("runtime_env") or None) if text else None
    except (ValueError, AttributeError):
        return None


def ray_init_kwargs(local: bool) -> dict:
    """Keyword arguments of :func:`ensure_ray`'s ``ray.init``: no dashboard and WARNING on the
    driver's ``ray`` logger; a local Ray runs :func:`local_ray_worker_setup` in its workers, a
    cluster :func:`cluster_worker_setup` (unless this process is a Ray Job submitted with a
    runtime_env of its own, which a driver's would replace)."""
    kwargs: dict = {"include_dashboard": False, "logging_level": logging.WARNING}
    if local:
        kwargs["runtime_env"] = {"worker_process_setup_hook": local_ray_worker_setup}
    elif _job_runtime_env() is None:
        kwargs["runtime_env"] = {"worker_process_setup_hook": cluster_worker_setup}
    return kwargs


def ensure_ray(cfg: RuntimeConfig, *, echo=None) -> float:
    """Connect to (or start) Ray unless this process already did. Returns the seconds it took."""
    global ray_start_seconds
    import ray

    if ray.is_initialized():
        return 0.0
    address = ray_address(cfg)
    from tasks.jobs import is_jobs_address

    if is_jobs_address(address):  # a stage that runs in this process on a Jobs-mode config
        raise ConfigError(
            f"Ray address {address} is a Ray Jobs API address: stages submit Ray Jobs there and "
            "cannot join it as a driver; this code path needs ray://head:10001, head:6379 or "
            "no address (a local Ray)")
    t0 = time.perf_counter()
    if address:
        if echo:
            echo(f"connecting to Ray at {address}")
        if address.startswith("ray://"):
            log.warning("Ray Client (%s) ends the workload when its connection is lost for "
                        "more than 30 s; for long or scheduled runs set RAY_ADDRESS to the Ray "
                        "Jobs API (http://<head>:8265) and each stage runs as a Ray Job",
                        address)
        ray.init(address=address, **ray_init_kwargs(local=False))
    else:
        if echo:
            echo("starting a local Ray (set RAY_ADDRESS or runtime.ray_address for a cluster)")
        # address="local": always a new single-node Ray, never one that happens to run on this
        # machine already (a bare ray.init() would join it).
        ray.init(address="local", num_cpus=cfg.ray_num_cpus, **ray_init_kwargs(local=True))
    ray_start_seconds = time.perf_counter() - t0
    return ray_start_seconds
