"""The registry stage: trained weights → an MLflow model version → the ``champion`` alias.

    register_model   logs the model as a pyfunc written as code (:mod:`tasks.pyfunc_model`; its
                     artifacts the safetensors weights, config.json and serving.json, the
                     ``diffusion`` package as ``code_paths``, an explicit signature), registers a
                     version with lineage, digest and evaluation tags, and, as the very last step,
                     points the ``challenger`` alias at it
    promote          the challenger becomes ``champion`` only if it beats the current champion by
                     ``registry.margin`` on ``registry.metric``, judged on the same evaluation set
                     and seeds (``eval.key``), and passes ``registry.thresholds`` (the only
                     gate for the first champion). The decision and its numbers become tags on
                     both versions
    rollback         moves ``champion`` back to the previous holder
    resolve / load_version   ``models:/<name>@<alias>`` or ``models:/<name>/<version>`` → the
                     version, or the UNet with its weights checked against the registered digest
                     before a single tensor is parsed

Tracking: ``tasks.tracking.tracking_uri`` (SQLite under the storage root by default, any MLflow
server by ``runtime.mlflow_uri`` / ``MLFLOW_TRACKING_URI``). MLflow's HTTP client retries for
minutes by default; around our calls its retries and timeouts are bounded by ``registry.retries``
and ``registry.timeout_s`` (MLflow reads ``MLFLOW_HTTP_REQUEST_*`` at every request), and an
unreachable server becomes :class:`RegistryUnavailable` naming the URI.

Why a lease: MLflow has no compare-and-set on aliases or tags, so two promotions racing would both
compare against the same champion and both move the alias, and the history tag would lose an
entry. Promotions and rollbacks of one model therefore run under an exclusive lease
(:class:`tasks.lease.Lease`: a lock file created only-if-absent in a directory every promoter
shares, e.g. ``<root>/registry/locks``; refreshed while held, broken when stale). The champion
history, a JSON list of versions on the registered model (tag ``champion.history``, newest last),
is only written under the lease; the ``champion`` alias is the source of truth and the history is
reconciled with it before use.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tasks.errors import LeaseBusy, RegistryError, RegistryUnavailable, StorageError
from tasks.storage import redact
from tasks.tracking import EXPERIMENT, artifact_root, is_unreachable

log = logging.getLogger(__name__)

CHALLENGER, CHAMPION = "challenger", "champion"
WEIGHTS_TAG = "weights_sha256"
EVAL_KEY_TAG = "eval.key"
HISTORY_TAG = "champion.history"
REQUIRED_LINEAGE = ("dataset.version", "config.sha256", "checkpoint.uri")
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Metrics the gate may use and their direction (True: lower is better).
LOWER_IS_BETTER: dict[str, bool] = {"fd": True, "nll_bpd": True, "memorization": True}

PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")  # logged as the model's code
REPO_DIR = Path(__file__).resolve().parents[1]


def _known_metric(name: str) -> str:
    if name not in LOWER_IS_BETTER:
        raise ValueError(f"metric {name!r} is unknown; use one of {', '.join(LOWER_IS_BETTER)}")
    return name


class RegistryConfig(BaseModel):
    """The ``registry`` section of the pipeline config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_name: str | None = Field(
        None, description="Registered model name (default: '<data.name>-diffusion').")
    metric: str = Field("fd", description="Metric the promotion gate compares.")
    margin: float = Field(
        0.0, ge=0, lt=1, description="Relative improvement required, e.g. 0.02 = 2% better.")
    thresholds: dict[str, float] = Field(
        default_factory=dict,
        description="Absolute gates every candidate must pass (metric → bound); they alone "
        "decide the first promotion.")
    retries: int = Field(3, ge=0, le=10, description="MLflow HTTP retries per request.")
    timeout_s: float = Field(10, gt=0, le=600, description="MLflow HTTP timeout per request.")
    lock_stale_s: float = Field(
        600, gt=0, description="A promotion lease not refreshed for this long is broken.")
    lock_wait_s: float = Field(
        120, gt=0, description="How long a promotion waits for another one to finish.")

    @field_validator("model_name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not MODEL_NAME_RE.match(v):
            raise ValueError(f"registry.model_name {v!r}: use letters, digits, '.', '_', '-'")
        return v

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str) -> str:
        return _known_metric(v)

    @field_validator("thresholds")
    @classmethod
    def _thresholds(cls, v: dict[str, float]) -> dict[str, float]:
        for k in v:
            _known_metric(k)
        return v


