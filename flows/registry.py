"""The registry flows: ``register`` (evaluate → log and register a version as ``challenger``),
``promote`` (the gate: ``challenger`` → ``champion``) and ``rollback``."""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.config import PipelineConfig
from flows.evaluate import evaluate_task
from flows.hooks import flow_run_id
from flows.retry import transient_retries
from tasks.errors import ConfigError, RegistryError
from tasks.models import fetch_model_dir
from tasks.registry import (
    RegistryConfig,
    default_lock_dir,
    lineage_from,
    model_name_for,
    promote,
    register_model,
    resolve,
    rollback,
)
from tasks.stages import execute
from tasks.storage import storage_options

# Registry calls change shared state: never answered from a cache.
_RETRY = transient_retries() | {"cache_policy": NO_CACHE}


@task(name="register", task_run_name="register {model_name}", **_RETRY)
def register_task(model_dir: str, *, tracking_uri: str, run_id: str | None, cfg: dict,
                  model_name: str, evaluation: dict, lineage: dict, defaults: dict) -> dict:
    """:func:`tasks.registry.register_model` (``cfg``: the ``registry`` section as JSON); the
    version's lineage records the flow run it was registered in (``prefect.flow_run_id``)."""
    if (run := flow_run_id()) is not None:
        lineage = {"prefect.flow_run_id": run} | lineage
    return register_model(model_dir, tracking_uri=tracking_uri, run_id=run_id,
                          cfg=RegistryConfig(**cfg), model_name=model_name,
                          evaluation=evaluation, lineage=lineage, defaults=defaults)


@task(name="promote", task_run_name="promote {model_name}", **_RETRY)
def promote_task(model_name: str, version: str | None = None, *, tracking_uri: str,
                 cfg: dict, lock_dir: str,
                 evaluate: Callable[[str], dict] | None = None,
                 lock_options: dict | None = None, explicit: bool = False,
                 paired: Callable[[str], dict | None] | None = None,
                 replace_broken: bool = False) -> dict:
    """:func:`tasks.registry.promote`; the decision is in the returned dict (a refusal is not a
    failure)."""
    return promote(model_name, version, tracking_uri=tracking_uri,
                   cfg=RegistryConfig(**cfg), lock_dir=lock_dir, evaluate=evaluate,
                   lock_options=lock_options, explicit=explicit, paired=paired,
                   replace_broken=replace_broken)


@task(name="rollback", task_run_name="rollback {model_name}", **_RETRY)
def rollback_task(model_name: str, *, tracking_uri: str, lock_dir: str,
                  cfg: dict | None = None, lock_options: dict | None = None) -> dict:
    """:func:`tasks.registry.rollback`."""
    return rollback(model_name, tracking_uri=tracking_uri, lock_dir=lock_dir,
                    cfg=RegistryConfig(**(cfg or {})), lock_options=lock_options)


def require_selection_split(cfg: PipelineConfig) -> None:
    """Registration and promotion judge on the selection split (``val``); the locked test split
    (``evaluate.split=test``) is for reports that no decision reads, so a flow that decides
    refuses it before any work."""
    if cfg.evaluate.split != "val":
        raise ConfigError(
            f"evaluate.split={cfg.evaluate.split}: registration and promotion judge models on "
            "the selection split (val); the test split is locked for reports. Drop the "
            "override here, and report on test with `diffusion-pipeline evaluate --set "
            "evaluate.split=test`")


def _context(config: PipelineConfig | dict):
    from tasks import tracking

    cfg = PipelineConfig.model_validate(config)
    root = cfg.runtime.root_location()
    uri = tracking.tracking_uri(cfg.runtime, root)
    return cfg, root, uri, model_name_for(cfg.registry, cfg.data.name)


