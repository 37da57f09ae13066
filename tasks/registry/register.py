"""Register: trained weights → an MLflow model version that is the new ``challenger``.

:func:`register_model` logs the model as a pyfunc written as code (:mod:`tasks.registry.pyfunc`),
registers a version with lineage, digest and evaluation tags, and, as the very last step, points
the ``challenger`` alias at it. A re-run with the same weights and run finds that version again.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from tasks.errors import RegistryError
from tasks.registry.config import (
    CHALLENGER,
    CONFIG_TAG,
    EVAL_KEY_TAG,
    MODEL_NAME_RE,
    SERVING_FILE,
    WEIGHTS_TAG,
    RegistryConfig,
    _tag_value,
)
from tasks.registry.lineage import lineage_tags
from tasks.registry.pyfunc import _log_pyfunc
from tasks.registry.refs import _aliases
from tasks.registry.session import _FLUENT_GUARD, _error_code, _fluent_tracking_uri, _mlflow
from tasks.tracking import EXPERIMENT, artifact_root

log = logging.getLogger(__name__)


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


def evaluation_split(evaluation: dict) -> str:
    """The dataset split an evaluation measured against: its ``dataset.split`` (or its config's
    ``split``); 'val' for an evaluation stored before the split was recorded."""
    return str((evaluation.get("dataset") or {}).get("split")
               or (evaluation.get("config") or {}).get("split") or "val")


def _check_evaluation(evaluation: dict) -> dict[str, float]:
    if not isinstance(evaluation, dict) or not isinstance(evaluation.get("metrics"), dict) \
            or not evaluation.get("eval_key"):
        raise RegistryError("evaluation must be the dict tasks.evaluate returns, with 'eval_key' "
                            "and 'metrics'")
    split = evaluation_split(evaluation)
    if split != "val":
        # the gate, the default sampler and the champion's tags read what is registered: only
        # the selection split may decide; the locked test split is for reports
        raise RegistryError(
            f"evaluation {evaluation['eval_key']} was made on the {split} split "
            f"(evaluate.split={split}); the {split} split only reports a model and never "
            "decides. Register with an evaluation on the selection split (evaluate.split=val)")
    return {k: float(v) for k, v in evaluation["metrics"].items()
            if isinstance(v, int | float) and not isinstance(v, bool)}


def _serving_document(digest: str, config_digest: str, model_name: str,
                      defaults: dict) -> dict:
    """serving.json: the weights' and config's digests, the model name (the served model
    checks both digests against this model's versions in the registry) and the sampling
    defaults, checked."""
    from tasks.pyfunc_model import serving_document

    try:
        return serving_document(digest, defaults, config_sha256=config_digest,
                                model_name=model_name)
    except (KeyError, TypeError, ValueError) as e:
        raise RegistryError(f"bad sampling defaults {defaults!r}: {e}; pass {{'sampler': "
                            "SamplerConfig fields, 'guidance_scale': float}") from e


def _version_tags(evaluation: dict, lineage: dict[str, str], digest: str, config_digest: str,
                  metrics: dict[str, float]) -> dict[str, str]:
    """The new version's tags: lineage, the weights' digest, the evaluation key and metrics."""
    tags = lineage_tags(evaluation, lineage)
    tags |= {WEIGHTS_TAG: digest, CONFIG_TAG: config_digest,
             EVAL_KEY_TAG: str(evaluation["eval_key"])}
    tags |= {f"eval.{k}": _tag_value(v) for k, v in metrics.items()}
    return tags


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


def _create_version(client, tracking_uri: str, model_name: str, run_id: str,
                    files: dict[str, str], serving: dict, tags: dict[str, str]):
    """Log the pyfunc into ``run_id`` (``files``: the weights and config paths; serving.json is
    written here) and register it as a new version of ``model_name``."""
    with tempfile.TemporaryDirectory() as d:
        serving_path = Path(d) / SERVING_FILE
        serving_path.write_text(json.dumps(serving, indent=2, sort_keys=True))
        info = _log_pyfunc(tracking_uri, client, run_id, files | {"serving": str(serving_path)})
    _ensure_registered_model(client, model_name)
    # MLflow's SQL registry store looks the logged model up through the *global* tracking
    # URI (its own TODO in SqlAlchemyStore.create_model_version), not the client's.
    with _FLUENT_GUARD, _fluent_tracking_uri(tracking_uri):
        return client.create_model_version(
            model_name, source=info.model_uri, run_id=run_id, tags=tags,
            await_creation_for=0, model_id=info.model_id)


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
    if not MODEL_NAME_RE.match(model_name or ""):
        raise RegistryError(f"model name {model_name!r}: use letters, digits, '.', '_', '-'")
    weights_path, config_path, digest, _ = _read_model_dir(model_dir)
    metrics = _check_evaluation(evaluation)
    from diffusion.serialization import sha256_hex

    config_digest = sha256_hex(Path(config_path).read_bytes())
    serving = _serving_document(digest, config_digest, model_name, defaults)
    tags = _version_tags(evaluation, lineage, digest, config_digest, metrics)

    with _mlflow(tracking_uri, cfg, f"register {model_name}") as client:
        if run_id is None:
            run_id = _new_run(client, tracking_uri, model_name,
                              {k: v for k, v in tags.items() if not k.startswith("eval.")})
        mv = _find_registered(client, model_name, digest, run_id)
        fresh = mv is None
        if fresh:
            mv = _create_version(client, tracking_uri, model_name, run_id,
                                 {"weights": str(weights_path), "config": str(config_path)},
                                 serving, tags)
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