def model_name_for(cfg: RegistryConfig, dataset_name: str) -> str:
    return cfg.model_name or f"{dataset_name}-diffusion"


def default_lock_dir(root_url: str) -> str:
    """Where promotion leases live under a storage root; all promoters of a model must share it."""
    return root_url.rstrip("/") + "/registry/locks"


# --------------------------------------------------------------------------------------------
# MLflow sessions: bounded HTTP retries, errors that name the URI
# --------------------------------------------------------------------------------------------

_ENV_GUARD = threading.Lock()
_ENV_USERS = 0
_ENV_SAVED: dict[str, str | None] = {}
_FLUENT_GUARD = threading.Lock()  # mlflow's fluent API keeps the tracking URI in a global


@contextlib.contextmanager
def _http_bounds(cfg: RegistryConfig) -> Iterator[None]:
    """MLflow's HTTP retry/timeout variables set from ``cfg`` while any registry call runs.

    MLflow reads them at every request (mlflow.utils.rest_utils.http_request), so they take effect
    without a new client. Reference-counted, so concurrent calls in one process keep them set
    until the last one leaves; the caller's own values come back afterwards.
    """
    global _ENV_USERS
    values = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(cfg.retries),
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, math.ceil(cfg.timeout_s))),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",  # urllib3: sleeps 0, 2, 4... seconds
        "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # no progress bars in task logs
    }
    with _ENV_GUARD:
        if _ENV_USERS == 0:
            _ENV_SAVED.clear()
            _ENV_SAVED.update({k: os.environ.get(k) for k in values})
        _ENV_USERS += 1
        os.environ.update(values)
    try:
        yield
    finally:
        with _ENV_GUARD:
            _ENV_USERS -= 1
            if _ENV_USERS == 0:
                for k, v in _ENV_SAVED.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v


def _error_code(e: BaseException) -> str:
    return str(getattr(e, "error_code", ""))


@contextlib.contextmanager
def _mlflow(uri: str, cfg: RegistryConfig, what: str) -> Iterator[Any]:
    """An MlflowClient for ``uri`` (tracking and registry), bounded retries, errors explained."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    where = redact(uri)
    unreachable = (f"cannot reach MLflow at {where} to {what} (gave up after {cfg.retries} "
                   f"retries, {cfg.timeout_s:g} s timeout each)")
    hint = "check runtime.mlflow_uri / MLFLOW_TRACKING_URI and that the server is up"
    with _http_bounds(cfg):
        try:
            yield MlflowClient(tracking_uri=uri, registry_uri=uri)
        except RegistryError:
            raise
        except MlflowException as e:
            if is_unreachable(e):
                raise RegistryUnavailable(f"{unreachable}: {_cause(e)}; {hint}") from e
            raise RegistryError(f"MLflow at {where} refused to {what}: {_first_line(e)}") from e
        except Exception as e:
            if is_unreachable(e):
                raise RegistryUnavailable(f"{unreachable}: {_cause(e)}; {hint}") from e
            raise


def _cause(e: BaseException) -> str:
    """The short reason inside urllib3's long connection errors ("[Errno 111] Connection
    refused", "Read timed out"), else the first line of the message."""
    m = re.search(r"\[Errno -?\d+\][^\"')\]]*|Read timed out|timed out|database is locked", str(e))
    return m.group(0).strip() if m else _first_line(e)


def _first_line(e: BaseException) -> str:
    msg = getattr(e, "message", None) or str(e)
    return f"{type(e).__name__}: {msg.strip().splitlines()[0] if msg.strip() else ''}"[:500]


# --------------------------------------------------------------------------------------------
# Lineage
# --------------------------------------------------------------------------------------------