@flow(name="register", log_prints=True)
def register_flow(config: PipelineConfig, model: str | None = None) -> dict:
    """Evaluate ``model`` (default: the finished training run ``config`` names; a stored
    evaluation is reused) and register it as a new version with the ``challenger`` alias."""
    from diffusion.samplers import SamplerConfig
    from tasks import tracking
    from tasks.train import finished_run

    cfg, _root, uri, name = _context(config)
    require_selection_split(cfg)
    if model is None:
        run = finished_run(cfg.data, cfg.model, cfg.diffusion, cfg.train, cfg.runtime)
    else:
        if model.startswith("models:/"):
            raise RegistryError(f"{model} is already registered; register takes a training "
                             "checkpoint (or the config's finished run)")
        run = {"checkpoint_uri": model}
    evaluation = evaluate_task(run["checkpoint_uri"], cfg.to_json_dict())
    run_id = tracking.find_run(uri, run["run_name"]) if run.get("run_name") else None
    lineage = lineage_from({"dataset": evaluation["dataset"], "run_name": run.get("run_name"),
                            "checkpoint_uri": run["checkpoint_uri"], "mlflow_run_id": run_id},
                           cfg.fingerprint())
    d = evaluation["default_sampler"]
    defaults = {"sampler": dataclasses.asdict(SamplerConfig(d["name"], steps=d["steps"])),
                "guidance_scale": evaluation["guidance_scale"],
                "max_rows": cfg.registry.serving_max_rows}
    with tempfile.TemporaryDirectory() as tmp:
        local = fetch_model_dir(run["checkpoint_uri"], cfg.runtime, f"{tmp}/model")
        res = register_task(local, tracking_uri=uri, run_id=run_id,
                            cfg=cfg.registry.model_dump(mode="json"), model_name=name,
                            evaluation=evaluation, lineage=lineage, defaults=defaults)
    if run_id:
        from tasks.evaluate import table

        tracking.log_evaluation(uri, run_id, evaluation, table(evaluation))
    return res | {"evaluation": evaluation, "tracking_uri": uri}


@flow(name="promote", log_prints=True)
def promote_flow(config: PipelineConfig, version: str | None = None,
                 explicit: bool = False, replace_broken: bool = False) -> dict:
    """Promote ``version`` (default: the ``challenger``) to ``champion`` if it passes the gate.
    A champion evaluated on another set or seeds is re-evaluated on the challenger's.
    ``explicit``: a person named this version (``promote --version``), so a version that was
    rolled back is judged again; scheduled runs never promote one. ``replace_broken``: a
    person replaces a champion whose metric is not a number (``promote
    --replace-broken-champion``), the challenger judged on the absolute gates alone."""
    cfg, root, uri, name = _context(config)
    require_selection_split(cfg)

    def reevaluate(champion_ref: str) -> dict:
        ref = f"models:/{name}/{version}" if version else f"models:/{name}@challenger"
        challenger = resolve(ref, uri)["tags"]
        # the evaluate stage: here, or as a Ray Job when the cluster is reached through the
        # Jobs API (this runs inside promote_task: its run logger takes the lines)
        from prefect.logging import get_run_logger

        return execute("evaluate", {"model_ref": champion_ref, "config": cfg.to_json_dict(),
                                    "dataset_version": challenger.get("dataset.version")},
                       echo=get_run_logger().info)

    def paired(model_ref: str) -> dict | None:
        # the version's evaluation under the challenger's key: stored (a read) or made now
        from tasks.evaluate import load_paired

        ev = reevaluate(model_ref)
        stored = ev.get("stored_at")
        return load_paired(ev, storage_options(stored, cfg.runtime)) if stored else None

    res = promote_task(name, version, tracking_uri=uri, cfg=cfg.registry.model_dump(mode="json"),
                       lock_dir=default_lock_dir(root.url), evaluate=reevaluate,
                       lock_options=storage_options(root.url, cfg.runtime), explicit=explicit,
                       paired=paired, replace_broken=replace_broken)
    return res | {"name": name, "tracking_uri": uri}


@flow(name="rollback", log_prints=True)
def rollback_flow(config: PipelineConfig) -> dict:
    """Move ``champion`` back to its previous holder."""
    cfg, root, uri, name = _context(config)
    res = rollback_task(name, tracking_uri=uri, lock_dir=default_lock_dir(root.url),
                        lock_options=storage_options(root.url, cfg.runtime),
                        cfg=cfg.registry.model_dump(mode="json"))
    return res | {"name": name, "tracking_uri": uri}
