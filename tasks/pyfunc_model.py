"""The registered model as an MLflow pyfunc written as code ("models from code"): no cloudpickle.

:func:`tasks.registry.register_model` logs this file with ``mlflow.pyfunc.log_model(python_model=
<this file>)``; MLflow copies it next to the model and runs it on load, and the
``mlflow.models.set_model`` call at the bottom names the model object. The ``diffusion`` package
travels with the model (``code_paths``). So this module imports only torch, numpy, pandas, mlflow
and ``diffusion``: never ``tasks.*``, Ray or Prefect (it runs inside ``mlflow models serve``).

Artifacts (from the registry): ``weights`` (model.safetensors), ``config`` (config.json: "unet",
"diffusion", "class_names") and ``serving`` (serving.json: the weights' SHA-256 and the sampling
defaults). ``load_context`` checks the weights against the recorded digest before parsing them.

Input table, one row per image (``dataframe_split`` / ``dataframe_records`` over HTTP):

    seed            int, required    the generation seed
    index           int, optional    sample index within the seed's stream (default 0)
    label           int, optional    class id; null/NaN/absent = unconditional
    sampler         str, optional    e.g. "ddim", "dpmpp_2m" (default: the registered sampler)
    steps           int, optional    grid points (default: the registered steps)
    guidance_scale  float, optional  classifier-free guidance w (default: the registered scale)

In the signature the optional numeric columns are ``Any`` (validated here instead): MLflow's
``long`` cannot hold the NaN a JSON null becomes, and its ``double`` refuses int64 input, so
either strict type would reject ordinary requests. Row (seed, index) draws its
noise from ``SampleNoise(seed, [index])``, so its image depends only on (seed, index, label,
sampler settings), never on the other rows: it equals sample ``index`` of a batch job run with
``seed``. Rows with the same settings are sampled as one batch (in chunks of ``batch_size``).

Output table, one row per input row, in order: ``seed``, ``index``, ``label`` (long, −1 =
unconditional), ``sampler``, ``steps``, ``guidance_scale`` (the resolved settings), ``height``,
``width``, ``channels`` and ``pixels``: the image as uint8 CHW bytes, base64-encoded (a JSON
string). Decode with ``np.frombuffer(base64.b64decode(p), np.uint8).reshape(c, h, w)``.
"""

from __future__ import annotations

import base64
import json
import math
import re
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import torch

from diffusion.noise import SampleNoise
from diffusion.pipeline import DiffusionConfig, sample_images
from diffusion.samplers import SamplerConfig
from diffusion.serialization import unet_from_bytes
from diffusion.unet import UNet, UNetConfig

SERVING_FORMAT = "diffusion-pipeline/pyfunc-v1"
INPUT_COLUMNS = ("seed", "index", "label", "sampler", "steps", "guidance_scale")
UNCONDITIONAL = -1  # the output label of an unconditional sample
DEFAULT_BATCH_SIZE = 256
DEFAULT_MAX_ROWS = 1024  # versions registered before serving.json recorded a bound get this