def code_version() -> str:
    """The git commit of this checkout (``+dirty`` with local changes), else the package version."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_DIR, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO_DIR, capture_output=True, text=True, timeout=10,
                               check=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        from importlib.metadata import version

        return f"diffusion-pipeline=={version('diffusion-pipeline')}"
    except Exception:
        return "unknown"


def flow_run_id() -> str | None:
    """The Prefect flow run this process is working for, if any.

    Only looked up when Prefect is already imported: a process that never imported Prefect is not
    inside a flow run, and importing it just to find out would cost seconds.
    """
    if "prefect" not in sys.modules:
        return None
    try:
        from prefect.runtime import flow_run

        return str(flow_run.id) if flow_run.id else None
    except Exception:
        return None


def lineage_from(train_summary: dict, config_sha256: str) -> dict[str, str]:
    """Lineage tags from ``TrainResult.summary()`` and the pipeline config's fingerprint."""
    ds = train_summary.get("dataset") or {}
    out = {"dataset.name": ds.get("name"), "dataset.version": ds.get("version"),
           "config.sha256": config_sha256, "checkpoint.uri": train_summary.get("checkpoint_uri"),
           "training.run_name": train_summary.get("run_name"),
           "training.mlflow_run_id": train_summary.get("mlflow_run_id")}
    return {k: str(v) for k, v in out.items() if v is not None}


# --------------------------------------------------------------------------------------------
# Register
# --------------------------------------------------------------------------------------------


def _read_model_dir(model_dir: str) -> tuple[Path, Path, str, dict]:
    """The weights and config paths, the weights' digest and the config, fully checked."""
    from diffusion.serialization import unet_from_bytes

    d = Path(model_dir)
    weights_path, config_path = d / "model.safetensors", d / "config.json"
    for p in (weights_path, config_path):
        if not p.is_file():
            raise RegistryError(f"{p} does not exist; model_dir must be a directory written by "
                                "diffusion.serialization.save_model (a checkpoint's model/)")
    weights = weights_path.read_bytes()
    try:
        _, config = unet_from_bytes(weights, config_path.read_bytes(), name=str(weights_path),
                                    require=("unet", "diffusion"))
    except (KeyError, TypeError) as e:
        raise RegistryError(f"{config_path} does not describe the weights: {e}") from e
    from diffusion.serialization import sha256_hex

    return weights_path, config_path, sha256_hex(weights), config


def _check_evaluation(evaluation: dict) -> dict[str, float]:
    if not isinstance(evaluation, dict) or not isinstance(evaluation.get("metrics"), dict) \
            or not evaluation.get("eval_key"):
        raise RegistryError("evaluation must be the dict tasks.evaluate returns, with 'eval_key' "
                            "and 'metrics'")
    return {k: float(v) for k, v in evaluation["metrics"].items()
            if isinstance(v, int | float) and not isinstance(v, bool)}


def _tag_value(x: float) -> str:
    return repr(float(x))


def _find_registered(client, name: str, digest: str, run_id: str):
    """The version of ``name`` registered from ``run_id`` with these weights, if any."""
    from mlflow.exceptions import MlflowException

    try:
        found = client.search_model_versions(
            f"name = '{name}' and tags.{WEIGHTS_TAG} = '{digest}'", max_results=100)
    except MlflowException as e:
        if "RESOURCE_DOES_NOT_EXIST" in _error_code(e):
            return None
        raise
    hits = [mv for mv in found if mv.run_id == run_id]
    return max(hits, key=lambda mv: int(mv.version)) if hits else None


def _log_pyfunc(uri: str, client, run_id: str, files: dict[str, str]):
    """``mlflow.pyfunc.log_model`` into run ``run_id``, leaving that run's status as it was.

    The fluent API needs the tracking URI in MLflow's process-wide global and an active run; both
    are set only for this call (under a lock, so concurrent registrations do not mix URIs).
    """
    import mlflow

    import diffusion
    from tasks.pyfunc_model import signature

    status = client.get_run(run_id).info.status
    with _FLUENT_GUARD, _fluent_tracking_uri(uri):
        active = mlflow.active_run()
        own = active is None or active.info.run_id != run_id
        if own:
            mlflow.start_run(run_id=run_id, nested=active is not None)
        try:
            # The signature is explicit; an input example would make MLflow predict at log time.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*input example was not provided")
                return mlflow.pyfunc.log_model(
                    name="model", python_model=str(PYFUNC_FILE), artifacts=files,
                    code_paths=[str(Path(diffusion.__file__).parent)], signature=signature(),
                    pip_requirements=_pip_requirements())
        finally:
            if own:
                mlflow.end_run(status=status)


