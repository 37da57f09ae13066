"""Model references in the registry: ``models:/<name>@<alias>`` or ``models:/<name>/<version>``
→ the version (:func:`resolve`), or the UNet with its weights checked against the registered
digest before a single tensor is parsed (:func:`load_version`); the lookups of registered models,
versions and aliases that the other registry modules share."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

from tasks.errors import RegistryError
from tasks.registry.config import CONFIG_TAG, SERVING_FILE, WEIGHTS_TAG, RegistryConfig
from tasks.registry.session import _error_code, _mlflow

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


# A version's files, at fixed paths in its folder in the artifact store (where
# ``mlflow.pyfunc.log_model`` puts the artifacts tasks.registry gives it) and downloaded to the
# same paths under a new folder: no path the store lists chooses where a file is written.
_MLMODEL = "MLmodel"


def _files() -> dict[str, str]:
    """The artifacts' fixed paths in the model's folder (diffusion.serialization imports torch,
    which the registry's other lookups do not need)."""
    from diffusion.serialization import CONFIG_FILE, WEIGHTS_FILE

    return {"weights": f"artifacts/{WEIGHTS_FILE}", "config": f"artifacts/{CONFIG_FILE}",
            "serving": f"artifacts/{SERVING_FILE}"}


def _listed(name: str, key: str, path: object, fixed: str) -> None:
    """Refuse an MLmodel that lists the ``key`` artifact anywhere but its ``fixed`` path."""
    if not isinstance(path, str) or PurePosixPath(path).is_absolute() or "\\" in path \
            or ".." in PurePosixPath(path).parts:
        raise RegistryError(
            f"{name}: its MLmodel lists the {key} at {path!r}, outside the model's folder; the "
            "version's artifacts were modified; refusing to download it; re-register it")
    if path != fixed:
        raise RegistryError(
            f"{name}: its MLmodel lists the {key} at {path!r}, not {fixed!r} where "
            "tasks.registry puts it; register the model with tasks.registry")


def _download(name: str, base: str, rel: str, out: Path, tracking_uri: str) -> Path:
    """The file ``rel`` of the model's folder ``base``, downloaded to ``out/rel``: what MLflow
    returns must be that path, a regular file that resolves inside ``out``."""
    import mlflow.artifacts

    want = out / rel
    want.parent.mkdir(parents=True, exist_ok=True)
    got = mlflow.artifacts.download_artifacts(
        artifact_uri=f"{base}/{rel}", dst_path=str(want.parent), tracking_uri=tracking_uri)
    if os.path.abspath(got) != str(want) or want.is_symlink() or not want.is_file() \
            or not Path(os.path.realpath(want)).is_relative_to(os.path.realpath(out)):
        raise RegistryError(
            f"{name}: the artifact store gave {got} for {rel}, not the file {want}; the "
            "version's artifacts were modified; re-register it")
    return want


def load_version(
    model_ref: str, tracking_uri: str, dst: str | None = None
) -> tuple[Any, dict, dict]:
    """``(UNet in eval mode, config, defaults)`` of a registered version.

    Only MLmodel, the weights, config.json and serving.json are downloaded, each from its fixed
    path in the version's folder to the same path under ``dst`` (a new or empty folder, kept) or
    a temporary directory; an MLmodel that lists them anywhere else is refused before anything
    else is downloaded. The weights are checked against the version's ``weights_sha256`` tag
    before they are parsed: a tampered or truncated file raises
    :class:`diffusion.serialization.WeightsIntegrityError` and no tensor is ever built from it.
    """
    from mlflow.models import Model

    from diffusion.serialization import unet_from_bytes

    with contextlib.ExitStack() as stack:
        client = stack.enter_context(_mlflow(tracking_uri, RegistryConfig(), f"load {model_ref}"))
        info = _resolve(client, model_ref)
        name = f"{model_ref} (v{info['version']})"
        expected = info["tags"].get(WEIGHTS_TAG)
        if not expected:
            raise RegistryError(
                f"{name} has no {WEIGHTS_TAG} tag: it was not registered by tasks.registry, so "
                "its weights cannot be checked")
        base = client.get_model_version_download_uri(info["name"], info["version"]).rstrip("/")
        if dst:
            out = Path(os.path.abspath(dst))
            out.mkdir(parents=True, exist_ok=True)
            if any(out.iterdir()):
                raise RegistryError(f"{out} is not empty; load {model_ref} into a new or empty "
                                    "folder")
        else:
            out = Path(stack.enter_context(tempfile.TemporaryDirectory()))

        mlmodel = _download(name, base, _MLMODEL, out, tracking_uri)
        flavor = Model.load(str(mlmodel)).flavors.get("python_function", {})
        arts = {k: v.get("path") if isinstance(v, dict) else v
                for k, v in (flavor.get("artifacts") or {}).items()}
        files = _files()
        if not set(files) <= set(arts):
            raise RegistryError(f"{model_ref} is not a diffusion-pipeline pyfunc (artifacts: "
                                f"{sorted(arts)}); register it with tasks.registry")
        for key, fixed in files.items():
            _listed(name, key, arts[key], fixed)
        paths = {k: _download(name, base, rel, out, tracking_uri) for k, rel in files.items()}
        serving = json.loads(paths["serving"].read_text())
        if serving.get("weights_sha256") != expected:
            from diffusion.serialization import WeightsIntegrityError

            raise WeightsIntegrityError(
                f"{model_ref}: serving.json records weights {serving.get('weights_sha256')}, the "
                f"registry {expected}; the version's artifacts were modified; re-register it")
        config_bytes = paths["config"].read_bytes()
        recorded = info["tags"].get(CONFIG_TAG)  # versions registered since it was recorded
        if recorded is not None and hashlib.sha256(config_bytes).hexdigest() != recorded:
            from diffusion.serialization import WeightsIntegrityError

            raise WeightsIntegrityError(
                f"{model_ref}: config.json is not the one registered (the registry records "
                f"sha256 {recorded[:12]}); the version's artifacts were modified; re-register it")
        model, config = unet_from_bytes(
            paths["weights"].read_bytes(), config_bytes, expected_sha256=expected,
            name=f"{model_ref} ({files['weights']})", require=("unet", "diffusion"))
        return model, config, serving["defaults"]