def signature():
    """The model signature: optional columns are ``required=False``."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema
    from mlflow.types.schema import AnyType

    inputs = Schema([
        ColSpec("long", "seed"),
        ColSpec(AnyType(), "index", required=False),
        ColSpec(AnyType(), "label", required=False),
        ColSpec("string", "sampler", required=False),
        ColSpec(AnyType(), "steps", required=False),
        ColSpec(AnyType(), "guidance_scale", required=False),
    ])
    outputs = Schema([
        ColSpec("long", "seed"),
        ColSpec("long", "index"),
        ColSpec("long", "label"),
        ColSpec("string", "sampler"),
        ColSpec("long", "steps"),
        ColSpec("double", "guidance_scale"),
        ColSpec("long", "height"),
        ColSpec("long", "width"),
        ColSpec("long", "channels"),
        ColSpec("string", "pixels"),
    ])
    return ModelSignature(inputs=inputs, outputs=outputs)


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA


def _whole(name: str, v: Any, row: int) -> int:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"row {row}: {name} must be a whole number, got {v!r}") from None
    if not math.isfinite(f) or f != int(f):
        raise ValueError(f"row {row}: {name} must be a whole number, got {v!r}")
    return int(f)


def resolve_rows(table: pd.DataFrame, defaults: dict, unet: UNetConfig, T: int) -> list[dict]:
    """One dict per input row with every setting resolved against ``defaults``; clear errors."""
    unknown = sorted(set(table.columns) - set(INPUT_COLUMNS))
    if unknown:
        raise ValueError(f"unknown input columns {unknown}; use {', '.join(INPUT_COLUMNS)}")
    if "seed" not in table.columns:
        raise ValueError("the input needs a 'seed' column (one row per image)")
    base = SamplerConfig(**defaults["sampler"])
    base_scale = float(defaults.get("guidance_scale", 1.0))
    n_cls = unet.num_classes
    rows = []
    for i, rec in enumerate(table.to_dict(orient="records")):
        seed = rec.get("seed")
        if _missing(seed):
            raise ValueError(f"row {i}: seed is missing")
        seed = _whole("seed", seed, i)
        index = 0 if _missing(rec.get("index")) else _whole("index", rec["index"], i)
        if index < 0:
            raise ValueError(f"row {i}: index must be >= 0, got {index}")
        label = None if _missing(rec.get("label")) else _whole("label", rec["label"], i)
        if label is not None and n_cls is None:
            raise ValueError(f"row {i}: label {label} given, but the model is unconditional")
        if label is not None and not 0 <= label < n_cls:
            raise ValueError(f"row {i}: label {label} is not a class id in 0..{n_cls - 1}")
        name = None if _missing(rec.get("sampler")) else str(rec["sampler"])
        steps = None if _missing(rec.get("steps")) else _whole("steps", rec["steps"], i)
        cfg = base if name is None or name == base.name else SamplerConfig(name=name)
        if steps is not None:
            cfg = replace(cfg, steps=steps)
        resolved_steps = cfg.resolved_steps(T)
        scale = base_scale if _missing(rec.get("guidance_scale")) else float(
            rec["guidance_scale"])
        if not math.isfinite(scale):
            raise ValueError(f"row {i}: guidance_scale must be finite, got {scale}")
        rows.append({"seed": seed, "index": index, "label": label, "sampler": cfg,
                     "steps": resolved_steps, "guidance_scale": scale})
    return rows


@torch.no_grad()
def generate(model: UNet, config: dict, defaults: dict, table: pd.DataFrame,
             batch_size: int = DEFAULT_BATCH_SIZE) -> pd.DataFrame:
    """Images for a request table (see the module docstring for the columns)."""
    max_rows = int(defaults.get("max_rows", DEFAULT_MAX_ROWS))
    if len(table) > max_rows:
        raise ValueError(
            f"the request has {len(table)} rows; this model makes at most {max_rows} images per "
            "request (registry.serving_max_rows when it was registered): split the request, or "
            "run a batch generation job (diffusion-pipeline generate) for large numbers")
    unet = model.config
    diffusion = DiffusionConfig.from_dict(config["diffusion"])
    schedule = diffusion.build_schedule()
    try:
        rows = resolve_rows(table, defaults, unet, schedule.T)
    except (TypeError, KeyError) as e:
        raise ValueError(f"bad request or sampler defaults: {e}") from None
    device = next(model.parameters()).device
    shape = (unet.in_channels, unet.resolution, unet.resolution)
    # Rows of one group share the sampler settings and (for guided rows) the scale; unlabelled
    # rows never go through guidance, so their image does not depend on labelled neighbours.
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(rows):
        guided = r["label"] is not None and unet.num_classes is not None
        groups.setdefault((r["sampler"], r["guidance_scale"] if guided else None, guided),
                          []).append(i)
    pixels: dict[int, torch.Tensor] = {}
    for (cfg, scale, guided), members in groups.items():
        noise = SampleNoise([rows[i]["seed"] for i in members],
                            [rows[i]["index"] for i in members], device=device)
        images = sample_images(
            model, schedule, shape, noise, cfg, prediction=diffusion.prediction,
            labels=[rows[i]["label"] for i in members] if guided else None,
            guidance_scale=scale if guided else 1.0, null_label=unet.num_classes,
            batch_size=batch_size)
        pixels.update(zip(members, images, strict=True))
    out = []
    for i, r in enumerate(rows):
        img = pixels[i].numpy()
        out.append({
            "seed": r["seed"], "index": r["index"],
            "label": UNCONDITIONAL if r["label"] is None else r["label"],
            "sampler": r["sampler"].name, "steps": r["steps"],
            "guidance_scale": r["guidance_scale"],
            "height": img.shape[1], "width": img.shape[2], "channels": img.shape[0],
            "pixels": base64.b64encode(img.tobytes()).decode("ascii"),
        })
    return pd.DataFrame(out, columns=["seed", "index", "label", "sampler", "steps",
                                      "guidance_scale", "height", "width", "channels", "pixels"])


def decode_pixels(row: dict) -> Any:
    """An output row's image as a uint8 numpy array [C, H, W]."""
    import numpy as np

    return np.frombuffer(base64.b64decode(row["pixels"]), np.uint8).reshape(
        int(row["channels"]), int(row["height"]), int(row["width"]))