@contextlib.contextmanager
def _fluent_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's global tracking URI set to ``uri`` for the block, then restored.

    ``mlflow.set_tracking_uri`` also writes MLFLOW_TRACKING_URI into os.environ (and unsets it when
    given None), so the caller's variable is saved and put back as well.
    """
    import mlflow
    from mlflow.tracking._tracking_service import utils

    old_global, old_env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(old_global)
        if old_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_env


def _pip_requirements() -> list[str]:
    """Pinned requirements, given explicitly: inferring them would load the model in a subprocess
    on every registration. Local version suffixes (``+cpu``) are dropped so GPU hosts resolve."""
    from importlib.metadata import version

    return [f"{p}=={version(p).split('+')[0]}"
            for p in ("mlflow", "torch", "numpy", "pandas", "safetensors")]


def _ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(
            name, description="Denoising diffusion model (diffusion-pipeline); predict: seeds → "
            "images. Aliases: champion (serving), challenger (newest registered).")
    except MlflowException as e:
        if "ALREADY_EXISTS" not in _error_code(e):
            raise


def _new_run(client, uri: str, model_name: str, tags: dict[str, str]) -> str:
    exp = client.get_experiment_by_name(EXPERIMENT)
    exp_id = exp.experiment_id if exp else client.create_experiment(
        EXPERIMENT, artifact_location=artifact_root(uri))
    run = client.create_run(exp_id, run_name=f"register-{model_name}", tags=tags)
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def register_model(
    model_dir: str,
    *,
    tracking_uri: str,
    run_id: str | None,
    cfg: RegistryConfig,
    model_name: str,
    evaluation: dict,
    lineage: dict[str, str],
    defaults: dict,
) -> dict:
    """Log ``model_dir`` as a pyfunc into ``run_id`` (a new run if None), register a version with
    tags, and point ``challenger`` at it last.

    Idempotent per (weights digest, run): a second call returns the version the first made,
    unchanged, and finishes its last steps if the first call died before them.
    """
    from tasks.pyfunc_model import serving_document

    if not MODEL_NAME_RE.match(model_name or ""):
        raise RegistryError(f"model name {model_name!r}: use letters, digits, '.', '_', '-'")
    weights_path, config_path, digest, _ = _read_model_dir(model_dir)
    metrics = _check_evaluation(evaluation)
    try:
        serving = serving_document(digest, defaults)
    except (KeyError, TypeError, ValueError) as e:
        raise RegistryError(f"bad sampling defaults {defaults!r}: {e}; pass {{'sampler': "
                            "SamplerConfig fields, 'guidance_scale': float}") from e
    tags: dict[str, str] = {"code.version": code_version()}
    if (fr := flow_run_id()) is not None:
        tags["prefect.flow_run_id"] = fr
    ds = evaluation.get("dataset") or {}
    if ds.get("version"):
        tags["dataset.version"] = str(ds["version"])
    if ds.get("name"):
        tags["dataset.name"] = str(ds["name"])
    tags |= {str(k): str(v) for k, v in lineage.items() if v is not None}
    missing = [k for k in REQUIRED_LINEAGE if not tags.get(k)]
    if missing:
        raise RegistryError(f"lineage lacks {', '.join(missing)}; pass them in lineage= "
                            "(tasks.registry.lineage_from builds them from the training result)")
    tags |= {WEIGHTS_TAG: digest, EVAL_KEY_TAG: str(evaluation["eval_key"])}
    tags |= {f"eval.{k}": _tag_value(v) for k, v in metrics.items()}

    with _mlflow(tracking_uri, cfg, f"register {model_name}") as client:
        if run_id is None:
            run_id = _new_run(client, tracking_uri, model_name,
                              {k: v for k, v in tags.items() if not k.startswith("eval.")})
        mv = _find_registered(client, model_name, digest, run_id)
        fresh = mv is None
        if fresh:
            with tempfile.TemporaryDirectory() as d:
                serving_path = Path(d) / "serving.json"
                serving_path.write_text(json.dumps(serving, indent=2, sort_keys=True))
                info = _log_pyfunc(tracking_uri, client, run_id, {
                    "weights": str(weights_path), "config": str(config_path),
                    "serving": str(serving_path)})
            _ensure_registered_model(client, model_name)
            # MLflow's SQL registry store looks the logged model up through the *global* tracking
            # URI (its own TODO in SqlAlchemyStore.create_model_version), not the client's.
            with _FLUENT_GUARD, _fluent_tracking_uri(tracking_uri):
                mv = client.create_model_version(
                    model_name, source=info.model_uri, run_id=run_id, tags=tags,
                    await_creation_for=0, model_id=info.model_id)
        if fresh or _unfinished(client, model_name, mv.version):
            client.log_dict(run_id, evaluation,
                            f"registry/{model_name}-v{mv.version}.evaluation.json")
            client.set_registered_model_alias(model_name, CHALLENGER, mv.version)  # last
        elif mv.tags.get(EVAL_KEY_TAG) != tags[EVAL_KEY_TAG]:
            log.warning("%s v%s already holds these weights from run %s; its recorded evaluation "
                        "(eval.key %s) stands", model_name, mv.version, run_id,
                        mv.tags.get(EVAL_KEY_TAG))
    return {"name": model_name, "version": str(mv.version),
            "model_uri": f"models:/{model_name}/{mv.version}", "weights_sha256": digest,
            "run_id": run_id, "new": fresh}


def _unfinished(client, name: str, version: str) -> bool:
    """A re-run found ``version`` already registered: did the earlier run stop before the alias?

    True when the version holds no alias, was never judged, and is the newest version: then the
    earlier registration died before its last step. An older version never takes the alias back.
    """
    rm = client.get_registered_model(name)
    if str(version) in _aliases(rm).values():
        return False
    mv = client.get_model_version(name, str(version))
    if "promotion.decision" in mv.tags:
        return False
    newest = client.search_model_versions(f"name = '{name}'", max_results=1,
                                          order_by=["version_number DESC"])
    return bool(newest) and str(newest[0].version) == str(version)


# --------------------------------------------------------------------------------------------
# Resolve and load
# --------------------------------------------------------------------------------------------

_REF = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")


def _registered_model(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as e:
        if "RESOURCE_DOES_NOT_EXIST" not in _error_code(e):
            raise
    names = sorted(m.name for m in client.search_registered_models(max_results=100))
    raise RegistryError(
        f"no registered model named {name!r}; registered: {', '.join(names) or 'none'} "
        "(set registry.model_name, or register a model first)")


def _aliases(rm) -> dict[str, str]:
    """alias → version, as strings (the SQL store returns versions as ints, the REST API as
    strings)."""
    return {str(a): str(v) for a, v in (rm.aliases or {}).items()}


def _aliases_text(rm) -> str:
    aliases = _aliases(rm)
    return ", ".join(f"@{a} → v{v}" for a, v in sorted(aliases.items())) or "no aliases"


def _version(client, name: str, version: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, str(version))
    except MlflowException as e:
        if "RESOURCE_DOES_NOT_EXIST" not in _error_code(e):
            raise
    versions = sorted(int(mv.version) for mv in
                      client.search_model_versions(f"name = '{name}'", max_results=1000))
    raise RegistryError(f"{name} has no version {version}; versions: "
                        f"{', '.join(map(str, versions)) or 'none'}")


def parse_ref(model_ref: str) -> tuple[str, str | None, str | None]:
    """``(name, alias, version)`` of ``models:/<name>@<alias>`` or ``models:/<name>/<version>``."""
    m = _REF.match(model_ref or "")
    if not m:
        raise RegistryError(f"{model_ref!r} is not a registry reference; use "
                            "models:/<name>@<alias> or models:/<name>/<version>")
    return m["name"], m["alias"], m["version"]


def _resolve(client, model_ref: str) -> dict:
    name, alias, version = parse_ref(model_ref)
    rm = _registered_model(client, name)
    if alias is not None:
        version = _aliases(rm).get(alias)
        if version is None:
            raise RegistryError(f"{name} has no alias @{alias}; it has {_aliases_text(rm)}")
    mv = _version(client, name, version)
    return {"name": name, "version": str(mv.version), "source": mv.source,
            "tags": dict(mv.tags or {}), "aliases": list(mv.aliases or [])}


def resolve(model_ref: str, tracking_uri: str) -> dict:
    """``{"name", "version", "source", "tags", "aliases"}`` of a registry reference."""
    with _mlflow(tracking_uri, RegistryConfig(), f"resolve {model_ref}") as client:
        return _resolve(client, model_ref)


def load_version(
    model_ref: str, tracking_uri: str, dst: str | None = None
) -> tuple[Any, dict, dict]:
    """``(UNet in eval mode, config, defaults)`` of a registered version.

    Only the weights, config.json and serving.json are downloaded (into ``dst``, kept, or a
    temporary directory). The weights are checked against the version's ``weights_sha256`` tag
    before they are parsed: a tampered or truncated file raises
    :class:`diffusion.serialization.WeightsIntegrityError` and no tensor is ever built from it.
    """
    import mlflow.artifacts
    from mlflow.models import Model

    from diffusion.serialization import unet_from_bytes

    with contextlib.ExitStack() as stack:
        client = stack.enter_context(_mlflow(tracking_uri, RegistryConfig(), f"load {model_ref}"))
        info = _resolve(client, model_ref)
        expected = info["tags"].get(WEIGHTS_TAG)
        if not expected:
            raise RegistryError(
                f"{model_ref} (v{info['version']}) has no {WEIGHTS_TAG} tag: it was not "
                "registered by tasks.registry, so its weights cannot be checked")
        base = client.get_model_version_download_uri(info["name"], info["version"]).rstrip("/")
        out = Path(dst) if dst else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        out.mkdir(parents=True, exist_ok=True)

        def fetch(rel: str) -> Path:  # keeps the model's layout under ``out``
            return Path(mlflow.artifacts.download_artifacts(
                artifact_uri=f"{base}/{rel}", dst_path=str(out / Path(rel).parent),
                tracking_uri=tracking_uri))

        flavor = Model.load(str(fetch("MLmodel"))).flavors.get("python_function", {})
        arts = {k: v["path"] for k, v in (flavor.get("artifacts") or {}).items()}
        if not {"weights", "config", "serving"} <= set(arts):
            raise RegistryError(f"{model_ref} is not a diffusion-pipeline pyfunc (artifacts: "
                                f"{sorted(arts)}); register it with tasks.registry")
        paths = {k: fetch(arts[k]) for k in ("weights", "config", "serving")}
        serving = json.loads(paths["serving"].read_text())
        if serving.get("weights_sha256") != expected:
            from diffusion.serialization import WeightsIntegrityError

            raise WeightsIntegrityError(
                f"{model_ref}: serving.json records weights {serving.get('weights_sha256')}, the "
                f"registry {expected}; the version's artifacts were modified; re-register it")
        model, config = unet_from_bytes(
            paths["weights"].read_bytes(), paths["config"].read_bytes(), expected_sha256=expected,
            name=f"{model_ref} ({arts['weights']})", require=("unet", "diffusion"))
        return model, config, serving["defaults"]


@contextlib.contextmanager
def _lease(lock_dir: str, model_name: str, cfg: RegistryConfig,
           options: dict | None) -> Iterator[None]:
    """The model's promotion lease (:class:`tasks.lease.Lease`), failures as registry errors."""
    from tasks.lease import Lease

    try:
        with Lease(lock_dir, model_name, stale_s=cfg.lock_stale_s, wait_s=cfg.lock_wait_s,
                   options=options):
            yield
    except LeaseBusy as e:
        raise RegistryError(f"another promotion or rollback of {model_name} is running: {e}") \
            from e
    except StorageError as e:
        raise RegistryUnavailable(f"cannot take the promotion lease of {model_name}: {e}") from e


