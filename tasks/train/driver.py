"""The driver: :func:`run_training` validates the config, takes the run's lease and runs Ray
Train's TorchTrainer; the result is a :class:`TrainResult`.

The run lives at ``<root>/runs/<run_name>/`` (Ray Train's storage path and name): starting the
same run name again resumes from its latest checkpoint (Ray Train V2 restores the run snapshot),
and worker failures are retried from the last checkpoint (``FailureConfig``). A run that
diverged raises :class:`TrainingDiverged` naming the step, keeping the last good checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from diffusion.pipeline import DiffusionConfig
from tasks.datasets import DataConfig, DatasetRef, open_dataset
from tasks.errors import (
    LeaseBusy,
    TrainConfigError,
    TrainingBusy,
    TrainingDiverged,
    TrainingLeaseLost,
)
from tasks.runtime import RuntimeConfig, ensure_ray
from tasks.storage import (
    Location,
    call,
    exists,
    protocol_of,
    read_json,
    redact,
    redact_all,
    storage_options,
)
from tasks.train.config import TrainConfig, default_run_name, run_identity, validate
from tasks.train.data import build_dataset, pyarrow_fs
from tasks.train.runs import STATUS_FILE, check_same_model, find_finished
from tasks.train.worker import train_loop_per_worker

# The training run's lease (tasks.lease), held by the driver for the whole job: refreshed every
# LEASE_STALE_S / 4 s; a second driver waits up to LEASE_WAIT_S (past the stale age, so a run
# restarted after a crash elsewhere takes over), then fails naming the holder.
LEASE_STALE_S = 120.0
LEASE_WAIT_S = 180.0
LEASE_NAME = "_training"


@dataclass
class TrainResult:
    run_name: str
    checkpoint_uri: str | None
    metrics: dict
    dataset: dict
    seconds: float
    mlflow_run_id: str | None = None
    mlflow_uri: str | None = None
    reused: bool = False  # the run had already finished: nothing was trained

    def summary(self) -> dict:
        return {"run_name": self.run_name, "checkpoint_uri": self.checkpoint_uri,
                "metrics": self.metrics, "dataset": self.dataset,
                "seconds": round(self.seconds, 1), "mlflow_run_id": self.mlflow_run_id,
                "mlflow_uri": self.mlflow_uri, "reused": self.reused}


@dataclass(frozen=True)
class FitJob:
    """One training run as :func:`run_training` resolved it, for :func:`_fit`."""

    job: dict  # the workers' train_loop_config (JSON): the run's identity, paths, fault hook
    run_name: str
    ref: DatasetRef
    manifest: dict
    root: Location
    runs: Location  # <root>/runs
    uri: str  # the MLflow tracking URI
    train: TrainConfig
    runtime: RuntimeConfig
    pipeline: dict | None
    echo: Callable[[str], Any]
    t0: float  # when run_training started (perf_counter)

    def reused(self, done: dict) -> TrainResult:
        """The result for a run found already finished (``done``: :func:`find_finished`'s)."""
        from tasks import tracking

        return TrainResult(self.run_name, done["checkpoint_uri"], done["metrics"],
                           self.ref.to_dict(), time.perf_counter() - self.t0,
                           tracking.find_run(self.uri, self.run_name), self.uri, reused=True)


def run_training(
    data: DataConfig,
    model: Any,
    diffusion: DiffusionConfig,
    train: TrainConfig,
    runtime: RuntimeConfig,
    *,
    pipeline: dict | None = None,
    echo=print,
    fault: str | None = None,
) -> TrainResult:
    """Train on the latest (or ``data.version``) committed version of ``data.name``."""
    fit = _resolve(data, model, diffusion, train, runtime, pipeline, echo, fault)
    done = find_finished(fit.root, fit.run_name, train.steps)
    if isinstance(done, dict):  # an unchanged rerun: no Ray, no new MLflow run
        echo(f"run {fit.run_name} already finished at step {done['metrics']['step']}; nothing "
             f"to train (checkpoint {done['checkpoint_uri']})")
        return fit.reused(done)
    from tasks.lease import Lease

    # one driver per run: a second one (an overlapping schedule, a manual run) would resume from
    # the same checkpoint and write the same checkpoint names. A holder that crashed on this
    # host is recognised at once; elsewhere its lease goes stale after LEASE_STALE_S.
    try:
        with Lease(fit.runs.child(fit.run_name).url, LEASE_NAME, stale_s=LEASE_STALE_S,
                   wait_s=LEASE_WAIT_S, options=fit.job["storage_options"]) as lease:
            done = find_finished(fit.root, fit.run_name, train.steps)
            if isinstance(done, dict):  # it finished while this process waited for the lease
                echo(f"run {fit.run_name} was finished meanwhile at step "
                     f"{done['metrics']['step']}")
                return fit.reused(done)
            return _fit(fit, lease)
    except LeaseBusy as e:  # only taking the lease raises it
        raise TrainingBusy(f"training run {fit.run_name} is being trained by another process: "
                           f"{e}") from None


def plan_run(pipeline: dict) -> tuple[str, bool]:
    """(run name, finished) of the training run the pipeline config ``pipeline`` (JSON) names:
    what a Ray Jobs driver needs to name the job, or to skip it, without Ray."""
    from diffusion.unet import UNetConfig

    data, runtime = DataConfig(**pipeline["data"]), RuntimeConfig(**pipeline["runtime"])
    train = TrainConfig(**pipeline["train"])
    fit = _resolve(data, UNetConfig.from_dict(pipeline["model"]),
                   DiffusionConfig.from_dict(pipeline["diffusion"]), train, runtime, pipeline,
                   lambda _: None, None)
    return fit.run_name, isinstance(find_finished(fit.root, fit.run_name, train.steps), dict)


def _resolve(data: DataConfig, model: Any, diffusion: DiffusionConfig, train: TrainConfig,
             runtime: RuntimeConfig, pipeline: dict | None, echo, fault: str | None) -> FitJob:
    """Open the dataset, validate the config against it, name the run and write its job."""
    t0 = time.perf_counter()
    root = runtime.root_location()
    ref, manifest = open_dataset(root, data.name, data.version)
    validate(model, train, manifest, diffusion)
    job = run_identity(model, diffusion, train)
    run_name = train.run_name or default_run_name(manifest, job)
    job |= {
        "run_name": run_name,
        "class_names": manifest["class_names"],
        "dataset": ref.to_dict(),
        "pipeline": redact_all(pipeline or {}),  # recorded in every checkpoint's state.json
        "fault": fault,
    }
    runs = root.child("runs")
    check_same_model(runs.child(run_name), job)
    job["run_dir"] = runs.child(run_name).url
    job["storage_options"] = storage_options(runs.url, runtime)
    job["fault_dir"] = runs.child(run_name).path if root.is_local else None
    echo(f"dataset {ref.name}@{ref.version}: {manifest['splits']['train']['rows']} train rows; "
         f"run {run_name} → {runs.describe()}/{run_name}")

    from tasks import tracking

    return FitJob(job, run_name, ref, manifest, root, runs, tracking.tracking_uri(runtime, root),
                  train, runtime, pipeline, echo, t0)


def _fit(fit: FitJob, lease) -> TrainResult:
    """The Ray Train job of :func:`run_training`, under the run's ``lease``: rank 0 checks
    that this driver still holds it before every checkpoint (the fence, :mod:`tasks.lease`)."""
    from tasks import tracking

    run_id = _start_mlflow_run(fit)
    job = fit.job | {"mlflow_uri": fit.uri, "mlflow_run_id": run_id,
                     "lease": {"dir": fit.runs.child(fit.run_name).url, "name": LEASE_NAME,
                               "token": lease.token, "stale_s": LEASE_STALE_S}}
    fit.echo(f"MLflow run {run_id} at {redact(fit.uri)}")

    ensure_ray(fit.runtime, echo=fit.echo)
    from ray.data.dataset import MaterializedDataset

    ds = build_dataset(fit.root, fit.manifest)
    job["in_memory"] = isinstance(ds, MaterializedDataset)
    job["train_rows"] = fit.manifest["splits"]["train"]["rows"]
    trainer = _trainer(fit, job, ds)
    status_loc = fit.runs.child(fit.run_name).child(STATUS_FILE)
    if exists(status_loc):
        call(status_loc, status_loc.fs.rm, status_loc.path)
    try:
        result = trainer.fit()
    except BaseException:
        if lease.lost is None:
            tracking.finish_run(fit.uri, run_id, "FAILED")
        raise
    lost = lease.lost or lease.lost_to(lease.holder())
    if lost:  # the run, its status and its MLflow run are the new holder's now: leave them
        raise TrainingLeaseLost(
            f"training run {fit.run_name} stopped: {lost}; no checkpoint was written after "
            f"this driver lost it. The new holder trains the run: nothing to do unless it "
            f"fails too")
    metrics = read_json(status_loc) if exists(status_loc) else dict(result.metrics or {})
    if metrics.get("status") == "lease_lost":
        tracking.finish_run(fit.uri, run_id, "FAILED")
        raise TrainingLeaseLost(
            f"training run {fit.run_name} stopped at step {metrics['step']} without writing its "
            f"checkpoint: {metrics['error']}. Check the storage's reachability from the "
            f"driver, then run again: it resumes from step {metrics['last_good_step']}")
    tracking.finish_run(fit.uri, run_id, "FINISHED" if metrics.get("status") == "finished"
                        else "FAILED")
    ckpt_uri = None
    if result.checkpoint is not None:
        p = result.checkpoint.path
        ckpt_uri = p if fit.root.is_local else f"{protocol_of(fit.runs.url)}://{p}"
    _check_outcome(fit.run_name, metrics, ckpt_uri)
    fit.echo(f"run {fit.run_name} finished at step {metrics['step']}; checkpoint {ckpt_uri}")
    return TrainResult(fit.run_name, ckpt_uri, metrics, fit.ref.to_dict(),
                       time.perf_counter() - fit.t0, run_id, fit.uri)


def _start_mlflow_run(fit: FitJob) -> str:
    """The run's MLflow run (created, or found for a resumed run name) with the config as
    params, lineage tags and the dataset manifest."""
    from tasks import tracking

    job, ref = fit.job, fit.ref
    run_id = tracking.ensure_run(
        fit.uri, fit.root, fit.run_name,
        params={k: redact(v) for k, v in tracking.flatten(
            {k: v for k, v in (fit.pipeline or job).items()
             if k in ("data", "model", "diffusion", "train")}).items()},  # no user:pass@ URL
        tags={"dataset.name": ref.name, "dataset.version": ref.version,
              "dataset.manifest": ref.manifest_uri,
              "config.sha256": hashlib.sha256(json.dumps(job["train"] | job["model"],
                                              sort_keys=True).encode()).hexdigest()})
    tracking.log_json(fit.uri, run_id, fit.manifest, "dataset/_manifest.json")
    return run_id


# Ray Train V2's switch (ray.train.v2._internal.constants.V2_ENABLED_ENV_VAR).
V2_ENV = "RAY_TRAIN_V2_ENABLED"
# Ray Train V2 replaces print() in its workers with a root-logger call that also tees to the
# original print when sys.stdout is not sys.__stdout__, which is always so in a Ray worker (Ray
# points sys.stdout at the worker's log file): every progress line reached the console twice.
# Workers keep the plain print (stdout → the worker's log file → the driver's console, once).
PRINT_PATCH_ENV = "RAY_TRAIN_ENABLE_PRINT_PATCH"


def require_train_v2(trainer_cls) -> None:
    """Refuse Ray Train V1: the driver relies on V2 (the controller's FailureConfig retries,
    resuming a run name from its snapshot, ``ray.train.report`` with checkpoints); under V1 the
    same calls run but behave differently. V2 is Ray's default from 2.51; ``RAY_TRAIN_V2_ENABLED``
    =0 (or an older Ray) selects V1, whose TorchTrainer lives outside ``ray.train.v2``."""
    if not trainer_cls.__module__.startswith("ray.train.v2."):
        raise TrainConfigError(
            f"Ray Train V2 is not active (TorchTrainer is {trainer_cls.__module__}."
            f"{trainer_cls.__qualname__}): the training stage needs it. Unset "
            f"RAY_TRAIN_V2_ENABLED or set it to 1 (it is {os.environ.get(V2_ENV, 'unset')!r}), "
            f"and use ray>=2.51")


def run_config_logging() -> dict:
    """The RunConfig arguments that keep Ray Train's own chatter off the console: the print
    patch off in the workers (:data:`PRINT_PATCH_ENV`, unless set on the driver) and, where this
    Ray has ``ray.train.LoggingConfig``, Ray Train's INFO records ("Requesting resources",
    "Reporting training result ...") only in its log files under the Ray session's logs/train/;
    its warnings and errors still reach the console."""
    import ray.train

    kwargs: dict = {"worker_runtime_env": {
        "env_vars": {PRINT_PATCH_ENV: os.environ.get(PRINT_PATCH_ENV, "0")}}}
    if hasattr(ray.train, "LoggingConfig"):
        kwargs["logging_config"] = ray.train.LoggingConfig(log_level="WARNING")
    return kwargs


def _trainer(fit: FitJob, job: dict, ds):
    """The TorchTrainer: ``train.num_workers`` workers running :func:`train_loop_per_worker`
    on ``job`` over the train split ``ds``, storing the run under ``<root>/runs/<run_name>``."""
    import ray.train
    from ray.train.torch import TorchTrainer

    require_train_v2(TorchTrainer)
    train = fit.train
    resources = {"CPU": train.cpus_per_worker}
    if train.use_gpu:
        resources["GPU"] = train.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=job,
        scaling_config=ray.train.ScalingConfig(
            num_workers=train.num_workers, use_gpu=train.use_gpu,
            resources_per_worker=resources, placement_strategy=train.placement_strategy),
        run_config=ray.train.RunConfig(
            name=fit.run_name,
            storage_path=fit.runs.path,  # a path within storage_filesystem (no scheme)
            storage_filesystem=pyarrow_fs(fit.root),
            failure_config=ray.train.FailureConfig(max_failures=train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=train.keep_checkpoints),
            **run_config_logging(),
        ),
        datasets={"train": ds},
        dataset_config=_data_config(job["in_memory"]),
    )


def _data_config(in_memory: bool):
    """How the train split reaches the workers (:func:`tasks.train.data._batches`): a split held
    in memory goes whole to every worker, which takes its rows of each epoch's permutation; a
    streamed one is split between the workers, in order: Ray Data then deals each rank the same
    rows in the same order on every pass, whichever worker asks first, which resuming mid-epoch
    relies on."""
    import ray.train

    if in_memory:
        return ray.train.DataConfig(datasets_to_split=[])
    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return ray.train.DataConfig(execution_options=options)


def _check_outcome(run_name: str, metrics: dict, ckpt_uri: str | None) -> None:
    """Raise unless the run finished: :class:`TrainingDiverged` naming the step and the last
    good checkpoint, or RuntimeError for any other ending."""
    if metrics.get("status") == "diverged":
        raise TrainingDiverged(
            f"training run {run_name} diverged at step {metrics['step']} ({metrics['error']}); "
            f"the last good checkpoint is step {metrics['last_good_step']}"
            + (f" at {ckpt_uri}" if ckpt_uri else " (none was written)")
            + "; lower train.lr or check the data")
    if metrics.get("status") != "finished":
        raise RuntimeError(f"training run {run_name} ended without finishing: {metrics}")