def serving_document(weights_sha256: str, defaults: dict, *, config_sha256: str | None = None,
                     model_name: str | None = None) -> dict:
    """What ``serving.json`` holds: the weights' and config's digests, the registered model's
    name and the sampling defaults."""
    sampler = SamplerConfig(**defaults["sampler"])  # validates the name and options
    return {"format": SERVING_FORMAT, "weights_sha256": weights_sha256,
            "config_sha256": config_sha256, "model_name": model_name,
            "defaults": {"sampler": asdict(sampler),
                         "guidance_scale": float(defaults.get("guidance_scale", 1.0)),
                         "batch_size": int(defaults.get("batch_size", DEFAULT_BATCH_SIZE)),
                         "max_rows": int(defaults.get("max_rows", DEFAULT_MAX_ROWS))}}


REGISTRY_CHECK_ENV = "DIFFUSION_SERVING_REGISTRY_CHECK"


def check_against_registry(serving: dict, weights: bytes, config: bytes) -> None:
    """ValueError unless the weights and config.json being served are those a version of the
    registered model was registered with (its ``weights_sha256`` and ``config_sha256`` tags in
    the registry at MLflow's tracking URI), and the config matches serving.json's digest.

    serving.json lives in the artifact store beside the files it describes, so checking against
    it alone only catches damage, not a consistent replacement; the registry's tags are kept by
    the tracking server. (Whoever can write the artifact store can also replace this code, which
    serving runs: see docs/registry.md.) Versions registered before the digests were recorded
    have no model name in serving.json and are checked against serving.json only;
    ``DIFFUSION_SERVING_REGISTRY_CHECK=0`` does the same where serving has no registry access."""
    import hashlib
    import os

    digest, config_digest = hashlib.sha256(weights).hexdigest(), hashlib.sha256(config).hexdigest()
    if serving.get("config_sha256") not in (None, config_digest):
        raise ValueError(f"config.json (sha256 {config_digest[:12]}) is not the config this "
                         f"model was registered with (sha256 {serving['config_sha256'][:12]})")
    name = serving.get("model_name")
    if not name or os.environ.get(REGISTRY_CHECK_ENV, "1") == "0":
        return
    from mlflow import MlflowClient

    uri = mlflow.get_tracking_uri()
    # without user:password@ (to the last '@', as tasks.storage.redact; no tasks.* import here)
    shown = re.sub(r"://.*@", "://", uri, count=1, flags=re.S)
    try:
        found = MlflowClient(uri, uri).search_model_versions(
            f"name = '{name}' and tags.weights_sha256 = '{digest}'", max_results=100)
    except Exception as e:
        raise ValueError(
            f"cannot check the weights of {name} against the model registry at {shown}: "
            f"{str(e).replace(uri, shown)}. Set "
            "MLFLOW_TRACKING_URI to the registry the model came from, or "
            f"{REGISTRY_CHECK_ENV}=0 to check against serving.json only") from None
    if not any((mv.tags or {}).get("config_sha256") in (None, config_digest) for mv in found):
        raise ValueError(
            f"the weights (sha256 {digest[:12]}) and config (sha256 {config_digest[:12]}) being "
            f"served are not those any version of {name} in the registry at {uri} was "
            "registered with: the artifact store's files were changed; refusing to serve them")


class DiffusionImageModel(mlflow.pyfunc.PythonModel):
    """Seeds (and optional labels and sampler settings) in, images out."""

    def load_context(self, context) -> None:
        arts = context.artifacts
        serving = json.loads(Path(arts["serving"]).read_text())
        if serving.get("format") != SERVING_FORMAT:
            raise ValueError(f"{arts['serving']} is not a {SERVING_FORMAT} document")
        weights, config = Path(arts["weights"]).read_bytes(), Path(arts["config"]).read_bytes()
        # damaged weights are refused here, before any tensor is parsed (serving.json's digest)
        self.model, self.config = unet_from_bytes(
            weights, config, expected_sha256=serving["weights_sha256"], name=arts["weights"],
            require=("unet", "diffusion"))
        check_against_registry(serving, weights, config)  # and replaced ones before any use
        if torch.cuda.is_available():
            self.model.to("cuda")
        self.defaults = serving["defaults"]

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None):
        from mlflow.exceptions import MlflowException

        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        try:
            return generate(self.model, self.config, self.defaults, model_input,
                            batch_size=self.defaults.get("batch_size", DEFAULT_BATCH_SIZE))
        except ValueError as e:  # a bad request: HTTP 400 under `mlflow models serve`
            raise MlflowException.invalid_parameter_value(str(e)) from e


mlflow.models.set_model(DiffusionImageModel())