# --------------------------------------------------------------------------------------------
# Promote and roll back
# --------------------------------------------------------------------------------------------


def _history(rm) -> list[str]:
    """The champion history, reconciled with the ``champion`` alias (the source of truth)."""
    try:
        history = [str(v) for v in json.loads((rm.tags or {}).get(HISTORY_TAG, "[]"))]
    except (ValueError, TypeError):
        history = []
    champion = _aliases(rm).get(CHAMPION)
    if champion is not None and (not history or history[-1] != str(champion)):
        history.append(str(champion))  # the alias was moved outside promote/rollback
    return history


def _write_history(client, name: str, history: list[str]) -> None:
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history[-200:]))


def _eval_value(mv, metric: str) -> float | None:
    v = (mv.tags or {}).get(f"eval.{metric}")
    return None if v is None else float(v)


def _gate(mv, cfg: RegistryConfig) -> tuple[bool, str]:
    """The absolute thresholds on a version's recorded evaluation."""
    for metric, bound in sorted(cfg.thresholds.items()):
        v = _eval_value(mv, metric)
        lower = LOWER_IS_BETTER[metric]
        if v is None:
            return False, f"v{mv.version} has no eval.{metric} for the threshold {bound:g}"
        if not math.isfinite(v) or (v > bound if lower else v < bound):
            return False, (f"v{mv.version} {metric} {v:g} fails the threshold "
                           f"{'<=' if lower else '>='} {bound:g}")
    return True, "passes " + (", ".join(f"{m} {'<=' if LOWER_IS_BETTER[m] else '>='} {b:g}"
                                       for m, b in sorted(cfg.thresholds.items()))
                              or "(no thresholds set)")


