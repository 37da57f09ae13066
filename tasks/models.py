"""Model references → models: the one reader of a model for every stage.

A reference is ``models:/<name>@<alias>`` or ``models:/<name>/<version>`` (the MLflow registry),
a training checkpoint directory (which holds ``model/`` and ``state.json``), or a saved model
directory (``model.safetensors`` + ``config.json``, :mod:`diffusion.serialization`), local or on
object storage. Weights are checked against their recorded digest before they are parsed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from diffusion.serialization import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    load_model_bytes,
    sha256_hex,
    unet_from_state,
)
from tasks import registry, tracking
from tasks.errors import EvalError
from tasks.runtime import RuntimeConfig
from tasks.storage import Location, call, exists, read_json, storage_options


@dataclass
class LoadedModel:
    model: Any  # a UNet in eval mode
    config: dict  # {"unet", "diffusion", "class_names", ...}
    weights_sha256: str
    source: str
    defaults: dict | None = None  # the sampling defaults recorded at registration (models:/)
    version: str | None = None  # the registry version (models:/)


def _model_files(ref: str, runtime: RuntimeConfig) -> tuple[Location, bytes, bytes, dict]:
    """The model directory at ``ref`` (a training checkpoint's ``model/`` or a saved model
    directory, local or on object storage): its location, weights, config.json, and the
    checkpoint's state.json when ``ref`` is a checkpoint (else {})."""
    loc = Location.of(ref, storage_options(ref, runtime))
    checkpoint_state: dict = {}
    if not exists(loc.child(CONFIG_FILE)) and exists(loc.child("model", CONFIG_FILE)):
        if exists(loc.child("state.json")):  # a training checkpoint: which run, data, step
            checkpoint_state = read_json(loc.child("state.json"))
        loc = loc.child("model")
    if not exists(loc.child(CONFIG_FILE)):
        raise EvalError(f"{loc.describe()} is neither a model directory ({CONFIG_FILE} + "
                        f"{WEIGHTS_FILE}) nor a training checkpoint (model/{CONFIG_FILE}); pass "
                        "a checkpoint URI from `diffusion-pipeline train` or "
                        "models:/<name>@<alias>")
    weights = call(loc, loc.fs.cat_file, loc.child(WEIGHTS_FILE).path)
    config_bytes = call(loc, loc.fs.cat_file, loc.child(CONFIG_FILE).path)
    return loc, weights, config_bytes, checkpoint_state


def load_model_ref(ref: str, runtime: RuntimeConfig) -> LoadedModel:
    """A model from ``models:/...`` (the registry), a training checkpoint directory (which holds
    ``model/``) or a saved model directory (``model.safetensors`` + ``config.json``), local or on
    object storage. The weights are checked against their recorded digest before use."""
    if ref.startswith("models:/"):
        uri = tracking.tracking_uri(runtime, runtime.root_location())
        # Resolved once, to a version: an alias that moves meanwhile cannot pair one version's
        # weights with another's digest or lineage.
        info = registry.resolve(ref, uri)
        model, config, defaults = registry.load_version(
            f"models:/{info['name']}/{info['version']}", uri)
        tags = info["tags"]
        if "dataset.name" in tags and "dataset.version" in tags:
            config.setdefault("dataset", {"name": tags["dataset.name"],
                                          "version": tags["dataset.version"]})
        return LoadedModel(model, config, tags.get("weights_sha256", ""), ref, defaults,
                           str(info["version"]))
    loc, weights, config_bytes, checkpoint_state = _model_files(ref, runtime)
    state, config = load_model_bytes(weights, config_bytes, name=loc.child(WEIGHTS_FILE).describe())
    if "unet" not in config or "diffusion" not in config:
        raise EvalError(f"{loc.child(CONFIG_FILE).describe()} has no 'unet'/'diffusion' section; "
                        "it was not written by the training stage")
    for key in ("dataset", "run_name", "step"):
        if key in checkpoint_state:
            config.setdefault(key, checkpoint_state[key])
    return LoadedModel(unet_from_state(config, state), config, sha256_hex(weights), loc.describe())


def fetch_model_dir(ref: str, runtime: RuntimeConfig, dst: str) -> str:
    """Copy the model directory (``model.safetensors`` + ``config.json``) of a training
    checkpoint or saved model at ``ref`` (local or object storage) into ``dst``, verified against
    its recorded digest first; returns ``dst``."""
    loc, weights, config_bytes, _ = _model_files(ref, runtime)
    load_model_bytes(weights, config_bytes, name=loc.child(WEIGHTS_FILE).describe())
    os.makedirs(dst, exist_ok=True)
    for name, data in ((WEIGHTS_FILE, weights), (CONFIG_FILE, config_bytes)):
        with open(os.path.join(dst, name), "wb") as f:
            f.write(data)
    return dst
