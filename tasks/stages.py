"""The Ray stages as one interface: run here, or as a Ray Job on the cluster.

:func:`execute` is what the Prefect tasks call. With a Jobs API address (see
:mod:`tasks.runtime`) it names the stage's job by what the stage will produce (its
fingerprint), returns at once when that already exists (an unchanged weekly rerun submits
nothing), and otherwise runs the stage as a Ray Job (:class:`tasks.jobs.JobRunner`). Without
one, it runs the stage in this process, as before. :func:`run_stage` is the same stage in this
process: what ``diffusion-pipeline job-run`` calls inside the job.

Each stage takes JSON arguments (the Prefect tasks' own) and returns a JSON summary:

===========  ====================================================  ============================
stage        arguments                                             job name
===========  ====================================================  ============================
preprocess   ``data``, ``runtime``                                 ``<dataset>-<version>``
train        ``config`` (the pipeline config)                      the run name
evaluate     ``model_ref``, ``config``, ``dataset_version``        the model (pinned version)
generate     ``config``, ``default_model``                         the model (pinned version)
===========  ====================================================  ============================

A job's submission id is ``<stage>-<name>-<digest>``; the digest covers the job's identity
(:func:`job_identity`: the arguments with aliases resolved, the storage root, the tracking
server, less what only changes how the job is run) and the code (:mod:`tasks.code`).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from tasks.errors import StageTimeout
from tasks.runtime import RuntimeConfig, jobs_address

Echo = Callable[[str], Any]
STAGES = ("preprocess", "train", "evaluate", "generate")


def _runtime(stage: str, args: dict) -> RuntimeConfig:
    return RuntimeConfig(**(args["runtime"] if stage == "preprocess" else
                            args["config"]["runtime"]))


# -- the stages, in this process ---------------------------------------------------------------


def _preprocess(args: dict, echo: Echo) -> dict:
    from tasks.datasets import DataConfig
    from tasks.preprocess import preprocess

    return preprocess(DataConfig(**args["data"]), RuntimeConfig(**args["runtime"]),
                      echo=echo).summary()


def _train(args: dict, echo: Echo) -> dict:
    from diffusion.pipeline import DiffusionConfig
    from diffusion.unet import UNetConfig
    from tasks.datasets import DataConfig
    from tasks.train import TrainConfig, run_training

    c = args["config"]
    return run_training(
        DataConfig(**c["data"]), UNetConfig.from_dict(c["model"]),
        DiffusionConfig.from_dict(c["diffusion"]), TrainConfig(**c["train"]),
        RuntimeConfig(**c["runtime"]), pipeline=c, echo=echo).summary()


def _evaluate(args: dict, echo: Echo) -> dict:
    from tasks.datasets import DataConfig
    from tasks.evaluate import EvalConfig, run_evaluation

    c = args["config"]
    return run_evaluation(args["model_ref"], DataConfig(**c["data"]),
                          EvalConfig(**c.get("evaluate", {})), RuntimeConfig(**c["runtime"]),
                          dataset_version=args.get("dataset_version"), echo=echo)


def _generate(args: dict, echo: Echo) -> dict:
    from tasks.generate import GenerateConfig, generate

    c = args["config"]
    return generate(GenerateConfig(**c["generate"]), RuntimeConfig(**c["runtime"]),
                    default_model=args.get("default_model"), echo=echo).summary()


_RUN = {"preprocess": _preprocess, "train": _train, "evaluate": _evaluate,
        "generate": _generate}


def run_stage(stage: str, args: dict, *, echo: Echo = print) -> dict:
    """Run ``stage`` with ``args`` in this process; returns its summary."""
    if stage not in _RUN:
        raise ValueError(f"unknown stage {stage!r}; one of {', '.join(STAGES)}")
    return _RUN[stage](args, echo)


# -- planning a job: its key, or the result when there is nothing to do ------------------------


def _plan_preprocess(args: dict, echo: Echo) -> str | None:
    from tasks.datasets import MANIFEST, DataConfig, dataset_dir
    from tasks.preprocess.listing import version_of
    from tasks.preprocess.sources import list_source
    from tasks.storage import exists

    data, runtime = DataConfig(**args["data"]), RuntimeConfig(**args["runtime"])
    version = version_of(list_source(data, runtime), data)
    if exists(dataset_dir(runtime.root_location(), data.name, version).child(MANIFEST)):
        return None
    return f"{data.name}-{version}"


def _plan_train(args: dict, echo: Echo) -> str | None:
    from tasks.train import plan_run

    run_name, finished = plan_run(args["config"])
    return None if finished else run_name


def _plan_evaluate(args: dict, echo: Echo) -> str | None:
    from tasks.evaluate import stored_evaluation

    if stored_evaluation(args, echo=echo) is not None:
        return None
    return str(args["model_ref"])


def _plan_generate(args: dict, echo: Echo) -> str | None:
    model = (args["config"].get("generate") or {}).get("model") or args.get("default_model")
    return str(model or "default")


# Each stage's plan: the readable name of its job, or None when its result exists already.
_PLAN = {"preprocess": _plan_preprocess, "train": _plan_train, "evaluate": _plan_evaluate,
         "generate": _plan_generate}

# ``runtime`` keys that change how a job is run or watched, not what it produces: left out of
# its identity, so changing one re-attaches to the running job instead of submitting a second.
RUNTIME_EXECUTION_KEYS = frozenset({
    "ray_address", "stage_timeouts", "ray_jobs_unreachable_s", "ray_jobs_resubmits",
    "storage_retries", "storage_connect_timeout", "ray_num_cpus",
})


def job_identity(stage: str, args: dict) -> dict:
    """What a job's output depends on: the job's arguments (:func:`for_job`'s: aliases
    pinned to versions, the storage root an absolute URL), less :data:`RUNTIME_EXECUTION_KEYS`
    and the train section's execution keys (:data:`tasks.train.config.EXECUTION_KEYS`: how
    often to log or checkpoint never changes the model)."""
    from tasks.train.config import EXECUTION_KEYS

    def runtime(rt: dict) -> dict:
        return {k: v for k, v in rt.items() if k not in RUNTIME_EXECUTION_KEYS}

    if stage == "preprocess":
        return args | {"runtime": runtime(args["runtime"])}
    c = args["config"]
    train = {k: v for k, v in (c.get("train") or {}).items() if k not in EXECUTION_KEYS}
    return args | {"config": c | {"runtime": runtime(c["runtime"]), "train": train}}


def pin_models(stage: str, args: dict) -> dict:
    """``args`` with registry aliases resolved to versions (``models:/m@champion`` →
    ``models:/m/7``), so a job key names the model it samples, not an alias that moves."""
    from tasks import tracking
    from tasks.registry import resolve

    keys = {"evaluate": ("model_ref",), "generate": ("default_model",)}.get(stage, ())
    c = args.get("config") or {}
    refs = [k for k in keys if isinstance(args.get(k), str) and "@" in args[k]]
    model = (c.get("generate") or {}).get("model") if stage == "generate" else None
    if not refs and not (isinstance(model, str) and "@" in model):
        return args
    runtime = _runtime(stage, args)
    uri = tracking.tracking_uri(runtime, runtime.root_location())

    def pinned(ref: str) -> str:
        info = resolve(ref, uri)
        return f"models:/{ref[len('models:/'):].split('@')[0]}/{info['version']}"

    out = dict(args)
    for k in refs:
        out[k] = pinned(args[k])
    if isinstance(model, str) and "@" in model:
        out["config"] = c | {"generate": c["generate"] | {"model": pinned(model)}}
    return out


def for_job(stage: str, args: dict, tracking_uri: str | None, root_url: str) -> dict:
    """The job's copy of ``args``: the runtime joins the cluster it runs in (no Ray address),
    stores under the root this driver resolved (a local root made absolute), logs to the
    tracking server this driver resolved, and carries no credential."""
    from tasks.storage import redact

    def runtime(rt: dict) -> dict:
        return rt | {"ray_address": None, "root": root_url,
                     "mlflow_uri": redact(tracking_uri) if tracking_uri else rt.get("mlflow_uri")}

    if stage == "preprocess":
        return args | {"runtime": runtime(args["runtime"])}
    c = args["config"]
    return args | {"config": c | {"runtime": runtime(c["runtime"])}}


# -- execute: here or as a job -----------------------------------------------------------------


def execute(stage: str, args: dict, *, echo: Echo = print,
            progress: Callable[[float], Any] | None = None) -> dict:
    """Run ``stage``: as a Ray Job when the Ray address is a Jobs API address, else here; either
    way bounded by ``runtime.stage_timeouts.<stage>``. ``progress`` gets the job's progress
    (0-1) from its log as it runs (jobs only)."""
    runtime = _runtime(stage, args)
    timeout = getattr(runtime.stage_timeouts, stage)
    address = jobs_address(runtime)
    if address is None:
        with _deadline(stage, timeout):
            return run_stage(stage, args, echo=echo)

    from tasks import tracking
    from tasks.jobs import JobRunner, StageJob

    args = pin_models(stage, args)  # first: a job is named by versions, never by an alias
    name = _PLAN[stage](args, echo)
    if name is None:  # nothing to do: the stage returns what exists without touching Ray
        return run_stage(stage, args, echo=echo)
    root = runtime.root_location()
    try:
        uri = tracking.tracking_uri(runtime, root)
    except Exception:  # no tracking store: the stage itself says so if it needs one
        uri = None
    runner = JobRunner(address, root, echo=echo, timeout_s=timeout,
                       unreachable_s=runtime.ray_jobs_unreachable_s,
                       resubmits=runtime.ray_jobs_resubmits,
                       entrypoint_args=_entrypoint_args(runtime), progress=progress)
    job_args = for_job(stage, args, uri, root.url)
    return runner.run(StageJob(stage, name, job_args, job_identity(stage, job_args)))


def _entrypoint_args(runtime: RuntimeConfig) -> tuple[str, ...]:
    """What the job needs to read its request before it has read it: the S3 endpoint, if one
    is configured here rather than in the cluster's environment."""
    if runtime.s3_endpoint_url:
        return ("--s3-endpoint-url", runtime.s3_endpoint_url)
    return ()


@contextlib.contextmanager
def _deadline(stage: str, seconds: float) -> Iterator[None]:
    """Raise :class:`StageTimeout` in this (main) thread after ``seconds``; elsewhere (Ray's or
    Prefect's worker threads have no signals) the stage runs unbounded."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(
            signal, "SIGALRM"):
        yield
        return

    def expired(signum, frame):
        raise StageTimeout(f"stage {stage} ran past its timeout of {seconds:.0f} s; raise "
                           f"runtime.stage_timeouts.{stage} if it needs longer")

    previous = signal.signal(signal.SIGALRM, expired)
    old_delay, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    t0 = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if old_delay:  # someone else's timer (pytest-timeout's), minus the time spent here
            signal.setitimer(signal.ITIMER_REAL, max(old_delay - (time.monotonic() - t0), 1e-3))