def improvement(challenger: float, champion: float, metric: str) -> float:
    """Relative improvement of the challenger over the champion (positive: better)."""
    diff = champion - challenger if LOWER_IS_BETTER[metric] else challenger - champion
    return diff / max(abs(champion), 1e-12)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def promote(
    model_name: str,
    version: str | None = None,
    *,
    tracking_uri: str,
    cfg: RegistryConfig,
    lock_dir: str,
    evaluate: Callable[[str], dict] | None = None,
    lock_options: dict | None = None,
) -> dict:
    """Make ``version`` (default: the ``challenger``) the ``champion`` if the gate passes.

    When the champion was evaluated on another set or seeds (``eval.key`` differs), ``evaluate``
    re-evaluates it on the challenger's (it gets ``models:/<name>/<champion version>`` and returns
    an evaluation dict); without it the promotion is refused rather than compare unlike numbers.
    ``lock_options``: storage options for ``lock_dir`` (default: from the environment).
    """
    metric = cfg.metric
    with _mlflow(tracking_uri, cfg, f"promote {model_name}") as client, \
            _lease(lock_dir, model_name, cfg, lock_options):
        rm = _registered_model(client, model_name)
        if version is None:
            version = _aliases(rm).get(CHALLENGER)
            if version is None:
                raise RegistryError(f"{model_name} has no @{CHALLENGER} to promote (it has "
                                    f"{_aliases_text(rm)}); register a model or pass a version")
        chall = _version(client, model_name, str(version))
        chall_value = _eval_value(chall, metric)
        if chall_value is None:
            raise RegistryError(f"{model_name} v{chall.version} has no eval.{metric} tag; "
                                "register it with an evaluation that has this metric or change "
                                "registry.metric")
        history = _history(rm)
        previous = _aliases(rm).get(CHAMPION)
        result = {"promoted": False, "reason": "", "champion": previous, "previous": previous,
                  "challenger": str(chall.version), "metric": metric,
                  "challenger_value": chall_value, "champion_value": None, "margin": cfg.margin,
                  "improvement": None}
        if previous is not None and str(previous) == str(chall.version):
            return result | {"reason": f"v{chall.version} is already the champion"}
        policy = json.dumps({"metric": metric, "margin": cfg.margin,
                             "thresholds": cfg.thresholds}, sort_keys=True)
        earlier = _earlier_rejection(chall, previous, policy)
        if earlier is not None:  # the same challenger, champion and policy: the same verdict
            if earlier["champion_value"] is not None:
                earlier["improvement"] = improvement(chall_value, earlier["champion_value"],
                                                     metric)
            return result | earlier
        champ = _version(client, model_name, str(previous)) if previous is not None else None
        ok, reason = _gate(chall, cfg)
        if not math.isfinite(chall_value):
            ok, reason = False, f"v{chall.version} {metric} is {chall_value}, not a number to judge"
        if ok and champ is not None:
            champ_value = _champion_value(model_name, chall, champ, metric, evaluate)
            gain = improvement(chall_value, champ_value, metric)
            result |= {"champion_value": champ_value, "improvement": gain}
            ok = math.isfinite(gain) and gain > 0 and gain >= cfg.margin
            reason = (f"{metric} {chall_value:g} vs champion v{champ.version} {champ_value:g}: "
                      f"{gain:+.2%} {'meets' if ok else 'misses'} the required "
                      f"{max(cfg.margin, 0):.2%} improvement")
        elif ok:
            reason = f"first champion: {reason}"
        at = _now()
        record = {"decision": "promoted" if ok else "rejected", "at": at,
                  "challenger": str(chall.version), "against": str(previous) if previous else None,
                  "metric": metric, "challenger_value": chall_value,
                  "champion_value": result["champion_value"], "margin": cfg.margin,
                  "reason": reason}
        for k, v in {"promotion.decision": record["decision"], "promotion.at": at,
                     "promotion.against": record["against"] or "none",
                     "promotion.metric": metric, "promotion.challenger_value": _tag_value(
                         chall_value),
                     "promotion.champion_value": "none" if result["champion_value"] is None
                     else _tag_value(result["champion_value"]),
                     "promotion.margin": _tag_value(cfg.margin),
                     "promotion.policy": policy,
                     "promotion.reason": reason[:4000]}.items():
            client.set_model_version_tag(model_name, chall.version, k, v)
        if champ is not None:
            client.set_model_version_tag(model_name, champ.version,
                                         f"promotion.challenge.v{chall.version}",
                                         json.dumps(record))
        if ok:
            # alias first: it is the source of truth, and _history reconciles a missed write
            client.set_registered_model_alias(model_name, CHAMPION, chall.version)
            history.append(str(chall.version))
            _write_history(client, model_name, history)
            if champ is not None:
                client.set_model_version_tag(model_name, champ.version, "promotion.superseded_by",
                                             str(chall.version))
            if _aliases(rm).get(CHALLENGER) == str(chall.version):
                client.delete_registered_model_alias(model_name, CHALLENGER)
        return result | {"promoted": ok, "reason": reason,
                         "champion": str(chall.version) if ok else previous}


def _earlier_rejection(chall, champion: str | None, policy: str) -> dict | None:
    """The recorded verdict when ``chall`` was already rejected against this same champion
    under the same policy (metric, margin, thresholds): judging again would re-evaluate a
    champion and rewrite the same tags for the same answer, on every unchanged scheduled run.
    A new champion or a changed policy is judged afresh."""
    tags = chall.tags or {}
    if (tags.get("promotion.decision") != "rejected"
            or tags.get("promotion.against") != (str(champion) if champion else "none")
            or tags.get("promotion.policy") != policy):
        return None
    recorded = tags.get("promotion.champion_value", "none")
    return {"reason": f"{tags.get('promotion.reason', 'rejected')} (decided at "
                      f"{tags.get('promotion.at', '?')}; unchanged since)",
            "champion_value": None if recorded == "none" else float(recorded),
            "decided_at": tags.get("promotion.at"), "reused": True}


def _champion_value(name: str, chall, champ, metric: str,
                    evaluate: Callable[[str], dict] | None) -> float:
    key = (chall.tags or {}).get(EVAL_KEY_TAG)
    if (champ.tags or {}).get(EVAL_KEY_TAG) == key:
        v = _eval_value(champ, metric)
        if v is not None:
            return v
    if evaluate is None:
        raise RegistryError(
            f"{name} champion v{champ.version} was evaluated on another set or seeds (eval.key "
            f"{(champ.tags or {}).get(EVAL_KEY_TAG)} vs {key}); pass evaluate= to re-evaluate it "
            "on the challenger's set, or evaluate both the same way")
    ev = evaluate(f"models:/{name}/{champ.version}")
    if str(ev.get("eval_key")) != str(key):
        raise RegistryError(f"re-evaluating {name} v{champ.version} gave eval_key "
                            f"{ev.get('eval_key')}, not the challenger's {key}; the evaluate "
                            "callable must use the challenger's set and seeds")
    try:
        return float(ev["metrics"][metric])
    except (KeyError, TypeError, ValueError) as e:
        raise RegistryError(f"re-evaluating {name} v{champ.version} gave no {metric}") from e


def rollback(model_name: str, *, tracking_uri: str, lock_dir: str,
             cfg: RegistryConfig | None = None, lock_options: dict | None = None) -> dict:
    """Move ``champion`` back to its previous holder (the history's second-to-last entry)."""
    cfg = cfg or RegistryConfig()
    with _mlflow(tracking_uri, cfg, f"roll back {model_name}") as client, \
            _lease(lock_dir, model_name, cfg, lock_options):
        rm = _registered_model(client, model_name)
        current = _aliases(rm).get(CHAMPION)
        if current is None:
            raise RegistryError(f"{model_name} has no @{CHAMPION} to roll back (it has "
                                f"{_aliases_text(rm)}); promote a version first")
        history = _history(rm)
        if len(history) < 2:
            raise RegistryError(f"{model_name} has no previous champion to roll back to "
                                f"(champion history: {history}); promote another version instead")
        history.pop()
        target = history[-1]
        _version(client, model_name, target)  # still there?
        at = _now()
        client.set_registered_model_alias(model_name, CHAMPION, target)
        _write_history(client, model_name, history)
        client.set_model_version_tag(model_name, current, "promotion.decision", "rolled_back")
        client.set_model_version_tag(model_name, current, "promotion.rolled_back_at", at)
        client.set_model_version_tag(model_name, target, "promotion.restored_at", at)
        client.set_model_version_tag(model_name, target, "promotion.restored_from", str(current))
        return {"champion": target, "previous": str(current), "history": history}
